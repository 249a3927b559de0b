"""Python environments shaped like a Colab image, built quickly from this machine's packages.

A virtual environment of its own (no system site-packages), to which a ``.pth`` file adds a
folder of links to every package this interpreter has, less the distributions named in ``hide``.
Then ``pins`` are installed into the environment itself, from the package index. So torch,
IPython and the rest come from here without a download, while the packages a test is about
(transformers, peft, datasets, ...) are exactly the versions it names, or absent.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

# What every test here hides: the packages whose versions the tests choose, and this project.
HF_STACK = {"transformers", "peft", "accelerate", "datasets", "bitsandbytes", "huggingface-hub",
            "tokenizers", "safetensors", "hf-xet", "qlora-series"}
WIDGETS = {"ipywidgets", "widgetsnbextension", "jupyterlab-widgets"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def index_reachable(timeout: float = 20) -> str | None:
    """None when pip can reach a package index, else the reason it cannot."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                   "--retries", "0", "--timeout", "10", "--no-cache-dir",
                                   "-d", tmp, "iniconfig"],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"pip download timed out after {timeout:.0f} s"
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def _hidden_entries(site: Path, hide: set[str]) -> set[str]:
    """Top-level names in ``site`` that belong to the hidden distributions."""
    out: set[str] = set()
    for dist in md.distributions(path=[str(site)]):
        if canonical(dist.metadata["Name"] or "") not in hide:
            continue
        out.add(Path(dist._path).name)  # the .dist-info folder
        for f in dist.files or ():
            parts = Path(f).parts
            if parts and parts[0] != "..":
                out.add(parts[0])
    return out


def make_env(where: Path, hide: set[str], pins: list[str] = ()) -> Path:
    """Build the environment in ``where``; return its python."""
    venv.create(where, with_pip=True)
    py = where / "bin" / "python"
    site = Path(sysconfig.get_paths()["purelib"])
    base = where / "base"
    base.mkdir()
    hidden = _hidden_entries(site, {canonical(h) for h in hide})
    for entry in site.iterdir():
        name = entry.name
        if (name in hidden or name.endswith(".pth") or name.startswith("__editable__")
                or name in ("pip", "setuptools", "_distutils_hack", "__pycache__")
                or re.match(r"(pip|setuptools)-.*\.dist-info", name)):
            continue
        (base / name).symlink_to(entry)
    own_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                    "['purelib'])"], capture_output=True, text=True,
                                   check=True).stdout.strip())
    (own_site / "zz_base.pth").write_text(str(base) + "\n")
    pip(py, "install", "-q", "--upgrade", "pip")  # as current as a Colab image's pip
    if pins:
        pip(py, "install", "-q", *pins)
    return py


def pip(py: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore",
           "PIP_NO_COMPILE": "1"}  # no .pyc of every file installed: these environments are short
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(py), "-m", "pip", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def versions(py: Path, *names: str) -> dict[str, str | None]:
    """The installed version of each distribution in the environment (None when absent)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    import json

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout)

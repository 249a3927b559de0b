"""The setup cell on environments shaped like Colab images, and the lowest versions the ranges
admit. Each test builds its environment from this machine's packages (tests/_envs.py) and takes
the rest from the package index, so the tests skip, saying why, where no index can be reached.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import _envs

ROOT = Path(__file__).resolve().parent.parent
NO_INDEX = _envs.index_reachable()
pytestmark = pytest.mark.skipif(
    NO_INDEX is not None, reason=f"no package index reachable ({NO_INDEX}): these tests install "
    "packages; run them where pip can download")

# Colab images as they come, before the setup cell: an older one (transformers 4, a peft that
# no transformers 5 works with, ipywidgets 7, no datasets, no bitsandbytes) and a current one.
OLDER_COLAB = ["transformers==4.57.1", "peft==0.17.1", "accelerate==1.10.1", "ipywidgets==7.7.1",
               "safetensors==0.6.2"]
# A current image: this machine's transformers, peft, accelerate and datasets, as Colab ships
# them, with ipywidgets 7 and no bitsandbytes.
CURRENT_COLAB = ["ipywidgets==7.7.1"]


def lower_bounds() -> list[str]:
    """``name==X`` for every ``name>=X`` of the package's requirements (torch excepted: the one
    here is the CPU build on disk, and its bound is the GPU card's torch)."""
    from packaging.requirements import Requirement

    pins = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        low = [s.version for s in req.specifier if s.operator == ">="]
        if low and req.name != "torch":
            pins.append(f"{req.name}=={low[0]}")
    return pins


def source_repo(tmp_path: Path) -> str:
    """A git URL of this checkout as it is now (committed or not): the files git tracks or
    would track, committed into a repository of their own."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    repo = tmp_path / "source"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "source"], check=True)
    return f"git+file://{repo}"


def run_notebook_alone(py: Path, name: str, source: str, tmp_path: Path) -> dict:
    """Notebook ``name`` executed by a kernel of that environment, as on a fresh runtime: its
    setup cell installs the series from ``source``; returns the run's manifest."""
    kernels = tmp_path / "jupyter"
    subprocess.run([str(py), "-m", "ipykernel", "install", "--prefix", str(kernels),
                    "--name", "colab-shaped"], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QLORA_RUN_DIR")}
    env.update(QLORA_SERIES_SOURCE=source, JUPYTER_PATH=str(kernels / "share" / "jupyter"),
               PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore",
               PIP_NO_COMPILE="1")
    run_dir, out = tmp_path / "run", tmp_path / f"{name}.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"),
                           str(out), "-k", "colab-shaped", "--cwd", str(tmp_path),
                           "-p", "RUN_DIR", str(run_dir)], env=env, capture_output=True,
                          text=True, timeout=1200)
    cells = json.loads(out.read_text())["cells"] if out.exists() else []
    setup = [c for c in cells if c["cell_type"] == "code"][:1]
    setup_output = "".join("".join(o["text"]) if isinstance(o.get("text"), list) else
                           o.get("text", "") for o in (setup[0]["outputs"] if setup else []))
    assert proc.returncode == 0, f"{setup_output}\n{proc.stderr[-4000:]}"
    return {"manifest": json.loads((run_dir / "manifest.json").read_text()),
            "setup_output": setup_output}


STACK = ("transformers", "peft", "accelerate", "huggingface-hub", "tokenizers", "datasets",
         "bitsandbytes", "ipywidgets")


def colab_image(image: str, tmp_path: Path) -> dict:
    """A Colab-shaped environment (``image``: "older" or "current"), the versions of the stack
    before and after notebook 03 ran alone there through its setup cell, and ``helpers.env``'s
    check of the result."""
    pins = OLDER_COLAB if image == "older" else CURRENT_COLAB
    hide = _envs.HF_STACK if image == "older" else {"bitsandbytes", "qlora-series"}
    py = _envs.make_env(tmp_path / "env", hide | _envs.WIDGETS, pins)
    before = _envs.versions(py, *STACK)
    done = run_notebook_alone(py, "03_lora_setup", source_repo(tmp_path), tmp_path)
    check = subprocess.run([str(py), "-m", "helpers.env"], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return {"before": before, "after": _envs.versions(py, *STACK), "done": done, "check": check}


def lowest_versions(tmp_path: Path) -> dict:
    """Every range's lower bound installed together, and notebooks 03 and 04 run on them."""
    pins = lower_bounds()
    hide = _envs.HF_STACK | _envs.WIDGETS | {p.split("==")[0] for p in pins}
    py = _envs.make_env(tmp_path / "env", hide, pins)
    want = dict(p.split("==") for p in pins)
    got = _envs.versions(py, *want)
    env = {**{k: v for k, v in os.environ.items() if k != "QLORA_RUN_DIR"}, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(py), "-m", "helpers.run", "--only", "03,04", "--run-dir",
                           str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    return {"want": want, "got": got, "proc": proc, "run": tmp_path / "run"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The three environments, built and run at the same time (each is mostly pip and a kernel
    waiting on its own processes): name -> a future whose result re-raises what failed."""
    jobs = {"older": lambda t: colab_image("older", t), "current": lambda t: colab_image("current", t),
            "lowest": lowest_versions}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job, tmp_path_factory.mktemp(name))
                   for name, job in jobs.items()}
        concurrent.futures.wait(futures.values())
    return futures


@pytest.mark.parametrize("image", ["older", "current"])
def test_setup_cell_on_a_colab_image_leaves_a_working_stack(image, installed):
    """The setup cell, from a local git URL, on a Colab-shaped environment: what it installs
    works together (transformers and peft above all), and notebook 03 then runs alone."""
    r = installed[image].result()
    before, after, done, check = r["before"], r["after"], r["done"], r["check"]
    assert before["bitsandbytes"] is None and before["ipywidgets"] == "7.7.1"
    print(image, "before:", before, "\nafter:", after, "\n", done["setup_output"])
    assert "problem" not in done["setup_output"] and "installed:" in done["setup_output"]
    assert check.returncode == 0, check.stdout + check.stderr
    assert after["bitsandbytes"] and after["datasets"]  # what Colab lacks was installed
    if image == "current":  # nothing that already worked was changed
        assert {k: after[k] for k in ("transformers", "peft", "accelerate")} == {
            k: before[k] for k in ("transformers", "peft", "accelerate")}
    entry = done["manifest"]["notebooks"]["03_lora_setup"]  # papermill ran every cell
    assert entry["metrics"]["trainable_params"] > 0


def test_the_lowest_versions_the_ranges_admit(installed):
    """Every range's lower bound installed together (transformers, peft, accelerate, datasets,
    bitsandbytes, ...), then notebooks 03 and 04 on them: 4-bit loading, LoRA, data preparation."""
    from packaging.version import Version

    r = installed["lowest"].result()
    want, got, proc = r["want"], r["got"], r["proc"]
    assert all(got[n] and Version(got[n]) == Version(v) for n, v in want.items()), got
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

"""The notebooks as a person sees them: JupyterLab and a headless Chromium run every cell (Run All),
then each notebook's outputs are checked as drawn in the page.

Every figure is an image (none is the text ``<Figure size ...>``), no widget shows "Error
displaying widget", nothing on stderr is a traceback, and the memory calculator draws its chart
again when a control changes. Screenshots go to ``browser-shots/`` in the repository (or
``QLORA_BROWSER_SHOTS``), named in the terminal at the end.

Needs Node.js >= 18 with npm, and jupyterlab (``pip install -e ".[test]"``); the Chromium comes
inside the npm package ``@sparticuz/chromium`` (``tests/browser``, installed here on first use),
no browser download. The notebooks run in a copy, on the embedded default, with few steps.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import nbtools

ROOT = Path(__file__).resolve().parent.parent
BROWSER = ROOT / "tests" / "browser"
# notebook -> parameters changed for a quick run (its figures all still drawn)
NOTEBOOKS = {
    "02_load_in_4bit": {},
    "04_dataset_preparation": {},
    "05_paged_optimizer_training": {"MAX_STEPS": 6, "SAVE_STEPS": 6, "MAX_NEW_TOKENS": 12},
}
# what must be drawn as images, at least: notebook -> count of cells with an image
FIGURES = {"02_load_in_4bit": 2, "04_dataset_preparation": 1, "05_paged_optimizer_training": 1}
CALCULATOR_CHOICE = "llama-2-70b"  # a preset of helpers/configs/, chosen in the calculator


def _node_or_skip() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("the browser test needs Node.js >= 18 and npm (e.g. `apt-get install nodejs "
                    "npm`, or https://nodejs.org); then `npm --prefix tests/browser install`")
    if not (BROWSER / "node_modules" / "puppeteer-core").is_dir():
        proc = subprocess.run([npm, "install", "--silent", "--no-audit", "--no-fund"],
                              cwd=BROWSER, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"npm install in tests/browser failed:\n{proc.stderr[-2000:]}"
    return node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_parameters(src: Path, dest: Path, values: dict) -> None:
    """A copy of the notebook with some literals of its parameters cell replaced."""
    nb = json.loads(src.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    lines = cell["source"].splitlines()
    for name, value in values.items():
        at = [i for i, line in enumerate(lines) if line.startswith(f"{name} = ")]
        assert at, f"{src.name} has no parameter {name}"
        comment = lines[at[0]].partition("#")[2]
        lines[at[0]] = f"{name} = {value!r}  #{comment}"
    cell["source"] = "\n".join(lines)
    dest.write_text(nbtools.dumps(nb))


@pytest.fixture(scope="module")
def shots(request):
    folder = Path(os.environ.get("QLORA_BROWSER_SHOTS", ROOT / "browser-shots")).absolute()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    yield folder
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nbrowser screenshots: {folder}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving copies of the notebooks, with every cell rendered (no windowing); its
    kernels import this checkout's helpers. Yields (base URL, folder of the copies)."""
    pytest.importorskip("jupyterlab", reason="the browser test needs jupyterlab: "
                        "pip install -e '.[test]'")
    folder = tmp_path_factory.mktemp("lab")
    for stem, values in NOTEBOOKS.items():
        _with_parameters(ROOT / "notebooks" / f"{stem}.ipynb", folder / f"{stem}.ipynb", values)
    settings = folder / ".settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("QLORA_SERIES_STATIC", "QLORA_RUN_DIR")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               JUPYTERLAB_SETTINGS_DIR=str(folder / ".settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(folder / ".workspaces"))
    log = (folder / "lab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
         "--allow-root", f"--ServerApp.root_dir={folder}"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (folder / "lab.log").read_text()[-3000:]
                time.sleep(1)
        else:
            pytest.fail("JupyterLab did not start:\n" + (folder / "lab.log").read_text()[-3000:])
        yield base, folder
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _run_in_browser(node, base, stem, shots, *extra) -> dict:
    prefix = shots / stem
    proc = subprocess.run(
        [node, str(BROWSER / "run_notebook.mjs"), f"{base}/lab/tree/{stem}.ipynb?reset",
         str(prefix), "--wait", "480", *extra],
        cwd=BROWSER, capture_output=True, text=True, timeout=720)
    assert proc.returncode == 0, f"browser run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(Path(f"{prefix}.json").read_text())


def _problems(report: dict) -> list[str]:
    """What a person would see wrong in the page."""
    out = [] if report["finished"] else [f"cells still running after {report['seconds']:.0f} s"]
    for c in report["cells"]:
        where = f"cell {c['index']} ({c['input'][:60]!r})"
        if c["code"] and c["prompt"].strip() in ("[ ]:", ""):
            out.append(f"{where} did not run")
        if "<Figure size" in c["text"]:
            out.append(f"{where} shows a figure as text: {c['text'][:120]!r}")
        if "Error displaying widget" in c["text"] or "model not found" in c["text"]:
            out.append(f"{where} shows a broken widget")
        out += [f"{where} wrote a traceback to stderr: {s[-300:]!r}" for s in c["stderr"]
                if "Traceback" in s]
    return out


@pytest.mark.notebook
@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_notebook_in_the_browser(stem, lab, shots):
    node = _node_or_skip()
    base, _ = lab
    extra = ["--change", CALCULATOR_CHOICE] if stem.startswith("02") else []
    report = _run_in_browser(node, base, stem, shots, *extra)
    assert not _problems(report), _problems(report)
    drawn = [c for c in report["cells"] if c["images"]]
    assert len(drawn) >= FIGURES[stem], (
        f"{len(drawn)} cell(s) with an image, expected {FIGURES[stem]}: "
        + json.dumps([(c["index"], c["input"], c["mimes"]) for c in report["cells"]]))
    if report["change"] is not None:
        change = report["change"]
        assert change["found"], f"no dropdown offering {CALCULATOR_CHOICE}"
        assert change["changed"], f"the chart was not redrawn: {change}"
        assert change["text_after"] != change["text_before"]

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

import concurrent.futures
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
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
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


@pytest.fixture(scope="module")
def browser_runs(lab, shots):
    """Every notebook of NOTEBOOKS run in its own browser at the same time (each waits mostly on
    its kernel and page): stem -> a future whose result is the page's report."""
    node = _node_or_skip()
    base, _ = lab
    # the package unpacks its Chromium on first use: once here, not in three browsers at once,
    # where one would start the binary while another still writes it (ETXTBSY)
    proc = subprocess.run(
        [node, "--input-type=module", "-e", "import chromium from '@sparticuz/chromium'; "
         "console.log(await chromium.executablePath());"],
        cwd=BROWSER, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"unpacking the Chromium failed:\n{proc.stderr[-2000:]}"
    with concurrent.futures.ThreadPoolExecutor(len(NOTEBOOKS)) as pool:
        runs = {stem: pool.submit(_run_in_browser, node, base, stem, shots,
                                  *(["--change", CALCULATOR_CHOICE] if stem.startswith("02")
                                    else [])) for stem in NOTEBOOKS}
        concurrent.futures.wait(runs.values())
    return runs


@pytest.mark.notebook
@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_notebook_in_the_browser(stem, browser_runs):
    report = browser_runs[stem].result()
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


# ------------------------------------------------- the same outputs, checked without a browser


def test_a_figure_displays_as_png_with_a_text_description():
    from types import SimpleNamespace

    from IPython.core.formatters import DisplayFormatter

    from helpers import plots

    shell = SimpleNamespace(display_formatter=DisplayFormatter())
    assert plots.display_figures_as_images(shell)
    data, _ = shell.display_formatter.format(plots.length_histogram([3, 5, 9], 8))
    assert data["image/png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert data["text/plain"].startswith("[figure: Tokens per example: n=3")
    assert not plots.display_figures_as_images(SimpleNamespace())  # not an IPython shell


def test_config_shows_what_differs_from_the_defaults():
    from IPython.lib.pretty import pretty

    from helpers.config import make_config

    cfg = make_config(RUN_DIR="runs/x", QUANT_TYPE="fp4", LORA_R=8)
    assert [row[:3] for row in cfg.changed()] == [
        ("run", "RUN_DIR", "runs/x"), ("model", "QUANT_TYPE", "fp4"), ("LoRA", "LORA_R", 8)]
    text = pretty(cfg)
    assert text.startswith("Config: 3 of") and "LORA_R" in text and "SEED" not in text
    assert "<table>" in cfg._repr_html_() and "fp4" in cfg._repr_html_()


def test_recorded_figures_show_with_units():
    from IPython.lib.pretty import pretty

    from helpers.manifest import Figures

    figures = Figures({"footprint_bytes": 2_308_128, "eval_loss": 5.847339258289777, "steps": 200})
    assert figures == {"footprint_bytes": 2_308_128, "eval_loss": 5.847339258289777, "steps": 200}
    text = pretty(figures)
    assert "2.3 MB (2,308,128)" in text and "5.847" in text and "5.8473392" not in text


def test_counts_print_with_a_unit_that_fits():
    from helpers.units import fmt_count

    assert [fmt_count(n) for n in (512, 65_536, 921_088, 1.2e6, 6.05e9)] == [
        "512", "65.5k", "921k", "1.20M", "6.05B"]


def test_the_calculator_twin_shows_no_estimate_dump(monkeypatch):
    from helpers import shapes, widgets

    monkeypatch.setenv("QLORA_SERIES_STATIC", "1")
    out = widgets.memory_calculator({"gpt-j-6b": shapes.PRESETS["gpt-j-6b"]}, gpu_gb=16)
    text = repr(out)
    assert text.startswith("Will it fit? fits") and "card memory needed" in text
    assert "Estimate(" not in text and "ModelShape(" not in text


def test_progress_bars_wait_for_their_delay():
    import io

    from tqdm.auto import tqdm

    from helpers.config import bars_only_on_long_waits

    bars_only_on_long_waits(0.3)
    try:
        quick = io.StringIO()
        with tqdm(total=2, file=quick, desc="quick") as bar:
            bar.set_description("renamed")  # a refresh: still too early to show
            bar.update(2)
        assert quick.getvalue() == ""
        slow = io.StringIO()
        with tqdm(total=2, file=slow, desc="slow", mininterval=0) as bar:
            time.sleep(0.4)
            bar.update(2)
        assert "slow: 100%" in slow.getvalue()
    finally:
        bars_only_on_long_waits()


def test_known_warnings_are_silenced_by_message_only():
    import warnings

    from helpers.config import HARMLESS_WARNINGS, quiet_known_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        for category, module, message in HARMLESS_WARNINGS:
            warnings.warn_explicit(message + " (details)", category, "x.py", 1, module=module)
            warnings.warn_explicit("another message", category, "x.py", 1, module=module)
    assert [str(w.message) for w in seen] == ["another message"] * len(HARMLESS_WARNINGS)


def test_the_kernel_stderr_keeps_everything_but_the_tcp_notice(capfd):
    from helpers.run import _forward_kernel_stderr

    read, write = os.pipe()
    os.write(write, b"[IPKernelApp] WARNING | Kernel is running over TCP without encryption. "
                    b"All communication ...\nSegmentation fault in a cell\n"
                    b"[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel.\n")
    os.close(write)
    _forward_kernel_stderr(read)
    assert capfd.readouterr().err == "Segmentation fault in a cell\n"


def test_choice_parameters_need_their_dropdown():
    nb = json.loads((ROOT / "notebooks" / "05_paged_optimizer_training.ipynb").read_text())
    assert nbtools.dropdown_problems(nb) == []
    forms = nbtools.form_dropdowns(nb)
    assert forms["OPTIMIZER"] == (["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit",
                                   "adamw_torch"], False)
    assert forms["MODEL"][1] and forms["LORA_TARGETS"][1]  # free values allowed
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    cell["source"] = cell["source"].replace('# @param ["nf4", "fp4"]', '# @param {type:"string"}')
    cell["source"] = cell["source"].replace(' {allow-input: true}', '', 1)
    problems = nbtools.dropdown_problems(nb)
    assert any("QUANT_TYPE needs the dropdown" in p for p in problems), problems
    assert any("MODEL takes free values" in p for p in problems), problems

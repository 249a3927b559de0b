"""The main job: options, bad input, failure reporting and regression comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import manifest, nbtools, run
from helpers.config import ConfigError, make_config

ROOT = Path(__file__).resolve().parent.parent


def _main(*args, env=None):
    return subprocess.run([sys.executable, "-m", "helpers.run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_unknown_parameter_is_refused_with_the_valid_names():
    proc = _main("-p", "LORA_RANK", "8")
    assert proc.returncode == 2
    assert "unknown parameter 'LORA_RANK'" in proc.stderr and "LORA_R" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_value_is_refused():
    proc = _main("-p", "MAX_STEPS", "many")
    assert proc.returncode == 2 and "MAX_STEPS" in proc.stderr and "int" in proc.stderr


def test_unknown_notebook_lists_the_available_ones():
    proc = _main("--only", "09")
    assert proc.returncode == 2 and "no notebook '09'" in proc.stderr
    assert "01_environment_and_cuda" in proc.stderr


def test_unwritable_run_directory_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _main("--run-dir", str(blocker / "sub"))
    assert proc.returncode == 2 and "cannot write to the run directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_select_accepts_numbers_and_names_in_series_order():
    stems = run.available()
    assert run.select(None) == stems
    assert run.select("01") == [stems[0]]
    assert run.select(f"{stems[0]},01") == [stems[0]]


def test_parameters_are_typed():
    assert run.parse_parameters([["MAX_STEPS", "5"], ["PACKING", "true"],
                                 ["LEARNING_RATE", "1e-3"], ["MODEL", "x/y"]]) == {
        "MAX_STEPS": 5, "PACKING": True, "LEARNING_RATE": 1e-3, "MODEL": "x/y"}


def test_config_refuses_out_of_range_values():
    for bad, word in [({"LORA_R": 0}, "LORA_R"), ({"LORA_DROPOUT": 1.0}, "[0, 1)"),
                      ({"OPTIMIZER": "sgd"}, "paged_adamw_8bit"), ({"LORA_ALPHA": -1}, "ALPHA")]:
        with pytest.raises(ConfigError, match=word.replace("[", r"\[").replace(")", r"\)")):
            make_config(**bad)


def test_failure_names_notebook_and_cell_and_keeps_the_copy(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    nb = json.loads((ROOT / "notebooks" / "01_environment_and_cuda.ipynb").read_text())
    nb["cells"] = nb["cells"][:4] + [  # title, setup, parameters, config; then a failing cell
        {"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
        for src in ("x = 1", "raise ValueError('deliberate failure')", "y = 2")]
    (nbdir / "01_environment_and_cuda.ipynb").write_text(nbtools.dumps(nbtools.normalize(nb)))
    out = tmp_path / "run"
    proc = _main("--run-dir", str(out), env={"QLORA_NOTEBOOKS": str(nbdir)})
    assert proc.returncode == 1
    assert "01_environment_and_cuda failed in cell" in proc.stdout
    assert "ValueError: deliberate failure" in proc.stdout
    assert (out / "01_environment_and_cuda.ipynb").exists()
    data = manifest.load(out)
    assert data["notebooks"]["01_environment_and_cuda"]["status"] == "failed"


def test_compare_rules():
    base = {"notebooks": {"05": {"metrics": {"eval_loss_after": 2.0, "trainable_params": 100,
                                             "tokens_per_second": 1000.0,
                                             "disk_free_bytes": 5}}}}
    same = json.loads(json.dumps(base))
    assert not [r for r in run.compare(same, base) if r["verdict"].startswith("REGRESSION")]
    worse = json.loads(json.dumps(base))
    worse["notebooks"]["05"]["metrics"].update(eval_loss_after=2.5, tokens_per_second=950.0,
                                               disk_free_bytes=1)
    bad = [r["figure"] for r in run.compare(worse, base) if r["verdict"].startswith("REGRESSION")]
    assert bad == ["eval_loss_after"]  # 5% slower is noise; free disk is ignored
    changed = json.loads(json.dumps(base))
    changed["notebooks"]["05"]["metrics"]["trainable_params"] = 101
    assert [r["figure"] for r in run.compare(changed, base)
            if r["verdict"].startswith("REGRESSION")] == ["trainable_params"]


def test_compare_end_to_end(tmp_path):
    first = tmp_path / "a"
    assert _main("--only", "01", "--run-dir", str(first)).returncode == 0
    proc = _main("--only", "01", "--run-dir", str(tmp_path / "b"),
                 "--compare", str(first / "manifest.json"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 regression(s)" in proc.stdout
    data = manifest.load(first)
    data["notebooks"]["01_environment_and_cuda"]["metrics"]["bnb_relative_error"] = 0.01
    worse = tmp_path / "baseline.json"
    worse.write_text(json.dumps(data))
    proc = _main("--only", "01", "--run-dir", str(tmp_path / "c"), "--compare", str(worse))
    assert proc.returncode == 3
    assert "01_environment_and_cuda:bnb_relative_error" in proc.stdout


def test_the_terminal_shows_one_line_per_notebook_and_no_kernel_notice(tmp_path):
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    for stem in ("01_environment_and_cuda", "04_dataset_preparation"):
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        nb["cells"] = nb["cells"][:4] + [  # title, setup, parameters, config; then a figure
            {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
             "source": "helpers.plots.length_histogram([3, 5, 9], 8)"}]
        (nbdir / f"{stem}.ipynb").write_text(nbtools.dumps(nbtools.normalize(nb)))
    out = tmp_path / "run"
    proc = _main("--run-dir", str(out), env={"QLORA_NOTEBOOKS": str(nbdir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # no kernel notice, no library warning
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run directory: {out}"
    assert [ln.split(" ...")[0] for ln in lines[1:3]] == ["[1/2] 01_environment_and_cuda",
                                                          "[2/2] 04_dataset_preparation"]
    assert all(" ... ok (" in ln for ln in lines[1:3]) and len(lines) == 5, lines
    executed = (out / "04_dataset_preparation.ipynb").read_text()
    assert "<Figure size" not in executed and '"image/png"' in executed

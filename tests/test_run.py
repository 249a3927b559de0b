"""The main job: options, bad input, failure reporting and regression comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import manifest, nbtools, run
from helpers.config import ConfigError, check, make_config

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
    assert proc.returncode == 2 and "MAX_STEPS='many' is not an integer" in proc.stderr


@pytest.mark.parametrize("name, value, says", [
    ("LORA_R", "-4", "LORA_R=-4 must be a positive integer"),
    ("DATA_FORMAT", "chatml", "not one of: text, template, instruction, chat (did you mean 'chat'"),
    ("MAX_STEPS", "abc", "MAX_STEPS='abc' is not an integer"),
    ("MEMORY_BUDGET_GB", "0.001", "MEMORY_BUDGET_GB=0.001 is 1 MB (the budget is in GB)"),
    ("MEMORY_BUDGET_GB", "-2", "MEMORY_BUDGET_GB=-2 must be >= 0"),
    ("LORA_DROPOUT", "1.5", "LORA_DROPOUT=1.5 must be in [0, 1)"),
    ("OPTIMIZER", "sgd", "OPTIMIZER='sgd' is not one of"),
    ("LEARNING_RATE", "nan", "LEARNING_RATE=nan is not a finite number"),
    ("TEMPLATE", "no columns", "names no column"),
    ("TEMPLATE", "{quote", "is not a valid template"),
    ("EVAL_FRACTION", "1", "EVAL_FRACTION=1.0 must be in [0, 1)"),
    ("GRAD_ACCUM", "0", "GRAD_ACCUM >= 1"),
    ("SAVE_STEPS", "-1", "SAVE_STEPS=-1 must be >= 0"),
    ("MAX_NEW_TOKENS", "0", "MAX_NEW_TOKENS=0 must be at least 1"),
    ("PACKING", "maybe", "PACKING='maybe' is not true or false"),
    ("SEED", "-1", "SEED=-1 must be a whole number from 0"),
])
def test_a_bad_parameter_exits_2_before_anything_is_created(tmp_path, name, value, says):
    out = tmp_path / "run"
    proc = _main("--run-dir", str(out), "-p", name, value)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and proc.stdout == ""


def test_rules_between_parameters_are_checked_up_front(tmp_path):
    out = tmp_path / "run"
    proc = _main("--run-dir", str(out), "-p", "RESUME", "true", "-p", "START_OVER", "true")
    assert proc.returncode == 2 and "RESUME and START_OVER are both True" in proc.stderr
    assert not out.exists()
    with pytest.raises(ConfigError, match="under FSDP"):  # an accelerate launch with FSDP
        check(make_config(OPTIMIZER="paged_adamw_8bit"), fsdp=True)
    with pytest.raises(ConfigError, match="QUANT_STORAGE='uint8' under FSDP"):
        check(make_config(OPTIMIZER="adamw_torch", QUANT_STORAGE="uint8"), fsdp=True)
    check(make_config(OPTIMIZER="adamw_torch"), fsdp=True)
    with pytest.raises(ConfigError, match="TEXT_COLUMN"):
        make_config(DATA_FORMAT="text", TEXT_COLUMN=" ")
    make_config(DATA_FORMAT="instruction", TEMPLATE="")  # TEMPLATE matters for template only


# ------------------------------------------------------------------ an earlier run's files


def _earlier_run(run_dir: Path) -> dict:
    """A run directory as an interrupted run leaves it: checkpoints, an adapter, a merged model,
    the manifest and an executed notebook; returns {relative path: bytes}."""
    files = {"checkpoints/checkpoint-50/adapter_model.safetensors": b"50",
             "checkpoints/checkpoint-100/adapter_model.safetensors": b"100",
             "adapter/adapter_model.safetensors": b"adapter",
             "merged/model.safetensors": b"merged", "loss_curve.png": b"png",
             "05_paged_optimizer_training.ipynb": b"{}", "dataset_stats.json": b"{}"}
    for rel, data in files.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_bytes(data)
    manifest.save(run_dir, {"notebooks": {}, "parameters": {"MAX_STEPS": 200}})
    files["manifest.json"] = manifest.path(run_dir).read_bytes()
    return files


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_rerunning_into_a_used_run_dir_is_refused_and_keeps_every_file(tmp_path):
    run_dir = tmp_path / "run"
    before = _earlier_run(run_dir)
    proc = _main("--run-dir", str(run_dir))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "checkpoint-50, checkpoint-100" in err and "an adapter" in err and "merged" in err
    assert "-p RESUME true" in err and "--run-dir" in err and "-p START_OVER true" in err
    assert "Traceback" not in err and "running" not in proc.stdout
    assert _tree(run_dir) == before  # every earlier file, unchanged, and nothing new
    # a run of notebooks that do not train leaves them alone, and is not refused
    path, notes = run.prepare_run_dir(str(run_dir), {}, ["01_environment_and_cuda"])
    assert path == run_dir.resolve() and notes == [] and _tree(run_dir) == before


def test_start_over_moves_the_earlier_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    before = _earlier_run(run_dir)
    path, notes = run.prepare_run_dir(str(run_dir), {"START_OVER": True}, stems=run.available())
    previous = list(run_dir.glob("previous-*"))
    assert len(previous) == 1 and [p.name for p in run_dir.iterdir()] == [previous[0].name]
    assert _tree(previous[0]) == before  # moved whole, byte for byte
    assert len(notes) == 1 and f"moved to run/{previous[0].name}/" in notes[0]
    assert "checkpoints/" in notes[0] and "adapter/" in notes[0]
    # once more: a second earlier run goes beside the first, never over it
    _earlier_run(run_dir)
    run.prepare_run_dir(str(run_dir), {"START_OVER": True}, stems=run.available())
    assert len(list(run_dir.glob("previous-*"))) == 2


def test_resume_continues_and_an_interrupted_run_is_named(tmp_path):
    run_dir = tmp_path / "run"
    before = _earlier_run(run_dir)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    manifest.update(run_dir, lambda d: d.update(running={
        "notebook": "05_paged_optimizer_training", "pid": int(gone.stdout), "host":
        __import__("socket").gethostname(), "started": "2030-01-01T10:00:00"}))
    path, notes = run.prepare_run_dir(str(run_dir), {"RESUME": True}, stems=run.available())
    assert any("interrupted in 05_paged_optimizer_training (started 2030-01-01T10:00:00, "
               "never finished)" in n for n in notes)
    assert any(n.startswith("RESUME = True: continuing") for n in notes)
    data = manifest.load(run_dir)
    assert "running" not in data
    assert data["notebooks"]["05_paged_optimizer_training"]["status"] == "interrupted"
    assert {k: v for k, v in _tree(run_dir).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}


def test_a_run_going_on_in_the_same_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _earlier_run(run_dir)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "helpers.run"])
    try:
        manifest.update(run_dir, lambda d: d.update(running={
            "notebook": "04_dataset_preparation", "pid": other.pid,
            "host": __import__("socket").gethostname(), "started": "now"}))
        with pytest.raises(run.RunError, match=f"a run \\(process {other.pid}"):
            run.prepare_run_dir(str(run_dir), {"RESUME": True}, stems=run.available())
    finally:
        other.kill()
        other.wait()


def test_notebook_05_refuses_a_used_run_dir_in_its_config_cell(tmp_path):
    """Stepping through notebook 05: its config cell (helpers.config.start) stops with the
    choices before anything is loaded; START_OVER moves the training's files aside (the
    dataset and the earlier notebooks' manifest stay: this session's notebook 04 made them)."""
    from helpers import config

    run_dir = tmp_path / "run"
    before = _earlier_run(run_dir)
    with pytest.raises(ConfigError) as err:
        config.start("05_paged_optimizer_training", RUN_DIR=str(run_dir))
    assert "RESUME = True" in str(err.value) and "START_OVER = True" in str(err.value)
    assert _tree(run_dir) == before
    config.start("05_paged_optimizer_training", RUN_DIR=str(run_dir), START_OVER=True)
    previous = next(run_dir.glob("previous-*"))
    assert sorted(p.name for p in previous.iterdir()) == [
        "adapter", "checkpoints", "loss_curve.png", "merged"]
    assert (run_dir / "dataset_stats.json").exists() and manifest.path(run_dir).exists()


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


def test_the_manifest_keeps_local_paths_relative_to_the_run_and_no_machine_path(
        tmp_path, monkeypatch):
    """A local MODEL or DATASET is recorded relative to RUN_DIR (inside it "./", beside it
    "../"), read back from wherever the run directory is; "embedded", rehearsals and Hub ids as
    they are; in any text (the command line, an error) the run directory is RUN_DIR and the home
    directory ~, each only as a whole path."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    run_dir = home / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "in.jsonl").write_text("{}\n")
    (home / "model").mkdir()
    monkeypatch.chdir(home)  # a relative path is taken from the current directory
    forms = manifest.portable({"RUN_DIR": str(run_dir), "MODEL": str(home / "model"),
                               "DATASET": "runs/r/in.jsonl", "MAX_STEPS": 5}, run_dir)
    assert forms == {"RUN_DIR": ".", "MODEL": "../../model", "DATASET": "./in.jsonl",
                     "MAX_STEPS": 5}
    for name in ("embedded", "rehearsal:gpt-j-6b", "Abirate/english_quotes"):
        assert manifest.portable({"MODEL": name, "DATASET": name}, run_dir) == {
            "MODEL": name, "DATASET": name}
    monkeypatch.chdir(tmp_path)
    back = manifest.resolve(forms, run_dir)
    assert back["MODEL"] == str((home / "model").resolve())
    assert back["DATASET"] == str((run_dir / "in.jsonl").resolve())
    assert back["MAX_STEPS"] == 5

    manifest.save(run_dir, {
        "command": f"python -m helpers.run --run-dir {run_dir} -p DATASET {home}/d.jsonl "
                   f"-p MODEL {home}2/m",
        "error": f"FileNotFoundError: {run_dir}/adapter is gone. '{run_dir}'"})
    saved = manifest.load(run_dir)
    assert saved["command"] == ("python -m helpers.run --run-dir RUN_DIR -p DATASET ~/d.jsonl "
                                f"-p MODEL {home}2/m")  # another folder: not the home's
    assert saved["error"] == "FileNotFoundError: RUN_DIR/adapter is gone. 'RUN_DIR'"


def test_shared_files_name_a_hub_cache_folder_by_its_id():
    """A base model loaded from the Hub's cache is named by its id in the adapter's files."""
    from helpers.formats import public_name

    snapshot = "/cache/huggingface/hub/models--EleutherAI--gpt-j-6b/snapshots/0123abc"
    assert public_name(snapshot) == "EleutherAI/gpt-j-6b"
    assert public_name("/cache/hub/models--gpt2") == "gpt2"
    assert public_name("EleutherAI/gpt-j-6b") == "EleutherAI/gpt-j-6b"

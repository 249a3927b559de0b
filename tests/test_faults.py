"""Kills at any moment: training killed with SIGKILL and resumed ends where an uninterrupted run
ends, and a file or folder being replaced when the kill comes keeps its earlier version.

Each training runs in a forked child of this process (the tiny model of test_train, loaded once
here, is the child's copy-on-write), so twenty-odd trainings take seconds each, not the import
time of a fresh interpreter. Linux and macOS only (``fork``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import checkpoints, manifest, rundir
from helpers import train as T
from test_train import TEXTS, collator_for, config, peft_model, rows, tiny, tokenizer_of  # noqa: F401

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs fork")

SEED = 1717  # draws the kill moments
KILLS = 20
MAX_STEPS, SAVE_STEPS = 40, 2


class Phases(TrainerCallback):
    """Tells the parent where training is: ("step", n) when optimizer step n begins, ("save", n)
    when checkpoint-n is about to be written (the Trainer writes it right after on_step_end),
    ("saved", n) when it is written, ("end", n) when training ends."""

    def __init__(self, conn):
        self.conn = conn

    def on_step_begin(self, args, state, control, **kwargs):
        self.conn.send(("step", state.global_step + 1, time.perf_counter()))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.conn.send(("save", state.global_step, time.perf_counter()))

    def on_save(self, args, state, control, **kwargs):
        self.conn.send(("saved", state.global_step, time.perf_counter()))

    def on_train_end(self, args, state, control, **kwargs):
        self.conn.send(("end", state.global_step, time.perf_counter()))


def _train_in_child(conn, cfg, setup):
    torch.set_num_threads(1)
    # the CPU model, trained on the CPU on every machine: a forked child cannot use a CUDA
    # context its parent made (on a GPU machine the parent's other tests made one)
    torch.cuda.is_available = lambda: False
    model, tokenizer, train_set, eval_set = _build(setup) if isinstance(setup, str) else setup
    # the loss-curve figure redrawn at every checkpoint is not what is tested here, and
    # drawing it is most of a checkpoint's time on a small CPU
    T.LossCurveCallback.save = lambda self: None
    try:
        result = T.train(cfg, model, tokenizer, train_set, eval_set, collator_for(tokenizer),
                         callbacks=[Phases(conn)], live=False, verbose=False)
        conn.send(("done", result.metrics["train_steps"], time.perf_counter()))
    except BaseException as err:  # reported to the parent, which fails the test
        conn.send(("error", f"{type(err).__name__}: {err}", time.perf_counter()))
    finally:
        conn.close()
        os._exit(0)  # no pytest teardown in the child


def _training_context():
    """``fork`` where this process has run no backward on a GPU. After one (the GPU tests before
    these, in the one process of a CUDA machine) autograd refuses to run in a forked child, so
    the children come from a fork server instead: a fresh process that has touched no GPU forks
    them, and the model and data travel to it pickled."""
    return multiprocessing.get_context("forkserver" if torch.cuda.is_available() else "fork")


def _launch(setup, cfg, ctx=None):
    ctx = ctx or _training_context()
    parent_end, child_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_train_in_child, args=(child_end, cfg, setup))
    proc.start()
    child_end.close()
    return proc, parent_end


def _events(proc, conn, timeout=300):
    """The child's messages as they come: (kind, step, time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(0.01):
            try:
                yield conn.recv()
            except EOFError:
                return
        elif not proc.is_alive() and not conn.poll(0):
            return
    raise TimeoutError("the training child did not finish")


def _build(folder):
    """Model (LoRA attached, seeded), tokenizer and the two splits, from the tiny model's folder."""
    cfg = config(Path(folder), lora_dropout=0.1)  # its LoRA settings; nothing is written
    tokenizer = tokenizer_of(folder)
    return (peft_model(folder, cfg, seed=0), tokenizer, rows(tokenizer, TEXTS),
            rows(tokenizer, TEXTS[:8]))


@pytest.fixture(scope="module")
def setup(tiny):  # noqa: F811 (the fixture imported above)
    """What each training child trains: built once in this process where the children are forked
    from it (they share it copy-on-write), else the tiny model's folder, from which each child
    of the fork server builds the same."""
    if _training_context().get_start_method() == "fork":
        return _build(tiny)
    return str(tiny)


def _check_what_a_kill_left(run_dir):
    """After a kill: the files a resume reads are whole (the newest complete checkpoint, the
    adapter when there is one)."""
    rundir.recover(run_dir)
    last = checkpoints.latest_checkpoint(run_dir)
    if last is not None:
        assert checkpoints.is_complete(last)
        load_file(str(last / "adapter_model.safetensors"))
        torch.load(last / "optimizer.pt", weights_only=True)
    if (run_dir / "adapter").exists():
        load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return last


def test_twenty_kills_during_steps_and_saves_end_with_the_uninterrupted_adapter(setup, tmp_path):
    """Training of 40 steps with a checkpoint every 2 steps is killed with SIGKILL 20 times and
    resumed (RESUME = True) after each kill; the adapter it ends with is bit for bit the adapter
    of the same training run without interruption.

    The moments: ``random.Random(1717)`` draws, for each kill, a kind - during an optimizer step
    or during the writing of a checkpoint, each with probability 1/2 - which occurrence of it in
    that resumed run (1st, 2nd or 3rd), and a fraction in [0, 1) of that phase's median duration
    in the uninterrupted run; the child is killed that long after it announces the phase (a step
    begins: ``on_step_begin``; a checkpoint is about to be written: ``on_step_end`` with
    ``should_save``). Where the phase ends sooner, the kill lands in what follows it. After
    every kill, the newest complete checkpoint and the adapter (when there is one) must load;
    some kills must have left a checkpoint cut short (on two CPU cores about half of the kills
    during a checkpoint's writing do), which resume passes over."""
    common = dict(max_steps=MAX_STEPS, save_steps=SAVE_STEPS, lora_dropout=0.1, resume=True,
                  lr_schedule="cosine", warmup_steps=2)

    # the uninterrupted run, and how long its steps and checkpoint writes take
    straight = config(tmp_path / "straight", **common)
    proc, conn = _launch(setup, straight)
    seen, begun = {"step": [], "save": []}, {}
    for kind, step, at in _events(proc, conn):
        assert kind != "error", step
        for open_kind, (open_step, t0) in list(begun.items()):
            seen[open_kind].append(at - t0)
            del begun[open_kind]
        if kind in ("step", "save"):
            begun[kind] = (step, at)
    proc.join()
    reference = load_file(str(tmp_path / "straight" / "run" / "adapter" /
                              "adapter_model.safetensors"))
    duration = {k: statistics.median(v) for k, v in seen.items()}

    rng = random.Random(SEED)
    moments = [(rng.choice(["step", "save"]), rng.randint(1, 3), rng.random())
               for _ in range(KILLS)]
    cfg = config(tmp_path / "killed", **common)
    run_dir = tmp_path / "killed" / "run"
    resumed_from, kinds_hit, cut_short = [], [], 0
    for kind, nth, fraction in moments:
        proc, conn = _launch(setup, cfg)
        count = 0
        for event, step, _ in _events(proc, conn):
            assert event not in ("error", "done"), f"{event} before the kill: {step}"
            if event == kind:
                count += 1
                if count == nth:
                    time.sleep(fraction * duration[kind])
                    os.kill(proc.pid, signal.SIGKILL)
                    kinds_hit.append(kind)
                    break
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        cut_short += any(not checkpoints.is_complete(p)
                         for p in (run_dir / "checkpoints").glob("checkpoint-*"))
        last = _check_what_a_kill_left(run_dir)
        resumed_from.append(last.name if last else None)

    proc, conn = _launch(setup, cfg)  # the last resume, left to finish
    events = list(_events(proc, conn))
    proc.join()
    assert events[-1][0] == "done" and events[-1][1] == MAX_STEPS, events[-1]
    assert sorted(set(kinds_hit)) == ["save", "step"] and len(kinds_hit) == KILLS
    assert any(r is not None for r in resumed_from)  # progress was kept across kills
    assert cut_short >= 1  # some kills came while a checkpoint was being written
    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == reference.keys()
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


# --------------------------------------------------------------------------- one write, killed


def _killed_child(fn):
    """Run ``fn`` in a forked child that SIGKILLs itself where ``fn`` calls ``die()``."""
    ctx = multiprocessing.get_context("fork")

    def target():
        try:
            fn(lambda: os.kill(os.getpid(), signal.SIGKILL))
        finally:
            os._exit(1)  # fn returned without dying: the parent's assertion catches it

    proc = ctx.Process(target=target)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode


def test_a_kill_while_the_adapter_is_written_keeps_the_earlier_one(tmp_path):
    folder = tmp_path / "run" / "adapter"
    tensors = {"w": torch.arange(6.0)}

    def write(into):
        from safetensors.torch import save_file

        save_file(tensors, str(into / "adapter_model.safetensors"))
        (into / "adapter_config.json").write_text("{}")

    checkpoints.save_adapter(None, folder, "first card", save=write)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half_then_die(die):
        def save(into):
            (into / "adapter_model.safetensors").write_bytes(b"\0" * 10)
            die()
        checkpoints.save_adapter(None, folder, "second card", save=save)

    _killed_child(half_then_die)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert rundir.recover(tmp_path / "run") == []
    assert not list((tmp_path / "run").glob(".*"))  # the unfinished one is cleared away


def test_a_kill_between_the_renames_of_a_folder_swap_is_put_back(tmp_path, monkeypatch):
    """replace_folder moves the old folder aside, then renames the new one in: a kill between
    the two leaves the old one aside, and recover (every notebook's config cell) puts it back."""
    target = tmp_path / "merged"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    new = rundir.partial_folder(target)
    (new / "model.safetensors").write_text("new")

    def die_at_the_second_rename(die):
        real, calls = os.replace, []

        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:
                die()
            real(a, b)

        monkeypatch.setattr(os, "replace", replace)
        rundir.replace_folder(new, target)

    _killed_child(die_at_the_second_rename)
    assert not target.exists()
    assert rundir.recover(tmp_path) == ["merged"]
    assert (target / "model.safetensors").read_text() == "old"


def test_a_kill_while_the_dataset_is_written_keeps_the_earlier_one(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict, load_from_disk

    from helpers import data

    run_dir = tmp_path / "run"
    old = data.Prepared(Dataset.from_dict({"input_ids": [[1, 2]]}), None, {"fingerprint": "a"})
    data.save(old, run_dir)
    new = data.Prepared(Dataset.from_dict({"input_ids": [[3, 4, 5]]}), None, {"fingerprint": "b"})

    def die_while_saving(die):
        def save_to_disk(self, path, **kwargs):
            (os.makedirs(path, exist_ok=True), open(os.path.join(path, "part"), "w").close())
            die()

        monkeypatch.setattr(DatasetDict, "save_to_disk", save_to_disk)
        data.save(new, run_dir)

    _killed_child(die_while_saving)
    rundir.recover(run_dir)
    assert json.loads((run_dir / data.STATS_FILE).read_text())["fingerprint"] == "a"
    assert load_from_disk(str(run_dir / data.DATASET_DIR))["train"]["input_ids"] == [[1, 2]]


def test_a_kill_while_the_manifest_is_written_keeps_the_earlier_one(tmp_path, monkeypatch):
    manifest.save(tmp_path, {"notebooks": {}, "mark": 1})

    def die_before_the_rename(die):
        monkeypatch.setattr(os, "fsync", lambda fd: die())
        manifest.save(tmp_path, {"notebooks": {}, "mark": 2})

    _killed_child(die_before_the_rename)
    assert manifest.load(tmp_path)["mark"] == 1


def test_a_checkpoint_cut_short_is_passed_over(setup, tmp_path):
    """A checkpoint folder without its completion mark (a kill came while it was written) is not
    resumed from: the one before it is, and the resumed run says so."""
    cfg = config(tmp_path, max_steps=4, save_steps=2, resume=True)
    proc, conn = _launch(setup, cfg)
    assert [e[0] for e in _events(proc, conn)][-1] == "done"
    proc.join()
    ckpt = tmp_path / "run" / "checkpoints"
    (ckpt / "checkpoint-4" / checkpoints.SIGNATURE).unlink()
    assert checkpoints.latest_checkpoint(tmp_path / "run").name == "checkpoint-2"
    signature = json.loads((ckpt / checkpoints.SIGNATURE).read_text())
    last, notes = checkpoints.resume_point(cfg, signature)
    assert last.endswith("checkpoint-2")
    assert any("checkpoint-4: incomplete" in n for n in notes)

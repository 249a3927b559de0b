"""Scaling out (notebook 05's last section): the accelerate configs, the refusals, and a real
2-process data-parallel run of the embedded default on CPU (gloo) whose adapter notebook 06 uses."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import loading, scaling
from helpers import env, manifest, models
from helpers import train as T, checkpoints
from helpers.config import PARAMETERS, make_config

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_FSDP",
               "ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


def cfg_of(tmp_path, **parameters):
    return make_config(RUN_DIR=str(tmp_path / "run"), **parameters)


# ------------------------------------------------------------------------------ config writer


def test_writer_fills_in_the_processes_and_returns_the_command(tmp_path):
    cfg = cfg_of(tmp_path, MAX_STEPS=7)
    launch = scaling.write_launch_config(cfg, 4, cuda_devices=0, port=29999)
    assert launch.config_file == Path(cfg.run_dir) / "accelerate_ddp_cpu.yaml"
    written = yaml.safe_load(launch.config_file.read_text())
    assert written["num_processes"] == 4 and written["use_cpu"] is True
    assert written["distributed_type"] == "MULTI_GPU"  # accelerate's multi-process launcher
    assert written["main_process_port"] == 29999
    assert launch.command == ["accelerate", "launch", "--config_file", str(launch.config_file),
                              "-m", "helpers.train", cfg.run_dir]
    assert launch.command_line.startswith("accelerate launch --config_file ")
    assert any("gloo" in n for n in launch.notes)
    # the entry point reads the parameters from the manifest
    assert manifest.load(cfg.run_dir)["parameters"]["MAX_STEPS"] == 7

    gpu = scaling.write_launch_config(cfg, 2, cuda_devices=8)
    assert gpu.config_file.name == "accelerate_ddp.yaml"
    written = yaml.safe_load(gpu.config_file.read_text())
    assert written["num_processes"] == 2 and written["use_cpu"] is False
    assert "main_process_port" not in written


def test_fsdp_config_carries_the_qlora_settings(tmp_path):
    cfg = cfg_of(tmp_path, OPTIMIZER="adamw_torch", COMPUTE_DTYPE="bfloat16")
    launch = scaling.write_launch_config(cfg, 2, "fsdp", cuda_devices=2, offload=True)
    written = yaml.safe_load(launch.config_file.read_text())
    assert launch.config_file.name == "accelerate_fsdp_qlora.yaml"
    assert written["distributed_type"] == "FSDP" and written["num_processes"] == 2
    fsdp = written["fsdp_config"]
    assert fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True
    assert fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_offload_params"] is True
    no_offload = scaling.write_launch_config(cfg, 2, "fsdp", cuda_devices=2)
    assert yaml.safe_load(no_offload.config_file.read_text())["fsdp_config"][
        "fsdp_offload_params"] is False


def test_shipped_configs_are_package_data():
    for name in scaling.CONFIG_FILES.values():
        assert yaml.safe_load((scaling.LAUNCH_DIR / name).read_text())["num_processes"] >= 1
    assert "launch/*.yaml" in (ROOT / "pyproject.toml").read_text()


# ----------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_a_process_count_below_one_is_refused(tmp_path, n):
    with pytest.raises(scaling.LaunchError, match="at least 1"):
        scaling.check_plan(cfg_of(tmp_path), n, cuda_devices=0)


def test_more_processes_than_gpus_is_refused_but_cpu_processes_are_allowed(tmp_path):
    with pytest.raises(scaling.LaunchError, match="2 GPU.*num_processes = 2"):
        scaling.check_plan(cfg_of(tmp_path), 4, cuda_devices=2)
    assert scaling.check_plan(cfg_of(tmp_path), 2, cuda_devices=2) == []
    assert any("gloo" in n for n in scaling.check_plan(cfg_of(tmp_path), 4, cuda_devices=0))


def test_fsdp_refusals_say_what_to_do(tmp_path):
    ok = {"OPTIMIZER": "adamw_torch", "COMPUTE_DTYPE": "bfloat16"}
    with pytest.raises(scaling.LaunchError, match="FSDP needs CUDA GPUs.*ddp"):
        scaling.check_plan(cfg_of(tmp_path, **ok), 2, "fsdp", cuda_devices=0)
    with pytest.raises(scaling.LaunchError, match="floating-point.*'auto'"):
        scaling.check_plan(cfg_of(tmp_path, QUANT_STORAGE="uint8", **ok), 2, "fsdp", cuda_devices=2)
    with pytest.raises(scaling.LaunchError, match="one dtype"):
        scaling.check_plan(cfg_of(tmp_path, QUANT_STORAGE="float16", **ok), 2, "fsdp",
                     cuda_devices=2)
    with pytest.raises(scaling.LaunchError, match="8-bit.*adamw_torch"):
        scaling.check_plan(cfg_of(tmp_path, COMPUTE_DTYPE="bfloat16"), 2, "fsdp", cuda_devices=2)
    with pytest.raises(scaling.LaunchError, match="'ddp'"):
        scaling.check_plan(cfg_of(tmp_path), 2, "zero3", cuda_devices=2)
    # LoRA dropout and a 32-bit paged optimizer are fine
    notes = scaling.check_plan(cfg_of(tmp_path, LORA_DROPOUT=0.1, OPTIMIZER="paged_adamw_32bit",
                                COMPUTE_DTYPE="bfloat16"), 2, "fsdp", cuda_devices=2)
    assert notes == []


def test_the_entry_point_refuses_before_loading(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    assert T.main([str(run_dir)]) == 2  # no manifest yet
    assert "no manifest.json" in capsys.readouterr().err
    run_dir.mkdir()
    manifest.update(run_dir, lambda d: d.update(parameters=dict(PARAMETERS)))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    # four processes on a machine with two GPUs
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert T.main([str(run_dir)]) == 2
    assert "4 processes asked for" in capsys.readouterr().err
    entry = manifest.load(run_dir)["train"]
    assert entry["status"] == "refused" and "LaunchError" in entry["error"]
    # FSDP with the default 8-bit optimizer: the parameter check refuses it first
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert T.main([str(run_dir)]) == 2
    assert "OPTIMIZER='paged_adamw_8bit' under FSDP" in capsys.readouterr().err
    # FSDP on a machine without GPUs
    manifest.update(run_dir, lambda d: d["parameters"].update(OPTIMIZER="adamw_torch"))
    assert T.main([str(run_dir)]) == 2
    assert "FSDP needs CUDA GPUs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- quant storage


def test_quant_storage_is_uint8_unless_fsdp(monkeypatch):
    assert env.quant_storage_dtype("auto") == torch.uint8
    assert models.quantization_config().bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert env.quant_storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    qc = models.quantization_config(compute_dtype="bfloat16", quant_storage="auto")
    assert qc.bnb_4bit_quant_storage == torch.bfloat16
    assert env.quant_storage_dtype("uint8") == torch.uint8
    with pytest.raises(ValueError, match="QUANT_STORAGE"):
        env.quant_storage_dtype("int4")


# ------------------------------------------------------------------- a real 2-process launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The embedded default trained for 6 steps by two gloo processes started by
    ``accelerate launch`` with the written config; yields (run_dir, manifest, output)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    cfg = make_config(RUN_DIR=str(run_dir), MAX_STEPS=6, SAVE_STEPS=3, WARMUP_STEPS=1)
    launch = scaling.write_launch_config(cfg, 2, cuda_devices=0, port=_free_port())
    assert launch.command[:2] == ["accelerate", "launch"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch.command[2:]]
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    environ = {**clean, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([clean["PYTHONPATH"]] if clean.get("PYTHONPATH") else [])),
        "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return run_dir, manifest.load(run_dir), output, environ


def test_two_processes_trained_one_adapter(ddp_run):
    run_dir, data, output, _ = ddp_run
    entry = data["train"]
    assert entry["status"] == "ok" and entry["launch"]["num_processes"] == 2
    m = entry["metrics"]
    assert m["num_processes"] == 2 and m["train_steps"] == 6
    assert m["global_batch"] == m["micro_batch"] * m["grad_accum"] * 2
    # the tokens were gathered: one process trains on at most steps x micro-batch x
    # accumulation rows of MAX_LENGTH (128) tokens; the count holds both processes' shares
    one_process = m["train_steps"] * m["micro_batch"] * m["grad_accum"] * 128
    assert 1.5 * one_process < m["train_tokens_seen"] <= 2 * one_process
    assert m["tokens_per_second"] > 0
    assert m["eval_loss_after"] < m["eval_loss_before"]
    # one writer: one summary, one adapter, checkpoints at steps 3 and 6
    assert output.count("held-out loss") == 1
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-6"]
    state = json.loads((run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json")
                       .read_text())
    assert state["num_input_tokens_seen"] == m["train_tokens_seen"]


def test_two_processes_resume_exactly(ddp_run, tmp_path):
    """A launch of two processes keeps one RNG state per process; resuming the run from its
    step-3 checkpoint on two processes ends with the adapter of the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file


    run_dir, _, _, environ = ddp_run
    last = run_dir / "checkpoints" / "checkpoint-6"
    assert all(checkpoints.checkpoint_files(last, processes=2).values())
    assert not checkpoints.checkpoint_files(last, processes=1)["rng_state.pth"]
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-6")
    shutil.rmtree(copy / "adapter")
    launch = scaling.write_launch_config(make_config(RUN_DIR=str(copy), MAX_STEPS=6, SAVE_STEPS=3,
                                               WARMUP_STEPS=1), 2, cuda_devices=0,
                                   port=_free_port())
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch.command[2:],
               "--resume"]
    proc = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    m = manifest.load(copy)["train"]["metrics"]
    assert m["resumed_from_step"] == 3 and m["train_steps"] == 6
    whole = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(copy / "adapter" / "adapter_model.safetensors"))
    assert sorted(whole) == sorted(resumed)
    for k in whole:
        assert torch.allclose(whole[k], resumed[k], rtol=0, atol=1e-6), k


def test_fsdp_checkpoint_layout_is_what_resume_asks_for(tmp_path):
    """Under FSDP the Trainer writes the adapter and optimizer as sharded folders and one RNG
    state per process; the resume check asks for those, and names what is missing."""

    ckpt = tmp_path / "checkpoint-2"
    for d in ("pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / d).mkdir(parents=True)
        (ckpt / d / "__0_0.distcp").write_bytes(b"x")
    for f in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"):
        (ckpt / f).write_bytes(b"x")
    assert all(checkpoints.checkpoint_files(ckpt, processes=2, fsdp=True).values())
    single = checkpoints.checkpoint_files(ckpt)
    assert not single["adapter_model.safetensors"] and not single["optimizer.pt"]
    (ckpt / "rng_state_1.pth").unlink()
    assert [n for n, ok in checkpoints.checkpoint_files(ckpt, 2, True).items() if not ok] == [
        "rng_state_1.pth"]


@pytest.mark.notebook
def test_notebook_06_uses_the_adapter_of_two_processes(ddp_run):
    run_dir, _, _, environ = ddp_run
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "helpers.run", "--only", "06", "--run-dir",
                           str(run_dir)], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert adapter.stat().st_mtime_ns == before  # used, not trained again
    m = manifest.load(run_dir)["notebooks"]["06_inference_and_merge"]["metrics"]
    assert m["merge_top1_agreement"] == 1.0 and m["merged_generation_matches"] == 1


def test_fsdp_qlora_gradients_adapter_and_checkpoint_on_every_process(tmp_path):
    """The FSDP-QLoRA wrapping (peft's auto-wrap policy, flat parameters, 4-bit weights stored in
    a float dtype) on 2 CPU processes: every process's LoRA shards receive gradients; the adapter
    saved from the shards is the one ``save_pretrained`` writes for the unwrapped model (same
    keys, same tensors, same config); a sharded checkpoint as the Trainer writes it holds the
    adapter, and loading it restores every LoRA tensor that was zeroed."""
    out = tmp_path / "fsdp"
    worker = Path(__file__).with_name("_fsdp_cpu_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), str(worker), str(out)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        seen = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert math.isfinite(seen["loss"]) and seen["trainable_flat"] > 0
        assert seen["with_grad"] == seen["trainable_flat"]
        assert seen["frozen_4bit_flat"] > 0
        n = seen["gathered"]
        assert n == 2 * 8  # lora_A and lora_B of 2 layers x 4 linear layers of tiny-neox
        assert seen["zeroed"] == n and seen["restored"] == n
    from safetensors.torch import load_file

    plain = load_file(f"{out}.plain/adapter_model.safetensors")
    sharded = load_file(f"{out}.fsdp/adapter_model.safetensors")
    assert len(plain) == 16 and sorted(plain) == sorted(sharded)
    assert all(torch.equal(plain[k], sharded[k]) for k in plain)
    assert json.loads(Path(f"{out}.plain/adapter_config.json").read_text()) == json.loads(
        Path(f"{out}.fsdp/adapter_config.json").read_text())
    checkpoint = out.parent / (out.name + ".ckpt")
    assert any(checkpoint.rglob("*.distcp"))

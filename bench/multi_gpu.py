"""Several GPUs of one host: the same fine-tune through the shipped accelerate configs, with the
single-GPU run beside it on the same machine.

    python bench/multi_gpu.py [--parts ddp-embedded,gpt-j,fsdp-70b] [--gpus 2]

Every run is ``python -m helpers.train RUN_DIR`` (one GPU) or the command
:func:`helpers.scaling.write_launch_config` prints (``accelerate launch --config_file
RUN_DIR/accelerate_<mode>.yaml -m helpers.train RUN_DIR``), exactly as notebook 05's "Scaling
out" section tells a user; the figures are the ``train`` entry each run writes into its
manifest. Results go to ``OUT/multi_gpu.jsonl`` (one line per run, appended as soon as it
exists) and each run's output to ``OUT/<part>-<gpus>.log``.

- ``ddp-embedded``: the embedded default, global batch 16 (16 x 1 GPU, 8 x 2 GPUs), 200 steps:
  the held-out loss should agree within noise.
- ``gpt-j``: the GPT-J-6B rehearsal under a 12 GB budget per GPU on 512-token rows of random
  tokens, 1 GPU and N GPUs (DDP): real tokens per second, gathered over the processes.
- ``fsdp-70b``: the Llama-2-70B rehearsal (about 37 GB in 4-bit, more than a 24 GB card) with
  FSDP-QLoRA over N GPUs, each held to a 24 GB budget: per-GPU peak memory and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers import config, scaling, env, manifest, loading  # noqa: E402

OUT = Path(os.environ.get("OUT", "runs/multi-gpu"))
WORK = Path(os.environ.get("SUITE_WORK", "runs/multi-gpu-work")).resolve()


def emit(record: dict) -> None:
    record["time"] = time.strftime("%H:%M:%S")
    print(json.dumps(record), flush=True)
    with open(OUT / "multi_gpu.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def random_text_file(path: Path, rows: int, tokens: int, seed: int = 0) -> Path:
    """``rows`` lines of ``tokens`` random tokens of the embedded tokenizer, as text (a local
    .jsonl dataset in the Hub layout's text format); throughput does not depend on the words."""
    import torch

    if path.is_file():
        return path
    tok = loading.load_tokenizer("embedded")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, len(tok) - 10, (rows, tokens), generator=g).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in ids:
            f.write(json.dumps({"text": tok.decode(row)}) + "\n")
    return path


KEEP = ("eval_loss_before", "eval_loss_after", "train_loss_final", "train_steps",
        "train_tokens_seen", "tokens_per_second", "peak_gpu_bytes_train",
        "peak_gpu_bytes_train_max_process", "peak_gpu_bytes_train_min_process", "micro_batch",
        "grad_accum", "num_processes", "global_batch", "train_seconds")


def run(part: str, params: dict, gpus: int, mode: str = "ddp", timeout: int = 600,
        offload: bool = False) -> dict:
    """Train with ``params`` on ``gpus`` GPUs (``mode`` ddp or fsdp) and return its figures."""
    run_dir = WORK / f"{part}-{gpus}"
    cfg = config.make_config(RUN_DIR=str(run_dir), **params)
    environ = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus == 1 and mode == "ddp":
        manifest.update(run_dir, lambda d: d.update(parameters=cfg.as_parameters()))
        command = [sys.executable, "-m", "helpers.train", str(run_dir)]
        environ["CUDA_VISIBLE_DEVICES"] = "0"
    else:
        launch = scaling.write_launch_config(cfg, gpus, mode, offload=offload)
        command = launch.command
    started = time.perf_counter()
    log = OUT / f"{part}-{gpus}.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=environ,
                                timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    entry = manifest.load(run_dir).get("train", {})
    metrics = entry.get("metrics", {}) if rc == 0 else {}
    record = {"part": part, "gpus": gpus, "mode": mode, "offload": offload, "rc": rc,
              "wall_seconds": round(time.perf_counter() - started, 1),
              "command": " ".join(str(c) for c in command).replace(str(ROOT) + "/", ""),
              "params": params, **{k: metrics.get(k) for k in KEEP if k in metrics}}
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    if rc == 0 and adapter.is_file():  # LoRA B starts at zero: non-zero means the adapter trained
        from safetensors.torch import load_file

        weights = load_file(str(adapter))
        record["adapter_tensors"] = len(weights)
        record["lora_B_abs_max"] = max((float(t.abs().max()) for k, t in weights.items()
                                        if "lora_B" in k), default=0.0)
    if rc != 0:
        record["error"] = str(entry.get("error", ""))[:800]
        record["log_tail"] = log.read_text()[-1500:]
    emit(record)
    return record


def main() -> int:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="ddp-embedded,gpt-j,fsdp-70b")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="steps of the embedded runs")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    n = args.gpus
    emit({"kind": "card", "gpus": [torch.cuda.get_device_name(i)
                                   for i in range(torch.cuda.device_count())],
          "versions": env.versions()})
    parts = args.parts.split(",")
    if "ddp-embedded" in parts:
        for gpus, micro in ((1, 16), (n, 16 // n)):
            run("ddp-embedded", {"MICRO_BATCH": micro, "MAX_STEPS": args.steps}, gpus,
                timeout=240)
    words = random_text_file(WORK / "random_text.jsonl", rows=1600, tokens=512)
    data = {"DATASET": str(words), "DATA_FORMAT": "text", "TEXT_COLUMN": "text",
            "MAX_LENGTH": 512, "EVAL_FRACTION": 0.01, "SAVE_STEPS": 0, "WARMUP_STEPS": 2}
    if "gpt-j" in parts:
        for gpus in (1, n):
            run("gpt-j", {"MODEL": "rehearsal:gpt-j-6b", "MEMORY_BUDGET_GB": 12,
                          "MAX_STEPS": 30, **data}, gpus, timeout=300)
    if "fsdp-70b" in parts or "fsdp-70b-offload" in parts:
        run("fsdp-70b", {"MODEL": "rehearsal:llama-2-70b", "MEMORY_BUDGET_GB": 24,
                         "OPTIMIZER": "adamw_torch", "LORA_TARGETS": "attention", "LORA_R": 8,
                         **data, "MAX_STEPS": 4, "MICRO_BATCH": 2, "EVAL_FRACTION": 0.002},
            n, mode="fsdp", timeout=420,
            offload="fsdp-70b-offload" in parts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""FSDP-QLoRA on 2 GPUs, looked at from inside the optimizer: do the LoRA shards get gradients
and move on every process, does the saved adapter hold them, and does resuming restore them?

    python bench/fsdp_resume.py prep RUN_DIR OFFLOAD [PARAM=VALUE ...]   # prints the config file
    accelerate launch --config_file CONFIG bench/fsdp_resume.py run RUN_DIR [--resume]

``prep`` records the parameters (the Llama-3.1-8B rehearsal, LoRA on attention, 3 steps,
``adamw_torch``; PARAM=VALUE overrides) and writes the FSDP launch config (OFFLOAD 1: CPU
offload). ``run`` is ``python -m helpers.train RUN_DIR`` with global optimizer hooks that print,
for the first three optimizer steps on every process, the trainable shards' count, how many are
all zero (LoRA B starts at zero), how many have no or a zero gradient, and the largest gradient
and value; at the end the main process prints what the saved adapter file holds.

Resume check (the figures in bench/results/h100x2_fsdp_checks.txt): ``prep`` with MAX_STEPS=2
SAVE_STEPS=2 and ``run``; then ``prep`` with MAX_STEPS=3 SAVE_STEPS=2 and ``run ... --resume``.
A restored adapter shows no all-zero shard at the resumed run's first step, and its gradient
equals the one an uninterrupted 3-step run has at step 3.
"""
import json
import os
import sys
from pathlib import Path

from torch.optim import optimizer as optimizer_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULTS = dict(MODEL="rehearsal:llama-3.1-8b", MAX_STEPS=3, MICRO_BATCH=2, OPTIMIZER="adamw_torch",
                LORA_TARGETS="attention", SAVE_STEPS=0, WARMUP_STEPS=1)


def value(text: str):
    return int(text) if text.isdigit() else {"True": True, "False": False}.get(text, text)


def prep(run_dir: str, offload: bool, overrides: list) -> None:
    from helpers import config, scaling

    params = {**DEFAULTS, **{k: value(v) for k, v in (a.split("=", 1) for a in overrides)}}
    cfg = config.make_config(RUN_DIR=run_dir, **params)
    print(scaling.write_launch_config(cfg, 2, "fsdp", offload=offload).config_file)


def summary(opt, grads: bool) -> dict:
    ps = [p for g in opt.param_groups for p in g["params"] if p.numel()]
    d = {"n": len(ps), "numel": sum(p.numel() for p in ps),
         "zero_valued": sum(1 for p in ps if float(p.detach().abs().max()) == 0),
         "devs": sorted({str(p.device) for p in ps}), "dtypes": sorted({str(p.dtype) for p in ps}),
         "pmax": max((float(p.detach().abs().max()) for p in ps), default=None)}
    if grads:
        with_grad = [p for p in ps if p.grad is not None]
        d.update(nograd=len(ps) - len(with_grad),
                 zero_grad=sum(1 for p in with_grad if float(p.grad.abs().max()) == 0),
                 gmax=max((float(p.grad.abs().max()) for p in with_grad), default=None))
    return d


def run(run_dir: str, extra: list) -> int:
    rank = int(os.environ.get("RANK", 0))
    steps = {"n": 0}

    def pre(opt, args, kwargs):
        if steps["n"] < 3:
            print("DIAG pre", rank, steps["n"], json.dumps(summary(opt, True)), flush=True)

    def post(opt, args, kwargs):
        if steps["n"] < 3:
            print("DIAG post", rank, steps["n"], json.dumps(summary(opt, False)), flush=True)
        steps["n"] += 1

    optimizer_hooks.register_optimizer_step_pre_hook(pre)
    optimizer_hooks.register_optimizer_step_post_hook(post)
    from helpers import train

    rc = train.main([run_dir] + extra)
    weights = Path(run_dir) / "adapter" / "adapter_model.safetensors"
    if rank == 0 and weights.is_file():
        from safetensors.torch import load_file

        w = load_file(str(weights))
        b = [float(t.abs().max()) for k, t in w.items() if "lora_B" in k]
        a = [float(t.abs().max()) for k, t in w.items() if "lora_A" in k]
        print("DIAG saved", len(w), "lora_B max", max(b or [-1]), "nonzero B",
              sum(x > 0 for x in b), "of", len(b), "lora_A max", max(a or [-1]), flush=True)
    return rc


if __name__ == "__main__":
    if sys.argv[1] == "prep":
        prep(sys.argv[2], sys.argv[3] == "1", sys.argv[4:])
    else:
        sys.exit(run(sys.argv[2], sys.argv[3:]))

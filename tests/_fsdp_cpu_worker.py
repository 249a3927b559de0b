"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): the FSDP-QLoRA
wrapping that accelerate's FSDP config applies (peft's auto-wrap policy, use_orig_params=False,
4-bit weights stored in the compute dtype) on a tiny 4-bit rehearsal with the series' LoRA layers,
one forward and backward; writes what each process saw to ``OUT.rank<N>.json``."""

import json
import sys

import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from helpers import config, lora, models

dist.init_process_group("gloo")
rank = dist.get_rank()
model = models.build_rehearsal("tiny-neox", device="cpu", compute_dtype="float32",
                               quant_storage=torch.float32)
cfg = config.make_config(RUN_DIR=sys.argv[1] + ".run", MODEL="rehearsal:tiny-neox", LORA_DROPOUT=0.0)
lora.prepare_for_training(model, True, False)
peft_model = lora.attach(model, cfg)
with torch.no_grad():  # B = 0 would leave A without gradient
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
wrapped = FSDP(peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model),
               use_orig_params=False, device_id=torch.device("cpu"))
ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(rank))
out = wrapped(input_ids=ids, labels=ids)
out.loss.backward()
trainable = [p for p in wrapped.parameters() if p.requires_grad]
report = {"loss": float(out.loss), "trainable_flat": len(trainable),
          "with_grad": sum(1 for p in trainable if p.grad is not None
                           and float(p.grad.abs().sum()) > 0),
          "frozen_4bit_flat": sum(1 for p in wrapped.parameters() if not p.requires_grad)}
with open(f"{sys.argv[1]}.rank{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()

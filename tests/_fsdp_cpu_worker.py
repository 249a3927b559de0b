"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): the FSDP-QLoRA
wrapping that accelerate's FSDP config applies (peft's auto-wrap policy, use_orig_params=False,
4-bit weights stored in the compute dtype) on a tiny 4-bit rehearsal with the series' LoRA layers.

One forward and backward; then the adapter as training saves it under FSDP
(:func:`helpers.fsdp.gather_trainable` + ``save_sharded_adapter``, into ``OUT.fsdp``,
beside ``OUT.plain``: ``save_pretrained`` of the same model before wrapping), and a sharded
checkpoint as the Trainer writes one (accelerate's ``save_fsdp_model``, adapter only), loaded
back into zeroed LoRA shards. Writes what each process saw to ``OUT.rank<N>.json``."""

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils.fsdp_utils import load_fsdp_model, save_fsdp_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import (ShardedOptimStateDictConfig, ShardedStateDictConfig,
                                    StateDictType)

from helpers import config, fsdp, lora, models, rehearsal

out = sys.argv[1]
dist.init_process_group("gloo")
PartialState(cpu=True)  # accelerate's checkpoint functions log through it
rank = dist.get_rank()
model = rehearsal.build_rehearsal("tiny-neox", models.quantization_config(
    compute_dtype="float32", quant_storage=torch.float32), device="cpu")
cfg = config.make_config(RUN_DIR=out + ".run", MODEL="rehearsal:tiny-neox", LORA_DROPOUT=0.0)
lora.prepare_for_training(model, True, False)
torch.manual_seed(0)  # the same LoRA A on both processes (on GPUs FSDP broadcasts rank 0's)
peft_model = lora.attach(model, cfg)
with torch.no_grad():  # B = 0 would leave A without gradient
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
if rank == 0:
    peft_model.save_pretrained(out + ".plain", safe_serialization=True)
wrapped = FSDP(peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model),
               use_orig_params=False, device_id=torch.device("cpu"))
ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(rank))
loss = wrapped(input_ids=ids, labels=ids).loss
loss.backward()
trainable = [p for p in wrapped.parameters() if p.requires_grad]
report = {"loss": float(loss), "trainable_flat": len(trainable),
          "with_grad": sum(1 for p in trainable if p.grad is not None
                           and float(p.grad.abs().sum()) > 0),
          "frozen_4bit_flat": sum(1 for p in wrapped.parameters() if not p.requires_grad)}

# the final adapter
before = fsdp.gather_trainable(wrapped)
report["gathered"] = len(before)
if rank == 0:
    fsdp.save_sharded_adapter(peft_model, out + ".fsdp", before)

# a checkpoint as the Trainer writes one, and resuming from it
report["patched"] = fsdp.match_peft_names_under_fsdp()
plugin = SimpleNamespace(state_dict_type=StateDictType.SHARDED_STATE_DICT, fsdp_version=1,
                         state_dict_config=ShardedStateDictConfig(),
                         optim_state_dict_config=ShardedOptimStateDictConfig())
accel = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0,
                        is_fsdp2=False, wait_for_everyone=dist.barrier)
save_fsdp_model(plugin, accel, wrapped, out + ".ckpt", adapter_only=True)
with torch.no_grad():
    for p in trainable:
        p.zero_()
zeroed = fsdp.gather_trainable(wrapped)
report["zeroed"] = sum(1 for k in before if not torch.equal(before[k], zeroed[k]))
load_fsdp_model(plugin, accel, wrapped, out + ".ckpt", adapter_only=True)
after = fsdp.gather_trainable(wrapped)
report["restored"] = sum(1 for k in before if torch.equal(before[k], after[k]))
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()

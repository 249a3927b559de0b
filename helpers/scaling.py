"""Scaling out: the same fine-tune on several GPUs through ``accelerate launch`` (notebook 05's last
section). The per-GPU memory estimate under DDP and FSDP, the check of a plan before anything
loads (:func:`check_plan`), and the accelerate config written into RUN_DIR with the command that
starts it (:func:`write_launch_config`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers import env
from helpers.config import FSDP_OPTIMIZERS  # the parameter rule lives with the other rules
from helpers.estimator import (Estimate, Item, _dtype_bytes, _lora_specs, _outside_allocator,
                               estimate)
from helpers.shapes import ModelShape
from helpers.units import fmt_bytes, quantized_weight_bytes


# What a process of a multi-GPU launch holds outside torch's allocator besides the CUDA context:
# NCCL's communicator buffers and kernels. Measured on 2 NVIDIA H200 (torch 2.11, NCCL for
# CUDA 13, FSDP over NVLink): 2.49 GB outside the allocator per process against 0.80 GB alone.
NCCL_BYTES = 1_700_000_000


# Items FSDP shards: every persistent tensor of the model, its gradients and optimizer state.
_SHARDED = ("weights_4bit", "quant_constants", "embeddings", "lm_head", "norms_biases",
            "lora_params", "lora_grads", "optimizer", "optimizer_paged")
SCALING_MODES = ("ddp", "fsdp")


def _small_weight_bytes(settings: dict) -> int:
    """Bytes per element of the weights that stay unquantized (norms, biases, embeddings):
    float32 when upcast, else the compute dtype's."""
    return 4 if settings["upcast_fp32"] else _dtype_bytes(settings["compute_dtype"])


def _block_bytes(shape: ModelShape, settings: dict) -> int:
    """Bytes of one transformer block's parameters as FSDP gathers them: its 4-bit linears with
    their constants, norms and biases in the 16-bit dtype, and its LoRA weights (float32)."""
    wb = _small_weight_bytes(settings)
    quant = sum(sum(quantized_weight_bytes(s.params, double_quant=settings["double_quant"])
                    .values()) for s in shape.linears)
    small = shape.norms_per_block * shape.params_per_norm + \
        sum(s.d_out for s in shape.linears if s.bias)
    r = settings["lora_r"]
    lora = sum(r * (s.d_in + s.d_out) for s in _lora_specs(shape, settings["lora_targets"]))
    return quant + small * wb + lora * 4


def estimate_per_gpu(shape, n_gpus: int, mode: str = "ddp", *, prefetch: bool = True,
                     offload: bool = False, **estimate_kwargs) -> Estimate:
    """Predicted memory of each GPU when the same QLoRA step runs on ``n_gpus`` GPUs.

    ``mode="ddp"`` (data parallel, one whole model per GPU): the one-GPU :func:`estimate`, plus
    DDP's gradient buckets, a second float32 copy of the LoRA gradients that the all-reduce
    works on. ``mode="fsdp"`` (fully sharded, the 4-bit weights stored in the compute dtype): the
    4-bit weights, their constants, the 16-bit embeddings, head, norms and biases, the LoRA
    parameters, their gradients and the optimizer state are divided by ``n_gpus``; on top, FSDP
    all-gathers one transformer block at a time (two with ``prefetch``: the next block is
    fetched while this one computes) and keeps the root unit - embeddings, head and final norm,
    everything outside the wrapped blocks - whole from the forward through the backward. With
    ``offload`` (``fsdp_offload_params``) the shards live in CPU RAM and only the gathered
    units are on the card. Activations, logits and the buffers of one block's backward are
    per GPU and do not shrink: each GPU still runs its own micro-batch.
    ``estimate_kwargs`` are :func:`estimate`'s (``seq_len``, ``micro_batch``, ...); the result
    is an :class:`Estimate` whose items say what was divided. Introduced in notebook 05.
    """
    if mode not in SCALING_MODES:
        raise ValueError(f"mode={mode!r}: use 'ddp' (a whole model per GPU) or 'fsdp' (sharded)")
    if int(n_gpus) != n_gpus or n_gpus < 1:
        raise ValueError(f"n_gpus={n_gpus} must be a whole number of at least 1")
    n = int(n_gpus)
    one = estimate(shape, **estimate_kwargs)
    settings = {**one.settings, "n_gpus": n, "mode": mode, "prefetch": prefetch,
                "offload": offload}
    items = [dataclasses.replace(i) for i in one.items
             if i.key not in ("allocator_slack", "cuda_context")]
    by_key = {i.key: i for i in items}
    if mode == "ddp":
        grads = by_key["lora_grads"].bytes
        items.append(Item("ddp_buckets", "DDP gradient buckets", grads, grads if n > 1 else 0,
                          "a float32 copy of the LoRA gradients that the all-reduce averages"))
    else:
        for i in items:
            if i.key in _SHARDED and i.bytes:
                i.at_peak = 0 if offload else math.ceil(i.bytes / n)
                i.explanation = (f"in CPU RAM (offloaded); {fmt_bytes(i.bytes / n)} per GPU "
                                 "there" if offload else
                                 f"1/{n} of {fmt_bytes(i.bytes)} ({i.explanation})")
        sh = one.shape
        root = by_key["embeddings"].bytes + by_key["lm_head"].bytes + \
            _small_weight_bytes(one.settings) * sh.params_per_norm  # the final norm
        block = _block_bytes(sh, one.settings)
        gathered = block * (2 if prefetch and sh.layers > 1 else 1)
        items += [
            Item("fsdp_root", "root unit, gathered", root, root if n > 1 else 0,
                 "embeddings, head and final norm held whole from forward to backward"),
            Item("fsdp_gathered_blocks", "blocks gathered", gathered, gathered if n > 1 else 0,
                 f"{gathered // block if block else 0} whole block(s) of {fmt_bytes(block)}: "
                 "the one computing" + (" and the one prefetched" if gathered > block else "")),
        ]
    allocated = sum(i.at_peak for i in items if i.allocator)
    cuda = one.settings["cuda_context"]
    items += _outside_allocator(items, allocated, cuda, one.settings["allocator_slack"],
                                one.settings["context_bytes"],
                                "driver context and kernels, on every GPU")
    if cuda and n > 1:
        items.append(Item("nccl", "NCCL communicators", NCCL_BYTES, NCCL_BYTES,
                          "the process group's buffers and kernels, outside torch's allocator",
                          allocator=False))
    device = sum(i.at_peak for i in items)
    return Estimate(shape=one.shape, settings=settings, items=items,
                    total_allocated=int(allocated), total_device=int(device),
                    footprint=one.footprint, peak_phase=one.peak_phase,
                    activation_detail=one.activation_detail)


LAUNCH_DIR = Path(__file__).resolve().parent / "launch"
CONFIG_FILES = {"ddp": "ddp.yaml", "ddp_cpu": "ddp_cpu.yaml", "fsdp": "fsdp_qlora.yaml"}


class LaunchError(ValueError):
    """A multi-process plan that cannot work; the message says why and what to do instead."""


@dataclass
class Launch:
    """What :func:`write_launch_config` made: the config file in RUN_DIR, the command that starts
    the run (``command`` as a list, ``command_line`` to paste into a shell) and notes."""

    mode: str
    num_processes: int
    config_file: Path
    command: list
    notes: list = field(default_factory=list)

    @property
    def command_line(self) -> str:
        return shlex.join(str(c) for c in self.command)

    def __str__(self) -> str:
        return "\n".join([self.command_line] + [f"  note: {n}" for n in self.notes])


def _gpu_count(cuda_devices) -> int:
    return torch.cuda.device_count() if cuda_devices is None else int(cuda_devices)


def check_plan(cfg, num_processes: int, mode: str = "ddp", *, cuda_devices: int | None = None,
               offload: bool = False) -> list:
    """Refuse a multi-process plan that cannot work, before anything is loaded; return notes.

    ``num_processes`` processes on this machine in ``mode`` ("ddp" or "fsdp"); ``cuda_devices``
    is the number of visible GPUs (default: ``torch.cuda.device_count()``; 0 = a CPU machine).
    Raises :class:`LaunchError` for: fewer than 1 process; more processes than GPUs on a GPU
    machine (one process per GPU; on a CPU machine gloo processes share the cores); FSDP
    without GPUs (accelerate applies FSDP only to GPU launches: on CPU it would silently run
    unsharded); FSDP with ``QUANT_STORAGE = 'uint8'`` (FSDP shards floating-point tensors only)
    or a storage dtype other than the compute dtype; FSDP with an 8-bit optimizer (see
    :data:`FSDP_OPTIMIZERS`). Called by :func:`write_launch_config` and by
    ``python -m helpers.train`` with what the launcher started. Introduced in notebook 05.
    """
    notes: list[str] = []
    if mode not in SCALING_MODES:
        raise LaunchError(f"mode={mode!r}: use 'ddp' (a whole model per GPU, the model fits one "
                          "card) or 'fsdp' (the model sharded over the GPUs)")
    if isinstance(num_processes, bool) or int(num_processes) != num_processes \
            or num_processes < 1:
        raise LaunchError(f"num_processes={num_processes!r}: use a whole number of at least 1 "
                          "(one process per GPU)")
    gpus = _gpu_count(cuda_devices)
    if gpus > 0 and num_processes > gpus:
        raise LaunchError(
            f"{num_processes} processes asked for, but this machine shows {gpus} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one "
            f"process drives one GPU; use num_processes = {gpus} or fewer")
    if gpus == 0 and num_processes > 1:
        notes.append(f"no GPU: {num_processes} CPU processes (gloo) share this machine's "
                     f"{os.cpu_count()} cores; right for testing the launch, not for speed")
    if mode == "fsdp":
        if gpus == 0:
            raise LaunchError(
                "FSDP needs CUDA GPUs: accelerate applies FSDP only to GPU launches, and on CPU "
                "the run would silently train unsharded copies. On this machine use mode='ddp' "
                "(gloo processes) to test the launch; run FSDP on a machine with GPUs")
        compute = env.compute_dtype(cfg.compute_dtype)
        try:  # as the launched processes will decide it
            storage = env.quant_storage_dtype(cfg.quant_storage, compute, fsdp=True)
        except ValueError as err:
            raise LaunchError(str(err)) from None
        if not storage.is_floating_point:
            raise LaunchError(
                f"QUANT_STORAGE={cfg.quant_storage!r} under FSDP: FSDP shards floating-point "
                "tensors only, and packs every parameter of a layer into one tensor of one "
                "dtype. Set QUANT_STORAGE = 'auto' (the compute dtype under FSDP) or "
                "'bfloat16'")
        if storage != compute:
            raise LaunchError(
                f"QUANT_STORAGE={cfg.quant_storage!r} differs from the compute dtype "
                f"({str(compute).replace('torch.', '')}): FSDP flattens the 4-bit weights with "
                "the 16-bit embeddings and norms of the same layer, so they must share one "
                "dtype. Set QUANT_STORAGE = 'auto'")
        if cfg.optimizer not in FSDP_OPTIMIZERS:
            raise LaunchError(
                f"OPTIMIZER={cfg.optimizer!r} under FSDP: bitsandbytes' 8-bit optimizer state "
                "cannot be gathered into FSDP checkpoints, and FSDP's flattening changes which "
                "tensors get 8-bit state. Use OPTIMIZER = 'adamw_torch' or 'paged_adamw_32bit': "
                "FSDP divides the optimizer state by the number of GPUs anyway")
        if num_processes == 1:
            notes.append("FSDP on one GPU shards nothing; it only adds overhead (use it to "
                         "rehearse the launch)")
        if not cfg.gradient_checkpointing:
            notes.append("GRADIENT_CHECKPOINTING = False under FSDP: every GPU keeps all "
                         "layers' activations; FSDP-QLoRA of a large model usually needs it on")
        if offload:
            notes.append("fsdp_offload_params: shards and the optimizer step live in CPU RAM "
                          "(slower, but only the gathered layers are on the cards)")
    return notes


def write_launch_config(cfg, num_processes: int, mode: str = "ddp", *, offload: bool = False,
                        port: int | None = None, cuda_devices: int | None = None) -> Launch:
    """Write the accelerate config for ``num_processes`` processes in ``mode`` into RUN_DIR and
    return the :class:`Launch` with the exact command to start the run.

    The plan is checked first (:func:`check_plan`). The file is the shipped
    ``helpers/launch/<ddp|ddp_cpu|fsdp_qlora>.yaml`` with ``num_processes`` (and, for FSDP,
    ``fsdp_offload_params``; with ``port``, ``main_process_port``) filled in, written as
    ``RUN_DIR/accelerate_<name>.yaml``. The Config's parameters are recorded in the run
    manifest, which is where ``python -m helpers.train RUN_DIR`` reads them from. Nothing is
    launched. Introduced in notebook 05.
    """
    from helpers import manifest

    notes = check_plan(cfg, num_processes, mode, cuda_devices=cuda_devices, offload=offload)
    if not cfg.run_dir:
        raise LaunchError("RUN_DIR is empty: helpers.config.start(...) sets it")
    name = CONFIG_FILES["fsdp" if mode == "fsdp" else
                        "ddp" if _gpu_count(cuda_devices) > 0 else "ddp_cpu"]
    run_dir = Path(cfg.run_dir)
    target = run_dir / f"accelerate_{name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    text = re.sub(r"(?m)^num_processes: .*$", f"num_processes: {int(num_processes)}",
                  (LAUNCH_DIR / name).read_text())
    text = re.sub(r"(?m)^(\s*fsdp_offload_params:) \w+", rf"\1 {str(offload).lower()}", text)
    target.write_text(text + (f"main_process_port: {int(port)}\n" if port is not None else ""))
    manifest.record_parameters(run_dir, cfg.as_parameters())
    command = ["accelerate", "launch", "--config_file", str(target), "-m", "helpers.train",
               str(run_dir)]
    return Launch(mode=mode, num_processes=int(num_processes), config_file=target,
                  command=command, notes=notes)

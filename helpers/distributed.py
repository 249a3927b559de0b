"""Scaling out: the same fine-tune on several GPUs (or CPU processes) through ``accelerate``.
Introduced in notebook 05's last section.

Two ways to use more than one GPU:

- **DDP** (data parallel): a whole 4-bit model on every GPU; each trains on its own micro-batches
  and the LoRA gradients are averaged after every backward. For a model that fits one card and a
  run you want sooner: N GPUs see N x the examples per step.
- **FSDP-QLoRA** (fully sharded): the 4-bit weights, the LoRA weights, their gradients and the
  optimizer state are divided over the GPUs and each layer is gathered only while it computes.
  For a model that does not fit one card (Llama-2-70B on 2 x 24 GB). It needs the 4-bit weights
  stored in the compute dtype (``QUANT_STORAGE``; "auto" does it) and a 32-bit optimizer.

One entry point serves all of them: ``python -m helpers.train RUN_DIR`` (one process, or one per
GPU under ``accelerate launch``), with the parameters recorded in ``RUN_DIR/manifest.json``.
:func:`write_launch_config` copies the right shipped accelerate config (``helpers/launch/*.yaml``)
into RUN_DIR with the number of processes filled in and returns the exact command;
:func:`check_plan` refuses, before anything starts, what cannot work, saying what would; the
training entry point calls it too, with what the launcher actually started.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers.memory import SCALING_MODES as MODES  # ddp, fsdp: the estimator's two ways

LAUNCH_DIR = Path(__file__).resolve().parent / "launch"
CONFIG_FILES = {"ddp": "ddp.yaml", "ddp_cpu": "ddp_cpu.yaml", "fsdp": "fsdp_qlora.yaml"}
# Optimizers whose state FSDP can shard and save: bitsandbytes' 8-bit states are blockwise
# quantized tensors of their own shapes, which FSDP1's optimizer state dict cannot gather
# (bitsandbytes issue #89), and flattening changes which tensors get 8-bit state (issue #2080).
FSDP_OPTIMIZERS = ("adamw_torch", "paged_adamw_32bit")


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


def world() -> dict:
    """This process's place in a launch, from the variables torchrun/accelerate set: ``rank``,
    ``local_rank``, ``world_size``, ``local_world_size`` (1 process: 0, 0, 1, 1), ``fsdp`` and
    ``offload`` (the FSDP config's ``fsdp_offload_params``, which accelerate launch passes as
    ``FSDP_OFFLOAD_PARAMS``)."""
    from helpers import env

    def num(name, default):
        try:
            return int(os.environ.get(name, default))
        except ValueError:
            return default

    size = num("WORLD_SIZE", 1)
    fsdp = env.fsdp_active()
    return {"rank": num("RANK", 0), "local_rank": num("LOCAL_RANK", 0), "world_size": size,
            "local_world_size": num("LOCAL_WORLD_SIZE", size), "fsdp": fsdp,
            "offload": fsdp and env.flag("FSDP_OFFLOAD_PARAMS")}


def is_main_process() -> bool:
    """True in a single process and in rank 0 of a launch: the one that writes files."""
    return world()["rank"] == 0


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
    from helpers import env

    notes: list[str] = []
    if mode not in MODES:
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


def _config_text(name: str, num_processes: int, *, offload: bool, port: int | None) -> str:
    text = (LAUNCH_DIR / name).read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith("num_processes:"):
            line = f"num_processes: {num_processes}"
        elif line.strip().startswith("fsdp_offload_params:"):
            indent = line[:len(line) - len(line.lstrip())]
            comment = line.split("#", 1)[1] if "#" in line else ""
            line = f"{indent}fsdp_offload_params: {'true' if offload else 'false'}" + \
                (f"  #{comment}" if comment else "")
        lines.append(line)
    if port is not None:
        lines.append(f"main_process_port: {int(port)}")
    return "\n".join(lines) + "\n"


def config_name(mode: str, cuda_devices: int | None = None) -> str:
    """The shipped config for ``mode`` on this machine: fsdp_qlora.yaml, ddp.yaml, or
    ddp_cpu.yaml where there is no GPU."""
    if mode == "fsdp":
        return CONFIG_FILES["fsdp"]
    return CONFIG_FILES["ddp" if _gpu_count(cuda_devices) > 0 else "ddp_cpu"]


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
    name = config_name(mode, cuda_devices)
    run_dir = Path(cfg.run_dir)
    target = run_dir / f"accelerate_{name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_config_text(name, int(num_processes), offload=offload, port=port))
    manifest.record_parameters(run_dir, cfg.as_parameters())
    command = ["accelerate", "launch", "--config_file", str(target), "-m", "helpers.train",
               str(run_dir)]
    return Launch(mode=mode, num_processes=int(num_processes), config_file=target,
                  command=command, notes=notes)


# ============================================================================ from a notebook


def _notebook_worker(run_dir: str) -> None:
    from helpers import train

    code = train.main([run_dir])
    if code:
        raise RuntimeError(f"helpers.train exited with status {code}")


def notebook_launch(cfg, num_processes: int, *, cuda_devices: int | None = None,
                    dry_run: bool = False):
    """Start the DDP run of ``cfg`` on ``num_processes`` processes from a notebook cell, with
    ``accelerate.notebook_launcher``; returns the launcher's result (``dry_run``: the arguments
    it would be called with, after the checks).

    When it works: in a fresh kernel, on one machine, for DDP - restart the kernel, run the
    setup and parameters cells and ``helpers.config.start``, then call this before loading a
    model. When it does not, it refuses with the reason: once CUDA is initialized in the kernel
    (a model on the GPU, a ``torch.cuda`` memory readout) forked processes cannot use CUDA;
    once bitsandbytes is imported (loading a 4-bit model imports it) or a Trainer/Accelerator
    exists in the kernel, accelerate itself refuses to fork. FSDP needs its config file: use
    :func:`write_launch_config` and the command line. On a CPU machine the processes are forked
    gloo workers. Introduced in notebook 05.
    """
    import sys

    notes = check_plan(cfg, num_processes, "ddp", cuda_devices=cuda_devices)
    gpus = _gpu_count(cuda_devices)
    if num_processes > 1 and "bitsandbytes" in sys.modules:
        raise LaunchError(
            "bitsandbytes is already imported in this kernel (a 4-bit model was loaded), and "
            "accelerate's notebook_launcher refuses to fork after that. Restart the kernel and "
            "call notebook_launch before loading a model, or run the command from "
            "write_launch_config(...) in a terminal")
    if num_processes > 1 and _accelerate_state_exists():
        raise LaunchError(
            "a Trainer or Accelerator was already created in this kernel, and accelerate's "
            "notebook_launcher refuses to fork after that. Restart the kernel and call "
            "notebook_launch before training, or run the command from write_launch_config(...)")
    if gpus > 0 and torch.cuda.is_initialized():
        raise LaunchError(
            "CUDA is already initialized in this kernel (a model or a memory readout used the "
            "GPU), and processes forked from it cannot use CUDA. Restart the kernel and call "
            "notebook_launch before anything touches the GPU, or run the command from "
            "write_launch_config(...) in a terminal")
    if not cfg.run_dir:
        raise LaunchError("RUN_DIR is empty: helpers.config.start(...) sets it")
    from helpers import manifest

    manifest.record_parameters(cfg.run_dir, cfg.as_parameters())
    kwargs = {"args": (str(cfg.run_dir),), "num_processes": int(num_processes)}
    if dry_run:
        return {"function": _notebook_worker, **kwargs, "notes": notes}
    from accelerate import notebook_launcher

    return notebook_launcher(_notebook_worker, **kwargs)


def _accelerate_state_exists() -> bool:
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover
        return False
    return len(AcceleratorState._shared_state) > 0


# ============================================================================ notebook 05


def suggested_processes(cuda_devices: int | None = None) -> int:
    """One process per visible GPU; 2 gloo processes on a machine without one."""
    return _gpu_count(cuda_devices) or 2


def launch_plans(cfg, num_processes: int | None = None, *, cuda_devices: int | None = None,
                 offload: bool = False) -> str:
    """Notebook 05's "Scaling out" in one call: write the DDP config for ``num_processes``
    (default :func:`suggested_processes`) into RUN_DIR and, where this Config and machine allow
    it, the FSDP-QLoRA one; return the commands to run them, or why FSDP is refused here and
    what to change. Nothing is launched."""
    n = num_processes or suggested_processes(cuda_devices)
    lines = []
    ddp = write_launch_config(cfg, n, "ddp", cuda_devices=cuda_devices)
    lines += [f"DDP, {n} processes (the model fits one card; the run finishes sooner):",
              f"  {ddp.command_line}"] + [f"  note: {x}" for x in ddp.notes]
    try:
        fsdp = write_launch_config(cfg, n, "fsdp", cuda_devices=cuda_devices, offload=offload)
    except LaunchError as err:
        lines += ["FSDP-QLoRA (the model does not fit one card): not with these settings "
                  f"here: {err}"]
    else:
        lines += [f"FSDP-QLoRA, {n} processes (the model does not fit one card):",
                  f"  {fsdp.command_line}"] + [f"  note: {x}" for x in fsdp.notes]
    return "\n".join(lines)


# ============================================================================ the adapter under FSDP

# module names FSDP (and its checkpoint wrapper) insert between a model's own module names
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrapped_name(name: str) -> str:
    """``name`` (a module or parameter path) without the segments FSDP's wrappers add, i.e. the
    name the same module has in the model before wrapping."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def gather_trainable(wrapped) -> dict:
    """Every trainable parameter of an FSDP-wrapped model, whole and on the CPU, keyed by its
    name in the unwrapped model (``base_model.model....lora_A.default.weight``).

    One FSDP unit at a time, and only the units whose flat parameter trains: peft's wrap policy
    gives each LoRA layer a unit of its own, so the frozen 4-bit weights (35 GB for a 70B model)
    are never gathered. A collective: every process calls it; every process gets the tensors."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = {id(m): unwrapped_name(n) for n, m in wrapped.named_modules()}
    gathered = {}
    for unit in FSDP.fsdp_modules(wrapped):
        own = list(unit.parameters(recurse=False)) + list(unit.module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            prefix = names[id(unit)]
            for name, p in unit.module.named_parameters():
                if any(seg in name.split(".") for seg in WRAPPER_SEGMENTS + ("_flat_param",)):
                    continue  # a nested unit's (gathered in its own turn)
                if p.requires_grad:
                    key = unwrapped_name(f"{prefix}.{name}" if prefix else name)
                    gathered[key] = p.detach().to("cpu", copy=True)
    return gathered


class _UnwrappedNames:
    """A model (FSDP-wrapped, or a peft model whose layers FSDP wrapped) seen with the module and
    parameter names it had before wrapping: ``named_modules`` and ``named_parameters`` give
    those names; everything else is the model's own (``load_state_dict`` included)."""

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def named_modules(self, *args, **kwargs):
        for name, module in self._model.named_modules(*args, **kwargs):
            yield unwrapped_name(name), module

    def named_parameters(self, *args, **kwargs):
        for name, param in self._model.named_parameters(*args, **kwargs):
            yield unwrapped_name(name), param

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_model"), name)


def match_peft_names_under_fsdp() -> bool:
    """Make peft read an FSDP-wrapped model by its names from before wrapping, so that the
    Trainer's FSDP checkpoints hold the adapter and resuming restores it.

    peft (0.21) picks the adapter's state-dict entries by module names and removes only a
    leading ``_fsdp_wrapped_module.``; FSDP-QLoRA wraps every decoder layer and LoRA layer, so
    the names disagree and a checkpoint holds no adapter weights. Loading one, peft decides from
    the parameter names whether the keys keep their ``base_model.model.`` prefix, and under FSDP
    it drops it, so nothing is restored. This wraps those two peft functions so that they see the
    names without FSDP's segments (other models are passed through unchanged). Returns True when
    it wrapped them (False: already done, or a peft without these functions). Called by the
    training entry point under FSDP."""
    try:
        import peft
        from peft.tuners import tuners_utils
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return False
    prefixes_of = getattr(tuners_utils, "_get_tuner_state_dict_key_prefixes", None)
    set_state = getattr(peft, "set_peft_model_state_dict", None)
    if prefixes_of is None or set_state is None or getattr(set_state, "unwrapped_names", False):
        return False

    def prefixes(model, *args, **kwargs):
        return prefixes_of(_UnwrappedNames(model), *args, **kwargs)

    def set_peft_model_state_dict(model, *args, **kwargs):
        return set_state(_UnwrappedNames(model) if isinstance(model, FSDP) else model,
                         *args, **kwargs)

    set_peft_model_state_dict.unwrapped_names = True
    tuners_utils._get_tuner_state_dict_key_prefixes = prefixes
    peft.set_peft_model_state_dict = set_peft_model_state_dict
    return True


def save_sharded_adapter(peft_model, folder, tensors: dict) -> Path:
    """Write the adapter of ``peft_model`` (whose layers FSDP wrapped) into ``folder`` from
    ``tensors`` (:func:`gather_trainable`), in exactly the format ``save_pretrained`` writes for
    the unwrapped model: ``adapter_model.safetensors`` and ``adapter_config.json``.

    peft picks the adapter's weights by module names, which FSDP's wrappers change, so its own
    ``save_pretrained`` on the wrapped model writes an empty file; here it is given the names
    from before wrapping. Embedding layers are not saved (they are frozen here, and notebook 06
    rebuilds them as training did). Main process only."""
    from peft import PeftModel

    folder = Path(folder)
    PeftModel.save_pretrained(_UnwrappedNames(peft_model), str(folder), state_dict=tensors,
                              safe_serialization=True, save_embedding_layers=False)
    return folder

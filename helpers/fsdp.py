"""FSDP-QLoRA's adapter: peft finds adapter weights by module name, which FSDP's wrappers change,
so its own save writes an empty adapter. :func:`gather_trainable` gathers the LoRA layers one at
a time, :func:`save_sharded_adapter` writes them under the names from before wrapping, and
:func:`match_peft_names_under_fsdp` lets the Trainer's checkpoints hold and restore them.
"""

from __future__ import annotations

from pathlib import Path


# module names FSDP (and its checkpoint wrapper) insert between a model's own module names
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def accept_indexed_cpu_locations() -> None:
    """Let ``torch.load`` restore storages to a location named ``cpu:N``.

    Under a CPU launch of several processes (gloo) the Trainer can ask ``torch.load`` for its
    own device, ``cpu:0``, when it restores a checkpoint's optimizer; torch's CPU deserializer
    accepts only the exact name ``cpu`` and fails with "don't know how to restore data location
    ... (tagged with cpu:0)". Registered once; other locations are left to torch.
    """
    import torch.serialization as ser

    if getattr(ser, "_qlora_series_cpu_index", False):
        return

    def restore(obj, location):
        return obj if location.startswith("cpu:") and location[4:].isdigit() else None

    ser.register_package(15, lambda _obj: None, restore)
    ser._qlora_series_cpu_index = True


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
    import peft
    from peft.tuners import tuners_utils
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

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

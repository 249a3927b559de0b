"""Rehearsal models: random weights of a real architecture built directly in 4-bit, layer by layer
on the target device, so that the memory and speed of a 20B fine-tune can be measured before
anything is downloaded (``MODEL=rehearsal:<name>``, notebook 02).
"""

from __future__ import annotations

import zlib
import torch
from torch import nn
from helpers.units import BITS_PER_PARAM_DQ, BITS_PER_PARAM_NO_DQ
from helpers.embedded import embedded_path
from helpers.models import (REHEARSAL_PREFIX, REHEARSALS, ModelSource, ModelUnavailableError,
                            _compute_dtype, _device, _from_pretrained, cpu_safe, rehearsal_config)


def _rehearsal_tokenizer(source: ModelSource):
    """The real model's tokenizer when the Hub (or its local cache) has it, else the embedded
    model's tokenizer, whose ids fit every shipped architecture's vocabulary."""
    from transformers import AutoTokenizer

    if source.hub_id:
        try:
            return _from_pretrained(AutoTokenizer, ModelSource("hub", source.hub_id,
                                                               hub_id=source.hub_id))
        except ModelUnavailableError as err:
            print(f"note: no tokenizer of {source.hub_id} here ({str(err).split(' [')[0]}); "
                  "the rehearsal uses the embedded model's tokenizer")
    return AutoTokenizer.from_pretrained(str(embedded_path()))


def _free_bytes(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    import psutil

    return psutil.virtual_memory().available


def _check_room(model, name: str, dev: torch.device, dtype: torch.dtype, qc) -> None:
    """Refuse, before anything is made, a rehearsal that cannot fit where it is to be built."""
    double_quant = qc is None or qc.bnb_4bit_use_double_quant
    bits = BITS_PER_PARAM_DQ if double_quant else BITS_PER_PARAM_NO_DQ
    need = largest = 0
    for param in model.parameters():
        if type(param).__name__ == "Params4bit":
            need += param.numel() * bits / 8
            largest = max(largest, param.numel() * dtype.itemsize)  # its unquantized form, briefly
        else:
            need += param.numel() * param.element_size()
    need += largest
    free = _free_bytes(dev)
    if need > free:
        others = ", ".join(f"'{REHEARSAL_PREFIX}{n}'" for n in REHEARSALS
                           if f"{REHEARSAL_PREFIX}{n}" != name)
        raise ModelUnavailableError(
            f"{name} needs about {need / 2**30:.1f} GiB on {dev} and {free / 2**30:.1f} GiB are "
            f"free; choose a smaller model ({others}) or a machine with more memory")


def draw(module, full_name: str, shape, dtype, generator, *, seed: int = 0, std: float = 0.02):
    """One parameter of a rehearsal, on the generator's device: zeros for a bias, ones for a
    norm's weight, else normal with ``std``, from a seed per parameter (the build seed and the
    parameter's name, stable across runs), so a parameter can be drawn again alone (the streamed
    merge draws the 16-bit base one tensor at a time, :mod:`helpers.streammerge`)."""
    device = generator.device
    if full_name.rsplit(".", 1)[-1] == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if "norm" in type(module).__name__.lower():  # a norm's weight
        return torch.ones(shape, dtype=dtype, device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(full_name.encode())) % (2**63 - 1))
    value = torch.empty(shape, dtype=dtype, device=device)
    return value.normal_(0.0, std, generator=generator)


def build_rehearsal(name, quantization_config=None, *, dtype=None, device=None, seed: int = 0,
                    build_device=None):
    """A real architecture with random weights, built directly in 4-bit (notebook 02).

    ``quantization_config`` is the ``BitsAndBytesConfig`` that ``from_pretrained`` would take: its
    quant type, double quantization, compute dtype and storage dtype are used here. The model's
    skeleton is made on the ``meta`` device (no memory); transformers' quantizer replaces every
    linear layer but the output head by a bitsandbytes ``Linear4bit``; then each layer in turn
    gets a random weight (normal, std = the config's ``initializer_range``) generated on the
    target device, quantized there, and the unquantized tensor is freed at once: the 16-bit model
    is never held anywhere.
    Embeddings, norms and head are made in the compute dtype directly on the device. The result
    looks to transformers, peft and the Trainer like a model loaded with
    ``from_pretrained(quantization_config=...)``. On a GPU, GPT-NeoX-20B takes about 11 GB.

    Without ``quantization_config`` the same random weights are built unquantized, in ``dtype``
    (what :func:`helpers.loading.load_16bit` gives). ``build_device``: where the values are drawn
    and quantized, when not ``device`` (a GPU is hundreds of times faster at it than a CPU).
    """
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    qc = quantization_config
    config = rehearsal_config(name)
    dev = _device(device)
    make = torch.device(build_device) if build_device is not None else dev
    dtype = qc.bnb_4bit_compute_dtype if qc is not None else _compute_dtype(dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    settings = {}
    if qc is not None:
        settings = {"quant_type": qc.bnb_4bit_quant_type,
                    "compress_statistics": bool(qc.bnb_4bit_use_double_quant),
                    "quant_storage": qc.bnb_4bit_quant_storage}
        # transformers' own quantizer swaps the linear layers for Linear4bit, as from_pretrained
        model.hf_quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
        model.hf_quantizer.preprocess_model(model, device_map={"": dev})

    _check_room(model, config.name_or_path, dev, dtype, qc)
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator(device=make)
    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            value = draw(module, full_name, param.shape, dtype, generator, seed=seed, std=std)
            if isinstance(module, bnb.nn.Linear4bit) and param_name == "weight":
                # quantized on its way to the device; the 16-bit tensor is dropped right after
                module.weight = bnb.nn.Params4bit(
                    value, requires_grad=False, module=module, **settings).to(make)
                if make != dev:  # quant_state moves with it, in place (the module shares it)
                    module.weight = module.weight.to(dev)
            else:
                module._parameters[param_name] = nn.Parameter(
                    value.to(dev), requires_grad=param.requires_grad)
            del value
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.device != dev and not buffer.is_meta:
                module._buffers[buffer_name] = buffer.to(dev)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise RuntimeError(f"rehearsal of {config.name_or_path}: tensors left unmade: {left[:5]}")

    if qc is not None:  # what from_pretrained(quantization_config=...) leaves on a 4-bit model
        model.hf_quantizer.postprocess_model(model)
    model.name_or_path = config.name_or_path
    model.eval()
    if dev.type == "cpu":
        cpu_safe(model)
    return model

"""Loading a model for the series: the tokenizer with a real padding token distinct from EOS
(:func:`load_tokenizer`), the base in 4-bit (:func:`load_model`, notebook 02's cells in one call),
in 16-bit for the merge (:func:`load_16bit`), and what a loaded model is (:func:`describe`).
Introduced in notebook 02.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from helpers import env
from helpers.units import logical_numel
from helpers.models import (_compute_dtype, _device, _device_map, _from_pretrained, cpu_safe,
                            quantization_config, resolve)
from helpers.rehearsal import _rehearsal_tokenizer, build_rehearsal
from helpers.tokens import PAD_TOKEN


def load_tokenizer(model, padding_side: str = "right"):
    """The tokenizer of MODEL, with a real padding token and right padding for training
    (notebook 02).

    Padding with EOS, as the original recipe does, makes the data collator mask every EOS out of
    the labels, and the tuned model never learns to stop. So a tokenizer whose padding token is
    missing or is EOS gets ``<|pad|>`` (the existing token when the vocabulary has one, else a new
    special token: then the model's embeddings must grow, see :func:`fit_embeddings`).
    A rehearsal has no tokenizer of its own: it uses the real model's tokenizer when the Hub is
    reachable, else the embedded model's (its ids fit every shipped architecture's vocabulary).
    """
    from transformers import AutoTokenizer

    source = resolve(model)
    if source.kind == "rehearsal":
        tokenizer = _rehearsal_tokenizer(source)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = padding_side
    return tokenizer


def fit_embeddings(model, tokenizer) -> bool:
    """Grow the embeddings (and head) when the tokenizer has more tokens than the model has rows
    (it gained ``<|pad|>``), and tell the model which ids pad and end; True if it grew
    (notebook 02)."""
    grew = len(tokenizer) > model.get_input_embeddings().weight.shape[0]
    if grew:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        config.pad_token_id = tokenizer.pad_token_id
        if getattr(config, "eos_token_id", None) is None:
            config.eos_token_id = tokenizer.eos_token_id
    return grew


def load_model(model, *, quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype="auto", device=None, tokenizer=None, quant_storage="auto"):
    """MODEL loaded in 4-bit, as the article does, on the GPU (or on CPU): notebook 02's cells in
    one call, for the notebooks after it and the command line.

    The ``BitsAndBytesConfig`` of :func:`helpers.models.quantization_config` goes to
    ``from_pretrained(..., quantization_config=..., device_map={"": 0} or {"": "cpu"},
    dtype=compute dtype)``: every linear layer but the output head becomes a bitsandbytes
    ``Linear4bit``; embeddings, norms and head stay in the compute dtype. A rehearsal takes the
    same config (:func:`helpers.rehearsal.build_rehearsal`). Then :func:`fit_embeddings` with the
    tokenizer (given, or :func:`load_tokenizer`'s), and on CPU :func:`helpers.models.cpu_safe`.

    ``quant_storage`` ("auto": ``uint8``, or the compute dtype inside an FSDP launch; see
    :func:`helpers.env.quant_storage_dtype`). Under FSDP, with no ``device`` given, a Hub or local
    model is loaded without a device map, in the storage dtype, as transformers' FSDP-QLoRA
    loading expects (FSDP places the shards), and a rehearsal is built in CPU RAM, where FSDP
    takes it from (``fsdp_sync_module_states``).
    """
    source = resolve(model)
    fsdp = env.fsdp_active() and device is None
    dev = torch.device("cpu") if fsdp and source.kind == "rehearsal" else _device(device)
    dtype = _compute_dtype(compute_dtype)
    qc = quantization_config(quant_type, double_quant, dtype, quant_storage)
    if source.kind == "rehearsal":
        # under FSDP a rehearsal is drawn and quantized on this process's GPU, layer by layer, and
        # kept in CPU RAM (a 70B model in minutes of CPU time otherwise)
        build_on = None
        if fsdp and torch.cuda.is_available():
            build_on = torch.device("cuda", env.world()["local_rank"])
        loaded = build_rehearsal(source, qc, device=dev, build_device=build_on)
    else:
        storage = qc.bnb_4bit_quant_storage
        placement = {"device_map": _device_map(dev)} if not fsdp else {}
        load_dtype = storage if (fsdp and storage.is_floating_point) else dtype
        loaded = _from_pretrained(AutoModelForCausalLM, source, quantization_config=qc,
                                  low_cpu_mem_usage=True, dtype=load_dtype, **placement)
        if dev.type == "cpu":  # build_rehearsal does it for a rehearsal
            cpu_safe(loaded)
    fit_embeddings(loaded, tokenizer if tokenizer is not None else load_tokenizer(source))
    return loaded


def load_16bit(model, dtype=None, *, device=None, tokenizer=None):
    """MODEL without quantization, to merge an adapter into (notebook 06).

    ``dtype`` defaults to float32 on CPU and to the compute dtype on a GPU (bf16 or fp16).
    The embeddings grow as in :func:`load_model`, so an adapter trained there fits. A rehearsal
    gives the same random weights its 4-bit build quantized (same seed), unquantized.
    """
    source = resolve(model)
    dev = _device(device)
    dtype = _compute_dtype(torch.float32 if dtype is None and dev.type == "cpu" else dtype)
    if source.kind == "rehearsal":
        loaded = build_rehearsal(source, dtype=dtype, device=dev)
    else:
        loaded = _from_pretrained(AutoModelForCausalLM, source, device_map=_device_map(dev),
                                  low_cpu_mem_usage=True, dtype=dtype)
    fit_embeddings(loaded, tokenizer if tokenizer is not None else load_tokenizer(source))
    return loaded


def describe(model) -> dict:
    """Architecture, size and precision of a loaded model, as one flat dict (notebook 02)."""
    import bitsandbytes as bnb

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config()
    four_bit = other = 0
    dtypes: dict = {}
    for param in base.parameters():
        if type(param).__name__ == "Params4bit":
            four_bit += logical_numel(param)
        else:
            other += param.numel()
            key = str(param.dtype).replace("torch.", "")
            dtypes[key] = dtypes.get(key, 0) + param.numel()
    quant = getattr(config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    architectures = getattr(config, "architectures", None) or [type(base).__name__]
    linear4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    return {
        "name": str(getattr(config, "name_or_path", "") or getattr(base, "name_or_path", "")),
        "architecture": architectures[0],
        "model_type": config.model_type,
        "parameters": four_bit + other,
        "parameters_4bit": four_bit,
        "parameters_other": other,
        "layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "attention_heads": getattr(text, "num_attention_heads", None),
        "vocab_size": base.get_input_embeddings().weight.shape[0],
        "context": getattr(text, "max_position_embeddings", None),
        "linear_4bit_layers": linear4,
        "dtype_other": max(dtypes, key=dtypes.get) if dtypes else None,
        "quant_type": quant.get("bnb_4bit_quant_type") if quant else None,
        "double_quant": quant.get("bnb_4bit_use_double_quant") if quant else None,
        "footprint_bytes": base.get_memory_footprint(),
        "device": str(next(base.parameters()).device),
    }

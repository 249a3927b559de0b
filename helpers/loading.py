"""Loading a model for the series: the tokenizer with a real padding token distinct from EOS
(:func:`load_tokenizer`), the base in 4-bit (:func:`load_model`, notebook 02's cells in one call),
in 16-bit for the merge (:func:`load_16bit`), and what a loaded model is (:func:`describe`);
the safetensors reader that loads a local folder one tensor at a time (and the streamed merge
reads its base with).
Introduced in notebook 02.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
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
    ``Linear4bit``; embeddings, norms and head stay in the compute dtype. A local folder of
    safetensors (the embedded model, notebook 06's merged model) is read one tensor at a time as
    it is quantized (:func:`_from_files`): host RAM holds the 4-bit model and one tensor, not
    every shard. A rehearsal takes the
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
        load = _from_pretrained if fsdp else _from_files
        loaded = load(AutoModelForCausalLM, source, quantization_config=qc,
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


# ------------------------------------------------------------------ safetensors, a tensor at a time

_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.int16: "I16"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
_OWN_PAGES = 1 << 20  # a tensor this large or larger is read into pages of its own


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets), where its data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read(f, start: int, entry: dict) -> torch.Tensor:
    """One tensor read into fresh memory with plain file reads: no mapping of the file, so the
    process holds this tensor and nothing else of the shard."""
    begin, end = entry["data_offsets"]
    n = end - begin
    # memory of its own, given back to the system when the tensor is freed (from the C heap, a
    # freed tensor's pages often stay with the process: hundreds of MB over a model's loading)
    buffer = mmap.mmap(-1, n) if n >= _OWN_PAGES else bytearray(n)
    f.seek(start + begin)
    if f.readinto(buffer) != n:
        raise OSError(f"{f.name} ends early: the file is truncated; download it again")
    if n == 0:
        return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    return torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing): what the previous tensor's conversion freed, before the next one is read."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class _FileTensor:
    """One tensor of a safetensors file, read (:func:`_read`) only when transformers takes it
    (``tensor[...]``, as it takes a slice of a mapped file), and not kept."""

    __slots__ = ("path", "start", "entry")

    def __init__(self, path: Path, start: int, entry: dict):
        self.path, self.start, self.entry = path, start, entry

    def __getitem__(self, index) -> torch.Tensor:
        _trim_heap()
        with open(self.path, "rb") as f:
            tensor = _read(f, self.start, self.entry)
        return tensor if index is Ellipsis else tensor[index]


def _safetensors_files(folder: Path) -> list | None:
    """The folder's safetensors weight files (one, or those its index names), or None."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def _from_files(loader, source, **kwargs):
    """``loader.from_pretrained`` of a local folder's safetensors, each tensor read from its file
    when transformers loads (and, in 4-bit, quantizes) it, then dropped.

    ``from_pretrained`` given the folder maps every shard into memory, and each page it reads
    stays resident until the whole model is loaded: a 16 GB folder loaded in 4-bit takes 16 GB
    more RAM than the 4-bit model it makes. Given the same tensors as a ``state_dict`` whose
    values are read on demand, it holds one tensor at a time and loads the same model. A Hub
    model, a folder of other weight files, a pre-quantized folder or one with an adapter goes
    to ``from_pretrained`` as usual (:func:`helpers.models._from_pretrained`).
    """
    from transformers import AutoConfig, GenerationConfig

    folder = source.path
    files = _safetensors_files(folder) if source.kind in ("local", "embedded") else None
    config = AutoConfig.from_pretrained(folder) if files else None
    if (files is None or getattr(config, "quantization_config", None) is not None
            or (folder / "adapter_config.json").exists()):
        return _from_pretrained(loader, source, **kwargs)
    state = {}
    for path in files:
        header, start = _header(path)
        state.update({key: _FileTensor(path, start, entry) for key, entry in header.items()})
    if hasattr(loader, "_model_mapping"):  # an Auto class: the model class of the config
        from transformers.models.auto.auto_factory import _get_model_class

        loader = _get_model_class(config, loader._model_mapping)
    model = loader.from_pretrained(None, config=config, state_dict=state, **kwargs)
    model.config.name_or_path = model.name_or_path = str(folder)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model

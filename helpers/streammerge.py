"""The streamed merge (notebook 06): the adapter folded into the 16-bit base one tensor at a time,
so that no process ever holds the whole 16-bit model (a T4 runtime has 15 GB of GPU memory and
12.7 GB of RAM; a 16-bit 8B model weighs 16 GB).

- :func:`plan_merge` reads only the base's file headers (or, for a rehearsal, its config) and the
  adapter, and says what the merge will hold at most; a merge over the GPU or host budget is
  refused there, before anything is loaded (:class:`MergeBudgetError`, with what would fit).
- :func:`helpers.adapters.capture_activations` records, on the adapter's own model, real inputs
  of every LoRA layer and what the adapter adds to them (peft's modules and scaling, float32).
- :func:`stream_merge` reads each base tensor (from the safetensors files, without mapping them
  into memory; a rehearsal's is drawn again from its seed), adds its LoRA update
  (scale x B @ A, in float32), checks the layer against the captured activations, and writes it
  into safetensors shards with an index, ``config.json`` and the tokenizer, so that
  ``AutoModelForCausalLM.from_pretrained`` loads the folder. The result equals peft's
  ``merge_and_unload()`` (tests compare them on a model small enough for both).

Introduced in notebook 06.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
import torch
from helpers import env
from helpers.adapters import MergeMismatch, _adapter_files
from helpers.footprint import cpu_rss
from helpers.loading import _CODES, _DTYPES, _header, _read
from helpers.models import _compute_dtype, resolve
from helpers.units import GB, fmt_bytes

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.[^.]+)?(?:\.weight)?$")
MAX_SHARD_BYTES = 2 * 10**9  # the merged model's files, as save_pretrained(max_shard_size="2GB")
# The layer check: the largest difference between the merged layer's output and the base's plus
# the adapter's, over the largest of those outputs, by the dtype the merged weights are stored in
# (float32: summation order only; 16-bit: the merged weight rounded to 11 or 8 significant bits).
LAYER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


class MergeBudgetError(ValueError):
    """A merge that would not fit the memory budgets, refused before anything was loaded."""


# ------------------------------------------------------------------ safetensors, written (read: loading)


class _ShardWriter:
    """A safetensors file written one tensor at a time: the header (every name, dtype, shape and
    offset) is known from the plan, so nothing is held but the tensor being written."""

    def __init__(self, path: Path, items: list):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in items:
            n = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _CODES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.expected = [(key, tuple(shape), dtype) for key, shape, dtype in items]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want = self.expected.pop(0)
        if (key, tuple(tensor.shape), tensor.dtype) != want:
            raise RuntimeError(f"shard written out of plan: {key} {tuple(tensor.shape)} "
                               f"{tensor.dtype}, the plan has {want}")
        self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        self.file.close()  # closing twice does nothing
        if self.expected:
            raise RuntimeError(f"shard closed with {len(self.expected)} tensors unwritten")


# ------------------------------------------------------------------ the adapter


@dataclass
class LoraUpdate:
    """One adapted weight's update: ``scale * B @ A`` (transposed for embeddings and for
    fan-in-fan-out layers, whose weight is stored inputs x outputs)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transposed: bool

    def apply(self, w32: torch.Tensor) -> torch.Tensor:
        """``w32`` (float32) plus the update, in place, without a separate delta tensor."""
        if self.transposed:
            return w32.addmm_(self.A.t(), self.B.t(), alpha=self.scale)
        return w32.addmm_(self.B, self.A, alpha=self.scale)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir) -> tuple[dict, dict, dict]:
    """The adapter as ``(updates, replacements, settings)``: base weight name ->
    :class:`LoraUpdate` (A and B in float32, the scale from ``lora_alpha`` / r, or / sqrt(r) with
    ``use_rslora``, with ``rank_pattern`` and ``alpha_pattern``), base weight name -> a whole
    tensor the adapter replaces (``modules_to_save``, saved embeddings), and adapter_config.json.
    Variants whose merge is not a plain sum (DoRA, LoRA biases) are refused, saying so."""
    from safetensors.torch import load_file

    config_file, weights_file = _adapter_files(adapter_dir)
    settings = json.loads(config_file.read_text())
    unsupported = [n for n in ("use_dora", "lora_bias", "target_parameters") if settings.get(n)]
    if unsupported:
        raise ValueError(f"the adapter in {adapter_dir} uses {', '.join(unsupported)}, which the "
                         "streamed merge does not fold in; merge it in memory with peft's "
                         "merge_and_unload() on a machine that holds the 16-bit model")
    parts, replacements = {}, {}
    for key, tensor in load_file(str(weights_file)).items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LORA_KEY.match(name)
        if m is None:  # a whole tensor the adapter carries (modules_to_save, embeddings)
            replacements[re.sub(r"\.modules_to_save\.[^.]+", "", name)] = tensor
            continue
        parts.setdefault(m.group(1), {})[m.group(2).replace("embedding_", "")] = tensor.float()
        if "embedding" in m.group(2):
            parts[m.group(1)]["embedding"] = True
    updates = {}
    for module, p in parts.items():
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"the adapter in {adapter_dir} has only half of layer {module}'s "
                             "LoRA weights; re-save the adapter")
        r = p["lora_A"].shape[0]
        alpha = _pattern_value(settings.get("alpha_pattern"), module, settings.get("lora_alpha", r))
        scale = alpha / (math.sqrt(r) if settings.get("use_rslora") else r)
        updates[f"{module}.weight"] = LoraUpdate(
            p["lora_A"], p["lora_B"], scale,
            transposed=bool(p.get("embedding") or settings.get("fan_in_fan_out")))
    return updates, replacements, settings


# ------------------------------------------------------------------ where the base comes from


class _FileBase:
    """The base's safetensors files (a local folder, the embedded model, a Hub snapshot)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{folder} holds no safetensors weights (model.safetensors or an index); the "
                "streamed merge reads only safetensors: re-save the model with "
                "save_pretrained(..., safe_serialization=True)")
        self.items, self._where = [], {}
        for name in files:
            header, start = _header(folder / name)
            for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                self.items.append((key, tuple(entry["shape"]), _DTYPES[entry["dtype"]]))
                self._where[key] = (name, start, entry)
        self._open = None

    def read(self, key: str) -> torch.Tensor:
        name, start, entry = self._where[key]
        if self._open is None or self._open.name != str(self.folder / name):
            self.close()
            self._open = open(self.folder / name, "rb")  # noqa: SIM115 - closed by close()
        return _read(self._open, start, entry)

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None


class _RehearsalBase:
    """A rehearsal's 16-bit weights, drawn again one tensor at a time from their seeds
    (:func:`helpers.rehearsal.draw`), on the device the 4-bit build drew them on."""

    def __init__(self, skeleton, dtype: torch.dtype, device):
        self.skeleton, self.dtype = skeleton, dtype
        self.modules = dict(skeleton.named_modules())
        self.std = getattr(skeleton.config, "initializer_range", 0.02)
        self.generator = torch.Generator(device=device)
        self.items = [(k, tuple(p.shape), dtype) for k, p in skeleton.named_parameters()]
        self.shapes = {k: shape for k, shape, _ in self.items}

    def read(self, key: str) -> torch.Tensor:
        from helpers.rehearsal import draw

        module = self.modules[key.rpartition(".")[0]]
        return draw(module, key, self.shapes[key], self.dtype, self.generator,
                    std=self.std).cpu()

    def close(self) -> None:  # nothing is open
        return None


def _skeleton(config):
    """The model's architecture on the meta device (no memory): its parameter names and shapes,
    and which of them are the input embeddings and the output head."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def _base_folder(source) -> Path:
    """The folder holding the base's files: the embedded model's or a local one, or the Hub
    model's local snapshot (only weights, config and tokenizer files are fetched)."""
    if source.path is not None:
        return Path(source.path)
    from huggingface_hub import snapshot_download

    from helpers.models import hub_reachable

    return Path(snapshot_download(
        source.hub_id, local_files_only=not hub_reachable(),
        allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json", "*.model",
                        "*.txt", "*.jinja"]))


# ------------------------------------------------------------------ the plan


@dataclass
class MergePlan:
    """What the streamed merge will read, write and hold (bytes), decided before anything is
    loaded. ``print(plan)`` says it in words."""

    model: str
    kind: str
    dtype: torch.dtype
    items: list  # (name, shape, dtype read)
    shards: list  # per output file: [(name, shape, dtype written)]
    largest: tuple  # (name, bytes while merged)
    host_need: int
    gpu_need: int
    host_budget: int
    gpu_budget: int
    host_baseline: int
    output_bytes: int  # the merged model, on disk and when held whole
    adapted: int

    @property
    def in_memory_fits(self) -> bool:
        """Whether peft's in-memory ``merge_and_unload`` fits too: the 16-bit model twice (the
        merged model and its reload) beside what the process holds (notebook 06 then runs it as
        the reference)."""
        room = (self.gpu_budget - torch.cuda.memory_allocated() if torch.cuda.is_available()
                else self.host_budget - self.host_baseline)
        return 2 * self.output_bytes < room

    def text(self) -> str:
        return "\n".join([
            f"Streamed merge of {self.model} ({self.kind}) into {str(self.dtype)[6:]}: "
            f"{len(self.items)} tensors, {self.adapted} with a LoRA update, written as "
            f"{len(self.shards)} shard(s), {fmt_bytes(self.output_bytes)}.",
            f"Holds at most one tensor at a time: the largest, {self.largest[0]}, takes "
            f"{fmt_bytes(self.largest[1])} while merged; host RAM {fmt_bytes(self.host_need)} "
            f"(with the {fmt_bytes(self.host_baseline)} the process holds) of a "
            f"{fmt_bytes(self.host_budget)} budget; GPU {fmt_bytes(self.gpu_need)} of "
            + (f"{fmt_bytes(self.gpu_budget)}." if self.gpu_budget else "none (no GPU)."),
            "merge_and_unload in memory (the model whole, twice) "
            + ("fits too." if self.in_memory_fits else "does not fit the budgets."),
        ])

    __str__ = __repr__ = text


def _plan_shards(items: list, max_bytes: int) -> list:
    """The output tensors in files of at most ``max_bytes`` (a larger tensor alone in one)."""
    shards, size = [[]], 0
    for item in items:
        n = math.prod(item[1]) * item[2].itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def plan_merge(model, adapter_dir, *, dtype=None, tokenizer=None, host_budget: int | None = None,
               gpu_budget: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
               reserve: int = 0) -> MergePlan:
    """The streamed merge of ``adapter_dir`` into MODEL's 16-bit base, planned from the files'
    headers (a rehearsal: its config) and the adapter alone, or :class:`MergeBudgetError`.

    ``dtype``: the merged weights' dtype (default: float32 on CPU, the compute dtype on a GPU,
    as :func:`helpers.loading.load_16bit`). ``tokenizer``: the embeddings grow to its length
    (a pad token added by :func:`helpers.loading.load_tokenizer`; new rows take the mean row).
    ``host_budget`` / ``gpu_budget``: bytes (default: the detected RAM, the card). ``reserve``:
    host bytes to keep for what runs beside the merge (the captured activations).
    Host need: what the process holds now plus the largest tensor read, in float32 and written,
    plus the adapter; GPU need (a rehearsal drawn on the GPU): the largest tensor drawn.
    """
    source = resolve(model)
    cuda = torch.cuda.is_available()
    dtype = _compute_dtype(dtype if dtype is not None else
                           ("auto" if cuda else torch.float32))
    updates, replacements, _ = read_adapter(adapter_dir)
    if source.kind == "rehearsal":
        from helpers.models import rehearsal_config

        config = rehearsal_config(source)
        skeleton = _skeleton(config)
        items = [(k, tuple(p.shape), dtype) for k, p in skeleton.named_parameters()]
    else:
        folder = _base_folder(source)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
        skeleton = _skeleton(config)
        items = _FileBase(folder).items
    names = {k for k, _, _ in items}
    missing = sorted(set(updates) - names)
    if missing:
        raise ValueError(f"the adapter updates {len(missing)} weight(s) the base's files do not "
                         f"name, e.g. {missing[0]} (the base's names: {items[0][0]}, ...); is it "
                         "the adapter of this MODEL?")
    rows = len(tokenizer) if tokenizer is not None else 0
    grow = _grown(skeleton, rows)
    out_items = [(k, grow.get(k, shape), dtype if d.is_floating_point else d)
                 for k, shape, d in items]
    sizes = {k: math.prod(s) for k, s, _ in out_items}
    read_dtype = {k: d for k, _, d in items}
    # the tensor read, the merged one (a copy where it changes) and, adapted, float32 copies
    working = {k: sizes[k] * (read_dtype[k].itemsize + (8 if k in updates else 0) + (
        d.itemsize if k in updates or k in grow or d != read_dtype[k] else 0))
        for k, _, d in out_items}
    largest = max(working.items(), key=lambda kv: kv[1])
    adapter_bytes = sum(u.A.numel() + u.B.numel() for u in updates.values()) * 4 + sum(
        t.numel() * t.element_size() for t in replacements.values())
    baseline = cpu_rss()
    host_need = baseline + largest[1] + adapter_bytes + reserve
    gpu_need = max(sizes.values()) * dtype.itemsize if source.kind == "rehearsal" and cuda else 0
    host_budget = host_budget or env.host_budget_bytes()
    gpu_budget = gpu_budget if gpu_budget is not None else (
        torch.cuda.get_device_properties(0).total_memory if cuda else 0)
    plan = MergePlan(
        model=source.name, kind=source.kind, dtype=dtype, items=items,
        shards=_plan_shards(out_items, max_shard_bytes), largest=largest, host_need=host_need,
        gpu_need=gpu_need, host_budget=host_budget, gpu_budget=gpu_budget,
        host_baseline=baseline, output_bytes=sum(sizes[k] * d.itemsize for k, _, d in out_items),
        adapted=len(updates))
    plan._source, plan._config, plan._skeleton = source, config, skeleton
    plan._updates, plan._replacements, plan._grow = updates, replacements, grow
    _refuse_over_budget(plan, gpu_allocated=torch.cuda.memory_allocated() if cuda else 0)
    return plan


def _grown(skeleton, rows: int) -> dict:
    """Parameter name -> grown shape for the input embeddings and an untied output head, when
    the tokenizer has more tokens than they have rows."""
    out = {}
    params = dict(skeleton.named_parameters())
    for layer in (skeleton.get_input_embeddings(), skeleton.get_output_embeddings()):
        for name, p in params.items():
            if layer is not None and p is layer.weight and rows > p.shape[0]:
                out[name] = (rows, *p.shape[1:])
    return out


def _refuse_over_budget(plan: MergePlan, gpu_allocated: int) -> None:
    problems, ways = [], []
    if plan.host_need > plan.host_budget:
        problems.append(
            f"it needs about {plan.host_need / GB:.2f} GB of host RAM "
            f"({plan.host_baseline / GB:.2f} GB the process holds now, {plan.largest[1] / GB:.2f} GB for its largest tensor "
            f"{plan.largest[0]} while merged) and the host budget is "
            f"{plan.host_budget / GB:.2f} GB")
        ways.append(f"HOST_MEMORY_BUDGET_GB >= {math.ceil(plan.host_need / GB * 10) / 10:.1f} "
                    "on a machine with that much RAM")
        ways.append("free what the process holds (del the model, helpers.units.free()) so that "
                    f"{plan.largest[1] / GB:.2f} GB fit beside it")
    if plan.gpu_need and plan.gpu_need + gpu_allocated > plan.gpu_budget:
        problems.append(f"drawing the rehearsal's largest tensor needs {plan.gpu_need / GB:.2f} "
                        f"GB of GPU memory beside the {gpu_allocated / GB:.2f} GB allocated, over "
                        f"the {plan.gpu_budget / GB:.2f} GB budget")
        need = math.ceil((plan.gpu_need + gpu_allocated) / GB * 10) / 10
        ways.append(f"MEMORY_BUDGET_GB >= {need:.1f}, or free the 4-bit model first")
    if problems:
        raise MergeBudgetError(
            f"the streamed merge of {plan.model} does not fit: {'; '.join(problems)}. Nothing "
            f"was loaded. What would fit: {'; or '.join(ways)}.")


# ------------------------------------------------------------------ the merge


@dataclass
class StreamResult:
    """What :func:`stream_merge` did: the folder, its files, the largest relative difference of
    a merged layer from base + adapter on real activations (``layer_max_rel_diff``, over
    ``layers_checked`` layers, against ``tolerance``), and the peak host RSS during the merge."""

    out_dir: str
    files: list
    size_bytes: int
    layers_checked: int
    layer_max_rel_diff: float
    worst_layer: str
    tolerance: float
    peak_host_rss: int
    seconds: float

    def text(self) -> str:
        return (f"Merged into {self.out_dir}: {len(self.files)} file(s), "
                f"{fmt_bytes(self.size_bytes)}; {self.layers_checked} layers checked on real "
                f"activations, largest relative difference from base + adapter "
                f"{self.layer_max_rel_diff:.1e} ({self.worst_layer}; tolerance "
                f"{self.tolerance:.0e}); host RSS peak during the merge "
                f"{fmt_bytes(self.peak_host_rss)}; {self.seconds:.1f} s.")

    __str__ = __repr__ = text


def _layer_rel_diff(merged: torch.Tensor, base: torch.Tensor, x: torch.Tensor,
                    delta: torch.Tensor, transposed: bool) -> float:
    """max |merged(x) - (base(x) + delta)| / max |base(x) + delta|, in float32."""
    def out(w):
        return x @ w.float() if transposed else x @ w.float().t()
    want = out(base) + delta
    return float((out(merged) - want).abs().max() / want.abs().max().clamp_min(1e-12))


def stream_merge(plan: MergePlan, out_dir, *, tokenizer=None, activations: dict | None = None,
                 device=None) -> StreamResult:
    """Write the merged model planned by :func:`plan_merge` to ``out_dir``, one tensor at a time.

    Each base tensor is read (or drawn, for a rehearsal, on ``device``: default the GPU when
    there is one, where the 4-bit build drew it), its LoRA update is added in float32
    (:class:`LoraUpdate`), checked against ``activations`` (:func:`capture_activations`; a layer
    off by more than :data:`LAYER_TOLERANCE` stops the merge, nothing is kept), cast to the
    plan's dtype and written. The folder is written as ``out_dir.partial`` first and renamed at
    the end, so a failure leaves no half-written model (an earlier merged model is replaced; any
    other folder is refused). ``config.json`` (without a quantization config, with the grown
    vocabulary), the generation config and the tokenizer go beside the shards."""
    import time
    start = time.perf_counter()
    env.peak_host_rss(restart=True)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise FileExistsError(f"{out} exists and is not a saved model; choose another folder "
                              "or empty it")
    free_disk = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if plan.output_bytes > free_disk:
        raise OSError(f"the merged model takes {plan.output_bytes / GB:.2f} GB and the disk has "
                      f"{free_disk / GB:.2f} GB free; free some, or choose another folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if plan.kind == "rehearsal":
        draw_on = torch.device(device or env.device())
        base = _RehearsalBase(plan._skeleton, plan.dtype, draw_on)
    else:
        base = _FileBase(_base_folder(plan._source))
    tolerance = LAYER_TOLERANCE.get(plan.dtype, LAYER_TOLERANCE[torch.bfloat16])
    worst, checked = ("", 0.0), 0
    n = len(plan.shards)
    files = ["model.safetensors"] if n == 1 else [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    try:
        for name, items in zip(files, plan.shards):
            writer = _ShardWriter(tmp / name, items)
            try:
                for key, shape, dtype in items:
                    tensor = _merged_tensor(plan, base, key, shape, dtype, activations)
                    if isinstance(tensor, tuple):
                        tensor, rel = tensor
                        checked += 1
                        worst = max(worst, (key, rel), key=lambda kv: kv[1])
                        if not rel <= tolerance:
                            raise MergeMismatch(
                                f"merged layer {key} differs from base + adapter by {rel:.3g} "
                                f"of its output on real activations (tolerance {tolerance:.0e}); "
                                "nothing was kept. Check that the adapter belongs to this base.",
                                {"layer": key, "max_rel_diff": rel}, {"rtol": tolerance})
                    writer.write(key, tensor)
                    del tensor
            finally:
                writer.file.close()
            writer.close()
        _write_index(tmp, files, plan)
        _write_config(tmp, plan, base)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        base.close()
    shutil.rmtree(out, ignore_errors=True)  # an earlier merged model
    tmp.rename(out)
    return StreamResult(
        out_dir=str(out), files=files, size_bytes=sum((out / f).stat().st_size for f in files),
        layers_checked=checked, layer_max_rel_diff=worst[1], worst_layer=worst[0],
        tolerance=tolerance, peak_host_rss=env.peak_host_rss(),
        seconds=round(time.perf_counter() - start, 2))


def _merged_tensor(plan, base, key, shape, dtype, activations):
    """One output tensor: the adapter's replacement, or the base's with its update (and, with
    activations for it, the layer check: ``(tensor, relative difference)``), grown to
    ``shape`` where the vocabulary grew."""
    if key in plan._replacements:
        value = plan._replacements[key]
    else:
        value = base.read(key)
    update = plan._updates.get(key)
    if update is None:
        merged = value.to(dtype) if value.is_floating_point() else value
    else:
        merged = update.apply(value.float() if value.dtype != torch.float32 else value.clone())
        merged = merged.to(dtype)
    if tuple(merged.shape) != tuple(shape):  # the embeddings or head grew: new rows, the mean
        grown = torch.empty(shape, dtype=merged.dtype)
        grown[:merged.shape[0]] = merged
        grown[merged.shape[0]:] = merged.float().mean(0, keepdim=True).to(merged.dtype)
        merged = grown
    if update is not None and activations and key in activations:
        x, delta = activations[key]
        return merged, _layer_rel_diff(merged, value, x, delta, update.transposed)
    return merged


def _write_index(folder: Path, files: list, plan: MergePlan) -> None:
    if len(files) == 1:
        return
    weight_map = {key: name for name, items in zip(files, plan.shards) for key, _, _ in items}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": plan.output_bytes}, "weight_map": weight_map}, indent=2))


def _write_config(folder: Path, plan: MergePlan, base) -> None:
    """config.json as the merged model is: no quantization config, the merged dtype, the grown
    vocabulary; the generation config of the base (or from the config)."""
    from transformers import GenerationConfig

    config = plan._config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(plan._skeleton).__name__]
    config.dtype = plan.dtype
    if plan._grow:
        config.get_text_config().vocab_size = max(s[0] for s in plan._grow.values())
    config.save_pretrained(folder)
    source = getattr(base, "folder", None)
    if source is not None and (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", folder / "generation_config.json")
    else:
        GenerationConfig.from_model_config(config).save_pretrained(folder)

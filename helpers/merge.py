"""The verified merge (notebook 06): the adapter folded into a 16-bit copy of the base (never into
the 4-bit weights), its logits compared with the adapter's before anything is saved, the saved
model reloaded and checked to write the same text.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
import torch
from helpers.units import logical_numel
from helpers.adapters import _adapter_files, _is_peft, load_adapter
from helpers.generate import _generation_mode, generate, model_device
from helpers.models import _device_map, _dtype_kwarg


SOURCE_RELOADED = "reloaded 16-bit base"
SOURCE_DEQUANTIZED = "dequantized from 4-bit"

# Merge check (comparison a): the largest relative logit difference (:func:`compare_logit_sets`:
# worst position's largest difference over its largest logit) tolerated between the merged model
# and the adapter on the same base, by the dtype both run in, and the smallest top-1 agreement.
# In float32 the merge is exact up to rounding: observed about 1e-6 relative (4e-7 absolute on the
# embedded-size test model). In 16-bit the merged weight W + BA is rounded to 8 (bf16) or 11 (fp16)
# significant bits while the adapter path adds a float32 LoRA term, so some difference is
# rounding: observed 0.015 relative (0.31 of logits up to 26) in bf16 and 0.0026 in fp16 on a
# 4-layer test model; deeper models accumulate more. The limits sit about 5x above that. A broken
# merge (a layer left out, a wrong scale, noise) moves logits by about as much as the adapter
# itself does, which the result reports as ``adapter_effect``.
MERGE_TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "min_top1": 0.99},
    torch.float16: {"rtol": 0.02, "min_top1": 0.9},
    torch.bfloat16: {"rtol": 0.08, "min_top1": 0.9},
}


class MergeMismatch(RuntimeError):
    """The merged model does not reproduce the adapter on the same base; nothing was saved.

    ``figures`` holds the comparison (max_abs_diff, top1_agreement, ...), ``tolerance`` the limits.
    """

    def __init__(self, message: str, figures: dict, tolerance: dict):
        super().__init__(message)
        self.figures = figures
        self.tolerance = tolerance


# ============================================================================== merging (06)


def _unpacked_for_cpu(data, state):
    """A 4-bit weight that bitsandbytes repacked for CPU inference, back in its usual layout, as
    copies (the layer keeps its own). The repacked block scales are bf16 values, used as they
    are, so the result equals what the repacked layer computes."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    copied = copy.copy(state)
    copied.original_nested = False  # keep the float scales; do not quantize them again
    packed_scales = state.absmax
    data, copied = _convert_weight_packed_for_cpu_inverse(data, copied)
    copied.absmax = packed_scales.T.reshape(-1).float().contiguous()
    copied.nested = False
    return data, copied


def dequantize_weight(weight) -> torch.Tensor:
    """The dense (outputs x inputs) matrix a bitsandbytes 4-bit weight stands for, in the dtype it
    was quantized from (``bitsandbytes.functional.dequantize_4bit`` with its quant_state).
    Introduced in notebook 06."""
    from bitsandbytes.functional import dequantize_4bit

    state = getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError("this 4-bit weight has no quant_state (not quantized yet, or on the "
                         "meta device); load the model fully before dequantizing")
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        data, state = _unpacked_for_cpu(data, state)
    return dequantize_4bit(data, state)


def _plain_name(name: str) -> str | None:
    """A parameter name of a (possibly peft-wrapped) model as the plain model names it; None for
    adapter parameters and trained copies that are not part of the base."""
    if ".lora_" in name or name.startswith("lora_") or ".modules_to_save." in name:
        return None
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def compute_dtype_of(model) -> torch.dtype:
    """The dtype a 4-bit model computes in (its layers' ``compute_dtype``), else its parameters'
    floating dtype."""
    for module in model.modules():
        dt = getattr(module, "compute_dtype", None)
        if isinstance(dt, torch.dtype):
            return dt
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def dequantize_model(model, dtype: torch.dtype | None = None, device=None):
    """A plain 16-bit copy of a 4-bit model: each ``bnb.nn.Linear4bit`` weight dequantized
    (:func:`dequantize_weight`) into an ``nn.Linear`` in ``dtype`` (default: the model's compute
    dtype), every other weight copied; the 4-bit model is left as it is. Adapter layers of a peft
    model are skipped (the copy is the base). The copy is built on the meta device and filled, so
    memory holds each weight once. Used by :func:`merge_adapter` when the original 16-bit weights
    are not available. Introduced in notebook 06.
    """
    import bitsandbytes as bnb
    from accelerate import init_empty_weights

    inner = model.get_base_model() if _is_peft(model) else model
    dtype = dtype or compute_dtype_of(inner)
    device = torch.device(device) if device is not None else model_device(inner)
    state, quantized = {}, set()
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, bnb.nn.Linear8bitLt):
                raise TypeError(f"{name} is an 8-bit layer: dequantize_model handles 4-bit "
                                 "models only")
            if isinstance(module, bnb.nn.Linear4bit):
                plain = _plain_name(name + ".weight")
                if plain is None:
                    continue
                state[plain] = dequantize_weight(module.weight).to(device=device, dtype=dtype)
                quantized.add(name + ".weight")
        for name, param in inner.named_parameters():
            plain = _plain_name(name)
            if plain is None or name in quantized:
                continue
            state[plain] = param.detach().to(device=device, dtype=dtype if
                                             param.is_floating_point() else param.dtype)
    config = copy.deepcopy(inner.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)

    for key, value in _dtype_kwarg(dtype).items():
        setattr(config, key, value)
    with init_empty_weights(include_buffers=False):
        plain_model = type(inner)(config)
    result = plain_model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"dequantizing produced weights the plain model does not have: "
                           f"{result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain_model.tie_weights()
    left = [n for n, p in plain_model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"dequantizing left weights unset: {left[:5]}")
    plain_model.to(device)
    plain_model.name_or_path = getattr(inner, "name_or_path", config._name_or_path)
    if getattr(inner, "generation_config", None) is not None:
        plain_model.generation_config = copy.deepcopy(inner.generation_config)
    plain_model.eval()
    return plain_model


def logits_for(model, tokenizer, texts) -> list[torch.Tensor]:
    """Float32 logits (positions x vocabulary, on the CPU) for each text, one text at a time (no
    padding), with the model in eval mode. Introduced in notebook 06."""
    device = model_device(model)
    out = []
    with _generation_mode(model, tokenizer), torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt").to(device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def compare_logit_sets(reference: list, other: list) -> dict:
    """Agreement of two lists of logits (same texts): ``max_abs_diff``; ``max_rel_diff`` (at each
    position the largest difference over the largest reference logit magnitude, the worst
    position); ``mean_abs_diff``; ``top1_agreement`` (fraction of positions whose argmax token
    is the same); ``positions``. All in float32. Introduced in notebook 06."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} reference texts but {len(other)} compared")
    ref = torch.cat([r.float() for r in reference])
    oth = torch.cat([o.float() for o in other])
    if ref.shape != oth.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(oth.shape)} (the "
                         "models have different vocabularies?)")
    diff = (ref - oth).abs()
    scale = ref.abs().amax(dim=-1).clamp_min(1e-12)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff.amax(dim=-1) / scale).max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }


def compare_logits(reference_model, merged_model, tokenizer, prompts) -> dict:
    """How closely ``merged_model`` reproduces ``reference_model`` (usually the adapter on its
    base) on fixed prompts: max absolute and relative logit difference, mean difference, top-1
    agreement, computed in float32 (:func:`compare_logit_sets`). Introduced in notebook 06."""
    return compare_logit_sets(logits_for(reference_model, tokenizer, prompts),
                              logits_for(merged_model, tokenizer, prompts))


def merge_tolerance(dtype: torch.dtype) -> dict:
    """The limits comparison (a) must meet for a merge in ``dtype`` (:data:`MERGE_TOLERANCE`;
    notebook 06)."""
    return dict(MERGE_TOLERANCE.get(dtype, MERGE_TOLERANCE[torch.bfloat16]))


def merge_into_base(peft_model):
    """peft's ``merge_and_unload()``: W <- W + (alpha / r) B A in every adapted layer, adapter
    layers removed; returns the plain base model, now holding the merged weights (notebook 06)."""
    return peft_model.merge_and_unload()


def _folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


def _replace_folder(tmp: Path, out_dir: Path) -> None:
    """Move a finished folder into place; an earlier model folder there is replaced, anything
    else is refused."""
    if out_dir.exists():
        entries = list(out_dir.iterdir())
        if entries and not (out_dir / "config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{out_dir} exists and is not a saved model; choose another "
                                  "folder or empty it")
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _fits_on(device: torch.device, n_bytes: int) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return n_bytes * 1.2 < free


@dataclass
class MergeResult:
    """What :func:`merge_adapter` did and measured.

    ``source``: where the 16-bit base came from (:data:`SOURCE_RELOADED` or
    :data:`SOURCE_DEQUANTIZED`). ``vs_same_base``: merged vs the adapter on the same 16-bit base
    (comparison a, the merge's own error). ``vs_4bit``: merged vs the adapter on the 4-bit base
    used in training (comparison b, which adds the quantization error; None without a 4-bit
    model). ``adapter_effect``: how far the adapter moves the 16-bit base's logits (max abs), the
    scale a broken merge would show. ``reference_text`` / ``merged_text``: greedy outputs of the
    adapter on the 16-bit base and of the merged model reloaded from disk.
    """

    source: str
    dtype: str
    device: str
    adapter_path: str
    out_dir: str | None
    vs_same_base: dict
    vs_4bit: dict | None
    adapter_effect: float
    tolerance: dict
    reference_text: list
    merged_text: list
    generation_matches: bool
    reload_max_abs_diff: float
    size_bytes: int
    memory: object = None
    notes: list = field(default_factory=list)
    model: object = None

    def text(self) -> str:
        a, b = self.vs_same_base, self.vs_4bit
        lines = [
            f"Merged into a {self.dtype} base on {self.device} ({self.source}).",
            (f"(a) merged vs adapter on the same base: max |logit diff| "
             f"{a['max_abs_diff']:.2e}, relative {a['max_rel_diff']:.1e} (tolerance "
             f"{self.tolerance['rtol']:.0e}), top-1 agreement {a['top1_agreement']:.3f} over "
             f"{a['positions']} positions; the adapter itself moves logits by up to "
             f"{self.adapter_effect:.3f}."),
        ]
        if b is not None:
            why = ("the 16-bit base was dequantized from these 4-bit weights, so only rounding "
                   "differs" if self.source == SOURCE_DEQUANTIZED else
                   "the 4-bit quantization error; expected to be larger than (a)")
            lines.append(f"(b) merged vs adapter on the 4-bit training base: max |logit diff| "
                         f"{b['max_abs_diff']:.2e}, top-1 agreement {b['top1_agreement']:.3f} "
                         f"({why}).")
        if self.out_dir:
            lines.append(f"Saved {self.size_bytes / 1e6:.1f} MB of safetensors to {self.out_dir}; "
                         f"reloaded: logits equal to the merged model within "
                         f"{self.reload_max_abs_diff:.1e}, greedy text "
                         + ("identical to" if self.generation_matches else "DIFFERENT from")
                         + " the adapter on the 16-bit base.")
        lines += self.notes
        return "\n".join(lines)

    __str__ = text


def merge_adapter(base_16bit_loader, adapter_path, *, tokenizer, prompts, out_dir=None,
                  quantized_model=None, dtype: torch.dtype | None = None, device=None,
                  max_new_tokens: int = 20, rtol: float | None = None,
                  min_top1: float | None = None, check_base_name: bool = True,
                  keep_model: bool = False) -> MergeResult:
    """Merge the adapter into a 16-bit copy of the base, verify, save, reload, verify again.

    Why never into the 4-bit weights: a LoRA update is small next to the weights (about 1% of
    their size), and NF4 keeps 16 levels per block of 64 weights, spaced about 10% of the block's
    largest weight apart. Rounding W + BA back to those levels returns most weights to the level
    they started at, so most of what training learned would be thrown away, and the merged model
    would no longer match the adapter it came from. The merge goes into 16-bit (float32 on CPU)
    weights instead, where W + BA keeps the update.

    Steps (each tracked with ``helpers.footprint``: CPU RSS and GPU memory before/after):

    1. The 16-bit base: ``base_16bit_loader()`` (e.g. ``lambda: loading.load_16bit(MODEL)``)
       where the original weights are available; when it is None, returns None or raises
       OSError (no such weights), the base is dequantized from ``quantized_model``
       (:func:`dequantize_model`). ``result.source`` says which.
    2. The adapter on it (:func:`load_adapter`); its greedy outputs on ``prompts`` and its logits
       on each prompt followed by that output (the reference). With ``quantized_model`` (the
       4-bit base, with or without the adapter loaded; a plain one gets it for the comparison
       and is given back plain), the same logits from the 4-bit model too.
    3. ``merge_and_unload()`` (:func:`merge_into_base`), then the merged logits. Comparison (a),
       merged vs adapter on the same base, must meet :func:`merge_tolerance` (or ``rtol`` /
       ``min_top1``), else :class:`MergeMismatch` is raised and nothing is saved. Comparison (b),
       vs the 4-bit model, is reported, not enforced.
    4. With ``out_dir``: saved there as safetensors in shards of at most 2 GB, with the tokenizer
       (written to a temporary folder first, so a failure leaves no half-saved model); the
       in-memory copy freed; reloaded with ``AutoModelForCausalLM.from_pretrained``; its logits
       compared with the merged ones and its greedy text with the reference text.

    ``device``: where the 16-bit copy goes when dequantizing (default: beside the 4-bit model, or
    the CPU when the card lacks room). ``keep_model=True`` keeps the reloaded (or merged) model on
    ``result.model``. Introduced in notebook 06.
    """
    from transformers import AutoModelForCausalLM

    from helpers import footprint, units

    log = footprint.MemoryLog()
    notes: list[str] = []
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt to compare the merged model on")
    _adapter_files(adapter_path)  # a missing adapter fails before anything is loaded

    # 1. a 16-bit base
    base16, source = None, SOURCE_RELOADED
    if base_16bit_loader is not None:
        with log.track("load 16-bit base"):
            try:
                base16 = base_16bit_loader()
            except OSError as err:
                notes.append(f"No 16-bit weights to reload ({type(err).__name__}: "
                             f"{str(err)[:200]}); dequantized the 4-bit model instead.")
    if base16 is None:
        if quantized_model is None:
            raise ValueError("no 16-bit base: base_16bit_loader gave none and no quantized_model "
                             "was passed to dequantize; pass one of them")
        source = SOURCE_DEQUANTIZED
        inner = quantized_model.get_base_model() if _is_peft(quantized_model) else quantized_model
        dt = dtype or compute_dtype_of(inner)
        target = torch.device(device) if device is not None else model_device(inner)
        n_bytes = sum(logical_numel(p) for p in inner.parameters()) * torch.finfo(dt).bits // 8
        if device is None and not _fits_on(target, n_bytes):
            notes.append(f"The 16-bit copy ({n_bytes / 1e9:.1f} GB) does not fit beside the 4-bit "
                         f"model on {target}: built on the CPU.")
            target = torch.device("cpu")
        with log.track("dequantize 4-bit base"):
            base16 = dequantize_model(quantized_model, dtype=dt, device=target)
    merge_dtype = compute_dtype_of(base16)
    tol = merge_tolerance(merge_dtype)
    if rtol is not None:
        tol["rtol"] = float(rtol)
    if min_top1 is not None:
        tol["min_top1"] = float(min_top1)

    # 2. the adapter on it, and the reference outputs
    with log.track("attach adapter"):
        peft16 = load_adapter(base16, adapter_path, check_base_name=check_base_name)
        del base16  # held by peft16 now; one name, so that freeing it below frees it
    with log.track("reference outputs"):
        reference_text = generate(peft16, tokenizer, prompts, max_new_tokens=max_new_tokens)
        texts = [p + t for p, t in zip(prompts, reference_text)]
        reference = logits_for(peft16, tokenizer, texts)
        with peft16.disable_adapter():
            base_only = logits_for(peft16, tokenizer, texts)
        adapter_effect = compare_logit_sets(reference, base_only)["max_abs_diff"]
        del base_only
        quantized_logits = None
        if quantized_model is not None and _is_peft(quantized_model):
            quantized_logits = logits_for(quantized_model, tokenizer, texts)
        elif quantized_model is not None:  # attach for the comparison, then take it off again
            q_model = load_adapter(quantized_model, adapter_path, check_base_name=check_base_name)
            try:
                quantized_logits = logits_for(q_model, tokenizer, texts)
            finally:
                q_model.unload()
                for attr in ("peft_config", "_hf_peft_config_loaded"):
                    if attr in vars(quantized_model):
                        delattr(quantized_model, attr)

    # 3. merge and compare
    with log.track("merge"):
        merged = merge_into_base(peft16)
        del peft16
    merged_logits = logits_for(merged, tokenizer, texts)
    vs_same = compare_logit_sets(reference, merged_logits)
    vs_4bit = compare_logit_sets(quantized_logits, merged_logits) if quantized_logits else None
    if vs_same["max_rel_diff"] > tol["rtol"] or vs_same["top1_agreement"] < tol["min_top1"]:
        figures = {**vs_same, "adapter_effect": adapter_effect}
        del merged  # an exception kept in a notebook must not keep the model alive
        units.free()
        raise MergeMismatch(
            f"the merged model does not reproduce the adapter on the same {merge_dtype} base: "
            f"max |logit diff| {vs_same['max_abs_diff']:.3g}, relative "
            f"{vs_same['max_rel_diff']:.3g} (tolerance {tol['rtol']:.3g}), "
            f"top-1 agreement {vs_same['top1_agreement']:.3f} (needs {tol['min_top1']:.3f}) "
            f"over {vs_same['positions']} positions; the adapter itself moves logits by up to "
            f"{adapter_effect:.3g}. Nothing was saved. Check that the adapter and the base belong "
            "together, and merge into a 16-bit base (never a 4-bit one).", figures, tol)

    # 4. save, reload, generate again
    merged_text, matches, reload_diff, size, out = list(reference_text), True, 0.0, 0, None
    device_used = model_device(merged)
    result_model = merged if keep_model else None
    if out_dir is not None:
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        with log.track("save merged"):
            tmp.parent.mkdir(parents=True, exist_ok=True)
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
            tokenizer.save_pretrained(tmp)
            _replace_folder(tmp, out)
        size = _folder_bytes(out)
        result_model = None
        del merged
        units.free()
        with log.track("reload merged"):
            reloaded = AutoModelForCausalLM.from_pretrained(
                out, device_map=_device_map(device_used),
                **_dtype_kwarg(merge_dtype))
        reload_diff = compare_logit_sets(merged_logits,
                                         logits_for(reloaded, tokenizer, texts))["max_abs_diff"]
        merged_text = generate(reloaded, tokenizer, prompts, max_new_tokens=max_new_tokens)
        matches = list(merged_text) == list(reference_text)
        if not matches:
            notes.append("The reloaded merged model's greedy text differs from the adapter's on "
                         "the 16-bit base" + (" (16-bit rounding can flip near-ties)."
                                              if merge_dtype != torch.float32 else "."))
        if keep_model:
            result_model = reloaded
        else:
            del reloaded
            units.free()
    return MergeResult(
        source=source, dtype=str(merge_dtype).replace("torch.", ""),
        device=str(device_used),
        adapter_path=str(adapter_path), out_dir=str(out) if out else None,
        vs_same_base=vs_same, vs_4bit=vs_4bit, adapter_effect=adapter_effect, tolerance=tol,
        reference_text=list(reference_text), merged_text=list(merged_text),
        generation_matches=matches, reload_max_abs_diff=reload_diff, size_bytes=size,
        memory=log, notes=notes, model=result_model)


def merge_metrics(result: MergeResult) -> dict:
    """The merge's figures for the run manifest (notebook 06)."""
    a = result.vs_same_base
    out = {
        "merge_max_abs_logit_diff": a["max_abs_diff"],
        "merge_max_rel_logit_diff": a["max_rel_diff"],
        "merge_top1_agreement": a["top1_agreement"],
        "merge_adapter_effect_max_abs": result.adapter_effect,
        "merge_dequantized": int(result.source == SOURCE_DEQUANTIZED),
        "merged_generation_matches": int(result.generation_matches),
        "merged_size_bytes": result.size_bytes,
        "merge_reload_max_abs_logit_diff": result.reload_max_abs_diff,
    }
    if result.vs_4bit is not None:
        out["merge_max_abs_logit_diff_vs_4bit"] = result.vs_4bit["max_abs_diff"]
        out["merge_top1_agreement_vs_4bit"] = result.vs_4bit["top1_agreement"]
    if result.memory is not None:
        out.update(result.memory.as_metrics(prefix="merge_"))
    return out

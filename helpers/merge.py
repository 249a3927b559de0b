"""The verified merge (notebook 06): the adapter folded into a 16-bit copy of the base (never into
the 4-bit weights), its logits compared with the adapter's before anything is saved, the saved
model reloaded and checked to write the same text.

Notebook 06 spells the steps out: the 16-bit base (:meth:`MergeCheck.base_16bit`), the adapter on
it with ``peft.PeftModel.from_pretrained``, the outputs the merge must reproduce
(:meth:`MergeCheck.reference`), peft's ``merge_and_unload()``, the comparison
(:meth:`MergeCheck.verify`), the save (:meth:`MergeCheck.save`) and the reload
(:meth:`MergeCheck.reload`). :func:`merge_adapter` runs the same steps in one call (the GPU bench).
"""

from __future__ import annotations

import copy
from pathlib import Path
import torch
from peft import PeftModel
from helpers import footprint, rundir, units
from helpers.adapters import MergeMismatch, _adapter_files, check_adapter
from helpers.generate import _generation_mode, generate
from helpers.models import _device_map, cpu_safe


SOURCE_RELOADED = "reloaded 16-bit base"
SOURCE_DEQUANTIZED = "dequantized from 4-bit"

# Merge check (comparison a): the largest relative logit difference (:func:`compare_logit_sets`)
# tolerated between the merged model and the adapter on the same base, by the dtype both run in,
# and the smallest top-1 agreement: about 5x above the rounding observed on test models (float32
# about 1e-6; bf16 0.015 and fp16 0.0026, where W + BA is rounded once more). Notebook 06 says why.
MERGE_TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "min_top1": 0.99},
    torch.float16: {"rtol": 0.02, "min_top1": 0.9},
    torch.bfloat16: {"rtol": 0.08, "min_top1": 0.9},
}


def _unload(peft_model):
    """peft's ``unload()`` (the base without its LoRA layers), also without the attributes peft
    left on it, so the base can take an adapter again."""
    plain = peft_model.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        vars(plain).pop(attr, None)
    return plain


def dequantize_model(model, device=None):
    """A plain 16-bit copy of a 4-bit model (a peft model's base, without its adapter), in the
    model's dtype, on ``device`` (default: beside the 4-bit model); the 4-bit model itself
    is kept, since comparison (b) and further generation need it. transformers'
    ``model.dequantize()`` turns every ``bnb.nn.Linear4bit`` into an ``nn.Linear`` in place, so it
    runs on a copy, moved to ``device`` first. Used when the original 16-bit weights are not
    available (:meth:`MergeCheck.base_16bit`). Introduced in notebook 06.
    """
    plain = copy.deepcopy(model)
    if isinstance(plain, PeftModel):
        plain = _unload(plain)
    if device is not None and torch.device(device) != plain.device:
        plain.to(device)
    cpu_safe(plain)  # weights bitsandbytes repacked for CPU inference back in their usual layout
    plain.dequantize()
    return plain.eval()


def logits_for(model, tokenizer, texts) -> list[torch.Tensor]:
    """Float32 logits (positions x vocabulary, on the CPU) for each text, one text at a time (no
    padding), with the model in eval mode. Introduced in notebook 06."""
    out = []
    with _generation_mode(model, tokenizer), torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt").to(model.device)
            out.append(model(**enc).logits[0].float().cpu())
    return out


def compare_logit_sets(reference: list, other: list) -> dict:
    """Agreement of two lists of logits (same texts): ``max_abs_diff``; ``max_rel_diff`` (at each
    position the largest difference over the largest reference logit magnitude, the worst
    position); ``top1_agreement`` (fraction of positions whose argmax token
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
        "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean()),
        "positions": int(ref.shape[0]),
    }


class MergeCheck:
    """The verification around peft's merge, one step per method, and what it measured.

    peft's ``merge_and_unload()`` folds the adapter into the weights but checks nothing; this
    keeps what the merged model must reproduce and compares it. ``source``: where the 16-bit base
    came from (:data:`SOURCE_RELOADED` or :data:`SOURCE_DEQUANTIZED`). ``vs_same_base``: merged vs
    the adapter on the same 16-bit base (comparison a, the merge's own error). ``vs_4bit``: merged
    vs the adapter on the 4-bit base used in training (comparison b, which adds the quantization
    error; None without a 4-bit model). ``adapter_effect``: how far the adapter moves the 16-bit
    base's logits (max abs), the scale a broken merge would show. ``reference_text`` /
    ``merged_text``: greedy outputs of the adapter on the 16-bit base and of the merged model
    reloaded from disk. ``memory``: a :class:`helpers.footprint.MemoryLog` of the steps (the
    notebook tracks its own steps in it too). ``print(check)`` reports it all. Introduced in
    notebook 06.
    """

    def __init__(self, tokenizer, prompts, *, max_new_tokens: int = 20):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("give at least one prompt to compare the merged model on")
        self.tokenizer, self.prompts, self.max_new_tokens = tokenizer, prompts, max_new_tokens
        self.memory = footprint.MemoryLog()
        self.notes: list[str] = []
        self.source = SOURCE_RELOADED
        self.dtype = self.device = self.out_dir = None
        self.tolerance = self.vs_same_base = self.vs_4bit = None
        self.reference_text = self.merged_text = None
        self.generation_matches, self.reload_max_abs_diff, self.size_bytes = True, 0.0, 0
        self.vs_reloaded = None

    def base_16bit(self, loader, quantized_model=None):
        """The 16-bit base to merge into: ``loader()`` (e.g. ``lambda: loading.load_16bit(MODEL)``)
        where the original weights are available; when ``loader`` is None, returns None or raises
        OSError (no such weights), a copy dequantized from ``quantized_model``
        (:func:`dequantize_model`; on the CPU when the card lacks room beside the 4-bit model).
        ``self.source`` says which; the step is tracked in ``self.memory``."""
        base16 = None
        if loader is not None:
            with self.memory.track("load 16-bit base"):
                try:
                    base16 = loader()
                except OSError as err:
                    self.notes.append(f"No 16-bit weights to reload ({type(err).__name__}: "
                                      f"{str(err)[:200]}); dequantized the 4-bit model instead.")
        if base16 is not None:
            return base16
        if quantized_model is None:
            raise ValueError("no 16-bit base: the loader gave none and no quantized_model was "
                             "passed to dequantize; pass one of them")
        self.source = SOURCE_DEQUANTIZED
        inner = (quantized_model.get_base_model() if isinstance(quantized_model, PeftModel)
                 else quantized_model)
        target = inner.device
        n_bytes = sum(units.logical_numel(p) for p in inner.parameters()) * inner.dtype.itemsize
        if target.type == "cuda" and n_bytes * 1.2 > torch.cuda.mem_get_info(target)[0]:
            self.notes.append(f"The 16-bit copy ({n_bytes / 1e9:.1f} GB) does not fit beside the "
                              f"4-bit model on {target}: built on the CPU.")
            target = torch.device("cpu")
        with self.memory.track("dequantize 4-bit base"):
            return dequantize_model(quantized_model, device=target)

    def reference(self, peft_model, quantized_model=None) -> None:
        """What the merge must reproduce, from the adapter on the 16-bit base (``peft_model``): its
        greedy text on the prompts, its logits on each prompt followed by that text, and how far
        switching the adapter off moves them; with ``quantized_model`` (the 4-bit base carrying
        the same adapter), its logits on the same texts."""
        if not isinstance(peft_model, PeftModel):
            raise TypeError(f"{type(peft_model).__name__} carries no adapter: pass the peft model "
                            "(PeftModel.from_pretrained(base16, adapter_dir))")
        tok = self.tokenizer
        with self.memory.track("reference outputs"):
            self.reference_text = list(generate(peft_model, tok, self.prompts,
                                                max_new_tokens=self.max_new_tokens))
            self._texts = [p + t for p, t in zip(self.prompts, self.reference_text)]
            self._reference = logits_for(peft_model, tok, self._texts)
            with peft_model.disable_adapter():
                base_only = logits_for(peft_model, tok, self._texts)
            self.adapter_effect = compare_logit_sets(self._reference, base_only)["max_abs_diff"]
            self._quantized = (logits_for(quantized_model, tok, self._texts)
                               if quantized_model is not None else None)

    def verify(self, merged) -> None:
        """Compare the merged model's logits with the reference: (a) merged vs the adapter on the
        same base must meet :data:`MERGE_TOLERANCE` for the dtype, else :class:`MergeMismatch` is
        raised (before anything is saved); (b) merged vs the 4-bit model is reported only."""
        if self.reference_text is None:
            raise RuntimeError("no reference yet: call reference(peft_model) before merging")
        dtype = merged.dtype
        self.dtype, self.device = str(dtype).replace("torch.", ""), str(merged.device)
        self.tolerance = tol = dict(MERGE_TOLERANCE.get(dtype, MERGE_TOLERANCE[torch.bfloat16]))
        self._merged = logits_for(merged, self.tokenizer, self._texts)
        self.vs_same_base = a = compare_logit_sets(self._reference, self._merged)
        if self._quantized is not None:
            self.vs_4bit = compare_logit_sets(self._quantized, self._merged)
        if a["max_rel_diff"] > tol["rtol"] or a["top1_agreement"] < tol["min_top1"]:
            raise MergeMismatch(
                f"the merged model does not reproduce the adapter on the same {self.dtype} base: "
                f"max |logit diff| {a['max_abs_diff']:.3g}, relative {a['max_rel_diff']:.3g} "
                f"(tolerance {tol['rtol']:.3g}), top-1 agreement {a['top1_agreement']:.3f} "
                f"(needs {tol['min_top1']:.3f}) over {a['positions']} positions; the adapter "
                f"itself moves logits by up to {self.adapter_effect:.3g}. Nothing was saved. Check "
                "that the adapter and the base belong together, and merge into a 16-bit base "
                "(never a 4-bit one).", {**a, "adapter_effect": self.adapter_effect}, tol)

    def save(self, merged, out_dir) -> None:
        """Save the verified model and the tokenizer to ``out_dir`` as safetensors in shards of at
        most 2 GB, written to a folder beside it and swapped in whole, so a failure or a kill
        leaves no half-saved model (an earlier saved model there is replaced; any other folder is
        refused)."""
        if self.vs_same_base is None:
            raise RuntimeError("not verified: call verify(merged) before saving")
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
            raise FileExistsError(f"{out} exists and is not a saved model; choose another "
                                  "folder or empty it")
        with self.memory.track("save merged"):
            tmp = rundir.partial_folder(out)
            merged.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
            self.tokenizer.save_pretrained(tmp)
            rundir.replace_folder(tmp, out)  # the earlier saved model stays whole until swapped
        self.out_dir = str(out)
        self.size_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))

    def reload(self):
        """Load the saved model with ``AutoModelForCausalLM.from_pretrained`` (same device and
        dtype as the merged one), compare its logits with the merged model's and its greedy text
        with the adapter's; returns it. Free the merged model first: both are full-size."""
        from transformers import AutoModelForCausalLM

        if self.out_dir is None:
            raise RuntimeError("nothing saved: call save(merged, out_dir) first")
        with self.memory.track("reload merged"):
            reloaded = AutoModelForCausalLM.from_pretrained(
                self.out_dir, device_map=_device_map(torch.device(self.device)),
                dtype=getattr(torch, self.dtype))
        self.reload_max_abs_diff = compare_logit_sets(
            self._merged, logits_for(reloaded, self.tokenizer, self._texts))["max_abs_diff"]
        self.merged_text = list(generate(reloaded, self.tokenizer, self.prompts,
                                         max_new_tokens=self.max_new_tokens))
        self.generation_matches = self.merged_text == self.reference_text
        if not self.generation_matches:
            self.notes.append("The reloaded merged model's greedy text differs from the adapter's "
                              "on the 16-bit base" + (" (16-bit rounding can flip near-ties)."
                                                      if self.dtype != "float32" else "."))
        return reloaded

    def compare(self, model) -> dict:
        """Report-only: ``model`` (e.g. the streamed merged model loaded in 4-bit, where the
        16-bit one does not fit) against the reference, its logits (``self.vs_reloaded``, as
        :func:`compare_logit_sets`) and greedy text (``merged_text``, ``generation_matches``).
        Rounding to 4 bits after the merge moves logits, so nothing is required here; the
        streamed merge checked every layer before writing it."""
        if self.reference_text is None:
            raise RuntimeError("no reference yet: call reference(peft_model) first")
        self.vs_reloaded = compare_logit_sets(self._reference,
                                              logits_for(model, self.tokenizer, self._texts))
        self.merged_text = list(generate(model, self.tokenizer, self.prompts,
                                         max_new_tokens=self.max_new_tokens))
        self.generation_matches = self.merged_text == self.reference_text
        return self.vs_reloaded

    def text(self) -> str:
        """The report: where the base came from, comparisons (a) and (b), the save and reload."""
        a, b = self.vs_same_base, self.vs_4bit
        if a is None and self.vs_reloaded is not None:
            r = self.vs_reloaded
            return (f"The merged model in 4-bit vs the adapter on the 4-bit base: max |logit "
                    f"diff| {r['max_abs_diff']:.2e} (the adapter itself moves logits by up to "
                    f"{self.adapter_effect:.3f}), top-1 agreement {r['top1_agreement']:.3f} over "
                    f"{r['positions']} positions; greedy text "
                    + ("identical." if self.generation_matches else "different (4-bit rounding "
                       "of the merged weights moves near-ties)."))
        if a is None:
            return "MergeCheck: not verified yet"
        lines = [
            f"Merged into a {self.dtype} base on {self.device} ({self.source}).",
            (f"(a) merged vs adapter on the same base: max |logit diff| "
             f"{a['max_abs_diff']:.2e}, relative {a['max_rel_diff']:.1e} (tolerance "
             f"{self.tolerance['rtol']:.0e}), top-1 agreement {a['top1_agreement']:.3f} over "
             f"{a['positions']} positions; the adapter itself moves logits by up to "
             f"{self.adapter_effect:.3f}."),
        ]
        if b is not None:
            lines.append(f"(b) merged vs adapter on the 4-bit training base: max |logit diff| "
                         f"{b['max_abs_diff']:.2e}, top-1 agreement {b['top1_agreement']:.3f}.")
        if self.merged_text is not None and self.out_dir is None:
            lines.append("Greedy text of the merged model " + (
                "identical to" if self.generation_matches else "DIFFERENT from")
                + " the adapter's on the 16-bit base.")
        elif self.merged_text is not None:
            lines.append(f"Saved {self.size_bytes / 1e6:.1f} MB of safetensors to {self.out_dir}; "
                         f"reloaded: logits equal to the merged model within "
                         f"{self.reload_max_abs_diff:.1e}, greedy text "
                         + ("identical to" if self.generation_matches else "DIFFERENT from")
                         + " the adapter on the 16-bit base.")
        return "\n".join(lines + self.notes)

    __str__ = __repr__ = text


def merge_adapter(base_16bit_loader, adapter_path, *, tokenizer, prompts, out_dir=None,
                  quantized_model=None, max_new_tokens: int = 20,
                  check_base_name: bool = True) -> MergeCheck:
    """Notebook 06's merge in one call: the 16-bit base (``base_16bit_loader``, or dequantized
    from ``quantized_model``), the adapter on it (checked by
    :func:`helpers.adapters.check_adapter`), the reference outputs, ``merge_and_unload()``, the comparisons, and with ``out_dir`` the save
    and the reload (the merged model is freed before the reload). ``quantized_model``: the 4-bit
    base, with or without the adapter loaded (a plain one gets it for comparison (b) and is given
    back plain). Returns the :class:`MergeCheck`; raises :class:`MergeMismatch` when comparison
    (a) fails. Used by the GPU bench; notebook 06 spells the same steps out.
    """
    _adapter_files(adapter_path)  # a missing adapter fails before anything is loaded
    check = MergeCheck(tokenizer, prompts, max_new_tokens=max_new_tokens)
    base16 = check.base_16bit(base_16bit_loader, quantized_model)
    with check.memory.track("attach adapter"):
        check_adapter(base16, adapter_path, check_base_name=check_base_name)
        peft16 = PeftModel.from_pretrained(base16, str(adapter_path))
        del base16  # held by peft16 now; one name, so that freeing it below frees it
    attached = quantized_model is not None and not isinstance(quantized_model, PeftModel)
    if attached:  # the adapter on the 4-bit base for comparison (b), taken off again below
        check_adapter(quantized_model, adapter_path, check_base_name=check_base_name)
        quantized_model = PeftModel.from_pretrained(quantized_model, str(adapter_path))
    try:
        check.reference(peft16, quantized_model)
    finally:
        if attached:
            _unload(quantized_model)
    with check.memory.track("merge"):
        merged = peft16.merge_and_unload()
        del peft16
    try:
        check.verify(merged)
        if out_dir is not None:
            check.save(merged, out_dir)
    finally:
        del merged  # an exception kept in a notebook must not keep the model alive
        units.free()
    if out_dir is not None:
        check.reload()  # the reloaded model is checked and dropped
        units.free()
    return check


def merge_metrics(check: MergeCheck) -> dict:
    """The merge's figures for the run manifest (notebook 06)."""
    a = check.vs_same_base
    out = {
        "merge_max_abs_logit_diff": a["max_abs_diff"],
        "merge_max_rel_logit_diff": a["max_rel_diff"],
        "merge_top1_agreement": a["top1_agreement"],
        "merge_adapter_effect_max_abs": check.adapter_effect,
        "merge_dequantized": int(check.source == SOURCE_DEQUANTIZED),
        "merged_generation_matches": int(check.generation_matches),
        "merged_size_bytes": check.size_bytes,
        "merge_reload_max_abs_logit_diff": check.reload_max_abs_diff,
    }
    if check.vs_4bit is not None:
        out["merge_max_abs_logit_diff_vs_4bit"] = check.vs_4bit["max_abs_diff"]
        out["merge_top1_agreement_vs_4bit"] = check.vs_4bit["top1_agreement"]
    out.update(check.memory.as_metrics(prefix="merge_"))
    return out


def compare_weights(reference, other) -> dict:
    """Two models' weights, tensor by tensor, in float32: ``max_abs_diff`` over all,
    ``tensors`` compared, names only one of them has (``missing``). Notebook 06 compares the
    streamed merge with peft's ``merge_and_unload`` this way, where both fit."""
    ours, theirs = reference.state_dict(), other.state_dict()
    common = [k for k in ours if k in theirs]
    diff = max((float((ours[k].float() - theirs[k].float()).abs().max()) for k in common),
               default=0.0)
    return {"max_abs_diff": diff, "tensors": len(common),
            "missing": sorted(set(ours) ^ set(theirs))}


def stream_metrics(result, check4: MergeCheck, check: MergeCheck | None = None,
                   weights: dict | None = None) -> dict:
    """The streamed merge's figures for the run manifest (notebook 06): the layer check
    (``result``, :class:`helpers.streammerge.StreamResult`), the merged model in 4-bit against the
    adapter on the 4-bit base (``check4``), and where the 16-bit model fitted, the in-memory
    comparison (``check``: :func:`merge_metrics`; ``weights``: :func:`compare_weights` against
    peft's ``merge_and_unload``)."""
    r = check4.vs_reloaded
    out = {
        "merge_streamed": 1, "merge_layers_checked": result.layers_checked,
        "merge_layer_max_rel_diff": result.layer_max_rel_diff,
        "merged_size_bytes": result.size_bytes,
        "merge_stream_peak_host_rss_bytes": result.peak_host_rss,
        "merge_stream_seconds": result.seconds,
        "merged_4bit_max_abs_logit_diff": r["max_abs_diff"],
        "merged_4bit_top1_agreement": r["top1_agreement"],
        "merged_4bit_generation_matches": int(check4.generation_matches),
        "merge_adapter_effect_4bit_max_abs": check4.adapter_effect,
        "merge_dequantized": 0,
    }
    if check is not None and check.vs_same_base is not None:
        out.update({k: v for k, v in merge_metrics(check).items()
                    if k not in ("merged_size_bytes", "merge_dequantized")})
    if weights is not None:
        out["merge_weights_max_abs_diff_vs_peft"] = weights["max_abs_diff"]
    return out

"""LoRA on a 4-bit base, for any architecture, with nothing typed by hand (notebook 03).

The original recipe names ``query_key_value``, a layer only GPT-NeoX has; the same recipe on
GPT-J stops with "Target modules not found". Here the targets come from the loaded model itself:

- :func:`linear_layers` lists every linear layer by short name, count and shape;
- :func:`find_targets` picks "all-linear" (every linear layer but the output head, found as
  ``model.get_output_embeddings()``, as the QLoRA paper does) or "attention" (the linear layers
  inside the attention block, found from the module tree, with no per-model table), or checks
  names given by hand;
- :func:`prepare_for_training` freezes the base, turns on gradient checkpointing the way that
  works with frozen embeddings, and casts nothing to float32 unless asked (peft's
  ``prepare_model_for_kbit_training`` upcasts embeddings, head and norms, which costs memory);
- :func:`compute_lora_in_stream_dtype` keeps LoRA weights in float32 but multiplies in the
  activations' dtype; :func:`attach` is notebook 03's ``LoraConfig`` + ``get_peft_model`` + that
  step in one call (:func:`lora_config` builds the config), for notebooks 05/06 and the CLI;
- :func:`trainable_report` puts peft's trainable-parameter count beside r x sum(d_in + d_out);
  :func:`gradient_check` runs one real step and shows that only LoRA weights learn while the
  4-bit weights stay bit-for-bit the same.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from helpers.config import check
from helpers.footprint import footprint_breakdown, footprint_totals
from helpers.models import cpu_safe

SCOPES = ("all-linear", "attention")
ADAPTER = "default"


# --------------------------------------------------------------------------- target discovery


def _is_4bit(param) -> bool:
    return type(param).__name__ == "Params4bit"


def _is_adapter_wrapper(module) -> bool:
    """A peft layer that wraps a base layer (after :func:`attach`)."""
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _head(model):
    """The output head (``get_output_embeddings()``, which a peft model passes on to its base),
    or None where a model has none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.base_layer if head is not None and _is_adapter_wrapper(head) else head


def _looks_like_attention(attr: str, module) -> bool:
    """An attention block, recognised structurally: its class name says Attention, or the
    attribute holding it is called ...attn... / ...attention... (attn, self_attn, attention)."""
    low = attr.lower()
    return "attention" in type(module).__name__.lower() or "attn" in low or "attention" in low


def _walk(model):
    """Every linear layer as (path, layer, inside_attention, is_head).

    A layer wrapped by LoRA is reported once, under its own path, as its base layer; the LoRA
    matrices themselves are not linear layers of the model.
    """
    head = _head(model)
    out = []

    def visit(module, path, in_attention):
        for attr, child in module.named_children():
            child_path = f"{path}.{attr}" if path else attr
            if _is_adapter_wrapper(child):
                layer = child.base_layer
                out.append((child_path, layer, in_attention, layer is head))
                continue
            if isinstance(child, nn.Linear):
                out.append((child_path, child, in_attention, child is head))
                continue
            visit(child, child_path, in_attention or _looks_like_attention(attr, child))

    visit(model, "", False)
    return out


def _dtype_name(layer) -> str:
    if _is_4bit(layer.weight):
        return f"4-bit {layer.weight.quant_state.quant_type}"
    return str(layer.weight.dtype).replace("torch.", "")


def linear_layers(model) -> list[dict]:
    """The model's linear layers grouped by short name (the last part of the module path).

    One row per short name and shape: ``name``, ``count`` (instances), ``d_in``, ``d_out``,
    ``shape`` ("d_in x d_out"), ``dtype`` ("4-bit nf4" for bitsandbytes 4-bit layers, else the
    weight dtype), ``block`` ("attention", "other" or "head") and one ``example`` path. Covers
    ``bnb.nn.Linear4bit`` and plain ``nn.Linear`` (a 16-bit model). Introduced in notebook 03.
    """
    rows: dict = {}
    for path, layer, in_attention, is_head in _walk(model):
        name = path.rsplit(".", 1)[-1]
        key = (name, layer.in_features, layer.out_features)
        if key not in rows:
            rows[key] = {
                "name": name, "count": 0, "d_in": layer.in_features,
                "d_out": layer.out_features,
                "shape": f"{layer.in_features} x {layer.out_features}",
                "dtype": _dtype_name(layer),
                "block": "head" if is_head else ("attention" if in_attention else "other"),
                "example": path,
            }
        rows[key]["count"] += 1
    if not rows:
        raise ValueError(
            f"{type(model).__name__} has no linear layers (nn.Linear or bitsandbytes Linear4bit); "
            "LoRA here adapts linear layers only"
        )
    return list(rows.values())


def _names_for(selected: list[str], every: list[str]) -> list[str]:
    """Names peft matches (a module is targeted when its path ends with ".<name>") that select
    exactly ``selected`` among ``every`` linear path: the short name where it is unambiguous,
    a longer dotted suffix where the same short name also sits outside the selection."""
    chosen = set(selected)
    names: list[str] = []
    for path in selected:
        parts = path.split(".")
        suffixes = (".".join(parts[-n:]) for n in range(1, len(parts) + 1))  # shortest first
        name = next((s for s in suffixes
                     if all(p in chosen for p in every if p == s or p.endswith("." + s))), path)
        if name not in names:
            names.append(name)
    return names


def find_targets(model, scope: str = "all-linear") -> list[str]:
    """LoRA target names for this model, discovered from its module tree.

    ``scope``: "all-linear" (default; every linear layer except the output head, which is
    ``model.get_output_embeddings()``), "attention" (the linear layers inside attention blocks),
    or comma-separated names such as "q_proj,v_proj" (each must name at least one linear layer).
    Works for GPT-NeoX, GPT-J, Llama/Mistral/Qwen2 and OPT alike. Introduced in notebook 03.
    """
    layers = _walk(model)
    if not layers:
        linear_layers(model)  # raises the "no linear layers" error
    every = [path for path, *_ in layers]
    short = sorted({p.rsplit(".", 1)[-1] for p in every})
    key = str(scope).strip()
    if key.lower() == "all-linear":
        selected = [path for path, _, _, is_head in layers if not is_head]
    elif key.lower() == "attention":
        selected = [path for path, _, in_attention, is_head in layers
                    if in_attention and not is_head]
    else:
        wanted = [n.strip() for n in key.split(",") if n.strip()]
        if not wanted:
            raise ValueError(f"LORA_TARGETS is empty; use {' or '.join(SCOPES)} or names from: "
                             f"{', '.join(short)}")
        missing = [n for n in wanted
                   if not any(p == n or p.endswith("." + n) for p in every)]
        if missing:
            raise ValueError(
                f"target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
                f"its linear layers are: {', '.join(short)} "
                f"(or use LORA_TARGETS = {' or '.join(repr(s) for s in SCOPES)})"
            )
        return wanted
    if not selected:
        raise ValueError(
            f"scope {key!r} finds no linear layers in {type(model).__name__}; name them instead, "
            f"from: {', '.join(short)}"
        )
    return _names_for(selected, every)


# --------------------------------------------------------------------------- memory figures


def param_bytes(model) -> int:
    """Bytes the model's weights take: parameters (each shared tensor once, 4-bit weights as
    their packed storage), buffers, and the 4-bit quantization constants (absmax, nested
    absmax, code tables) that live beside each packed weight: the "resident" total of
    :func:`helpers.footprint.footprint_breakdown`."""
    return footprint_totals(footprint_breakdown(model))["resident"]


def _upcast_candidates(model) -> list:
    """The parameters peft's ``prepare_model_for_kbit_training`` casts to float32: every
    float16/bfloat16 parameter that is not a packed 4-bit weight (embeddings, head, norms,
    biases), each shared one once (``named_parameters`` skips repeats)."""
    return [(name, p) for name, p in model.named_parameters()
            if p.dtype in (torch.float16, torch.bfloat16) and not _is_4bit(p)]


# --------------------------------------------------------------------------- k-bit preparation


def prepare_for_training(model, gradient_checkpointing: bool = True,
                         upcast_norms_and_head: bool = False) -> dict:
    """Make a (4-bit) model ready for LoRA training, in the order that works; call it before
    :func:`attach`.

    1. freeze every base parameter (before attaching, so LoRA weights are not frozen after);
    2. only with ``upcast_norms_and_head``: cast float16/bfloat16 parameters that are not 4-bit
       (embeddings, head, norms, biases) to float32, exactly what peft 0.21's
       ``prepare_model_for_kbit_training`` does; off by default, because it costs
       numel x 2 bytes for each of them and LoRA trains without it;
    3. gradient checkpointing with ``use_reentrant=False``;
    4. input embeddings made to output tensors that require grad
       (``enable_input_require_grads``): the fix for "element 0 of tensors does not require
       grad" when checkpointing meets frozen embeddings;
    5. ``config.use_cache = False`` (the key/value cache is useless in training and conflicts
       with checkpointing).

    Returns a report: ``bytes_before``/``bytes_after`` (see :func:`param_bytes`),
    ``upcast_bytes_would_cost`` (what the float32 upcast adds), ``upcast_bytes_avoided`` (the same
    when the upcast is off, else 0), ``upcast_applied``, ``upcast_params`` (names cast),
    ``frozen_params``, ``gradient_checkpointing``, ``input_require_grads``. Introduced in
    notebook 03.
    """
    if hasattr(model, "peft_config"):
        raise ValueError("this model already has adapters, and freezing it now would freeze them "
                         "too: call prepare_for_training on the base model, then attach")
    before = param_bytes(model)
    # what a float32 upcast adds: numel x (4 - current element size) over the 16-bit ones
    would_cost = sum(p.numel() * (4 - p.dtype.itemsize) for _, p in _upcast_candidates(model))
    model.requires_grad_(False)
    upcast = []
    if upcast_norms_and_head:
        for name, p in _upcast_candidates(model):
            p.data = p.data.to(torch.float32)
            upcast.append(name)
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"{type(model).__name__} does not support gradient checkpointing; "
                "set GRADIENT_CHECKPOINTING = False (it then needs more activation memory)"
            )
        # activation_checkpointing_enable in transformers 5.x, gradient_checkpointing_enable before
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not hasattr(model, "_require_grads_hook"):  # transformers 5.x already added it
            model.enable_input_require_grads()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    after = param_bytes(model)
    return {
        "bytes_before": before,
        "bytes_after": after,
        "upcast_bytes_would_cost": would_cost,
        "upcast_bytes_avoided": 0 if upcast_norms_and_head else would_cost,
        "upcast_applied": bool(upcast_norms_and_head),
        "upcast_params": upcast,
        "frozen_params": sum(1 for _ in model.parameters()),
        "gradient_checkpointing": bool(gradient_checkpointing),
        "input_require_grads": hasattr(model, "_require_grads_hook"),
    }


# --------------------------------------------------------------------------- LoRA config


def lora_config(cfg, model):
    """A ``peft.LoraConfig`` from the series' Config, as notebook 03 builds it in a cell: LORA_R,
    LORA_ALPHA, LORA_DROPOUT (checked by :func:`helpers.config.check`), and targets from
    LORA_TARGETS (a scope or names, resolved on ``model`` by :func:`find_targets`); bias "none",
    task CAUSAL_LM."""
    from peft import LoraConfig

    check(cfg)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=find_targets(model, cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


class StreamDtypeLinear(nn.Linear):
    """A LoRA A or B matrix that keeps its float32 weight (and so float32 gradients and optimizer
    state) but multiplies in the dtype of its input: a bfloat16 stream stays bfloat16. peft would
    instead cast every adapted layer's input to float32 (a float32 copy of the activations, twice,
    for each adapted layer). The state dict is unchanged, so saved adapters are plain peft."""

    def forward(self, x):
        # .to() returns the tensor itself when the dtype already matches
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


class _DropoutThenLinear(torch.autograd.Function):
    """``dropout(x) @ W^T`` that keeps ``x`` and a seed for the backward instead of the dropout's
    output and mask: the mask is drawn again from the seed. ``x`` is what the adapted layer reads
    (a norm's output shared by q, k and v, the MLP's product), so adapters reading the same input
    keep one tensor between them."""

    @staticmethod
    def forward(ctx, x, weight, p: float, seed: int):
        keep = _keep_mask(x, p, seed)
        out = nn.functional.linear(x * keep, weight.to(x.dtype)) * (1.0 / (1.0 - p))
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        keep = _keep_mask(x, ctx.p, ctx.seed)
        grad = grad * (1.0 / (1.0 - ctx.p))
        grad_x = grad_w = None
        # one input-wide temporary beside the mask at a time
        if ctx.needs_input_grad[1]:  # in the gradient's dtype: autocast's, where it was on
            dropped = (x * keep).to(grad.dtype).reshape(-1, x.shape[-1])
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped).to(weight.dtype)
            del dropped
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).mul_(keep)
        return grad_x, grad_w, None, None


def _keep_mask(x, p: float, seed: int) -> torch.Tensor:
    """1 where dropout keeps a value (probability 1 - p), else 0, in ``x``'s dtype; the same for
    the same seed, shape and device."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p, generator=gen)


class LeanDropoutLinear(StreamDtypeLinear):
    """A LoRA A matrix that applies its adapter's dropout itself, in training with gradients
    (:class:`_DropoutThenLinear`); otherwise a :class:`StreamDtypeLinear`."""

    dropout_p = 0.0

    def forward(self, x):
        if self.training and self.dropout_p > 0 and torch.is_grad_enabled():
            # drawn from the global generator, whose state a checkpoint restores for the
            # recompute: the recomputed forward draws the same seed
            seed = int(torch.randint(0, 2**62, (1,)).item())
            return _DropoutThenLinear.apply(x, self.weight, self.dropout_p, seed)
        return super().forward(x)


def use_lean_dropout(peft_model) -> str:
    """Give every adapter with LoRA dropout the dropout of :class:`LeanDropoutLinear`: the same
    distribution (each value kept with probability 1 - p and scaled by 1 / (1 - p)), but the
    backward keeps the layer's input and a seed, not the dropout's output and a mask per adapter
    (Llama-3.1-8B, all linear layers: 117 KB per token of each recomputed block down to the
    inputs the block holds anyway). Sets ``uses_lean_dropout``; the adapters and their saved
    files are unchanged. :func:`helpers.offload.install` calls it (long sequences)."""
    if getattr(peft_model, "uses_lean_dropout", False):
        return "lean LoRA dropout: already installed"
    done = 0
    for module in peft_model.modules():
        if not _is_adapter_wrapper(module):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            linear = module.lora_A[name]
            if not isinstance(dropout, nn.Dropout) or dropout.p <= 0 or \
                    type(linear) not in (nn.Linear, StreamDtypeLinear):
                continue
            linear.__class__ = LeanDropoutLinear
            linear.dropout_p = float(dropout.p)
            module.lora_dropout[name] = nn.Identity()
            done += 1
    if not done:
        return "lean LoRA dropout: no adapter has dropout"
    peft_model.uses_lean_dropout = True
    return (f"lean LoRA dropout on {done} adapters: each keeps its layer's input and a seed for "
            "the backward, not a dropout output and a mask")


def compute_lora_in_stream_dtype(peft_model) -> int:
    """What notebook 03 adds after ``get_peft_model``: float32 LoRA weights that multiply in the
    dtype of the activations. Returns how many adapted layers were changed.

    Trainable (LoRA) weights are cast to float32, so fp16 mixed precision can unscale their
    gradients and bfloat16 training keeps float32 master weights; the frozen base keeps its
    dtypes. Each A and B matrix becomes a :class:`StreamDtypeLinear` and peft's input cast is
    turned off, so without autocast (bfloat16 training, see :func:`helpers.env.precision_flags`)
    the whole forward stays in bfloat16.
    """
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.to(torch.float32)
    changed = 0
    for module in peft_model.modules():
        if not _is_adapter_wrapper(module):
            continue
        for holder in (module.lora_A, module.lora_B):
            for linear in holder.values():
                if type(linear) is nn.Linear:
                    linear.__class__ = StreamDtypeLinear
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
        changed += 1
    return changed


def attach(model, cfg):
    """Wrap ``model`` with LoRA adapters from ``cfg`` and return the peft model: notebook 03's
    cells in one call (:func:`lora_config`, ``get_peft_model``,
    :func:`compute_lora_in_stream_dtype`), for notebooks 05/06 and the command line."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(cfg, model))
    compute_lora_in_stream_dtype(peft_model)
    return peft_model


# --------------------------------------------------------------------------- reports


def trainable_report(peft_model) -> dict:
    """peft's trainable-parameter count beside the LoRA formula, by target module type and in
    total (notebook 03).

    ``rows``: one per target short name: ``name``, ``layers`` (instances), ``d_in``, ``d_out``,
    ``r``, ``trainable`` (the adapted layers' trainable parameters) and ``formula``
    (r x (d_in + d_out) x layers).
    ``totals``: ``trainable`` and ``total_params`` from peft's ``get_nb_trainable_parameters()``
    (each 4-bit weight counted as the elements it stands for, not its packed bytes; shared
    weights once), ``trainable_percent``, ``formula_count`` (r x sum(d_in + d_out) over adapted
    layers), ``equal``, ``lora_target_count`` (adapted layer instances),
    ``adapter_bytes``, ``bytes_after`` (:func:`param_bytes`) and ``bytes_before`` (the same less
    the adapters: what the model took before attaching).
    """
    layers = [(path, module, module.r[ADAPTER]) for path, module in peft_model.named_modules()
              if _is_adapter_wrapper(module) and ADAPTER in getattr(module, "r", {})]
    if not layers:
        raise ValueError("no LoRA layers found: pass the model returned by get_peft_model")
    rows: dict = {}
    for path, module, r in layers:
        base = module.base_layer
        name = path.rsplit(".", 1)[-1]
        row = rows.setdefault(name, {"name": name, "layers": 0, "d_in": base.in_features,
                                     "d_out": base.out_features, "r": r, "trainable": 0,
                                     "formula": 0})
        row["layers"] += 1
        row["formula"] += r * (base.in_features + base.out_features)
        row["trainable"] += sum(p.numel() for p in module.parameters() if p.requires_grad)
    counted, total = peft_model.get_nb_trainable_parameters()
    formula = sum(row["formula"] for row in rows.values())
    adapter_bytes = sum(p.numel() * p.element_size() for p in peft_model.parameters()
                        if p.requires_grad)
    after = param_bytes(peft_model)
    totals = {
        "trainable": counted,
        "total_params": total,
        "trainable_percent": 100.0 * counted / total if total else 0.0,
        "formula_count": formula,
        "equal": formula == counted,
        "lora_target_count": len(layers),
        "bytes_before": after - adapter_bytes,
        "bytes_after": after,
        "adapter_bytes": adapter_bytes,
        "note": "total_params counts each 4-bit weight by its logical element count "
                "(quant_state.shape), not by its packed uint8 storage",
    }
    return {"rows": list(rows.values()), "totals": totals}


# --------------------------------------------------------------------------- it trains


def _packed_hashes(model) -> dict:
    """A SHA-1 of the bytes of each packed 4-bit weight, copied to the CPU one weight at a time
    (never the whole model)."""
    return {name: hashlib.sha1(p.data.reshape(-1).view(torch.uint8).cpu().numpy()).hexdigest()
            for name, p in model.named_parameters() if _is_4bit(p)}


def gradient_check(model, batch: dict, lr: float = 1e-2) -> dict:
    """One forward and backward on a real batch, then one optimizer step, to show that training
    reaches the adapters and nothing else.

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``labels`` (``labels`` default to the
    input ids). The model runs in train mode. The optimizer (SGD, ``lr``) gets every parameter
    that requires grad, as the Trainer would. LoRA B starts at zero, so at step 0 the gradient
    reaches B while A's gradient is exactly zero (it is multiplied by B); both are reported.
    Afterwards the LoRA weights are restored, so the check leaves the model as it found it.

    Returns ``loss``, ``lora_A_grad_norm``, ``lora_B_grad_norm``, ``lora_A_grad_zero``,
    ``lora_B_grad_nonzero``, ``non_lora_with_grad`` (names; should be empty),
    ``non_lora_trainable`` (names; should be empty), ``only_lora_grads``,
    ``base_4bit_unchanged`` (packed 4-bit data identical after the step), ``checked_4bit_weights``,
    ``lora_B_changed``, and ``ok`` (all of these as they should be). Introduced in notebook 03.
    """
    device = next(model.parameters()).device
    cpu_safe(model)  # nothing to undo on a GPU
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if "input_ids" not in batch:
        raise ValueError("the batch needs input_ids (and attention_mask, labels)")
    batch.setdefault("labels", batch["input_ids"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("no parameter requires grad: attach LoRA adapters first (get_peft_model)")
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    if loss is None or not loss.requires_grad:
        raise RuntimeError(
            "the loss does not require grad: no gradient reaches the adapters "
            "(with gradient checkpointing, call helpers.lora.prepare_for_training first)"
        )
    loss.backward()
    grads = {n: p.grad.detach().float() for n, p in model.named_parameters() if p.grad is not None}
    # one norm over all the A (or all the B) matrices
    a_norm, b_norm = (math.sqrt(sum(float(g.norm()) ** 2 for n, g in grads.items() if kind in n))
                      for kind in ("lora_A", "lora_B"))
    non_lora_grad = [n for n in grads if "lora_" not in n]
    non_lora_trainable = [n for n in trainable if "lora_" not in n]

    before = _packed_hashes(model)
    torch.optim.SGD(trainable.values(), lr=lr).step()
    after = _packed_hashes(model)
    b_changed = any(not torch.equal(p.detach(), saved[n]) for n, p in trainable.items()
                    if "lora_B" in n)

    with torch.no_grad():  # leave the model as it was
        for n, p in trainable.items():
            p.copy_(saved[n])
    model.zero_grad(set_to_none=True)
    model.train(was_training)

    result = {
        "loss": float(loss.detach()),
        "lora_A_grad_norm": a_norm,
        "lora_B_grad_norm": b_norm,
        "lora_A_grad_zero": a_norm == 0.0,
        "lora_B_grad_nonzero": b_norm > 0.0,
        "non_lora_with_grad": non_lora_grad,
        "non_lora_trainable": non_lora_trainable,
        "only_lora_grads": not non_lora_grad and not non_lora_trainable,
        "base_4bit_unchanged": before == after,
        "checked_4bit_weights": len(before),
        "lora_B_changed": b_changed,
    }
    result["ok"] = (math.isfinite(result["loss"]) and result["only_lora_grads"]
                    and result["lora_B_grad_nonzero"] and result["base_4bit_unchanged"]
                    and b_changed)
    return result

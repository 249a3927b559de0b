"""Per-example attention in packed rows without a mask. Introduced in notebook 05.

Packing (notebook 04) lays several examples end to end in one row, with ``position_ids`` that
restart at 0 for each. transformers keeps the examples apart by building a block-diagonal causal
mask from those positions: a [batch, 1, seq, seq] tensor for every forward. With a mask, SDPA
cannot take its flash kernel; it takes the memory-efficient kernel with the mask as a bias, or
the plain math path, and a packed row trains slower than a full row of one text.

torch's variable-length flash attention (``torch.nn.attention.varlen.varlen_attn``) needs no
mask: the rows are laid out as one stream of tokens and ``cu_seqlens`` (where each example
starts) keeps the examples apart, at the speed of an unmasked causal row. :func:`use_packed_attention`
registers it as an attention implementation of transformers (``ATTENTION``) and sets the model to
it. Each forward, a hook on the decoder reads ``position_ids``: where the batch has no
``attention_mask`` (the series' packed batches) it computes the examples' boundaries once, the
mask is not built, and every layer calls the varlen kernel; any other batch (an attention mask,
a cache, generation) goes to transformers' SDPA exactly as before. The kernel is checked once on
the model's device and dtype against per-example SDPA (values and gradients) before it is used;
where it is missing (CPU, float32, an older torch) or disagrees, nothing is changed and the
model keeps transformers' mask.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION = "series_packed_varlen"  # the name registered with transformers
HALF = (torch.float16, torch.bfloat16)
CHECK_TOLERANCE = 2e-2  # worst difference / largest value, for a 16-bit kernel against float32


@dataclass
class Segments:
    """The examples of one packed batch: ``starts`` (int32 [n + 1], where each example starts in
    the flattened batch, and its end), ``longest`` (the longest example's tokens), ``batch`` and
    ``seq`` (the batch's shape)."""

    starts: torch.Tensor
    longest: int
    batch: int
    seq: int

    def mask(self) -> torch.Tensor:
        """The block-diagonal causal mask of these examples ([batch, 1, seq, seq], True = may
        attend): what transformers builds from the positions."""
        n = self.batch * self.seq
        doc = torch.zeros(n, dtype=torch.int64, device=self.starts.device)
        doc[self.starts[1:-1].long()] = 1
        doc = doc.cumsum(0).view(self.batch, self.seq)
        causal = torch.ones(self.seq, self.seq, dtype=torch.bool, device=doc.device).tril()
        return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def segments(position_ids: torch.Tensor, batch: int | None = None) -> Segments:
    """:class:`Segments` from packed ``position_ids`` ([batch, seq]): an example starts at each
    row's first token and wherever the position does not follow the one before (a restart at 0,
    or a pad token's 0 after an example). ``batch``: the batch size, where the positions are
    one row shared by all."""
    pos = position_ids
    if batch is not None and pos.shape[0] != batch:
        pos = pos.expand(batch, -1)
    b, s = pos.shape
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = start.reshape(-1).nonzero().squeeze(-1)
    starts = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
    return Segments(starts, int((starts[1:] - starts[:-1]).max()), b, s)


class _State:
    """What this forward's layers read: the batch's :class:`Segments` where the varlen kernel
    runs it, else None (set by the decoder's hook before each forward)."""

    segments: Segments | None = None


_STATE = _State()


# ------------------------------------------------------------------ the kernel

@functools.lru_cache(maxsize=1)
def varlen_kernel():
    """torch's variable-length flash attention and the names of its parameters, or None in a
    torch without it (looked up once: every layer calls it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen(q, k, v, starts, longest: int, scale: float | None = None):
    """Causal attention of each example alone: ``q`` [tokens, heads, d], ``k``/``v`` [tokens,
    kv heads, d], ``starts`` and ``longest`` as in :class:`Segments`. Fits the kernel's signature
    in the installed torch (``window_size`` or ``is_causal``; ``scale``; ``enable_gqa``)."""
    kernel, params = varlen_kernel()
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)  # causal
    else:
        kw["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kw["scale"] = scale
        else:  # the kernel's own scale is 1 / sqrt(d)
            q = q * (scale * q.shape[-1] ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return kernel(q, k, v, starts, starts, longest, longest, **kw)


def reference(q, k, v, starts, scale: float | None = None):
    """:func:`varlen`'s result by SDPA, one example at a time, in float32 (the check's measure)."""
    out = []
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        qs, ks, vs = (t[a:b].transpose(0, 1).float() for t in (q, k, v))
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
                   .transpose(0, 1))
    return torch.cat(out)


def check_kernel(device, dtype, heads: int, kv_heads: int, head_dim: int) -> str | None:
    """Run :func:`varlen` forward and backward on three examples of random values in this
    device, dtype and head layout, against :func:`reference`. None if it agrees within
    :data:`CHECK_TOLERANCE`, else why it cannot be used."""
    if varlen_kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if torch.device(device).type != "cuda":
        return "the variable-length flash kernel runs on a CUDA GPU only"
    if dtype not in HALF:
        return f"the flash kernel computes in float16 or bfloat16, not {dtype}"
    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = [5, 37, 22]
    n = sum(lengths)
    starts = torch.tensor([0, 5, 42, 64], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(n, h, head_dim, generator=gen).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(n, heads, head_dim, generator=gen).to(device, dtype)
    scale = head_dim ** -0.5 * 0.9  # not the default, so that the scale is checked too
    try:
        out = varlen(q, k, v, starts, max(lengths), scale)
        ours = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    except Exception as err:  # noqa: BLE001 - any failure means: keep the mask
        return f"the varlen kernel failed here: {type(err).__name__}: {str(err)[:200]}"
    ref = reference(q, k, v, starts, scale)
    theirs = [ref, *torch.autograd.grad(ref, (q, k, v), grad.float())]
    for name, a, b in zip(("output", "dq", "dk", "dv"), ours, theirs, strict=True):
        a, b = a.detach().float(), b.detach()
        worst = float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))
        if not worst <= CHECK_TOLERANCE:
            return f"the varlen kernel's {name} differs from SDPA by {worst:.3g} of its largest value"
    return None


# ------------------------------------------------------------------ transformers' side

def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    """The attention function registered as :data:`ATTENTION`: the varlen kernel for a packed
    batch whose segments the decoder's hook computed, transformers' SDPA for anything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seg = _STATE.segments
    if seg is None or attention_mask is not None or query.shape[2] != seg.seq:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.dtype not in HALF and torch.is_autocast_enabled(query.device.type):
        half = torch.get_autocast_dtype(query.device.type)  # what SDPA computes in under autocast
        query, key, value = query.to(half), key.to(half), value.to(half)
    if dropout or query.dtype not in HALF:  # the kernel has neither: the mask transformers builds
        return sdpa_attention_forward(module, query, key, value, seg.mask(), dropout=dropout,
                                      scaling=scaling, **kwargs)
    b, heads, s, d = query.shape
    q = query.transpose(1, 2).reshape(b * s, heads, d)
    k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * s, value.shape[1], d)
    out = varlen(q, k, v, seg.starts, seg.longest, scaling)
    return out.view(b, s, heads, d), None


def _packed_mask(*args, **kwargs):
    """The mask function registered with :data:`ATTENTION`: no mask for a batch the varlen kernel
    runs, SDPA's mask for any other."""
    from transformers.masking_utils import sdpa_mask

    return None if _STATE.segments is not None else sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register :data:`ATTENTION` with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, _packed_mask)


def _decoder(model):
    """The transformer stack that receives ``position_ids`` (under peft and the causal-LM head)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm, getattr(lm, getattr(lm, "base_model_prefix", ""), None)


def _compute_dtype(decoder, device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return decoder.get_input_embeddings().weight.dtype


def runs_varlen(decoder, ids) -> bool:
    """Whether a packed batch of ``ids`` goes to the varlen kernel: on a CUDA device, in a 16-bit
    dtype (the check at installation ran there)."""
    return ids.device.type == "cuda" and _compute_dtype(decoder, ids.device) in HALF


def _hook(decoder):
    def before_forward(_module, args, kwargs):
        _STATE.segments = None
        positions = kwargs.get("position_ids")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if (positions is None or ids is None or kwargs.get("attention_mask") is not None
                or kwargs.get("past_key_values") is not None or not runs_varlen(decoder, ids)):
            return
        _STATE.segments = segments(positions, ids.shape[0])

    return before_forward


def use_packed_attention(model) -> str:
    """Give packed batches per-example attention by torch's varlen flash kernel instead of
    transformers' block mask, where the kernel exists and passes :func:`check_kernel` on this
    model's device, dtype and heads; say what was done. Installing twice changes nothing."""
    lm, decoder = _decoder(model)
    if getattr(lm, "uses_packed_attention", False):
        return f"packed rows: per-example attention by the varlen kernel ({ATTENTION})"
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if not getattr(lm, "_supports_attention_backend", False) or decoder is None:
        return (f"packed rows: transformers' block mask ({type(lm).__name__} does not call "
                "attention through transformers' attention interface)")
    if lm.config._attn_implementation not in ("sdpa", ATTENTION):
        return (f"packed rows: transformers' block mask (the model's attention is "
                f"{lm.config._attn_implementation!r}, which keeps its own way)")
    weight = decoder.get_input_embeddings().weight
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    why = check_kernel(weight.device, _compute_dtype(decoder, weight.device), heads, kv_heads,
                       head_dim)
    if why:
        return f"packed rows: transformers' block mask through SDPA ({why})"
    register()
    for sub in {id(config): config, id(lm.config): lm.config}.values():
        sub._attn_implementation = ATTENTION
    decoder.register_forward_pre_hook(_hook(decoder), with_kwargs=True)
    lm.uses_packed_attention = True
    return ("packed rows: per-example attention by torch's variable-length flash kernel "
            "(no mask; checked against SDPA on this device)")

"""A lighter RMSNorm for long sequences: the same numbers, without the float32 copy.

transformers writes the RMSNorm of Llama, Mistral, Qwen2 and their kin out in Python: the input
cast to float32, squared, averaged, its reciprocal square root, the product, the cast back, the
weight. Autograd keeps the float32 copy of the input for the backward (4 bytes a value: 32 KB per
token in each Llama-3.1-8B block, which has two norms), and the backward of those operations
makes five float32 tensors the size of the stream. :class:`LeanRMSNorm` runs the same operations
in the same order (so the forward gives the same numbers) and keeps only its input, which the
block holds anyway, and one float32 number per token; its backward holds three float32
temporaries. At long sequences that is most of the recomputed block's stream-wide memory once
the MLP is tiled (``helpers.estimator`` counts it).

:func:`install` gives every RMSNorm of a model this forward, checked on the module itself first:
a random input must give a bit-identical output, else the module keeps its own forward and the
note says so. :func:`helpers.offload.install` installs it with the offloaded activations, the
long-sequence setting (ACTIVATION_OFFLOAD), where it counts. Introduced in notebook 05.
"""

from __future__ import annotations

import torch


class LeanRMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, computed in float32 like
    transformers' RMSNorm, keeping ``x`` and the per-token ``rsqrt`` for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            lead = tuple(range(grad.dim() - 1))
            grad_weight = (grad * xhat.to(x.dtype)).sum(lead).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)), g the gradient of the
        # normalized values (the cast back to x's dtype passes gradients through, as autograd's)
        g = (grad * weight).to(torch.float32)
        dot = (g * xhat).mean(-1, keepdim=True)
        g.sub_(xhat.mul_(dot)).mul_(rstd)
        return g.to(x.dtype), grad_weight, None


def _eps(module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _candidates(model):
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm") and isinstance(
                getattr(module, "weight", None), torch.Tensor) and _eps(module) is not None:
            yield name, module


def _same_forward(module, eps: float) -> bool:
    weight = module.weight
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, weight.shape[-1], generator=gen).to(weight.device, weight.dtype)
    with torch.no_grad():
        try:
            own = module(x)
            mine = LeanRMSNorm.apply(x, weight, eps)
            return own.dtype == mine.dtype and torch.equal(own, mine)
        except Exception:  # noqa: BLE001 - a norm that cannot run alone here (a sharded weight)
            return False  # is left alone


def install(model) -> str:
    """Give each RMSNorm of ``model`` whose forward :class:`LeanRMSNorm` reproduces bit for bit
    that forward (with gradients; without, its own), set ``model.uses_lean_norms``, and say what
    was done. Installing twice changes nothing."""
    if getattr(model, "uses_lean_norms", False):
        return "lean RMSNorm: already installed"
    done, kept = 0, set()
    for _name, module in _candidates(model):
        eps = _eps(module)
        if not _same_forward(module, eps):
            kept.add(type(module).__name__)
            continue
        own = module.forward

        def forward(hidden_states, *args, _own=own, _module=module, _eps=eps, **kwargs):
            if args or kwargs or not torch.is_grad_enabled():
                return _own(hidden_states, *args, **kwargs)
            return LeanRMSNorm.apply(hidden_states, _module.weight, _eps)

        module.forward = forward
        module.lean_norm_own_forward = own
        done += 1
    if not done:
        why = f" ({', '.join(sorted(kept))} computes differently)" if kept else ""
        return f"lean RMSNorm: none of this model's norms{why}; they keep their own forward"
    model.uses_lean_norms = True
    text = (f"lean RMSNorm on {done} norms: each keeps its input and one number per token for "
            "the backward instead of a float32 copy")
    return text + (f"; {', '.join(sorted(kept))} kept their own" if kept else "")


def remove(model) -> None:
    """Give the norms back their own forward (what :func:`install` replaced)."""
    for module in model.modules():
        own = module.__dict__.pop("lean_norm_own_forward", None)
        if own is not None:
            module.__dict__.pop("forward", None)
    model.__dict__.pop("uses_lean_norms", None)

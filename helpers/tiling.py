"""Each decoder block's MLP run a chunk of tokens at a time for long sequences. Introduced in
notebook 05.

With gradient checkpointing the backward recomputes one block at a time, and for long sequences
that block is what fills the card: its MLP's intermediates (for Llama-3.1-8B: the gate, the up
projection, act(gate) and their product, each tokens x 14,336 wide, LoRA's saves inside the
MLP, and their gradients) outweigh everything else the block holds. :func:`install` splits
the MLP's input along the sequence into chunks of ``chunk_tokens`` tokens and runs each chunk
under its own non-reentrant ``torch.utils.checkpoint.checkpoint``, then concatenates the
outputs. Only one chunk's intermediates exist at a time, in the forward (the chunk saves none
of them) and in the backward (the chunk is recomputed just before its gradients). Without
gradients (the held-out loss before and after training, a long prompt's first forward) the
chunks run one after another with nothing saved: at the longest sequences a card trains, one
untiled MLP's intermediates would not fit beside the model. The checkpoint
inside the block's own checkpoint is supported by torch's non-reentrant implementation, and
each chunk's recomputation replays the random state of its forward, so LoRA dropout draws the
same masks. Loss and gradients equal the untiled ones (``tests/test_tiling.py``). The price:
every MLP is computed once more in the backward.

The chunk, :data:`helpers.estimator.MLP_CHUNK_TOKENS` = 4,096 tokens by default. Each chunk
dequantizes the MLP's 4-bit weights again for its matmuls: that moves about 2.5 bytes per weight
(half a byte read, two written) against 2 x chunk floating-point operations per weight, so at
4,096 tokens about 3,300 operations per byte, far above what a GPU computes per byte it moves
(about 200 on an H200), and the repeated dequantization stays a small share of the time; at a
few hundred tokens it would not. One chunk's intermediates are then those of an untiled
4,096-token step, which every budget the series plans for already holds. Shorter inputs are not
split. :func:`helpers.estimator.estimate` with ``tiled_mlp=True`` predicts the memory.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from helpers import budget, estimator


class TilingStats:
    """``mlps``: how many MLPs run tiled; ``chunk_tokens``: tokens per chunk; ``calls``: tiled
    forwards so far; ``chunk_runs``: chunk forwards, recomputations in the backward included."""

    def __init__(self, mlps: int, chunk_tokens: int):
        self.mlps, self.chunk_tokens = mlps, chunk_tokens
        self.calls = self.chunk_runs = 0


def decoder_mlps(model) -> list:
    """``(name, module)`` of every decoder layer's MLP: a submodule named ``mlp`` directly inside a
    numbered layer (``model.layers.3.mlp``, ``gpt_neox.layers.3.mlp``, ``transformer.h.3.mlp``),
    under peft's wrapper too."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "mlp" and parts[-2].isdigit():
            found.append((name, module))
    return found


def _tiled_forward(mlp, own, stats: TilingStats):
    def run_chunk(part):
        stats.chunk_runs += 1
        out = own(part)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{type(mlp).__name__} returns {type(out).__name__}, not a tensor: "
                            "the tiled MLP splits dense MLPs only; set TILED_MLP = 'off'")
        return out

    @functools.wraps(own)
    def forward(*args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else None
        grad = torch.is_grad_enabled()
        if not ((mlp.training or not grad) and isinstance(x, torch.Tensor) and x.dim() >= 2):
            return own(*args, **kwargs)
        rows = max(1, stats.chunk_tokens // max(1, x[..., 0, 0].numel()))  # per sequence
        if x.shape[-2] <= rows:
            return own(x)
        stats.calls += 1
        parts = x.split(rows, dim=-2)  # one backward node gathers the chunks' input gradients
        if not grad:  # evaluation of a long row: nothing is saved, one chunk at a time suffices
            return torch.cat([run_chunk(p) for p in parts], dim=-2)
        return torch.cat([checkpoint(run_chunk, p, use_reentrant=False) for p in parts], dim=-2)

    return forward


def install(model, chunk_tokens: int | None = None) -> TilingStats:
    """Run every decoder layer's MLP (:func:`decoder_mlps`) ``chunk_tokens`` tokens at a time
    (default :data:`helpers.estimator.MLP_CHUNK_TOKENS`; split along the sequence, micro-batch x
    rows per chunk) whenever it trains with gradients or runs without them, and its input is
    longer than a chunk; otherwise (short inputs; evaluation mode with gradients) its own
    forward. Sets ``model.uses_tiled_mlp = True`` (which
    :func:`helpers.budget.default_estimate_fn` reads) and returns the :class:`TilingStats`, also
    at ``model.tiled_mlp_stats``. Installing twice changes nothing."""
    if getattr(model, "uses_tiled_mlp", False):
        return model.tiled_mlp_stats
    chunk_tokens = estimator.MLP_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    if int(chunk_tokens) != chunk_tokens or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be a whole number of tokens >= 1")
    mlps = [m for _, m in decoder_mlps(model)]
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no decoder layers with an 'mlp' "
                         "(layers.N.mlp) to tile: set TILED_MLP = 'off'")
    stats = mlps[0].__dict__.get("_tiling_stats")  # tiled already, from inside peft's wrapper
    if stats is None:
        stats = TilingStats(len(mlps), int(chunk_tokens))
        for mlp in mlps:
            mlp._tiling_stats = stats
            mlp.forward = _tiled_forward(mlp, mlp.forward, stats)
    model.uses_tiled_mlp = True
    model.tiled_mlp_stats = stats
    return stats


def remove(model) -> None:
    """Give every MLP that :func:`install` tiled its own forward back."""
    for _, mlp in decoder_mlps(model):
        if "_tiling_stats" in mlp.__dict__:
            del mlp.__dict__["forward"], mlp.__dict__["_tiling_stats"]
    for attr in ("uses_tiled_mlp", "tiled_mlp_stats"):
        if attr in vars(model):
            delattr(model, attr)


def use_tiled_mlp(model, cfg) -> str:
    """Run each decoder block's MLP a chunk of tokens at a time during training when TILED_MLP
    says so, and say what was decided. Introduced in notebook 05.

    'on' installs the tiling (:func:`install`); 'off' leaves the model as it is; 'auto' (the
    default) installs it only when the budget needs it: when one training step at micro-batch 1
    and MAX_LENGTH is predicted not to fit MEMORY_BUDGET_GB without it and to fit with it, with
    the activations offloaded as :func:`helpers.offload.use_activation_offload` decided before
    (:func:`helpers.budget.choose_tiling`): offloading first, since the tiled MLP costs a
    recomputation. Call it after that and before :func:`helpers.budget.choose_micro_batch`.
    Tiling needs GRADIENT_CHECKPOINTING (the parameter check says so for 'on')."""
    fns = {on: budget.default_estimate_fn(cfg, model, tiled=on) for on in (False, True)}
    need = (lambda on: fns[on](1, cfg.max_length)) if fns[False] is not None else None
    on, why = budget.choose_tiling(cfg, need)
    if not on:
        return why
    stats = install(model)
    return why + (f"; {stats.mlps} MLPs run {stats.chunk_tokens:,} tokens at a time, each "
                  "recomputed in the backward")

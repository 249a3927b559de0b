"""A causal-LM loss that never holds the whole sequence's logits. Introduced in notebook 05.

The usual loss runs the output head over every position ([batch, seq, vocab] logits in the
compute dtype), and transformers casts them to float32 before the cross-entropy: for a
128,256-token vocabulary at 8,192 tokens that is 4.2 GB of float32 logits alone, plus the 16-bit
copy, log-softmax's output and the gradients - more than everything else a 16 GB card holds for
an 8B model. Here the model runs its body as usual but its head on the last position only
(``logits_to_keep=1``); the final hidden states (after the final norm, what the head reads) are
taken from the body, and the loss is computed over chunks of labelled positions: each chunk goes
through the head, to float32 and into ``cross_entropy(reduction="sum")`` inside a non-reentrant
activation checkpoint, so one chunk's logits exist at a time, in the forward and in the backward.
The sum is divided exactly as transformers divides it: by ``num_items_in_batch`` when the
Trainer passes it (so gradient accumulation gives the gradients of the standard loss), else by
the batch's label tokens: :func:`chunked_cross_entropy`, installed in the model's own forward by
:func:`use_chunked_loss` (CHUNKED_LOSS, on by default) so that a plain ``transformers.Trainer``
trains with it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helpers.tokens import IGNORE_INDEX
from helpers.units import chunk_tokens

# model_type -> the body whose last_hidden_state the head reads as is (verified numerically:
# head(body(x).last_hidden_state) equals the model's logits).
SUPPORTED = ("gpt_neox", "gptj", "llama", "mistral", "qwen2")
# config attributes that change the logits after the head (soft-capping, scaling)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_logits_scaling")


def unwrap(model):
    """The transformers causal LM inside ``model``: through DistributedDataParallel / DataParallel
    (accelerate's ``extract_model_from_parallel``) and a peft model (``get_base_model()``)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    peft = hasattr(model, "get_base_model") and hasattr(model, "peft_config")
    return model.get_base_model() if peft else model


def unsupported_reason(model) -> str | None:
    """Why the chunked loss cannot stand in for ``model``'s own loss (None: it can). It applies to
    the families whose head reads the body's last hidden state unchanged (:data:`SUPPORTED`,
    checked in tests/test_losses.py; each has its body under ``base_model_prefix`` and a forward
    that takes ``logits_to_keep``), with a plain linear head (GPT-J's bias included) and no logit
    soft-capping or scaling; any other model keeps the standard loss."""
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not among the checked families ({', '.join(SUPPORTED)})"
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0, False):
            return f"config.{attr}={value!r} transforms the logits after the head"
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    return None


def _autocast_state(device_type: str) -> tuple:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _chunk_loss(head, hidden, targets):
    """Sum of the cross-entropy of one chunk (``hidden`` [n, h], ``targets`` [n])."""
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head, *,
                          num_items_in_batch=None, chunk_size: int | None = None,
                          autocast: tuple | None = None) -> torch.Tensor:
    """The causal-LM loss of transformers (``ForCausalLMLoss``) from the final hidden states.

    ``hidden``: [batch, seq, h], what the head reads; ``labels``: [batch, seq], not shifted
    (position i predicts label i + 1; -100 is ignored); ``head``: the output layer (a module or
    function mapping [n, h] to [n, vocab] logits). Only labelled positions go through the head,
    ``chunk_size`` of them at a time (default :func:`helpers.units.chunk_tokens` of the
    vocabulary), each chunk under a non-reentrant checkpoint: its logits are freed after its loss
    and recomputed in the backward. The result is the sum over label tokens divided by ``num_items_in_batch`` when
    given (the Trainer's count over the accumulated micro-batches), else by this batch's label
    tokens (NaN when there are none, as in transformers). ``autocast``: ``(enabled, dtype)`` to
    run the head under (default: the current state), so the head computes in the dtype it would
    inside the model's forward.
    """
    if hidden.shape[:2] != labels.shape[:2]:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} "
                         "differ in batch or sequence length")
    labels = labels.to(hidden.device)
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    count = keep.numel()
    flat = hidden.reshape(-1, hidden.shape[-1])
    picked, targets = flat.index_select(0, keep), targets.index_select(0, keep)
    if chunk_size is None:
        weight = getattr(head, "weight", None)
        chunk_size = chunk_tokens(weight.shape[0] if weight is not None else 32768)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    device_type = hidden.device.type
    enabled, dtype = autocast if autocast is not None else _autocast_state(device_type)
    total = hidden.new_zeros((), dtype=torch.float32)
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        # split, not slices: its backward joins the chunks' gradients once
        for h, y in zip(picked.split(chunk_size), targets.split(chunk_size)):
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
            else:
                total = total + _chunk_loss(head, h, y)
    if count == 0:
        total = total + picked.sum() * 0.0  # keep the graph (and a zero gradient)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / (count if num_items_in_batch is None else num_items_in_batch)  # 0 / 0: NaN


def _forward_with_chunked_loss(lm, call, inputs: dict, labels, num_items_in_batch=None):
    """``call(**inputs)`` (the forward of the causal LM ``lm``) without labels and with
    ``logits_to_keep=1`` (the head on the last position only); a forward hook on the body takes
    its ``last_hidden_state`` and the autocast state of the forward, and
    :func:`chunked_cross_entropy` computes the loss. Returns the model's output with ``loss``
    set; its ``logits`` are the last position's only."""
    body = getattr(lm, lm.base_model_prefix)  # gpt_neox, transformer, model
    seen = {}

    def grab(_module, _args, output):
        last = output[0] if isinstance(output, (tuple, list)) else output["last_hidden_state"]
        seen["hidden"] = last
        seen["autocast"] = _autocast_state(last.device.type)

    handle = body.register_forward_hook(grab)
    try:
        outputs = call(**{"use_cache": False, **inputs, "logits_to_keep": 1})
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the model's body did not run: no hidden states for the loss")
    loss = chunked_cross_entropy(seen.pop("hidden"), labels, lm.get_output_embeddings(),
                                 num_items_in_batch=num_items_in_batch,
                                 autocast=seen["autocast"])
    outputs["loss"] = loss
    return outputs


def summed_loss(model, inputs: dict, labels) -> torch.Tensor:
    """The cross-entropy summed over the label tokens of one batch, from ``model(**inputs)`` (a
    model :func:`unsupported_reason` accepts, peft's wrapper included) with the head on the last
    position only and :func:`chunked_cross_entropy` over the labelled positions, so that the
    whole sequence's logits never exist. For the held-out loss
    (:func:`helpers.train.evaluate_loss`)."""
    out = _forward_with_chunked_loss(unwrap(model), model, inputs, labels, num_items_in_batch=1)
    return out["loss"]


def use_chunked_loss(model) -> str:
    """Make the causal LM inside ``model`` compute its training loss with
    :func:`chunked_cross_entropy`, and say what was done. Introduced in notebook 05.

    transformers has no loss that avoids the whole sequence's logits, and the Trainer computes
    the loss by calling the model, so the model's own ``forward`` is replaced by one that, in
    training mode and with ``labels`` (and no ``shift_labels``) for more than one chunk of
    positions, runs the body and the chunked loss instead of the head over every position;
    otherwise (evaluation, generation, short batches) it is the model's own forward: up to one
    chunk the chunked loss would hold the same logits (recomputed in the backward), saving
    nothing. The loss equals the model's own, divided by ``num_items_in_batch`` when the Trainer
    passes it, so gradient accumulation and averaging across processes stay the Trainer's. The
    Trainer's label smoothing or ``compute_loss_func`` take the labels out of the call, which
    then keeps the standard path. Models it does not apply to (:func:`unsupported_reason`) keep
    their own loss. The model gets ``uses_chunked_loss = True``,
    which the memory estimate of :func:`helpers.budget.default_estimate_fn` reads.
    """
    reason = unsupported_reason(model)
    if reason:
        return f"the model keeps its own loss: {reason}"
    lm = unwrap(model)
    size = chunk_tokens(lm.get_output_embeddings().weight.shape[0])
    what = f"chunked loss: labelled positions through the head {size} at a time"
    if getattr(lm, "uses_chunked_loss", False):
        return what
    own = lm.forward

    @functools.wraps(own)
    def forward(*args, labels=None, **kwargs):
        if labels is None or args or not lm.training or "shift_labels" in kwargs \
                or labels.numel() <= size:
            return own(*args, labels=labels, **kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        return _forward_with_chunked_loss(lm, own, kwargs, labels, num_items)

    lm.forward = forward
    lm.uses_chunked_loss = True
    return what

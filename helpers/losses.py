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
the batch's label tokens.

- :func:`chunked_cross_entropy` - the loss from hidden states, labels and the head;
- :func:`causal_lm_loss` - one forward of a (peft-wrapped) causal LM with that loss;
- :class:`ChunkedLossModel` - a stand-in for the model that ``Trainer.compute_loss`` calls
  (``helpers.train.SeriesTrainer`` uses it when ``CHUNKED_LOSS = True``, the default);
- :func:`unsupported_reason` / :func:`supports` - which models it applies to: the families whose
  head reads the body's last hidden state unchanged (checked in tests/test_losses.py), with a
  plain linear head (GPT-J's bias included) and no logit soft-capping or scaling; any other model
  keeps the standard loss;
- :func:`more_than_one_chunk` - whether a micro-batch is long enough for chunks to save memory:
  up to one chunk (:func:`chunk_tokens`: 512 positions of a 128,256-token vocabulary, 8,192 of a
  small model's) the model's own loss holds the same logits and is a little faster.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from helpers.tokens import IGNORE_INDEX

# One chunk's float32 logits take about this many bytes: 512 tokens of a 128,256-token vocabulary
# (Llama 3), 1,024 of a 50,000-token one, the whole sequence of a small model.
CHUNK_LOGIT_BYTES = 2 ** 28
MAX_CHUNK_TOKENS = 8192
MIN_CHUNK_TOKENS = 64
# model_type -> the body whose last_hidden_state the head reads as is (verified numerically:
# head(body(x).last_hidden_state) equals the model's logits).
SUPPORTED = ("gpt_neox", "gptj", "llama", "mistral", "qwen2")
# config attributes that change the logits after the head (soft-capping, scaling)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                     "output_logits_scaling")


def chunk_tokens(vocab: int) -> int:
    """Positions per chunk: a power of two whose float32 logits fill about
    :data:`CHUNK_LOGIT_BYTES`, between 64 and 8,192."""
    n = max(1, CHUNK_LOGIT_BYTES // (4 * max(1, int(vocab))))
    n = 1 << (n.bit_length() - 1)
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, n)))


def unwrap(model):
    """The transformers causal LM inside ``model``: through DistributedDataParallel / DataParallel
    (``.module``) and a peft model (``get_base_model()``)."""
    for _ in range(8):  # wrappers in wrappers, a few deep at most
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            model = model.get_base_model()
        else:
            break
    return model


def _body(lm):
    """The causal LM's body (``gpt_neox``, ``transformer``, ``model``)."""
    prefix = getattr(lm, "base_model_prefix", "")
    body = getattr(lm, prefix, None) if prefix else None
    if body is None and hasattr(lm, "get_decoder"):
        body = lm.get_decoder()
    return body


def unsupported_reason(model) -> str | None:
    """Why the chunked loss cannot stand in for ``model``'s own loss (None: it can)."""
    lm = unwrap(model)
    config = getattr(lm, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} is not among the checked families ({', '.join(SUPPORTED)})"
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0, False):
            return f"config.{attr}={value!r} transforms the logits after the head"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    body = _body(lm)
    if not isinstance(body, torch.nn.Module) or body is lm:
        return "the model's body (the module before the head) was not found"
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return "its forward has no logits_to_keep argument"
    return None


def supports(model) -> bool:
    """True when :func:`causal_lm_loss` can replace ``model``'s own loss."""
    return unsupported_reason(model) is None


def more_than_one_chunk(model, positions: int) -> bool:
    """True when ``positions`` (micro-batch x sequence length) are more than one chunk of
    ``model``'s vocabulary holds. Up to one chunk the chunked loss holds the same logits as the
    model's own loss (recomputed in backward), so it saves nothing and the model's loss is used."""
    head = unwrap(model).get_output_embeddings()
    return positions > chunk_tokens(head.weight.shape[0])


def _autocast_state(device_type: str) -> tuple:
    try:
        return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    except (TypeError, AttributeError):  # pragma: no cover - older torch
        if device_type == "cuda":
            return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


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
    ``chunk_size`` of them at a time (default :func:`chunk_tokens` of the vocabulary), each chunk
    under a non-reentrant checkpoint: its logits are freed after its loss and recomputed in the
    backward. The result is the sum over label tokens divided by ``num_items_in_batch`` when
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
    if num_items_in_batch is None:
        return total / count if count else total / 0.0
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(model, inputs: dict, labels: torch.Tensor, *, num_items_in_batch=None,
                   chunk_size: int | None = None):
    """One forward of ``model`` (a causal LM, peft-wrapped or not, possibly inside
    DistributedDataParallel: the wrapper's forward is the one called) with the chunked loss.

    The model runs with ``logits_to_keep=1`` (its head on the last position only); a forward hook
    on the body takes its ``last_hidden_state`` and the autocast state of the forward, and
    :func:`chunked_cross_entropy` computes the loss. Returns the model's output with ``loss`` set;
    its ``logits`` are the last position's only.
    """
    lm = unwrap(model)
    reason = unsupported_reason(lm)
    if reason:
        raise ValueError(f"the chunked loss does not apply to this model: {reason}")
    body = _body(lm)
    seen = {}

    def grab(_module, _args, output):
        last = output[0] if isinstance(output, (tuple, list)) else output["last_hidden_state"]
        seen["hidden"] = last
        seen["autocast"] = _autocast_state(last.device.type)

    handle = body.register_forward_hook(grab)
    try:
        outputs = model(**{"use_cache": False, **inputs, "logits_to_keep": 1})
    finally:
        handle.remove()
    if "hidden" not in seen:
        raise RuntimeError("the model's body did not run: no hidden states for the loss")
    loss = chunked_cross_entropy(seen.pop("hidden"), labels, lm.get_output_embeddings(),
                                 num_items_in_batch=num_items_in_batch, chunk_size=chunk_size,
                                 autocast=seen["autocast"])
    outputs["loss"] = loss
    return outputs


class ChunkedLossModel:
    """Calls ``model`` as ``Trainer.compute_loss`` does (``model(**inputs)`` with ``labels`` and,
    when the model accepts loss kwargs, ``num_items_in_batch``) and returns its output with the
    chunked loss, so the Trainer's own handling of the loss - gradient-accumulation scaling,
    averaging across devices - stays exactly as for the model's own loss."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        labels = inputs.pop("labels")
        num_items = inputs.pop("num_items_in_batch", None)
        return causal_lm_loss(self.model, inputs, labels, num_items_in_batch=num_items)

    def __getattr__(self, name):  # anything else the Trainer asks of the model
        return getattr(self.model, name)

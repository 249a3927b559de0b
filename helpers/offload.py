"""Checkpointed activations kept in CPU memory during training. Introduced in notebook 05.

With gradient checkpointing the GPU holds, from the forward to the backward, one tensor per
block: the block's input (tokens x hidden size in the stream's dtype; 32 x 8,192 x 4,096 x 2
bytes = 2.1 GB for Llama-3.1-8B at 8,192 tokens, and it grows with the sequence). Everything else
a block saves is recomputed in the backward. With non-reentrant checkpointing (the series'
``use_reentrant=False``) those block inputs, and the few tensors the model saves outside its
blocks, are the only tensors autograd saves itself; the recomputed blocks save theirs through
the checkpoint's own hooks. So a ``torch.autograd.graph.saved_tensors_hooks`` around the training
forward sees exactly them: :class:`ActivationsOnCpu` copies each into pinned CPU memory on a
side CUDA stream (the copy runs while the next block computes) and copies it back when the
backward recomputes that block. The GPU then holds the blocks' inputs in flight only, and the
host holds the rest (:func:`helpers.estimator.estimate` with ``activation_offload=True`` predicts
both). Parameters are never copied. On CPU the tensors are copied within host memory: nothing is
saved there, but the same path runs, so the CPU tests check it.

torch's own ``torch.autograd.graph.save_on_cpu(pin_memory=True)`` does the same with its copies
on the computing stream and copies parameters too. :func:`use_activation_offload` installs the
hooks in the model's forward (ACTIVATION_OFFLOAD), in training mode with gradients only, so that
a plain ``transformers.Trainer`` trains with them and evaluation and generation are unchanged.
"""

from __future__ import annotations

import functools
import weakref

import torch

from helpers import budget, lora, norms
from helpers.units import fmt_bytes

_STREAMS: dict = {}  # device -> the side stream of the copies to the host


def _copy_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class OffloadStats:
    """Bytes the hooks hold in host memory now (``held``), their peak since the last
    :meth:`reset` (``peak``), and how many tensors were copied (``tensors``)."""

    def __init__(self):
        self.held = self.peak = self.tensors = 0
        self.lean = ""  # what install did to the RMSNorms and the LoRA dropout

    def reset(self) -> None:
        self.peak, self.tensors = self.held, 0


class _OnHost:
    """One saved tensor in host memory: its device, the copy, the event that ends the copy."""

    __slots__ = ("device", "host", "event", "nbytes", "stats")

    def __init__(self, device, host, event, stats):
        self.device, self.host, self.event, self.stats = device, host, event, stats
        self.nbytes = host.numel() * host.element_size()
        stats.held += self.nbytes
        stats.peak = max(stats.peak, stats.held)
        stats.tensors += 1

    def __del__(self):
        self.stats.held -= self.nbytes


def _is_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


class ActivationsOnCpu(torch.autograd.graph.saved_tensors_hooks):
    """Within this context every tensor autograd saves (parameters and their views excepted) is
    copied to CPU memory, pinned on a CUDA machine, and copied back to its device when the
    backward needs it. A CUDA tensor is copied without blocking, on a side stream that waits for
    the tensor to be computed; the tensor's memory is freed for reuse once that copy has run
    (``record_stream``), and the backward's stream waits for it before copying back. ``stats``:
    an :class:`OffloadStats` that counts the host bytes. A tensor saved twice (unchanged) is
    copied once."""

    def __init__(self, stats: OffloadStats | None = None):
        self.stats = stats if stats is not None else OffloadStats()
        self._copied = {}  # id -> (weak reference, version, copy): one copy of a tensor saved twice
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if _is_parameter(tensor) or tensor.layout != torch.strided:
            return tensor
        ref, version, copy = self._copied.get(id(tensor), (None, None, None))
        if ref is not None and ref() is tensor and version == tensor._version:
            return copy  # e.g. log-softmax's output, saved by it and by the loss after it
        copy = self._copy(tensor)
        self._copied[id(tensor)] = (weakref.ref(tensor), tensor._version, copy)
        return copy

    def __exit__(self, *exc):
        self._copied.clear()  # the saved tensors keep their copies; this context lets go
        return super().__exit__(*exc)

    def _copy(self, tensor: torch.Tensor) -> _OnHost:
        cuda = tensor.device.type == "cuda"
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=cuda)
        event = None
        if cuda:
            stream = _copy_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            tensor.record_stream(stream)
        else:
            host.copy_(tensor)
        return _OnHost(tensor.device, host, event, self.stats)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.event is None:
            return packed.host
        torch.cuda.current_stream(packed.device).wait_event(packed.event)
        return packed.host.to(packed.device, non_blocking=True)


def install(model, lean: bool = True) -> OffloadStats:
    """Run ``model``'s forward inside :class:`ActivationsOnCpu` whenever it trains with gradients
    (``model.training`` and grad mode); otherwise its own forward. Its RMSNorms get the lighter
    backward of :mod:`helpers.norms` and its LoRA dropout that of
    :func:`helpers.lora.use_lean_dropout` (``lean=False`` keeps both as they are): long sequences
    are what offloading is for, and there the norms' float32 copies and the dropout masks count.
    Sets
    ``model.uses_activation_offload = True`` (which :func:`helpers.budget.default_estimate_fn`
    reads) and returns the :class:`OffloadStats`, also at ``model.activation_offload_stats``;
    what was done to the norms and the dropout is ``stats.lean``. Installing twice changes
    nothing."""
    if getattr(model, "uses_activation_offload", False):
        return model.activation_offload_stats
    own, stats = model.forward, OffloadStats()
    stats.lean = (f"{norms.install(model)}; {lora.use_lean_dropout(model)}" if lean else
                  "the norms and the LoRA dropout stay as they are")

    @functools.wraps(own)
    def forward(*args, **kwargs):
        if not (model.training and torch.is_grad_enabled()):
            return own(*args, **kwargs)
        with ActivationsOnCpu(stats):
            return own(*args, **kwargs)

    model.forward = forward
    model.uses_activation_offload = True
    model.activation_offload_stats = stats
    return stats


def use_activation_offload(model, cfg) -> str:
    """Keep ``model``'s checkpointed activations in CPU memory during training when
    ACTIVATION_OFFLOAD says so, and say what was decided. Introduced in notebook 05.

    'on' installs the hooks (:func:`install`); 'off' leaves the model as it is; 'auto' (the
    default) installs them only when the budget needs it: when one training step at micro-batch 1
    and MAX_LENGTH is predicted not to fit MEMORY_BUDGET_GB without them and to fit with them
    (:func:`helpers.budget.choose_offload`), so a run that fits keeps the faster path. Call it
    before :func:`helpers.budget.choose_micro_batch`, which then sizes the micro-batch with the
    activations on the host. Offloading needs GRADIENT_CHECKPOINTING (the parameter check says
    so for 'on')."""
    estimate_fn = {(on, tiled): budget.default_estimate_fn(cfg, model, offload=on, tiled=tiled)
                   for on in (False, True) for tiled in (False, True)}
    need = None
    if estimate_fn[False, False] is not None:
        def need(on: bool, tiled: bool) -> int:  # tiled: the MLP as TILED_MLP may run it
            return estimate_fn[on, tiled](1, cfg.max_length)
    on, why = budget.choose_offload(cfg, need)
    if not on:
        return why
    short = budget.host_shortfall(cfg, model)
    if short:  # refused before anything is installed
        if cfg.activation_offload == "auto":
            return ("ACTIVATION_OFFLOAD = 'auto': off, the host cannot hold it: "
                    + budget.host_refusal(cfg, model, *short))
        raise budget.BudgetError(budget.host_refusal(cfg, model, *short))
    stats = install(model)
    return why + ("; the GPU keeps the blocks' inputs in flight only; the host holds about "
                  f"{_host_text(cfg, model)} at micro-batch 1; {stats.lean}")


def _host_text(cfg, model) -> str:
    est = budget.model_estimate(cfg, model, 1, cfg.max_length, offload=True)
    return fmt_bytes(est.host_bytes) if est is not None else "(the estimator does not know it)"

"""Fitting a run to the memory budget: whether an estimate fits (:func:`fits`, :func:`verdict_text`,
:func:`require_fit`), the largest micro-batch and sequence that fit (:func:`largest_fit`), and the
training's micro-batch for MEMORY_BUDGET_GB (:func:`choose_micro_batch`: predicted by the
estimator, confirmed on the GPU by one forward and backward, halved on out-of-memory).
Introduced in notebook 02, used by notebook 05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from helpers import env, units
from helpers.estimator import Estimate, estimate
from helpers.scaling import estimate_per_gpu
from helpers.footprint import probe_step  # noqa: F401 (helpers.budget.probe_step, as before)
from helpers.shapes import (SequenceTooLongError, as_shape, positions,  # noqa: F401
                            require_positions, shape_from_config)
from helpers.units import GB, fmt_bytes, free


# ============================================================================ will it fit?


@dataclass
class Verdict:
    fits: bool
    needed: int  # total_device of the estimate
    budget: int
    headroom: int  # budget - needed (negative when it does not fit)

    def __bool__(self):
        return self.fits


def fits(est: Estimate, budget_bytes: float) -> Verdict:
    """Does the estimate's card memory (``total_device``) fit in ``budget_bytes``?"""
    budget = int(budget_bytes)
    return Verdict(fits=est.total_device <= budget, needed=est.total_device, budget=budget,
                   headroom=budget - est.total_device)


def _estimate_as(shape, n_gpus: int | None = None, mode: str = "ddp", prefetch: bool = True,
                 offload: bool = False, **settings) -> Estimate:
    """:func:`estimate`, or :func:`estimate_per_gpu` when ``n_gpus`` is given (an
    :class:`Estimate`'s ``settings`` are either)."""
    if n_gpus is None:
        return estimate(shape, **settings)
    return estimate_per_gpu(shape, n_gpus, mode, prefetch=prefetch, offload=offload, **settings)


def largest_micro_batch(estimate_fn, budget: float, seq_len: int, limit: int = 64) -> int:
    """The largest power-of-two micro-batch up to ``limit`` whose estimate
    (``estimate_fn(micro_batch, seq_len) -> bytes``) fits ``budget``, trying 1, 2, 4, ... and
    stopping at the first that does not (memory grows with it); 0 when not even 1 fits."""
    best, n = 0, 1
    while n <= limit and estimate_fn(n, seq_len) <= budget:
        best, n = n, n * 2
    return best


def largest_seq_len(estimate_fn, budget: float, candidates) -> int:
    """The last of the increasing sequence lengths ``candidates`` whose estimate at micro-batch 1
    fits ``budget``, stopping at the first that does not (memory grows with them); 0 when the
    first does not."""
    best = 0
    for seq_len in candidates:
        if estimate_fn(1, seq_len) > budget:
            break
        best = seq_len
    return best


def largest_fit(shape, budget_bytes: float, **settings) -> dict:
    """The largest micro-batch (1, 2, 4, ... 64) at the given ``seq_len``, and the largest
    sequence length (multiples of 128, or of 64 below 256) up to the model's context at
    micro-batch 1, that fit in ``budget_bytes``. 0 where nothing fits. Other settings as for
    :func:`estimate` (or an :class:`Estimate`'s ``settings``, per-GPU ones included: each GPU
    of several is then sized). A larger budget never fits less. With gradient checkpointing
    and the activations not offloaded, ``seq_len_offload`` is the longest sequence with them
    offloaded to CPU memory (ACTIVATION_OFFLOAD), ``micro_batch_offload`` the largest
    micro-batch; with the MLP not tiled, ``seq_len_tiled`` and ``micro_batch_tiled`` are the
    same with the activations offloaded and the MLP tiled (TILED_MLP) as well.
    """
    shape = as_shape(shape)
    if "seq_len" not in settings:
        raise ValueError("largest_fit needs seq_len= (the sequence length to size the "
                         "micro-batch for)")
    settings.pop("micro_batch", None)
    seq_len = settings.pop("seq_len")

    def need(micro_batch: int, seq: int) -> int:
        return _estimate_as(shape, seq_len=seq, micro_batch=micro_batch, **settings).total_device

    step = 64 if shape.context < 256 else 128
    lengths = range(step, shape.context + 1, step)
    found = {"micro_batch": largest_micro_batch(need, budget_bytes, seq_len),
             "seq_len": largest_seq_len(need, budget_bytes, lengths)}
    if not settings.get("gradient_checkpointing", True):
        return found
    for saver, key in (("activation_offload", "offload"), ("tiled_mlp", "tiled")):
        if not settings.get(saver):  # this one as well as those before it
            settings[saver] = True
            found.update({f"micro_batch_{key}": largest_micro_batch(need, budget_bytes, seq_len),
                          f"seq_len_{key}": largest_seq_len(need, budget_bytes, lengths)})
        settings["activation_offload"] = True
    return found


_CARDS_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141)


def verdict_text(est: Estimate, budget_bytes: float) -> str:
    """One sentence: "fits: predicted 9.8 GB of 12 GB" or "does not fit: needs 14.1 GB of 12 GB;
    micro-batch 1 at 512 tokens would fit, or a 16 GB card"."""
    v = fits(est, budget_bytes)
    card_gb = f"{v.budget / GB:.3g} GB"
    if v.fits:
        return f"fits: predicted {fmt_bytes(v.needed)} of {card_gb}"
    s = dict(est.settings)
    lf = largest_fit(est.shape, budget_bytes, **s)
    alt = []
    if s["micro_batch"] > 1 and lf["micro_batch"]:
        alt.append(f"micro-batch {lf['micro_batch']} at {s['seq_len']} tokens would fit")
    elif lf.get("micro_batch_offload"):
        alt.append(f"ACTIVATION_OFFLOAD = 'on' (or 'auto') would fit micro-batch "
                   f"{lf['micro_batch_offload']} at {s['seq_len']} tokens")
    elif lf.get("micro_batch_tiled"):
        alt.append(f"ACTIVATION_OFFLOAD and TILED_MLP = 'on' (or 'auto') would fit micro-batch "
                   f"{lf['micro_batch_tiled']} at {s['seq_len']} tokens")
    elif lf["seq_len"]:
        alt.append(f"micro-batch 1 at {lf['seq_len']} tokens would fit")
    elif not s["gradient_checkpointing"]:
        alt.append("gradient checkpointing might make it fit")
    card = next((c for c in _CARDS_GB if v.needed <= c * GB * 0.97), None)
    alt.append(f"{units.article(card)} {card} GB card" if card else "several GPUs")
    return (f"does not fit: needs {fmt_bytes(v.needed)} of {card_gb}; "
            + ", or ".join(alt))


def config_settings(cfg) -> dict:
    """:func:`estimate`'s settings for the series' :class:`helpers.config.Config` (LoRA,
    checkpointing, dtype, optimizer; autocast as training decides it,
    :func:`helpers.env.uses_autocast`), without ``seq_len`` and ``micro_batch``."""
    dtype = env.compute_dtype(cfg.compute_dtype)
    return {"gradient_checkpointing": cfg.gradient_checkpointing, "lora_r": cfg.lora_r,
            "lora_targets": cfg.lora_targets, "optimizer": cfg.optimizer,
            "compute_dtype": dtype, "double_quant": cfg.double_quant,
            "cuda_context": torch.cuda.is_available(), "autocast": env.uses_autocast(dtype),
            "upcast_fp32": cfg.upcast_norms_and_head, "lora_dropout": cfg.lora_dropout,
            "chunked_loss": cfg.chunked_loss,
            "activation_offload": cfg.activation_offload == "on" and cfg.gradient_checkpointing,
            "tiled_mlp": cfg.tiled_mlp == "on" and cfg.gradient_checkpointing}


def _auto_choice(cfg, name: str, what: dict, need_without, need_with) -> tuple:
    """``(on, why)`` for a memory saver's parameter ``name`` ('auto', 'on' or 'off'): 'on' and
    'off' decide themselves (``what``: their sentences); 'auto' turns it on only when one step at
    micro-batch 1 and MAX_LENGTH does not fit the budget without it (``need_without() ->
    bytes``) and does with it (``need_with() -> (bytes, how)``); needs None: the estimator does
    not know the model."""
    mode = getattr(cfg, name.lower())
    head = f"{name} = {mode!r}"
    if mode != "auto":
        return mode == "on", f"{head}: {what[mode]}"
    budget = budget_bytes(cfg)
    if not cfg.gradient_checkpointing:
        return False, head + ": off (it needs GRADIENT_CHECKPOINTING)"
    if budget is None or need_without is None:
        return False, head + (": off (no GPU budget to need it)" if budget is None else
                              ": off (the estimator does not know this model)")
    without = need_without()
    if without <= budget:
        return False, (f"{head}: off, not needed (micro-batch 1 x {cfg.max_length} tokens: "
                       f"{without / GB:.2f} GB of {budget / GB:.2f} GB)")
    with_it, how = need_with()
    if with_it > budget:
        return False, (f"{head}: off, it would not fit even with it ({with_it / GB:.2f} GB of "
                       f"{budget / GB:.2f} GB)")
    return True, (f"{head}: on, chosen because micro-batch 1 x {cfg.max_length} tokens needs "
                  f"{without / GB:.2f} GB of the {budget / GB:.2f} GB budget {what['without']} "
                  f"and {with_it / GB:.2f} GB {how}")


def choose_offload(cfg, need) -> tuple:
    """Whether training keeps the checkpointed activations in CPU memory, and the sentence saying
    why: ``(on, why)``. ACTIVATION_OFFLOAD 'on' and 'off' decide themselves; 'auto' turns it on
    only when one step at micro-batch 1 and MAX_LENGTH does not fit the budget
    (:func:`budget_bytes`) without it and does with it (``need(offload, tiled) -> bytes``: the
    card's need at that size with the activations offloaded and the MLP tiled or not; None when
    the model is unknown to the estimator). Offloading is decided first: its copies run beside
    the computation, while a tiled MLP (TILED_MLP, :func:`choose_tiling`, decided next) computes
    every MLP once more. So with TILED_MLP = 'on' both count it; with 'auto', offloading is
    also chosen when it fits only with the MLP tiled as well. Introduced in notebook 02."""
    tiled = cfg.tiled_mlp == "on"

    def with_it() -> tuple:
        alone = need(True, tiled)
        if alone > (budget_bytes(cfg) or 0) and cfg.tiled_mlp == "auto":
            return need(True, True), "with them on the host and the MLP tiled (TILED_MLP)"
        return alone, "with them on the host"

    return _auto_choice(cfg, "ACTIVATION_OFFLOAD", {
        "on": "checkpointed activations go to pinned CPU memory",
        "off": "activations stay on the GPU", "without": "with the activations on the GPU"},
        need and (lambda: need(False, tiled)), with_it)


def choose_tiling(cfg, need) -> tuple:
    """Whether training runs each block's MLP a chunk of tokens at a time (TILED_MLP,
    :mod:`helpers.tiling`), and why: ``(on, why)``, as :func:`choose_offload` decides, after
    it (``need(tiled) -> bytes``, with the activations offloaded as decided)."""
    return _auto_choice(cfg, "TILED_MLP", {
        "on": "each MLP runs a chunk of tokens at a time", "off": "each MLP runs whole",
        "without": "with each MLP run whole"},
        need and (lambda: need(False)), lambda: (need(True), "with the MLP tiled"))


def estimate_for_config(cfg, shape=None) -> Estimate:
    """The estimate for the series' :class:`helpers.config.Config` (:func:`config_settings`) at
    ``cfg.max_length`` tokens and its micro-batch (1 when it is chosen automatically). ``shape``
    defaults to the preset named like ``cfg.model``. ACTIVATION_OFFLOAD = 'auto' and TILED_MLP =
    'auto' are decided here as training decides them (:func:`choose_offload`, then
    :func:`choose_tiling`), and the estimate's notes say so."""
    shape = as_shape(shape if shape is not None else cfg.model)
    settings = config_settings(cfg)

    def at(offload: bool, tiled: bool, micro_batch: int = 1) -> Estimate:
        return estimate(shape, seq_len=cfg.max_length, micro_batch=micro_batch,
                        **{**settings, "activation_offload": offload, "tiled_mlp": tiled})

    offload, tiled, notes = settings["activation_offload"], settings["tiled_mlp"], []
    if cfg.activation_offload == "auto":
        offload, why = choose_offload(cfg, lambda o, t: at(o, t).total_device)
        notes.append(why)
    if cfg.tiled_mlp == "auto":
        tiled, why = choose_tiling(cfg, lambda t: at(offload, t).total_device)
        notes.append(why)
    est = at(offload, tiled, max(cfg.micro_batch, 1))
    est.notes[:0] = notes
    return est


def longest_text(cfg, shape=None) -> str:
    """The longest sequence that fits MEMORY_BUDGET_GB at micro-batch 1 with the Config's
    settings, with the activations on the GPU, offloaded to CPU memory (ACTIVATION_OFFLOAD), and
    offloaded with the MLP tiled (TILED_MLP), from the estimator: a sentence for notebook 02."""
    budget = budget_bytes(cfg)
    if budget is None:
        return "no GPU budget on this machine: set MEMORY_BUDGET_GB to size a card"
    shape = as_shape(shape if shape is not None else cfg.model)
    settings = {**config_settings(cfg), "activation_offload": False, "tiled_mlp": False}
    lf = largest_fit(shape, budget, seq_len=cfg.max_length, **settings)
    text = (f"longest sequence at micro-batch 1 in {budget / GB:.3g} GB: {lf['seq_len']:,} "
            f"tokens with the activations on the GPU")
    if "seq_len_offload" not in lf:
        return text + " (offloading needs GRADIENT_CHECKPOINTING)"
    longest, tiled = lf["seq_len_offload"], lf["seq_len_tiled"]

    def host(seq: int) -> int:
        return estimate(shape, seq_len=max(seq, 1), micro_batch=1, **{
            **settings, "activation_offload": True, "tiled_mlp": True}).host_bytes

    lean = [name for name, applies in (("RMSNorm", shape.norm == "rmsnorm"),
                                       ("LoRA dropout", cfg.lora_dropout > 0)) if applies]
    lean = f" and its lean {' and '.join(lean)}" if lean else ""
    most = max(longest, tiled)
    at_most, room = host(most), host_room(cfg)
    text += (f", {longest:,} with ACTIVATION_OFFLOAD{lean}, {tiled:,} with TILED_MLP as "
             f"well (then {fmt_bytes(at_most)} of host memory)")
    if at_most > room:  # the offloaded activations must fit the host too
        fits = largest_seq_len(lambda _mb, seq: host(seq), room, range(128, most + 1, 128))
        text += (f"; this machine's host may take {fmt_bytes(room)} more, which holds the "
                 f"offloaded activations of {fits:,} tokens")
    return text


class MemoryBudgetError(ValueError):
    """A run that cannot fit the memory budget, refused before anything is loaded."""


def require_fit(est: Estimate, budget_bytes: float | None) -> str:
    """The verdict sentence when the estimate fits ``budget_bytes`` (None: no budget, CPU);
    otherwise :class:`MemoryBudgetError` with what would fit. Introduced in notebook 02."""
    if not budget_bytes:
        return (f"no GPU budget on this machine; predicted GPU need "
                f"{fmt_bytes(est.total_device)}")
    sentence = verdict_text(est, budget_bytes)
    if not fits(est, budget_bytes):
        raise MemoryBudgetError(sentence + " (refused before loading: change MAX_LENGTH, "
                                "MICRO_BATCH or MEMORY_BUDGET_GB, or pick a smaller MODEL)")
    return sentence


CPU_MICRO_BATCH = 8  # MICRO_BATCH=0 on CPU: no memory budget to size it by
AUTO_MICRO_BATCH_LIMIT = 16  # the automatic choice stops here (see choose_micro_batch)
UNPROBED_HEADROOM = 0.85  # share of the budget an unprobed (FSDP) micro-batch may be predicted to use


class BudgetError(ValueError):
    """MEMORY_BUDGET_GB cannot hold even micro-batch 1 at MAX_LENGTH; the message says what would."""


# ============================================================================ the training's micro-batch


# What training itself adds to the host on a GPU beside the pinned copies, before its peak (not
# broken down; likely the GPU libraries its first steps load): 0.61 GB on an H200 (torch 2.11) at
# 58,624 tokens of Llama-3.1-8B, resident peak 20.61 GB less 18.20 GB pinned less the 1.80 GB
# held once the model was built (bench/results/h200_gpu_checks.jsonl).
TRAINING_HOST_GROWTH = 610_000_000


def host_room(cfg) -> int:
    """Host memory this process may still take: HOST_MEMORY_BUDGET_GB (0: the RAM detected) less
    what it holds now and, on a GPU, less what training adds beside the offloaded activations
    (:data:`TRAINING_HOST_GROWTH`); no more than the machine has available, shared by the
    processes of a launch on this machine. What the offloaded activations (ACTIVATION_OFFLOAD)
    must fit in, since a runtime over its RAM is killed."""
    growth = TRAINING_HOST_GROWTH if torch.cuda.is_available() else 0
    room = env.host_budget_bytes(cfg.host_memory_budget_gb) - env.host_rss() - growth
    return max(0, min(room, env.host_memory()["available"] - growth)) \
        // env.world()["local_world_size"]


def offload_host_need(cfg, model, micro_batch: int, seq_len: int | None = None) -> int | None:
    """Host bytes the offloaded activations of one training step take (on a GPU in pinned
    memory, each tensor rounded up as torch's pinned allocator rounds it); None where the
    estimator does not know the model."""
    est = model_estimate(cfg, model, micro_batch, seq_len or cfg.max_length, offload=True,
                         tiled=bool(getattr(model, "uses_tiled_mlp", False)))
    return None if est is None else est.host_bytes


def host_shortfall(cfg, model, micro_batch: int = 1) -> tuple | None:
    """``(need, room)`` where the offloaded activations of one step at ``micro_batch`` x
    MAX_LENGTH (:func:`offload_host_need`) do not fit :func:`host_room`; None where they do, or
    where the estimator does not know the model."""
    need = offload_host_need(cfg, model, micro_batch)
    room = host_room(cfg)
    return (need, room) if need is not None and need > room else None


def host_fit_length(cfg, model, room: int) -> int:
    """The longest sequence (a multiple of 128) whose offloaded activations at micro-batch 1 fit
    ``room`` host bytes, up to MAX_LENGTH; 0 when none does."""
    need = offload_host_need(cfg, model, 1, 128)
    if need is None or need > room:
        return 0
    return largest_seq_len(lambda _mb, seq: offload_host_need(cfg, model, 1, seq), room,
                           range(128, cfg.max_length + 1, 128))


def host_refusal(cfg, model, need: int, room: int) -> str:
    """Why the offloaded activations do not fit the host, and what would."""
    seq = host_fit_length(cfg, model, room)
    host = (f"HOST_MEMORY_BUDGET_GB={cfg.host_memory_budget_gb:g}"
            if cfg.host_memory_budget_gb > 0 else "the RAM detected")
    ways = ([f"MAX_LENGTH = {seq}"] if seq else []) + [
        "a larger HOST_MEMORY_BUDGET_GB where the machine has the RAM",
        "ACTIVATION_OFFLOAD = 'off' with a larger MEMORY_BUDGET_GB"]
    return (f"ACTIVATION_OFFLOAD keeps {fmt_bytes(need)} of activations in host memory at "
            f"micro-batch 1 x {cfg.max_length} tokens, and this process may take only "
            f"{fmt_bytes(room)} more ({host} less the {fmt_bytes(env.host_rss())} it holds): a "
            f"runtime over its RAM is killed. What would fit: {'; or '.join(ways)}.")


def budget_bytes(cfg) -> int | None:
    """MEMORY_BUDGET_GB in bytes: 0 means the whole card; None on CPU without a budget."""
    if cfg.memory_budget_gb > 0:
        return int(cfg.memory_budget_gb * GB)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def _model_settings(cfg, model, offload: bool | None = None, tiled: bool | None = None):
    """``(shape, settings)`` of :func:`_estimate_as` for ``model`` trained with the Config
    (``offload``, ``tiled``: as installed in the model by default); None where the estimator does
    not know the model's architecture."""
    try:
        shape = shape_from_config(getattr(model, "config", model))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # an architecture the estimator does not describe: the probe decides
    # the chunked loss and the offload count where helpers.losses / helpers.offload installed
    # them in the model
    lean = None  # the lean norms and dropout follow a predicted offload (which installs them)
    if offload is None:
        offload = bool(getattr(model, "uses_activation_offload", False))
        lean = {"lean_norms": bool(getattr(model, "uses_lean_norms", False)),
                "lean_dropout": bool(getattr(model, "uses_lean_dropout", False))}
    if tiled is None:
        tiled = bool(getattr(model, "uses_tiled_mlp", False))
    settings = {**config_settings(cfg),
                "chunked_loss": bool(getattr(model, "uses_chunked_loss", False)),
                "activation_offload": offload and cfg.gradient_checkpointing,
                "tiled_mlp": tiled and cfg.gradient_checkpointing}
    if lean is not None:
        settings.update(lean)
    chunk = getattr(getattr(model, "tiled_mlp_stats", None), "chunk_tokens", None)
    if chunk:
        settings["mlp_chunk_tokens"] = chunk
    try:
        estimate(shape, seq_len=8, micro_batch=1, **settings)
    except ValueError:  # e.g. LoRA targets named differently from the estimator's layer names
        settings["lora_targets"] = "all-linear"
    launch = env.world()
    if launch["world_size"] > 1:  # what each GPU of the launch holds
        settings.update(n_gpus=launch["world_size"], mode="fsdp" if launch["fsdp"] else "ddp",
                        offload=launch["offload"])
    return shape, settings


def model_estimate(cfg, model, micro_batch: int, seq_len: int, offload: bool | None = None,
                   tiled: bool | None = None) -> Estimate | None:
    """The :class:`Estimate` of one training step of ``model`` with the Config's settings
    (``offload``: the activations in CPU memory; ``tiled``: the MLP tiled; default: as installed
    in the model); None where the estimator does not know the model's architecture."""
    found = _model_settings(cfg, model, offload, tiled)
    if found is None:
        return None
    shape, settings = found
    return _estimate_as(shape, seq_len=seq_len, micro_batch=micro_batch, **settings)


def default_estimate_fn(cfg, model, offload: bool | None = None, tiled: bool | None = None):
    """``fn(micro_batch, seq_len) -> bytes`` the card needs for one training step of ``model``
    with the Config's settings, from :func:`helpers.estimator.estimate` (``offload``: the
    checkpointed activations in CPU memory; ``tiled``: the MLP tiled; default: as
    :mod:`helpers.offload` and :mod:`helpers.tiling` installed them in the model); None where the
    estimator does not know the model's architecture."""
    found = _model_settings(cfg, model, offload, tiled)
    if found is None:
        return None
    shape, settings = found

    def estimate_fn(micro_batch: int, seq_len: int) -> int:
        return _estimate_as(shape, seq_len=seq_len, micro_batch=micro_batch,
                            **settings).total_device

    return estimate_fn


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _enforce_budget(budget: int, notes: list) -> None:
    """Cap torch's allocator at ``budget`` bytes of the card (:func:`helpers.env.enforce_gpu_budget`,
    which every notebook's start applies too), with the sentence saying so in ``notes``."""
    notes.append(env.enforce_gpu_budget(budget))


def _host_capped(cfg, model, micro: int, notes: list) -> int:
    """``micro`` halved until the offloaded activations fit the host (:func:`host_shortfall`)."""
    start = micro
    while micro > 1 and host_shortfall(cfg, model, micro):
        micro //= 2
    if micro < start:
        notes.append(f"micro-batch {micro}: the host holds the offloaded activations of "
                     f"{micro} rows ({fmt_bytes(offload_host_need(cfg, model, micro))}), not "
                     f"of {start}, in the {fmt_bytes(host_room(cfg))} it may still take")
    return micro


def _refusal(cfg, budget: int, estimate_fn, needed_1: int, offloaded: int | None = None,
             tiled: int | None = None, host: str | None = None) -> str:
    upto = cfg.max_length
    seq = largest_seq_len(estimate_fn, budget, range(64, upto + 1, 64) or range(8, upto + 1, 8))
    ways = []
    if host and any(n is not None and n <= budget for n in (offloaded, tiled)):
        ways.append(f"not ACTIVATION_OFFLOAD, which would fit the card but not the host ({host})")
    elif offloaded is not None and offloaded <= budget:
        ways.append(f"ACTIVATION_OFFLOAD = 'on' or 'auto' would fit ({offloaded / GB:.2f} GB: "
                    "the checkpointed activations in CPU memory)")
    elif tiled is not None and tiled <= budget:
        ways.append(f"TILED_MLP = 'on' or 'auto' would fit ({tiled / GB:.2f} GB, with "
                    "ACTIVATION_OFFLOAD as well: each MLP a chunk of tokens at a time)")
    if seq:
        ways.append(f"MAX_LENGTH = {seq} would fit at micro-batch 1")
    if not cfg.gradient_checkpointing:
        ways.append("GRADIENT_CHECKPOINTING = True saves activation memory")
    ways.append(f"a budget of at least {math.ceil(needed_1 / GB * 10) / 10:.1f} GB "
                "(MEMORY_BUDGET_GB, or a larger card)")
    return (f"MEMORY_BUDGET_GB={budget / GB:.3g} is too small: one training step at micro-batch 1 "
            f"and MAX_LENGTH={cfg.max_length} needs about {needed_1 / GB:.2f} GB (predicted by "
            "helpers.estimator.estimate). "
            f"What would fit: {'; or '.join(ways)}.")


def choose_micro_batch(cfg, model, estimate_fn=None, probe: bool = True,
                       limit: int = AUTO_MICRO_BATCH_LIMIT) -> tuple:
    """The micro-batch for this card and budget, and the notes explaining it: ``(n, [lines])``.

    - The budget is MEMORY_BUDGET_GB (0: the whole card). On a card larger than the budget it is
      enforced with ``torch.cuda.set_per_process_memory_fraction``, so the run behaves as it would
      on a card of that size.
    - ``estimate_fn(micro_batch, seq_len) -> bytes`` predicts a training step's need (default:
      :func:`default_estimate_fn`, from :mod:`helpers.estimator`). If micro-batch 1 at MAX_LENGTH does
      not fit, :class:`BudgetError` is raised before anything is trained, naming the MAX_LENGTH
      or the budget that would fit.
    - MICRO_BATCH > 0 is taken as given; MICRO_BATCH = 0 takes the largest power of two that the
      estimate fits, up to ``limit`` (16: beyond it a larger micro-batch mostly changes the
      optimization - fewer, larger steps - rather than the speed; set MICRO_BATCH for more).
    - On the GPU a probe (:func:`probe_step`: forward and backward at that micro-batch and
      MAX_LENGTH on the real model) confirms it, halving on out-of-memory until it fits.
    - On CPU there is no out-of-memory to probe and no card to budget: MICRO_BATCH or 8. A
      MEMORY_BUDGET_GB given on CPU is still checked against the estimate (would the run fit a
      card of that size?), so a plan can be refused here before it fails on the card.

    Introduced in notebook 05.
    """
    require_positions(model, cfg.max_length)
    notes: list[str] = []
    cuda = torch.cuda.is_available() and _model_device(model).type == "cuda"
    if env.fsdp_active() and torch.cuda.is_available():
        # FSDP places the shards when training starts: no probe on the unsharded model
        cuda, probe = True, False
    budget = budget_bytes(cfg)
    if budget is not None:
        estimate_fn = estimate_fn or default_estimate_fn(cfg, model)
        if estimate_fn is None:
            notes.append("the estimator does not know this architecture: the probe decides")
        else:
            needed_1 = estimate_fn(1, cfg.max_length)
            if needed_1 > budget:
                saved = {}  # the need with offload, then tiling too, where not installed yet
                for key, attr, kw in (("offloaded", "uses_activation_offload", {}),
                                      ("tiled", "uses_tiled_mlp", {"tiled": True})):
                    if cfg.gradient_checkpointing and not getattr(model, attr, False):
                        saved[key] = default_estimate_fn(cfg, model, offload=True,
                                                         **kw)(1, cfg.max_length)
                short = host_shortfall(cfg, model) if saved else None
                host = short and (f"{fmt_bytes(short[0])} of activations in host memory, with "
                                  f"{fmt_bytes(short[1])} free under the host budget")
                raise BudgetError(_refusal(cfg, budget, estimate_fn, needed_1, host=host,
                                           **saved))
            notes.append(f"estimate at micro-batch 1 x {cfg.max_length} tokens: "
                         f"{needed_1 / GB:.2f} GB of a {budget / GB:.2f} GB budget")
    if not cuda:
        micro = cfg.micro_batch or CPU_MICRO_BATCH
        how = "MICRO_BATCH" if cfg.micro_batch else "the CPU default (no GPU memory to size by)"
        notes.append(f"CPU: micro-batch {micro} from {how}; no out-of-memory probe on CPU")
        return micro, notes

    if cfg.memory_budget_gb > 0:
        _enforce_budget(budget, notes)
    else:
        # undo an earlier budget
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
    if cfg.micro_batch:
        micro = cfg.micro_batch
        if estimate_fn is not None and estimate_fn(micro, cfg.max_length) > budget:
            notes.append(f"MICRO_BATCH={micro} is predicted not to fit "
                         f"({estimate_fn(micro, cfg.max_length) / GB:.2f} GB): the probe checks")
        else:
            notes.append(f"micro-batch {micro} from MICRO_BATCH")
    elif estimate_fn is not None:
        # with no probe to confirm it before training (FSDP shards only when training starts),
        # keep headroom for the estimator's error (an FSDP run with CPU offload at micro-batch
        # 16, predicted 22.9 of 24 GB, ran out of memory on 2 H200s)
        room = budget if probe else int(budget * UNPROBED_HEADROOM)
        micro = max(1, largest_micro_batch(estimate_fn, room, cfg.max_length, limit))
        headroom = "" if probe else f" with {1 - UNPROBED_HEADROOM:.0%} headroom"
        notes.append(f"micro-batch {micro}: the largest power of two up to {limit} that the "
                     f"estimate fits{headroom} ({estimate_fn(micro, cfg.max_length) / GB:.2f} GB"
                     + ("" if probe else "; no probe can confirm it before training") + ")")
    else:
        micro = limit
        notes.append(f"micro-batch {micro} to start the probe from")
    if getattr(model, "uses_activation_offload", False) and not cfg.micro_batch:
        micro = _host_capped(cfg, model, micro, notes)
    if not probe:
        return micro, notes

    dtype = env.compute_dtype(cfg.compute_dtype)
    while True:
        try:
            peak = probe_step(model, micro, cfg.max_length, dtype)
            break
        except torch.cuda.OutOfMemoryError:
            pass  # handled below, outside the except block, so the failed step's tensors can go
        free()
        if micro == 1:
            ways = ["lower MAX_LENGTH", "adapt fewer layers (LORA_TARGETS='attention')"]
            if not cfg.gradient_checkpointing:
                ways.insert(1, "turn GRADIENT_CHECKPOINTING on")
            raise BudgetError(
                f"out of GPU memory at micro-batch 1 and MAX_LENGTH={cfg.max_length} within "
                f"a {budget / GB:.2f} GB budget (the estimate said it would fit; the probe "
                f"step says otherwise): {', '.join(ways)}, or raise MEMORY_BUDGET_GB")
        msg = f"out of memory at micro-batch {micro}: trying {micro // 2}"
        print(msg)
        notes.append(msg)
        micro //= 2
    notes.append(f"probe: micro-batch {micro} x {cfg.max_length} tokens ran, peak "
                 f"{peak / GB:.2f} GB allocated (optimizer state comes on top)")
    return micro, notes

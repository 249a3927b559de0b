"""Training: paged-optimizer QLoRA training that fits the card, shows its progress, survives an
interruption and proves that it learned. Introduced in notebook 05.

The pieces, each callable on its own so the notebook can show them one at a time:

1. :func:`training_arguments` - ``transformers.TrainingArguments`` from the one Config: the
   optimizer (``paged_adamw_8bit`` by default), schedule, micro-batch x gradient accumulation,
   checkpoints every SAVE_STEPS, and fp16/bf16 flags taken from :func:`helpers.env.precision_flags`
   of the same dtype the 4-bit layers compute in (:func:`precision`), so the original recipe's
   bf16-compute-with-fp16-flag mismatch cannot happen.
2. :func:`choose_micro_batch` - the micro-batch that fits MEMORY_BUDGET_GB: predicted by the
   estimator of :mod:`helpers.memory`, confirmed on the GPU by one forward and backward at that size
   (:func:`probe_step`), halved on out-of-memory; a budget smaller than the card is enforced, so a
   12 GB or 16 GB card can be rehearsed on a larger one; a budget too small even for micro-batch 1
   is refused before training, with what would fit.
3. Callbacks - :class:`LossCurveCallback` (a live loss / learning-rate / gradient-norm figure in
   Jupyter, ``RUN_DIR/loss_curve.png`` at each checkpoint and at the end), :class:`TrainingGuard`
   (stops on a NaN/inf or exactly-zero loss and explains the likely cause),
   :class:`MemoryCallback` (peak GPU memory and CPU RSS per step), :class:`ThroughputCallback`
   (real, non-padding tokens per second, the warm-up step excluded).
4. :func:`evaluate_loss` - held-out loss and perplexity, weighted by label tokens, before and
   after training.
5. Checkpoints and resume - the Trainer's checkpoints (adapter as safetensors, optimizer,
   scheduler, RNG state) in ``RUN_DIR/checkpoints``, a :func:`run_signature` that refuses to resume
   another run's checkpoints, and the final adapter with a model card in ``RUN_DIR/adapter``.
6. :func:`train` - all of it in one call, returning a :class:`TrainResult`.

``python -m helpers.train RUN_DIR`` (or ``accelerate launch -m helpers.train RUN_DIR``) trains
with the parameters recorded in ``RUN_DIR/manifest.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from helpers import distributed, env
from helpers.data import IGNORE_INDEX

CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints: the Trainer's checkpoint-N folders
ADAPTER = "adapter"  # RUN_DIR/adapter: the final adapter, its config and model card
LOSS_CURVE = "loss_curve.png"
SIGNATURE = "run_signature.json"
CPU_MICRO_BATCH = 8  # MICRO_BATCH=0 on CPU: no memory budget to size it by
AUTO_MICRO_BATCH_LIMIT = 16  # the automatic choice stops here (see choose_micro_batch)
UNPROBED_HEADROOM = 0.85  # share of the budget an unprobed (FSDP) micro-batch may be predicted to use
GB = 1e9


class TrainingStopped(RuntimeError):
    """Training was stopped by :class:`TrainingGuard`; the message explains why and what to do.

    ``kind`` is "nan" or "zero"; ``step`` the optimizer step it happened at; ``history`` the
    logged steps up to it (for :func:`helpers.plots.loss_curve`).
    """

    def __init__(self, explanation: str, kind: str = "", step: int = 0, history=None):
        super().__init__(explanation)
        self.explanation, self.kind, self.step = explanation, kind, step
        self.history = list(history or [])


class BudgetError(ValueError):
    """MEMORY_BUDGET_GB cannot hold even micro-batch 1 at MAX_LENGTH; the message says what would."""


class ResumeError(ValueError):
    """RESUME=True found checkpoints of another run; the message names the differences."""


# ============================================================================ 1. arguments


def precision(cfg) -> tuple:
    """``(dtype, flags)``: the compute dtype of the 4-bit layers and the Trainer's matching
    ``{"bf16": ..., "fp16": ...}``, both from :mod:`helpers.env` (one decision, two places)."""
    dtype = env.compute_dtype(cfg.compute_dtype)
    return dtype, env.precision_flags(dtype)


def auto_learning_rate(model) -> float:
    """LEARNING_RATE=0 picks 2e-4 x 4096 / hidden size, capped at 1e-2: the QLoRA paper's 2e-4 for
    7B-13B models (hidden 4096-5120) and 1e-4 for 33B-65B (6656-8192), and proportionally more
    for narrow models such as the embedded one (hidden 128), whose adapters barely move at 2e-4.
    Introduced in notebook 05."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = getattr(base.config, "hidden_size", None) or getattr(base.config, "n_embd", 4096)
    return float(min(1e-2, 2e-4 * 4096 / hidden))


def checkpointing_arguments(enabled: bool) -> dict:
    """The TrainingArguments that turn (non-reentrant) checkpointing on or off, under the names
    this transformers has: ``activation_checkpointing`` from 5.2x, ``gradient_checkpointing``
    before."""
    import dataclasses as dc

    names = {f.name for f in dc.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def training_arguments(cfg, micro_batch: int, dtype: torch.dtype | None = None,
                       model=None) -> TrainingArguments:
    """``TrainingArguments`` for the series' Config at ``micro_batch`` examples per forward.

    ``dtype`` is the compute dtype the model was loaded with (default: the Config's, through
    :func:`helpers.env.compute_dtype`); the fp16/bf16 flags follow it. Logging every step with
    NaN/inf losses left visible (``logging_nan_inf_filter=False``: by default the Trainer hides
    them, so a diverging run would look healthy); checkpoints every SAVE_STEPS in
    ``RUN_DIR/checkpoints`` (the adapter as safetensors, optimizer, scheduler and RNG state);
    non-reentrant activation checkpointing; the Trainer's own progress bar; no external
    reporting. ``remove_unused_columns=False`` because the collator, not the Trainer, decides what
    the model receives. Introduced in notebook 05.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch} must be at least 1")
    if not cfg.learning_rate:
        if model is None:
            raise ValueError("LEARNING_RATE=0 (auto) needs the model: pass model=")
        cfg = dataclasses.replace(cfg, learning_rate=auto_learning_rate(model))
    if dtype is None:
        dtype = env.compute_dtype(cfg.compute_dtype)
    flags = env.precision_flags(dtype)
    cuda = torch.cuda.is_available()
    steps = {"max_steps": cfg.max_steps} if cfg.max_steps > 0 else {
        "max_steps": -1, "num_train_epochs": cfg.epochs}
    save = {"save_strategy": "steps", "save_steps": cfg.save_steps} if cfg.save_steps > 0 else {
        "save_strategy": "no"}
    return TrainingArguments(
        output_dir=str(Path(cfg.run_dir) / CHECKPOINTS),
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        **steps,
        optim=cfg.optimizer,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,
        bf16=flags["bf16"],
        fp16=flags["fp16"],
        **checkpointing_arguments(cfg.gradient_checkpointing),
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        eval_strategy="no",
        **save,
        save_only_model=False,  # keep optimizer, scheduler and RNG state: resume is exact
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step (DDP)
        label_names=["labels"],
        report_to="none",
        disable_tqdm=False,  # the series quiets transformers' logging, which would hide the bar
    )


# ============================================================================ 2. fit the card


def _gpu() -> int:
    """The GPU this process trains on (its LOCAL_RANK's under a multi-GPU launch)."""
    return torch.cuda.current_device()


def budget_bytes(cfg) -> int | None:
    """MEMORY_BUDGET_GB in bytes: 0 means the whole card; None on CPU without a budget."""
    if cfg.memory_budget_gb > 0:
        return int(cfg.memory_budget_gb * GB)
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(_gpu()).total_memory)
    return None


def default_estimate_fn(cfg, model):
    """``fn(micro_batch, seq_len) -> bytes`` the card needs for one training step of ``model``
    with the Config's settings, from :func:`helpers.memory.estimate`; None where the estimator
    does not know the model's architecture."""
    from helpers import losses, memory

    try:
        shape = memory.shape_from_config(getattr(model, "config", model))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # an architecture the estimator does not describe: the probe decides
    settings = {**memory.config_settings(cfg),
                "chunked_loss": cfg.chunked_loss and losses.supports(model)}
    try:
        memory.estimate(shape, seq_len=8, micro_batch=1, **settings)
    except ValueError:  # e.g. LoRA targets named differently from the estimator's layer names
        settings["lora_targets"] = "all-linear"
    launch = distributed.world()
    mode = "fsdp" if launch["fsdp"] else "ddp"
    offload = {"offload": launch["offload"]} if launch["fsdp"] else {}

    def estimate_fn(micro_batch: int, seq_len: int) -> int:
        if launch["world_size"] > 1:  # what each GPU of the launch holds
            return memory.estimate_per_gpu(shape, launch["world_size"], mode, seq_len=seq_len,
                                           micro_batch=micro_batch, **offload,
                                           **settings).total_device
        return memory.estimate(shape, seq_len=seq_len, micro_batch=micro_batch,
                               **settings).total_device

    return estimate_fn


def largest_micro_batch(estimate_fn, budget: int, seq_len: int, limit: int = 64) -> int:
    """The largest power-of-two micro-batch up to ``limit`` whose estimate fits ``budget``
    (0 when not even 1 fits)."""
    from helpers import memory

    return memory.largest_power_of_two(lambda b: estimate_fn(b, seq_len) <= budget, limit)


def largest_seq_len(estimate_fn, budget: int, upto: int) -> int:
    """The longest sequence (a multiple of 64, or of 8 below 64) up to ``upto`` whose estimate at
    micro-batch 1 fits ``budget``; 0 when none does."""
    from helpers import memory

    candidates = list(range(64, upto + 1, 64)) or list(range(8, upto + 1, 8))
    return memory.longest_fitting(lambda s: estimate_fn(1, s) <= budget, candidates)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if not size:
        size = model.get_input_embeddings().weight.shape[0]
    return int(size)


def probe_step(model, micro_batch: int, seq_len: int, dtype: torch.dtype | None = None,
               chunked_loss: bool = True) -> int:
    """One forward and backward (no optimizer step) of ``micro_batch`` x ``seq_len`` random tokens,
    all of them labelled: the largest activations a training step at this size can have. Returns
    the peak GPU bytes allocated during it (0 on CPU); raises ``torch.cuda.OutOfMemoryError`` when
    it does not fit. The random numbers come from their own generator and the global RNG state is
    restored, so the run that follows is not shifted by the probe. ``chunked_loss``: the loss of
    :mod:`helpers.losses`, as :class:`SeriesTrainer` computes it (CHUNKED_LOSS; models it does
    not apply to keep their own loss), so the probe measures what training will hold.
    Introduced in notebook 05.
    """
    from helpers import losses

    device = _model_device(model)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _vocab_size(model), (micro_batch, seq_len), generator=gen).to(device)
    was_training = model.training
    devices = [device.index or 0] if cuda else []
    use_autocast = cuda and dtype is not None and env.uses_autocast(dtype)
    try:
        with torch.random.fork_rng(devices=devices):
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            model.train()
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
            with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=use_autocast):
                if chunked_loss and losses.supports(model) and \
                        losses.more_than_one_chunk(model, ids.numel()):
                    out = losses.causal_lm_loss(model, inputs, ids)
                else:
                    out = model(**inputs, labels=ids)
            out.loss.backward()
            del out
            peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        del ids
        if cuda:
            torch.cuda.empty_cache()
    return int(peak)


def _enforce_budget(budget: int, notes: list) -> None:
    """Cap torch's allocator so that the process uses at most ``budget`` bytes of the card,
    counting what is already held outside the allocator (CUDA context, libraries)."""
    free, total = torch.cuda.mem_get_info(_gpu())
    outside = max(0, (total - free) - torch.cuda.memory_reserved(_gpu()))
    if budget >= total:
        notes.append(f"MEMORY_BUDGET_GB={budget / GB:.1f} is not below the card's "
                     f"{total / GB:.1f} GB: nothing to enforce")
        return
    fraction = max(0.01, (budget - outside) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, _gpu())
    notes.append(f"budget enforced: torch may allocate {fraction * total / GB:.2f} GB of this "
                 f"{total / GB:.1f} GB card ({budget / GB:.1f} GB budget less "
                 f"{outside / GB:.2f} GB of CUDA context), as on a {budget / GB:.0f} GB card")


def _refusal(cfg, budget: int, estimate_fn, needed_1: int) -> str:
    seq = largest_seq_len(estimate_fn, budget, cfg.max_length)
    ways = []
    if seq:
        ways.append(f"MAX_LENGTH = {seq} would fit at micro-batch 1")
    if not cfg.gradient_checkpointing:
        ways.append("GRADIENT_CHECKPOINTING = True saves activation memory")
    ways.append(f"a budget of at least {math.ceil(needed_1 / GB * 10) / 10:.1f} GB "
                "(MEMORY_BUDGET_GB, or a larger card)")
    return (f"MEMORY_BUDGET_GB={budget / GB:.2f} is too small: one training step at micro-batch 1 "
            f"and MAX_LENGTH={cfg.max_length} needs about {needed_1 / GB:.2f} GB (predicted by "
            "helpers.memory.estimate). "
            f"What would fit: {'; or '.join(ways)}.")


def choose_micro_batch(cfg, model, estimate_fn=None, probe: bool = True,
                       limit: int = AUTO_MICRO_BATCH_LIMIT) -> tuple:
    """The micro-batch for this card and budget, and the notes explaining it: ``(n, [lines])``.

    - The budget is MEMORY_BUDGET_GB (0: the whole card). On a card larger than the budget it is
      enforced with ``torch.cuda.set_per_process_memory_fraction``, so the run behaves as it would
      on a card of that size.
    - ``estimate_fn(micro_batch, seq_len) -> bytes`` predicts a training step's need (default:
      :func:`default_estimate_fn`, from :mod:`helpers.memory`). If micro-batch 1 at MAX_LENGTH does
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
    notes: list[str] = []
    cuda = torch.cuda.is_available() and _model_device(model).type == "cuda"
    if env.fsdp_active() and torch.cuda.is_available():
        # FSDP places the shards when training starts: no probe on the unsharded model
        cuda, probe = True, False
    budget = budget_bytes(cfg)
    if budget is not None:
        if estimate_fn is None:
            estimate_fn = default_estimate_fn(cfg, model)
        if estimate_fn is None:
            notes.append("the estimator does not know this architecture: the probe decides")
        else:
            needed_1 = estimate_fn(1, cfg.max_length)
            if needed_1 > budget:
                raise BudgetError(_refusal(cfg, budget, estimate_fn, needed_1))
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
        torch.cuda.set_per_process_memory_fraction(1.0, _gpu())  # undo an earlier budget
    if cfg.micro_batch:
        micro = cfg.micro_batch
        if estimate_fn is not None and estimate_fn(micro, cfg.max_length) > budget:
            notes.append(f"MICRO_BATCH={micro} is predicted not to fit "
                         f"({estimate_fn(micro, cfg.max_length) / GB:.2f} GB): the probe checks")
        else:
            notes.append(f"micro-batch {micro} from MICRO_BATCH")
    elif estimate_fn is not None and not probe:
        # nothing will confirm it before training (FSDP shards only when training starts): keep
        # headroom for the estimator's error (an FSDP run with CPU offload at micro-batch 16,
        # predicted 22.9 of 24 GB, ran out of memory on 2 H200s)
        room = int(budget * UNPROBED_HEADROOM)
        micro = max(1, largest_micro_batch(estimate_fn, room, cfg.max_length, limit))
        notes.append(f"micro-batch {micro}: the largest power of two up to {limit} that the "
                     f"estimate fits with {1 - UNPROBED_HEADROOM:.0%} headroom "
                     f"({estimate_fn(micro, cfg.max_length) / GB:.2f} GB; no probe can confirm it "
                     "before training)")
    elif estimate_fn is not None:
        micro = max(1, largest_micro_batch(estimate_fn, budget, cfg.max_length, limit))
        notes.append(f"micro-batch {micro}: the largest power of two up to {limit} that the "
                     f"estimate fits ({estimate_fn(micro, cfg.max_length) / GB:.2f} GB)")
    else:
        micro = limit
        notes.append(f"micro-batch {micro} to start the probe from")
    if not probe:
        return micro, notes

    from helpers import memory

    dtype = env.compute_dtype(cfg.compute_dtype)
    while True:
        out_of_memory = False
        try:
            peak = probe_step(model, micro, cfg.max_length, dtype, chunked_loss=cfg.chunked_loss)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the except block, so the failed step's tensors can go
            memory.free()
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
            continue
        notes.append(f"probe: micro-batch {micro} x {cfg.max_length} tokens ran, peak "
                     f"{peak / GB:.2f} GB allocated (optimizer state comes on top)")
        return micro, notes


# ============================================================================ 3. tokens


def _row_token_count(feature) -> int:
    mask = feature.get("attention_mask")
    return int(sum(mask)) if mask is not None else len(feature["input_ids"])


class CountingCollator:
    """Wraps a collator and adds two counts to each batch, as plain ints counted on the CPU (a
    count read back from the GPU would make every step wait for the one before):
    ``num_real_tokens``, the tokens of its rows before padding (the sum of their attention
    masks, or their lengths: this also counts packed rows, whose batches carry no attention
    mask), and ``num_loss_tokens``, the label tokens the loss is computed on.
    :class:`SeriesTrainer` takes them out before the model sees the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch["num_real_tokens"] = sum(_row_token_count(f) for f in features)
        batch["num_loss_tokens"] = _batch_loss_tokens(batch)
        return batch


COUNT_KEYS = ("num_real_tokens", "num_loss_tokens")  # what CountingCollator adds to a batch


class TokenCounter:
    """Real tokens and loss tokens of the micro-batches trained since the last :meth:`take`."""

    def __init__(self):
        self.tokens = 0
        self.loss_tokens = 0

    def add(self, tokens: int, loss_tokens: int) -> None:
        self.tokens += tokens
        self.loss_tokens += loss_tokens

    def take(self) -> tuple:
        out = (self.tokens, self.loss_tokens)
        self.tokens = self.loss_tokens = 0
        return out


def _batch_real_tokens(inputs) -> int:
    n = inputs.pop("num_real_tokens", None)
    if n is not None:
        return int(n)
    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum())
    return int(inputs["input_ids"].numel())


def _batch_loss_tokens(inputs) -> int:
    n = inputs.pop("num_loss_tokens", None)
    if n is not None:
        return int(n)
    labels = inputs.get("labels")
    if labels is None:
        return 0
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


class SeriesTrainer(Trainer):
    """The Trainer, counting the real (non-padding) and loss tokens of every micro-batch it trains
    on: into ``token_counter`` (for :class:`ThroughputCallback` and :class:`TrainingGuard`) and
    into ``state.num_input_tokens_seen``, which checkpoints keep, so a resumed run's total counts
    the steps before the interruption too.

    With ``chunked_loss`` (CHUNKED_LOSS, on by default) the training loss is the chunked
    cross-entropy of :mod:`helpers.losses`, which never holds the whole sequence's logits, for
    the models it applies to (:func:`helpers.losses.supports`) and micro-batches of more than one
    chunk of positions (:func:`helpers.losses.more_than_one_chunk`); it equals the model's own
    loss, and the Trainer scales it for gradient accumulation exactly as it scales the model's.
    Evaluation through the Trainer (which returns logits) and label smoothing or a
    ``compute_loss_func`` keep the standard path."""

    def __init__(self, *args, token_counter: TokenCounter | None = None,
                 chunked_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter or TokenCounter()
        self.chunked_loss = chunked_loss
        self._chunked_applies = None

    def _use_chunked_loss(self, model, inputs, return_outputs) -> bool:
        if not self.chunked_loss or return_outputs or "labels" not in inputs:
            return False
        if "shift_labels" in inputs or self.label_smoother is not None \
                or getattr(self, "compute_loss_func", None) is not None:
            return False
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "sp_enabled", False):
            return False
        from helpers import losses

        if self._chunked_applies is None:
            self._chunked_applies = losses.supports(model)
        return self._chunked_applies and losses.more_than_one_chunk(model, inputs["labels"].numel())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._use_chunked_loss(model, inputs, return_outputs):
            from helpers import losses

            model = losses.ChunkedLossModel(model)  # called as the model; the Trainer does the rest
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        real = _batch_real_tokens(inputs)
        self.token_counter.add(real, _batch_loss_tokens(inputs))
        self.state.num_input_tokens_seen += real
        return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        for key in COUNT_KEYS:
            inputs.pop(key, None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def label_token_count(dataset) -> int:
    """Label tokens the loss is computed on in ``dataset`` (labels other than -100, each row's
    first position excluded: nothing predicts it). Zero means training would learn nothing."""
    import numpy as np
    import pyarrow.compute as pc

    total = 0
    for table in dataset.select_columns(["labels"]).with_format("arrow").iter(batch_size=4096):
        labels = table.column("labels").combine_chunks()
        flat = np.asarray(labels.flatten(), dtype=np.int64)
        nonempty = labels.filter(pc.greater(pc.list_value_length(labels), 0))
        first = np.asarray(pc.list_element(nonempty, 0), dtype=np.int64)
        total += int((flat != IGNORE_INDEX).sum()) - int((first != IGNORE_INDEX).sum())
    return total


# ============================================================================ 3. callbacks


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _process_count() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _across_processes(values, op: str = "sum") -> list:
    """``values`` summed (or their maximum / minimum, ``op="max"`` / ``"min"``) over the processes
    of a launch; the values themselves in a single process. Every process must call it at the same
    point."""
    import torch.distributed as dist

    if _process_count() == 1:
        return list(values)
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) \
        if "nccl" in backend and torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(t, op=ops[op])
    return t.cpu().tolist()


class ThroughputCallback(TrainerCallback):
    """Real tokens and seconds of each optimizer step (``steps``: step, tokens, loss_tokens,
    seconds, local_tokens). :attr:`tokens_per_second` leaves out the first step of the run, whose
    time includes warm-up (allocations, kernel selection, the optimizer's state creation).

    In a launch of several processes the step's tokens are summed over all of them and its
    seconds are the slowest process's (the wall time of the step), so tokens/s is the whole
    launch's; ``local_tokens`` are this process's share. ``state.num_input_tokens_seen`` is
    raised to the launch's total, the same in every process and in the checkpoints."""

    def __init__(self, counter: TokenCounter):
        self.counter = counter
        self.steps: list[dict] = []
        self._start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.counter.take()  # anything counted before this run's first step is not ours

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        seconds = time.perf_counter() - (self._start or time.perf_counter())
        tokens, loss_tokens = self.counter.take()
        local = tokens
        if _process_count() > 1:
            tokens, loss_tokens = (int(v) for v in _across_processes([tokens, loss_tokens]))
            seconds = _across_processes([seconds], "max")[0]
            state.num_input_tokens_seen += tokens - local  # SeriesTrainer counted `local`
        self.steps.append({"step": state.global_step, "tokens": tokens,
                           "loss_tokens": loss_tokens, "seconds": seconds,
                           "local_tokens": local})

    @property
    def tokens_per_second(self) -> float:
        timed = self.steps[1:] if len(self.steps) > 1 else self.steps
        seconds = sum(s["seconds"] for s in timed)
        return sum(s["tokens"] for s in timed) / seconds if seconds > 0 else 0.0

    @property
    def local_tokens(self) -> int:
        return sum(s["local_tokens"] for s in self.steps)


class MemoryCallback(TrainerCallback):
    """GPU memory and CPU RSS at the end of each optimizer step, in ``steps``: ``peak_gpu_bytes``
    (``torch.cuda.max_memory_allocated`` since training began: the peak counter is reset once, at
    the start of training, and not per step, so a ``helpers.memory.track`` stage around the
    training still reads the training's peak), ``gpu_allocated_bytes`` (held between steps:
    weights, adapters, optimizer state) and ``cpu_rss_bytes``. Zeros for the GPU on CPU."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        from helpers import memory

        cuda = torch.cuda.is_available()
        self.steps.append({
            "step": state.global_step,
            "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if cuda else 0,
            "gpu_allocated_bytes": int(torch.cuda.memory_allocated()) if cuda else 0,
            "cpu_rss_bytes": int(memory.cpu_rss())})

    @property
    def peak_gpu_bytes(self) -> int:
        return max((s["peak_gpu_bytes"] for s in self.steps), default=0)

    @property
    def peak_cpu_rss_bytes(self) -> int:
        return max((s["cpu_rss_bytes"] for s in self.steps), default=0)


class ProgressBar(TrainerCallback):
    """One progress bar over the optimizer steps with the latest loss and learning rate: a widget
    in Jupyter (:func:`helpers.widgets.has_frontend`), text elsewhere (papermill, scripts), where
    it redraws at most every ``text_interval`` seconds. It replaces the Trainer's own bar, which
    also prints every step's log as a line (or a table row in Jupyter)."""

    def __init__(self, live: bool | None = None, text_interval: float = 10.0):
        if live is None:
            from helpers import widgets

            live = widgets.has_frontend()
        self.live, self.text_interval = live, text_interval
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self.live:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step",
                        desc="training", dynamic_ncols=True,
                        mininterval=0.1 if self.live else self.text_interval)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4g}",
                                 lr=f"{logs.get('learning_rate', 0):.2g}", refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _log_entry(state, logs) -> dict | None:
    if "loss" not in logs:
        return None  # the end-of-training summary, or an evaluation
    entry = {"step": state.global_step, "loss": float(logs["loss"])}
    for key in ("learning_rate", "grad_norm", "epoch"):
        if logs.get(key) is not None:
            entry[key] = float(logs[key])
    return entry


class LossCurveCallback(TrainerCallback):
    """Keeps the logged steps in ``history`` and draws them with :func:`helpers.plots.loss_curve`:
    live in Jupyter (one figure, redrawn in place at most every ``min_interval`` seconds, only when
    :func:`helpers.widgets.has_frontend`), and as ``path`` (RUN_DIR/loss_curve.png) at every
    checkpoint and at the end."""

    def __init__(self, path, live: bool | None = None, min_interval: float = 2.0):
        self.path = Path(path)
        self.history: list[dict] = []
        self.eval_points: list = []
        if live is None:
            from helpers import widgets

            live = widgets.has_frontend()
        self.live = live
        self.min_interval = min_interval
        self._handle = None
        self._drawn = 0.0

    def figure(self):
        from helpers import plots

        return plots.loss_curve(self.history, eval_points=self.eval_points)

    def save(self):
        from helpers import plots

        if not self.history:
            return None
        return plots.save(self.figure(), self.path)

    def _redraw(self, force: bool = False):
        if not self.live or not self.history:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < self.min_interval:
            return
        import io

        from IPython.display import Image, display

        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=90, bbox_inches="tight")
        image = Image(data=buf.getvalue())
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)
        self._drawn = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = _log_entry(state, logs or {})
        if entry is not None:
            self.history.append(entry)
            self._redraw()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            self.save()

    def on_train_end(self, args, state, control, **kwargs):
        self._redraw(force=True)
        if args.should_save:
            self.save()


def _finite(x) -> bool:
    return x is None or math.isfinite(x)


class TrainingGuard(TrainerCallback):
    """Stops training cleanly on a NaN/inf loss, a non-finite gradient norm, or a loss of exactly
    zero, and keeps an explanation of the likely cause in ``problem`` (``kind``: "nan"/"zero").

    It acts on each step's log, before that step's checkpoint would be written, and cancels the
    checkpoint, so no broken weights are saved. Under fp16 the gradient scaler skips steps whose
    gradients overflow - normal while it finds its scale - so a non-finite gradient norm with a
    finite loss stops the run only after ``fp16_patience`` such steps in a row.
    :func:`train` raises :class:`TrainingStopped` with the explanation once the Trainer returns.
    ``counter_steps`` (optional) is a :class:`ThroughputCallback`'s ``steps`` list, giving the
    step's number of loss tokens.
    """

    def __init__(self, counter_steps: list | None = None, fp16_patience: int = 8,
                 dataset_loss_tokens: int | None = None):
        self.counter_steps = counter_steps if counter_steps is not None else []
        self.fp16_patience = fp16_patience
        self.dataset_loss_tokens = dataset_loss_tokens
        self.problem: str | None = None
        self.kind = ""
        self.step = 0
        self._bad_grad_steps = 0
        self._last_good: dict | None = None

    def _step_loss_tokens(self, step: int):
        for s in reversed(self.counter_steps):
            if s["step"] == step:
                return s["loss_tokens"]
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs or self.problem:
            return
        loss, grad = logs.get("loss"), logs.get("grad_norm")
        kind = None
        if not _finite(loss):
            kind = "nan"
        elif not _finite(grad):
            self._bad_grad_steps += 1
            if not args.fp16 or self._bad_grad_steps >= self.fp16_patience:
                kind = "nan"
        elif loss == 0.0:
            kind = "zero"
        else:
            self._bad_grad_steps = 0
            self._last_good = {"step": state.global_step, "loss": loss}
        if kind is None:
            return
        self.kind, self.step = kind, state.global_step
        self.problem = (explain_nan(args, state.global_step, loss, grad, self._last_good,
                                    self._step_loss_tokens(state.global_step),
                                    self._bad_grad_steps)
                        if kind == "nan" else
                        explain_zero(args, state.global_step, self._step_loss_tokens(
                            state.global_step), self.dataset_loss_tokens))
        control.should_training_stop = True
        control.should_save = False  # keep the last good checkpoint the latest one
        print(self.problem)


def _capability() -> tuple | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0)


def explain_nan(args, step, loss, grad_norm, last_good, step_loss_tokens, bad_grad_steps=0) -> str:
    """What a NaN/inf loss or gradient norm most likely means, and what to do about it."""
    what = (f"loss {loss}" if not _finite(loss) else
            f"gradient norm {grad_norm} for {bad_grad_steps} step(s) with loss {loss:.4g}")
    lines = [f"Training stopped at step {step}: {what}."]
    if last_good:
        lines[0] += f" The last finite loss was {last_good['loss']:.4g} at step {last_good['step']}."
    causes = []
    if step_loss_tokens == 0:
        causes.append(
            "Data: this step had no label tokens (every label -100), and a mean over zero tokens is "
            "0/0 = NaN. Check the label masking (RESPONSE_ONLY with prompts that fill MAX_LENGTH "
            "leaves nothing to learn): notebook 04 shows the labels of a few examples.")
    if args.fp16:
        cap = _capability()
        better = ("this GPU has compute capability "
                  f"{cap[0]}.{cap[1]} >= 8.0: use bfloat16 (COMPUTE_DTYPE = 'auto' or 'bfloat16')"
                  if cap and cap[0] >= 8 else
                  "on a GPU of compute capability >= 8 (A100, L4, RTX 30xx and later) bfloat16 "
                  "avoids this; here, lower LEARNING_RATE and keep MAX_GRAD_NORM = 1.0")
        causes.append("fp16 overflow: float16 ends at 65,504, and activations or gradients beyond "
                      f"it become inf, then NaN; {better}.")
    lr = args.learning_rate
    advice = (" is far above the usual 1e-4 to 3e-4 for LoRA: use 2e-4" if lr > 1e-2 else
              " is high for LoRA (1e-4 to 3e-4 is usual): lower it 10x" if lr > 1e-3 else
              ": if the loss rose before it broke, lower it (2e-4 -> 5e-5)")
    causes.append(f"Learning rate: LEARNING_RATE = {lr:g}" + advice
                  + (" and set MAX_GRAD_NORM = 1.0" if not args.max_grad_norm else "") + ".")
    if step_loss_tokens is None or step_loss_tokens > 0:
        causes.append("Data: a NaN can also come from the inputs; check that labels are -100 or "
                      "valid token ids (below the vocabulary size).")
    lines.append("Likely causes, most likely first:")
    lines += [f"  - {c}" for c in causes]
    lines.append("The checkpoints before this step are intact; after changing the setting, start "
                 "again with RESUME = False (or resume from the last checkpoint with a lower "
                 "LEARNING_RATE only if the loss was healthy there).")
    return "\n".join(lines)


def explain_zero(args, step, step_loss_tokens, dataset_loss_tokens) -> str:
    """What a loss of exactly zero most likely means, and what to do about it."""
    lines = [(f"Training stopped at step {step}: the loss is exactly 0, so nothing is being "
              "learned from this batch.")]
    causes = []
    if dataset_loss_tokens == 0 or step_loss_tokens == 0:
        causes.append("Data: no label tokens"
                      + (" in the whole train set" if dataset_loss_tokens == 0 else
                         " in this step's batch")
                      + " (every label -100). Check the label masking in notebook 04.")
    else:
        facts = []
        if step_loss_tokens is not None:
            facts.append(f"this step had {step_loss_tokens:,} label tokens")
        if dataset_loss_tokens is not None:
            facts.append(f"the train set has {dataset_loss_tokens:,}")
        causes.append("Data: labels that are trivially predictable, e.g. padding positions "
                      "labelled with the pad id instead of -100, or every label the same token"
                      + (f" ({', '.join(facts)})" if facts else "") + ".")
    if args.fp16:
        causes.append("fp16: the loss or the logits underflowed or were clamped in float16; use "
                      "bfloat16 on a GPU of compute capability >= 8, or lower LEARNING_RATE.")
    causes.append("Memorized: a tiny train set seen for many epochs can be predicted perfectly; "
                  "compare the eval loss (it rises when the model memorizes), and use fewer "
                  "MAX_STEPS or more data.")
    lines.append("Likely causes:")
    lines += [f"  - {c}" for c in causes]
    return "\n".join(lines)


class StopAfterStep(TrainerCallback):
    """Stops training after optimizer step ``step``, as an interruption would (the schedule stays
    that of the full run). With ``save=True`` a checkpoint is written at that step first."""

    def __init__(self, step: int, save: bool = False):
        self.step, self.save = step, save

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            if self.save:
                control.should_save = True


class SignatureCallback(TrainerCallback):
    """Copies the run signature into every checkpoint folder, so a checkpoint moved elsewhere
    still says which run it belongs to."""

    def __init__(self, signature: dict):
        self.signature = signature

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_signature(folder, self.signature)


class ScheduleRealign(TrainerCallback):
    """For a run resumed with a different MAX_STEPS: the optimizer state restored from the
    checkpoint carries the learning rate of the old schedule (0 at its end), and the scheduler
    sets the new one only after the next step, so the first resumed step would run at the old
    rate. At the start of training this puts the new schedule's rate for the current step into
    the optimizer (for the Trainer's schedules, which are LambdaLR)."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR) or optimizer is None:
            return
        step = lr_scheduler.last_epoch
        rates = [base * fn(step) for base, fn in zip(lr_scheduler.base_lrs,
                                                     lr_scheduler.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        lr_scheduler._last_lr = rates


# ============================================================================ 4. evaluation


def evaluate_loss(model, eval_dataset, collator, batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> tuple:
    """``(loss, perplexity)`` of ``model`` on ``eval_dataset``: the mean cross-entropy over every
    label token of the whole set (token-weighted, not a mean of batch means, which would weigh a
    short example's tokens more), and ``exp(loss)``.

    Runs without gradients in eval mode (dropout off) and restores the mode. On a GPU it runs
    the way training does (autocast for float16 only, :func:`helpers.env.uses_autocast`); on CPU
    the 4-bit layers are first made safe for a no-grad forward (see
    :func:`helpers.models.cpu_safe`). Introduced in notebook 05.
    """
    if eval_dataset is None or len(eval_dataset) == 0:
        raise ValueError("no eval examples: set EVAL_FRACTION > 0 (notebook 04) to hold some out")
    device = _model_device(model)
    if env.fsdp_active() and torch.cuda.is_available():
        # FSDP computes on this process's GPU, wherever the shards are kept (CPU with offload)
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "cpu":
        from helpers.models import cpu_safe

        cpu_safe(model)
    use_autocast = device.type == "cuda" and dtype is not None and env.uses_autocast(dtype)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(eval_dataset), batch_size):
                rows = [eval_dataset[i] for i in range(start, min(start + batch_size,
                                                                  len(eval_dataset)))]
                batch = collator(rows)
                for key in COUNT_KEYS:
                    batch.pop(key, None)
                labels = batch.pop("labels").to(device)
                inputs = {k: (v.to(device) if torch.is_tensor(v) else v)
                          for k, v in batch.items()}
                inputs.setdefault("use_cache", False)
                with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=use_autocast):
                    logits = model(**inputs).logits
                target = labels[:, 1:]
                keep = target != IGNORE_INDEX
                if not keep.any():
                    continue
                picked = logits[:, :-1][keep].float()
                total += float(torch.nn.functional.cross_entropy(picked, target[keep],
                                                                 reduction="sum"))
                count += int(keep.sum())
                del logits, picked
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the eval examples have no label tokens (every label is -100): check "
                         "the label masking in notebook 04")
    loss = total / count
    return loss, math.exp(min(loss, 700.0))


# ============================================================================ 5. checkpoints


def dataset_fingerprint(dataset) -> str:
    """A hash of a dataset's token content (input_ids, labels, position_ids, attention_mask) and
    row count: equal for the same rows in the same order, however they were prepared."""
    import numpy as np
    import pyarrow.compute as pc

    cols = [c for c in ("input_ids", "labels", "position_ids", "attention_mask")
            if c in dataset.column_names]
    h = hashlib.sha256(json.dumps([len(dataset), cols]).encode())
    arrow = dataset.select_columns(cols).with_format("arrow")
    for table in arrow.iter(batch_size=4096):
        for c in cols:
            arr = table.column(c).combine_chunks()
            h.update(np.asarray(pc.list_value_length(arr), dtype=np.int64).tobytes())
            h.update(np.asarray(arr.flatten(), dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _lora_identity(model) -> dict:
    configs = getattr(model, "peft_config", None) or {}
    if not configs:
        return {}
    c = next(iter(configs.values()))
    targets = c.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {"r": c.r, "alpha": c.lora_alpha, "dropout": c.lora_dropout, "targets": targets}


def _model_identity(cfg, model) -> dict:
    config = getattr(model, "config", None)
    name_or_path = str(getattr(config, "_name_or_path", "") or "")
    return {"model": cfg.model, "name": Path(name_or_path).name if name_or_path else "",
            "type": getattr(config, "model_type", type(model).__name__),
            "hidden": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None),
            "vocab": getattr(config, "vocab_size", None),
            "quant_type": cfg.quant_type, "double_quant": cfg.double_quant}


# fields that must agree to resume; the rest of a signature is informative
_MUST_MATCH = ("model", "lora", "max_length", "data", "micro_batch", "grad_accum", "optimizer",
               "learning_rate", "lr_schedule", "warmup_steps")


def run_signature(cfg, model, train_dataset, micro_batch: int) -> dict:
    """What a checkpoint must share with this run to be resumed: the model, the LoRA config, the
    data (a fingerprint of its tokens), MAX_LENGTH, micro-batch, gradient accumulation, optimizer
    and schedule; plus informative fields (max_steps, seed, compute dtype, versions)."""
    return {
        "model": _model_identity(cfg, model),
        "lora": _lora_identity(model),
        "max_length": cfg.max_length,
        "data": {"rows": len(train_dataset), "fingerprint": dataset_fingerprint(train_dataset)},
        "micro_batch": micro_batch,
        "grad_accum": cfg.grad_accum,
        "optimizer": cfg.optimizer,
        "learning_rate": cfg.learning_rate,
        "lr_schedule": cfg.lr_schedule,
        "warmup_steps": cfg.warmup_steps,
        "max_steps": cfg.max_steps,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "compute_dtype": str(env.compute_dtype(cfg.compute_dtype)).replace("torch.", ""),
        "versions": {k: v for k, v in env.versions().items()
                     if k in ("torch", "transformers", "peft", "bitsandbytes")},
    }


def write_signature(folder, signature: dict) -> Path:
    path = Path(folder) / SIGNATURE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(signature, indent=1, default=str) + "\n")
    return path


def signature_differences(saved: dict, current: dict) -> list:
    """The fields that must match to resume and do not, as readable lines."""
    out = []
    for key in _MUST_MATCH:
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}.{sub}: checkpoint {a.get(sub)!r}, now {b.get(sub)!r}")
        else:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def latest_checkpoint(run_dir) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N in ``RUN_DIR/checkpoints``, or None."""
    folder = Path(run_dir) / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir()
             and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def checkpoint_files(checkpoint, processes: int = 1, fsdp: bool = False) -> dict:
    """Which of the files an exact resume needs a checkpoint holds (name -> present): the adapter
    as safetensors and its config, optimizer, scheduler, RNG and trainer state. A launch of
    several processes keeps one RNG state per process (``rng_state_<i>.pth``); under FSDP the
    adapter and the optimizer state are sharded checkpoints (``pytorch_model_fsdp_0/``,
    ``optimizer_0/``), as the Trainer writes them."""
    folder = Path(checkpoint)
    if fsdp:
        found = {d: (folder / d).is_dir() and any((folder / d).iterdir())
                 for d in ("pytorch_model_fsdp_0", "optimizer_0")}
    else:
        found = {n: (folder / n).is_file()
                 for n in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt")}
    rng = ["rng_state.pth"] if processes <= 1 else [f"rng_state_{i}.pth" for i in range(processes)]
    for n in ["scheduler.pt", *rng, "trainer_state.json"]:
        found[n] = (folder / n).is_file()
    return found


def check_resume(cfg, signature: dict, processes: int = 1, fsdp: bool = False) -> Path | None:
    """The checkpoint to resume from when RESUME=True (None: start from step 0), after checking
    that it belongs to this run; raises :class:`ResumeError` naming what differs, or what is
    missing (for a launch of ``processes`` processes, sharded under ``fsdp``: see
    :func:`checkpoint_files`). Introduced in notebook 05."""
    last = latest_checkpoint(cfg.run_dir)
    if last is None:
        return None
    saved_path = last / SIGNATURE
    if not saved_path.is_file():
        saved_path = Path(cfg.run_dir) / CHECKPOINTS / SIGNATURE
    where = f"{Path(cfg.run_dir).name}/{CHECKPOINTS}/{last.name}"
    if not saved_path.is_file():
        raise ResumeError(f"{where} has no {SIGNATURE}, so nothing shows that it belongs to this "
                          "model, data and settings. Resume only checkpoints this series wrote; "
                          "or set RESUME = False to start over (its checkpoints are replaced).")
    saved = json.loads(saved_path.read_text())
    diffs = signature_differences(saved, signature)
    if diffs:
        raise ResumeError(f"cannot resume from {where}: it was written by a different run.\n  "
                          + "\n  ".join(diffs)
                          + "\nUse the same parameters as that run, choose another RUN_DIR, or set "
                            "RESUME = False to start over (its checkpoints are replaced).")
    missing = [n for n, ok in checkpoint_files(last, processes, fsdp).items() if not ok]
    if missing:
        raise ResumeError(f"{where} lacks {', '.join(missing)}: it cannot be resumed exactly. "
                          "Resume from an earlier checkpoint (delete this folder) or set RESUME = "
                          "False.")
    return last


def _clear_checkpoints(run_dir) -> list:
    folder = Path(run_dir) / CHECKPOINTS
    old = sorted(p for p in folder.glob("checkpoint-*") if p.is_dir())
    for p in old:
        shutil.rmtree(p)
    return [p.name for p in old]


def save_adapter(model, folder, card: dict, tensors: dict | None = None) -> Path:
    """The adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and a short model
    card (README.md: base model, dataset, steps, losses, date) in ``folder``. ``tensors``: the
    LoRA weights gathered from FSDP's shards (:func:`helpers.distributed.gather_trainable`),
    written by :func:`helpers.distributed.save_sharded_adapter`. A file without weights is an
    error, not an adapter."""
    folder = Path(folder)
    if tensors is not None:
        distributed.save_sharded_adapter(model, folder, tensors)
    else:
        model.save_pretrained(str(folder), safe_serialization=True)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"the adapter was not saved as safetensors in {folder}")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        if not list(f.keys()):  # an adapter that would load as the untrained one
            raise RuntimeError(f"the adapter saved in {folder} holds no weights: the LoRA "
                               "layers were not found under their names (see "
                               "helpers.distributed.save_sharded_adapter)")
    (folder / "README.md").write_text(model_card(card))
    return folder


def model_card(card: dict) -> str:
    """A short model card in Markdown from ``card`` (base_model, dataset, steps, losses, ...)."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"# LoRA adapter for {card.get('base_model', 'a base model')}", "",
             ("A QLoRA adapter: the base model loaded in 4-bit, these low-rank weights trained on "
              "top of it. Load the base model, then this folder with "
              "`peft.PeftModel.from_pretrained(base, path)`."), ""]
    rows = [("base model", "base_model"), ("dataset", "dataset"), ("trained", "date"),
            ("optimizer steps", "train_steps"), ("micro-batch x accumulation", "batch"),
            ("optimizer", "optimizer"), ("learning rate", "learning_rate"),
            ("LoRA", "lora"), ("MAX_LENGTH", "max_length"),
            ("eval loss before", "eval_loss_before"), ("eval loss after", "eval_loss_after"),
            ("eval perplexity before", "perplexity_before"),
            ("eval perplexity after", "perplexity_after"),
            ("final train loss", "train_loss_final"), ("tokens trained on", "train_tokens_seen")]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {label} | {fmt(card[key])} |" for label, key in rows if key in card]
    return "\n".join(lines) + "\n"


# ============================================================================ 6. one call


@dataclass
class TrainResult:
    """What :func:`train` returns: the figures for the manifest (``metrics``), the logged steps
    (``history``), where the adapter, loss curve and checkpoints are, the micro-batch notes and
    the Trainer itself (for a closer look)."""

    metrics: dict
    history: list
    adapter_dir: Path | None
    loss_curve: Path | None
    checkpoints: Path
    notes: list = field(default_factory=list)
    resumed_from: Path | None = None
    trainer: object = field(default=None, repr=False)

    def summary(self) -> str:
        """The figures a person reads first, as a few lines of text."""
        from helpers.memory import fmt_bytes

        m = self.metrics
        lines = [
            (f"held-out loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f} "
             f"(perplexity {m['perplexity_before']:.1f} -> {m['perplexity_after']:.1f})"),
            (f"train loss {m['train_loss_first']:.4f} (first step) -> "
             f"{m['train_loss_final']:.4f} (step {m['train_steps']})"),
            (f"{m['train_tokens_seen']:,} real tokens trained on; "
             f"{m['tokens_per_second']:,.0f} tokens/s (padding not counted, first step left "
             f"out); {m['train_seconds']:.1f} s"),
            (f"micro-batch {m['micro_batch']} x {m['grad_accum']} accumulation; peak GPU "
             f"{fmt_bytes(m['peak_gpu_bytes_train'])}, CPU RSS "
             f"{fmt_bytes(m['peak_cpu_rss_bytes_train'])}")]
        if m.get("num_processes", 1) > 1:
            lines.insert(3, (f"{m['num_processes']} processes x micro-batch {m['micro_batch']} x "
                             f"{m['grad_accum']} accumulation = {m['global_batch']} rows per "
                             f"optimizer step; tokens summed over the processes (this one: "
                             f"{m['train_tokens_this_process']:,}); peak memory of the main "
                             "process"))
        if self.resumed_from is not None:
            lines.append(f"resumed from {self.resumed_from.name}")
        if self.adapter_dir is not None:
            lines.append(f"adapter: {self.adapter_dir}")
        return "\n".join(lines)


def _merge_history(logged: list, *per_step: list) -> list:
    by_step = {}
    for rows in per_step:
        for r in rows:
            by_step.setdefault(r["step"], {}).update(r)
    return [{**by_step.get(e["step"], {}), **e} for e in logged]


def make_trainer(cfg, model, tokenizer, train_dataset, collator, micro_batch: int,
                 callbacks=(), dtype=None) -> SeriesTrainer:
    """The :class:`SeriesTrainer` for this Config with the counting collator, without the
    Trainer's own progress bar and log printing; :func:`train` adds the series' callbacks."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    trainer = SeriesTrainer(model=model, args=training_arguments(cfg, micro_batch, dtype),
                            train_dataset=train_dataset, data_collator=CountingCollator(collator),
                            processing_class=tokenizer, callbacks=list(callbacks),
                            token_counter=TokenCounter(), chunked_loss=cfg.chunked_loss)
    for own in (ProgressCallback, NotebookProgressCallback, PrinterCallback):
        trainer.remove_callback(own)  # replaced by ProgressBar (train adds it)
    return trainer


def train(cfg, model, tokenizer, train_dataset, eval_dataset, collator, *,
          micro_batch: int | None = None, callbacks=(), estimate_fn=None,
          live: bool | None = None, verbose: bool = True) -> TrainResult:
    """Train the LoRA adapters of ``model`` (a peft model on a 4-bit base) on ``train_dataset``
    with the Config's settings, and return a :class:`TrainResult`.

    In order: refuse a train set without label tokens; RESUME: find the latest checkpoint and
    check its run signature (else start over, removing earlier checkpoints); choose the
    micro-batch (:func:`choose_micro_batch`, unless ``micro_batch`` is given; a resumed run keeps
    its micro-batch); evaluate before; train with the callbacks (live loss curve, NaN/zero guard,
    memory, throughput) plus ``callbacks``; raise :class:`TrainingStopped` if the guard stopped it;
    evaluate after; save the adapter with its model card in ``RUN_DIR/adapter`` and the curve as
    ``RUN_DIR/loss_curve.png``.

    ``metrics``: eval_loss_before/after, perplexity_before/after, train_loss_first/final,
    train_steps, train_tokens_seen (real tokens, all runs of a resumed training),
    train_seconds, tokens_per_second (real tokens, this run, warm-up step excluded),
    peak_gpu_bytes_train, peak_cpu_rss_bytes_train, micro_batch, grad_accum, resumed_from_step.
    ``live``: draw the loss curve and progress bar for Jupyter (default: when a front end is
    attached); ``verbose``: print the notes (micro-batch choice, resume) as they are made.
    Introduced in notebook 05.
    """
    if not cfg.run_dir:
        raise ValueError("RUN_DIR is empty: helpers.config.start(...) sets it (runs/interactive)")
    if len(train_dataset) == 0:
        raise ValueError("the train set is empty: prepare the dataset first (notebook 04)")
    loss_tokens = label_token_count(train_dataset)
    if loss_tokens == 0:
        raise ValueError("the train set has no label tokens (every label is -100), so training "
                         "would learn nothing and log a NaN loss: check RESPONSE_ONLY and "
                         "MAX_LENGTH in notebook 04")
    dtype, _ = precision(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    notes: list[str] = []
    verbose = verbose and distributed.is_main_process()  # one process prints, one writes
    fsdp = env.fsdp_active() and torch.cuda.is_available()
    if fsdp:  # the Trainer's sharded checkpoints then hold the adapter, and resuming restores it
        distributed.match_peft_names_under_fsdp()
    if not cfg.learning_rate:
        cfg = dataclasses.replace(cfg, learning_rate=auto_learning_rate(model))
        notes.append(f"LEARNING_RATE=0: {cfg.learning_rate:.2g} for this model's width "
                     f"(2e-4 x 4096 / hidden size)")

    resume_from = None
    if cfg.resume and latest_checkpoint(run_dir) is not None:
        # a resumed run keeps its micro-batch (a different card might choose another)
        saved = ckpt_dir / SIGNATURE
        if micro_batch is None and not cfg.micro_batch and saved.is_file():
            micro_batch = int(json.loads(saved.read_text()).get("micro_batch") or 0) or None
    chosen_cfg = cfg if micro_batch is None else dataclasses.replace(cfg, micro_batch=micro_batch)
    micro, fit_notes = choose_micro_batch(chosen_cfg, model, estimate_fn=estimate_fn)
    notes += fit_notes
    signature = run_signature(cfg, model, train_dataset, micro)
    if cfg.resume:
        resume_from = check_resume(cfg, signature, _process_count(), fsdp)
        if resume_from is None:
            notes.append("RESUME = True, but no checkpoint yet: starting from step 0")
        else:
            notes.append(f"resuming from {resume_from.name}")
            saved = json.loads((resume_from / SIGNATURE).read_text()) \
                if (resume_from / SIGNATURE).is_file() else {}
            if saved.get("max_steps", cfg.max_steps) != cfg.max_steps:
                notes.append(f"MAX_STEPS changed from {saved['max_steps']} to {cfg.max_steps}: "
                             "the learning-rate schedule now ends at the new last step")
                callbacks = (*callbacks, ScheduleRealign())
    elif latest_checkpoint(run_dir) is not None and distributed.is_main_process():
        removed = _clear_checkpoints(run_dir)
        notes.append(f"RESUME = False: starting over; removed the earlier run's "
                     f"{', '.join(removed)} (RESUME = True would have continued from them)")
    if distributed.is_main_process():
        write_signature(ckpt_dir, signature)
    eval_set = eval_dataset
    if eval_set is None or len(eval_set) == 0:
        eval_set = train_dataset.select(range(min(64, len(train_dataset))))
        notes.append("no eval split: before/after losses are measured on the first train rows")
    if fsdp:  # the model is sharded only when training starts: measured after, not before
        notes.append("FSDP: the held-out loss before training is not measured (the model is "
                     "not sharded yet, and whole it may not fit one GPU)")
        eval_loss_before, ppl_before = float("nan"), float("nan")
    if verbose:
        print("\n".join(notes))
    if not fsdp:
        eval_loss_before, ppl_before = evaluate_loss(model, eval_set, collator, micro, dtype)

    trainer = make_trainer(cfg, model, tokenizer, train_dataset, collator, micro, dtype=dtype)
    throughput = ThroughputCallback(trainer.token_counter)
    memory_cb = MemoryCallback()
    curve = LossCurveCallback(run_dir / LOSS_CURVE, live=live)
    curve.eval_points.append((0, eval_loss_before, "eval before"))
    guard = TrainingGuard(throughput.steps, dataset_loss_tokens=loss_tokens)
    for cb in (throughput, memory_cb, curve, guard, SignatureCallback(signature),
               ProgressBar(live), *callbacks):
        trainer.add_callback(cb)

    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.cuda.OutOfMemoryError:
        raise BudgetError(
            f"out of GPU memory during training at micro-batch {micro} (the probe fitted; the "
            f"optimizer state or a longer batch did not): set MICRO_BATCH = {max(1, micro // 2)} "
            f"and GRAD_ACCUM = {cfg.grad_accum * 2} (the same examples per step), restart the "
            "runtime to free the GPU, and set RESUME = True to continue from the last "
            "checkpoint") from None
    seconds = time.perf_counter() - started
    history = _merge_history(curve.history, throughput.steps, memory_cb.steps)
    if guard.problem:
        curve.save()
        raise TrainingStopped(guard.problem, guard.kind, guard.step, history)

    # under FSDP the wrapped model, whose layers are gathered in turn on every process
    eval_model = trainer.model_wrapped if fsdp else model
    eval_loss_after, ppl_after = evaluate_loss(eval_model, eval_set, collator, micro, dtype)
    curve.eval_points.append((trainer.state.global_step, eval_loss_after, "eval after"))
    state = trainer.state
    logged = [e["loss"] for e in curve.history]
    processes = _process_count()
    # every process's GPU peak: the largest is what the card must hold; the smallest shows the
    # spread (equal under DDP, near-equal shards under FSDP)
    peak_max = int(_across_processes([memory_cb.peak_gpu_bytes], "max")[0])
    peak_min = int(_across_processes([memory_cb.peak_gpu_bytes], "min")[0])
    metrics = {
        "eval_loss_before": eval_loss_before, "eval_loss_after": eval_loss_after,
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "train_loss_first": logged[0] if logged else float("nan"),
        "train_loss_final": logged[-1] if logged else float("nan"),
        "train_steps": state.global_step,
        "train_tokens_seen": int(state.num_input_tokens_seen),
        "train_seconds": round(seconds, 3),
        "tokens_per_second": throughput.tokens_per_second,
        "peak_gpu_bytes_train": memory_cb.peak_gpu_bytes,
        "peak_gpu_bytes_train_max_process": peak_max,
        "peak_gpu_bytes_train_min_process": peak_min,
        "peak_cpu_rss_bytes_train": memory_cb.peak_cpu_rss_bytes,
        "micro_batch": micro, "grad_accum": cfg.grad_accum,
        "num_processes": processes, "global_batch": micro * cfg.grad_accum * processes,
        "train_tokens_this_process": throughput.local_tokens,
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else 0,
    }
    adapter_dir = curve_path = None
    # under FSDP every process takes part in gathering the LoRA weights from the shards
    gathered = distributed.gather_trainable(trainer.model_wrapped) if fsdp else None
    if trainer.args.should_save:
        curve_path = curve.save()
        lora_id = _lora_identity(model)
        adapter_dir = save_adapter(model, run_dir / ADAPTER, {
            **metrics, "base_model": cfg.model, "dataset": cfg.dataset,
            "date": time.strftime("%Y-%m-%d"),
            "batch": f"{micro} x {cfg.grad_accum}" + (f" x {processes} processes"
                                                      if processes > 1 else ""),
            "optimizer": cfg.optimizer, "learning_rate": f"{cfg.learning_rate:g} ({cfg.lr_schedule})",
            "lora": f"r={lora_id.get('r')}, alpha={lora_id.get('alpha')}, "
                    f"targets {lora_id.get('targets')}",
            "max_length": cfg.max_length}, tensors=gathered)
    return TrainResult(metrics=metrics, history=history, adapter_dir=adapter_dir,
                       loss_curve=curve_path, checkpoints=ckpt_dir, notes=notes,
                       resumed_from=resume_from, trainer=trainer)


# ============================================================================ command line


def train_from_config(cfg, *, device=None, live: bool = False, verbose: bool = True) -> TrainResult:
    """Notebook 05's steps in one call: load the model in 4-bit, prepare and attach LoRA, load or
    prepare the dataset, train. For scripts, ``python -m helpers.train`` and notebooks that need
    an adapter when notebook 05 has not run (:func:`ensure_adapter`).

    In a launch of several processes every process loads its own model (DDP: whole, on its
    GPU; FSDP: see :func:`helpers.models.load_model`); the main process prepares the dataset
    first and the others then read it, so no two processes write RUN_DIR at once."""
    from helpers import data, lora, models

    main = distributed.is_main_process()
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                              compute_dtype=cfg.compute_dtype, device=device, tokenizer=tokenizer,
                              quant_storage=cfg.quant_storage)
    lora.prepare_for_training(model, cfg.gradient_checkpointing, cfg.upcast_norms_and_head)
    model = lora.attach(model, cfg)
    with _main_process_first():
        prepared = data.load_or_prepare(cfg, tokenizer, verbose=verbose and main)
    return train(cfg, model, tokenizer, prepared.train, prepared.eval,
                 data.CompletionCollator(tokenizer), live=live, verbose=verbose)


def _main_process_first():
    """A context in which the main process of a launch runs first and the others wait for it
    (a no-op in a single process)."""
    import contextlib

    if distributed.world()["world_size"] == 1:
        return contextlib.nullcontext()
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).main_process_first()


def ensure_adapter(cfg) -> Path:
    """``RUN_DIR/adapter`` when notebook 05 saved one there; otherwise train it now with these
    parameters (so notebook 06 runs alone). Introduced in notebook 06."""
    folder = Path(cfg.run_dir) / ADAPTER
    if (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists():
        return folder
    print(f"no adapter in {folder}: training one first, as notebook 05 would")
    result = train_from_config(cfg)
    del result.trainer
    from helpers import memory

    memory.free()
    return Path(result.adapter_dir)


def main(argv=None) -> int:
    """``python -m helpers.train RUN_DIR [--resume]``: train with the parameters recorded in
    ``RUN_DIR/manifest.json`` - the path notebook 05 takes, for scripts and for
    ``accelerate launch --config_file RUN_DIR/accelerate_ddp.yaml -m helpers.train RUN_DIR``
    on several GPUs (see :mod:`helpers.distributed`).

    Before anything is loaded the launch is checked (:func:`helpers.distributed.check_plan`:
    processes against visible GPUs, FSDP's needs). One model per process, on the GPU of its
    LOCAL_RANK. Only the main process prints the summary and writes: the adapter, the loss
    curve, and the final figures in the manifest's ``train`` entry (``metrics``, ``status``).
    Exit status: 0 trained; 2 refused before starting (the message says what to change);
    1 failed while running (the manifest's ``train.error`` says how)."""
    import argparse
    import sys

    from helpers import config as config_mod
    from helpers import manifest

    ap = argparse.ArgumentParser(prog="python -m helpers.train", description=main.__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = ap.parse_args(argv)
    launch = distributed.world()
    is_main = launch["rank"] == 0
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def fail(err, code: int) -> int:
        where = f"[process {launch['rank']}] " if launch["world_size"] > 1 else ""
        print(f"{where}error: {err}", file=sys.stderr)
        if is_main and Path(args.run_dir).is_dir():
            manifest.update(args.run_dir, lambda d: d.__setitem__("train", {
                "status": "refused" if code == 2 else "failed", "started": started,
                "error": f"{type(err).__name__}: {str(err)[:1000]}", "metrics": {}}))
        return code

    if not manifest.path(args.run_dir).is_file():
        return fail(FileNotFoundError(
            f"{args.run_dir} has no {manifest.FILE}: write the parameters first (notebook 05, "
            "helpers.distributed.write_launch_config, or python -m helpers.run)"), 2)
    try:
        recorded = manifest.load(args.run_dir).get("parameters", {})
        params = {k: v for k, v in recorded.items() if k in config_mod.PARAMETERS}
        params["RUN_DIR"] = args.run_dir
        if args.resume:
            params["RESUME"] = True
        cfg = config_mod.make_config(**params)
        mode = "fsdp" if launch["fsdp"] else "ddp"
        notes = distributed.check_plan(cfg, launch["local_world_size"], mode,
                                       cuda_devices=torch.cuda.device_count())
    except (config_mod.ConfigError, distributed.LaunchError, ValueError) as err:
        return fail(err, 2)
    if is_main and launch["world_size"] > 1:
        print(f"{launch['world_size']} processes ({mode.upper()})"
              + "".join(f"\n  {n}" for n in notes))
    config_mod.seed_everything(cfg.seed)
    device = None
    if torch.cuda.is_available() and not launch["fsdp"] and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", launch["local_rank"])  # one model per GPU (DDP)
        torch.cuda.set_device(device)
    try:
        result = train_from_config(cfg, device=device)
    except (BudgetError, ResumeError, TrainingStopped) as err:
        return fail(err, 1)
    except Exception as err:
        fail(err, 1)
        raise
    if is_main:
        print(result.summary())
        print(json.dumps(result.metrics, indent=1))
        manifest.update(args.run_dir, lambda d: d.__setitem__("train", {
            "status": "ok", "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "launch": {"num_processes": launch["world_size"], "mode": mode},
            "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

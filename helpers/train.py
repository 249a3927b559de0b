"""Training: paged-optimizer QLoRA training that fits the card, shows its progress, survives an
interruption and proves that it learned. Introduced in notebook 05.

The pieces, each callable on its own so the notebook can show them one at a time:

1. :func:`training_arguments` - ``transformers.TrainingArguments`` from the one Config: the
   optimizer (``paged_adamw_8bit`` by default), schedule, micro-batch x gradient accumulation,
   checkpoints every SAVE_STEPS, and fp16/bf16 flags taken from :func:`helpers.env.precision_flags`
   of the same dtype the 4-bit layers compute in (:func:`precision`), so the original recipe's
   bf16-compute-with-fp16-flag mismatch cannot happen.
2. :func:`choose_micro_batch` - the micro-batch that fits MEMORY_BUDGET_GB: predicted by the
   estimator of :mod:`helpers.estimator`, confirmed on the GPU by one forward and backward at that size
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
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
import torch
from transformers import Trainer, TrainingArguments, set_seed
from helpers import scaling, env
from helpers.tokens import IGNORE_INDEX
from helpers.budget import BudgetError, _model_device, choose_micro_batch
from helpers.callbacks import LOSS_CURVE, LossCurveCallback, MemoryCallback, ProgressBar, ScheduleRealign, SignatureCallback, ThroughputCallback, TrainingGuard, TrainingStopped, _across_processes, _process_count
from helpers.checkpoints import ADAPTER, CHECKPOINTS, ResumeError, SIGNATURE, _clear_checkpoints, _lora_identity, check_resume, latest_checkpoint, run_signature, save_adapter, write_signature
from helpers.callbacks import COUNT_KEYS, CountingCollator, TokenCounter, _batch_loss_tokens, _batch_real_tokens


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


# ============================================================================ 4. evaluation


def evaluate_loss(model, eval_dataset, collator, batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> tuple:
    """``(loss, perplexity)`` of ``model`` on ``eval_dataset``: the mean cross-entropy over every
    label token of the whole set (token-weighted, not a mean of batch means, which would weigh a
    short example's tokens more), and ``exp(loss)``.

    Runs without gradients in eval mode (dropout off) and restores the mode. On a GPU it runs
    the way training does (autocast for float16 only, :func:`helpers.env.uses_autocast`); on CPU
    the 4-bit layers are first made safe for a no-grad forward (see
    :func:`helpers.loading.cpu_safe`). Introduced in notebook 05.
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
        from helpers.units import fmt_bytes

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
    verbose = verbose and env.is_main_process()  # one process prints, one writes
    fsdp = env.fsdp_active() and torch.cuda.is_available()
    if fsdp:  # the Trainer's sharded checkpoints then hold the adapter, and resuming restores it
        fsdp.match_peft_names_under_fsdp()
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
    elif latest_checkpoint(run_dir) is not None and env.is_main_process():
        removed = _clear_checkpoints(run_dir)
        notes.append(f"RESUME = False: starting over; removed the earlier run's "
                     f"{', '.join(removed)} (RESUME = True would have continued from them)")
    if env.is_main_process():
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
    gathered = fsdp.gather_trainable(trainer.model_wrapped) if fsdp else None
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
    GPU; FSDP: see :func:`helpers.loading.load_model`); the main process prepares the dataset
    first and the others then read it, so no two processes write RUN_DIR at once."""
    from helpers import data, lora, loading

    main = env.is_main_process()
    tokenizer = loading.load_tokenizer(cfg.model)
    model = loading.load_model(cfg.model, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
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

    if env.world()["world_size"] == 1:
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
    from helpers import units

    units.free()
    return Path(result.adapter_dir)


def main(argv=None) -> int:
    """``python -m helpers.train RUN_DIR [--resume]``: train with the parameters recorded in
    ``RUN_DIR/manifest.json`` - the path notebook 05 takes, for scripts and for
    ``accelerate launch --config_file RUN_DIR/accelerate_ddp.yaml -m helpers.train RUN_DIR``
    on several GPUs (see :mod:`helpers.scaling`).

    Before anything is loaded the launch is checked (:func:`helpers.scaling.check_plan`:
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
    launch = env.world()
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
            "helpers.scaling.write_launch_config, or python -m helpers.run)"), 2)
    try:
        recorded = manifest.load(args.run_dir).get("parameters", {})
        params = {k: v for k, v in recorded.items() if k in config_mod.PARAMETERS}
        params["RUN_DIR"] = args.run_dir
        if args.resume:
            params["RESUME"] = True
        cfg = config_mod.make_config(**params)
        mode = "fsdp" if launch["fsdp"] else "ddp"
        notes = scaling.check_plan(cfg, launch["local_world_size"], mode,
                                       cuda_devices=torch.cuda.device_count())
    except (config_mod.ConfigError, scaling.LaunchError, ValueError) as err:
        return fail(err, 2)
    if is_main and launch["world_size"] > 1:
        print(f"{launch['world_size']} processes ({mode.upper()})"
              + "".join(f"\n  {n}" for n in notes))
    set_seed(cfg.seed)
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

"""Training: paged-optimizer QLoRA training that fits the card, shows its progress, survives an
interruption and proves that it learned. Introduced in notebook 05, whose cells build the
``TrainingArguments`` and the plain ``transformers.Trainer`` themselves; this module holds what
those cells call (:func:`series_arguments`, :func:`evaluate_loss`, :func:`training_metrics`,
:func:`summary`) and the same steps as one call for the command line (:func:`train`,
:func:`train_from_config`): ``python -m helpers.train RUN_DIR`` (or ``accelerate launch -m
helpers.train RUN_DIR``) trains with the parameters recorded in ``RUN_DIR/manifest.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import torch
from accelerate import PartialState
from accelerate.utils import send_to_device
from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

from helpers import config as config_mod
from helpers import (attention, data, env, fsdp, loading, lora, losses, manifest, offload, scaling,
                     tiling)
from helpers.budget import BudgetError, _model_device, choose_micro_batch
from helpers.callbacks import (LOSS_CURVE, LossCurveCallback, MemoryCallback, ProgressBar,
                               ThroughputCallback, TrainingGuard, TrainingStopped)
from helpers.checkpoints import (ADAPTER, CHECKPOINTS, ResumeCallback, ResumeError,
                                 keep_resumed_micro_batch, model_card, resume_point,
                                 run_signature, save_adapter)
from helpers.tokens import IGNORE_INDEX
from helpers.models import cpu_safe
from helpers.units import fmt_bytes, free


# ============================================================================ arguments


def auto_learning_rate(model) -> float:
    """LEARNING_RATE=0 picks 2e-4 x 4096 / hidden size, capped at 1e-2: the QLoRA paper's 2e-4 for
    7B-13B models (hidden 4096-5120) and 1e-4 for 33B-65B (6656-8192), and proportionally more
    for narrow models such as the embedded one (hidden 128), whose adapters barely move at 2e-4.
    Introduced in notebook 05."""
    config = model.config  # a peft model's is its base model's
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 4096)
    return float(min(1e-2, 2e-4 * 4096 / hidden))


def series_arguments(cfg) -> dict:
    """The TrainingArguments notebook 05 does not dwell on, from the Config: non-reentrant
    activation checkpointing; the epochs (used when MAX_STEPS is 0); logging every step with
    NaN/inf losses left visible (``logging_nan_inf_filter=False``: by default the Trainer hides
    them, so a diverging run would look healthy); checkpoints every SAVE_STEPS (the adapter as
    safetensors, optimizer, scheduler and RNG state: resume is exact); the gradient clipping;
    seeds; CPU or GPU; ``remove_unused_columns=False`` because the collator, not the Trainer,
    decides what the model receives; no external reporting; the Trainer's printing of every
    step's log off (:class:`helpers.callbacks.ProgressBar` shows one bar with the loss instead).
    Introduced in notebook 05."""
    cuda, checkpointing = torch.cuda.is_available(), cfg.gradient_checkpointing
    # named activation_checkpointing from transformers 5.2x, gradient_checkpointing before
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation" if "activation_checkpointing" in fields else "gradient"
    save = {"save_strategy": "steps", "save_steps": cfg.save_steps} if cfg.save_steps > 0 else {
        "save_strategy": "no"}
    return {
        f"{ckpt}_checkpointing": checkpointing,
        f"{ckpt}_checkpointing_kwargs": {"use_reentrant": False} if checkpointing else None,
        "num_train_epochs": cfg.epochs,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": 1,
        "disable_tqdm": True,  # with PrinterCallback removed: ProgressBar instead
        "logging_nan_inf_filter": False,
        **save,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "use_cpu": not cuda,
        "dataloader_pin_memory": cuda,
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,  # every LoRA weight is used in every step (DDP)
        "report_to": "none",
    }


def training_arguments(cfg, micro_batch: int, dtype: torch.dtype | None = None,
                       model=None) -> TrainingArguments:
    """``TrainingArguments`` for the series' Config at ``micro_batch`` examples per forward: the
    arguments notebook 05's cell builds (tests/test_train.py checks that they agree), for the
    command line and :func:`train`.

    ``dtype`` is the compute dtype the model was loaded with (default: the Config's, through
    :func:`helpers.env.compute_dtype`); the fp16/bf16 flags follow it. LEARNING_RATE = 0 takes
    :func:`auto_learning_rate` of ``model``. The Trainer counts the real (non-padding) tokens
    it trains on (``include_num_input_tokens_seen``). Introduced in notebook 05.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch} must be at least 1")
    if not cfg.learning_rate and model is None:
        raise ValueError("LEARNING_RATE=0 (auto) needs the model: pass model=")
    learning_rate = cfg.learning_rate or auto_learning_rate(model)
    flags = env.precision_flags(dtype or env.compute_dtype(cfg.compute_dtype))
    return TrainingArguments(
        output_dir=f"{cfg.run_dir}/{CHECKPOINTS}",
        optim=cfg.optimizer,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps or -1,
        bf16=flags["bf16"],
        fp16=flags["fp16"],
        include_num_input_tokens_seen="non_padding",
        **series_arguments(cfg),
    )


def require_label_tokens(dataset) -> int:
    """Label tokens the loss is computed on in ``dataset`` (labels other than -100, each row's
    first position excluded: nothing predicts it); ``ValueError`` when there are none, since
    training would learn nothing and log a NaN loss. Introduced in notebook 05."""
    if len(dataset) == 0:
        raise ValueError("the train set is empty: prepare the dataset first (notebook 04)")
    total = 0
    for table in dataset.select_columns(["labels"]).with_format("arrow").iter(batch_size=4096):
        after_first = pc.list_flatten(pc.list_slice(table.column("labels"), 1))
        total += pc.sum(pc.not_equal(after_first, IGNORE_INDEX), min_count=0).as_py()
    if total == 0:
        raise ValueError("the train set has no label tokens (every label is -100), so training "
                         "would learn nothing and log a NaN loss: check RESPONSE_ONLY and "
                         "MAX_LENGTH in notebook 04")
    return total


# ============================================================================ evaluation


def evaluate_loss(model, eval_dataset, collator, batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> tuple:
    """``(loss, perplexity)`` of ``model`` on ``eval_dataset``: the mean cross-entropy over every
    label token of the whole set (token-weighted, not a mean of batch means, which would weigh a
    short example's tokens more), and ``exp(loss)``.

    Runs without gradients in eval mode (dropout off) and restores the mode. On a GPU it runs
    the way training does (autocast for float16 only, :func:`helpers.env.uses_autocast`); on CPU
    the 4-bit layers are first made safe for a no-grad forward (see
    :func:`helpers.loading.cpu_safe`). The head runs over labelled positions a chunk at a time
    (:func:`helpers.losses.summed_loss`) for the models the chunked loss supports, outside FSDP,
    so a row as long as training takes is evaluated where training fits. Running out of GPU
    memory raises a :class:`helpers.budget.BudgetError` that names the rows and what to change.
    Introduced in notebook 05.
    """
    if eval_dataset is None or len(eval_dataset) == 0:
        raise ValueError("no eval examples: set EVAL_FRACTION > 0 (notebook 04) to hold some out")
    device = _model_device(model)
    if env.fsdp_active() and torch.cuda.is_available():
        # FSDP computes on this process's GPU, wherever the shards are kept (CPU with offload)
        device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "cpu":
        cpu_safe(model)
    use_autocast = device.type == "cuda" and dtype is not None and env.uses_autocast(dtype)
    # the head over labelled positions a chunk at a time, as in training: a long row's whole
    # logits (for Llama-3.1-8B at 58,624 tokens, 15 GB) would not fit where its training does
    chunked = not env.fsdp_active() and losses.unsupported_reason(model) is None
    was_training = model.training
    model.eval()
    total, count, shape, out_of_memory = 0.0, 0, (0, 0), False
    try:
        with torch.no_grad():
            for start in range(0, len(eval_dataset), batch_size):
                # rows by index, not a DataLoader: its iterator draws from the global random
                # state, which would shift the dropout of the training that follows
                end = min(start + batch_size, len(eval_dataset))
                shape = (end - start, 0)
                batch = send_to_device(collator([eval_dataset[i] for i in range(start, end)]),
                                       device)
                labels = batch.pop("labels")
                batch.setdefault("use_cache", False)
                shape = tuple(labels.shape)
                target = labels[:, 1:]
                keep = target != IGNORE_INDEX
                count += int(keep.sum())
                with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=use_autocast):
                    if chunked:
                        total += float(losses.summed_loss(model, batch, labels))
                        continue
                    logits = model(**batch).logits
                picked = logits[:, :-1][keep].float()
                total += float(torch.nn.functional.cross_entropy(picked, target[keep],
                                                                 reduction="sum"))
                del logits, picked
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # raised below, once this frame's tensors are gone
    finally:
        model.train(was_training)
    if out_of_memory:
        batch = labels = target = keep = None
        free()
        rows, length = shape
        raise BudgetError(
            f"out of GPU memory computing the held-out loss on {rows} row(s)"
            + (f" of {length:,} tokens" if length else "") + ": "
            f"evaluate fewer rows at a time (batch_size={max(1, rows // 2)}), hold out shorter "
            "rows (MAX_LENGTH), or raise MEMORY_BUDGET_GB; nothing else was changed")
    if count == 0:
        raise ValueError("the eval examples have no label tokens (every label is -100): check "
                         "the label masking in notebook 04")
    loss = total / count
    return loss, math.exp(min(loss, 700.0))


# ============================================================================ the figures


def _callback(trainer, kind):
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind)]
    if not found:
        raise ValueError(f"the Trainer has no {kind.__name__}: pass one in callbacks=[...]")
    return found[0]


def training_metrics(trainer, before: tuple, after: tuple, resume_from=None) -> dict:
    """The figures of a finished ``trainer`` for the run manifest, from the Trainer's state and
    the series' callbacks (:class:`~helpers.callbacks.LossCurveCallback`,
    :class:`~helpers.callbacks.ThroughputCallback`, :class:`~helpers.callbacks.MemoryCallback`):
    eval_loss_before/after and perplexity_before/after (``before``/``after``: what
    :func:`evaluate_loss` returned), train_loss_first/final (this run's logged steps) and
    train_loss_first_step (the step of the first: 1, or the step after the resumed checkpoint),
    train_steps, train_tokens_seen (real tokens of every process, all runs of a resumed
    training), train_seconds (the Trainer's ``train_runtime``), tokens_per_second (real tokens,
    this run, warm-up step excluded), peak_gpu_bytes_train (this process) and its largest and
    smallest over the processes, peak_cpu_rss_bytes_train, micro_batch, grad_accum,
    num_processes, global_batch and resumed_from_step. Introduced in notebook 05."""
    state, args = trainer.state, trainer.args
    history = _callback(trainer, LossCurveCallback).history
    logged = [e["loss"] for e in history]
    memory = _callback(trainer, MemoryCallback)
    runtime = [e["train_runtime"] for e in state.log_history if "train_runtime" in e]
    processes = trainer.accelerator.num_processes
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {
        "eval_loss_before": before[0], "eval_loss_after": after[0],
        "perplexity_before": before[1], "perplexity_after": after[1],
        "train_loss_first": logged[0] if logged else float("nan"),
        "train_loss_first_step": history[0]["step"] if history else 0,
        "train_loss_final": logged[-1] if logged else float("nan"),
        "train_steps": state.global_step,
        "train_tokens_seen": int(state.num_input_tokens_seen),
        "train_seconds": round(runtime[-1], 3) if runtime else float("nan"),
        "tokens_per_second": _callback(trainer, ThroughputCallback).tokens_per_second,
        "peak_gpu_bytes_train": memory.peak_gpu_bytes,
        "peak_gpu_bytes_train_max_process": max(memory.peak_gpu_bytes_every_process),
        "peak_gpu_bytes_train_min_process": min(memory.peak_gpu_bytes_every_process),
        "peak_cpu_rss_bytes_train": memory.peak_cpu_rss_bytes,
        "micro_batch": micro, "grad_accum": accum,
        "num_processes": processes, "global_batch": micro * accum * processes,
        "resumed_from_step": int(Path(resume_from).name.split("-")[-1]) if resume_from else 0,
    }


def summary(metrics: dict) -> str:
    """The figures a person reads first (of :func:`training_metrics`), as a few lines of text.
    Introduced in notebook 05."""
    m = metrics
    lines = [
        (f"held-out loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f} "
         f"(perplexity {m['perplexity_before']:.1f} -> {m['perplexity_after']:.1f})"),
        (f"train loss {m['train_loss_first']:.4f} (step {m.get('train_loss_first_step', 1)}) "
         f"-> {m['train_loss_final']:.4f} (step {m['train_steps']})"),
        (f"{m['train_tokens_seen']:,} real tokens trained on; "
         f"{m['tokens_per_second']:,.0f} tokens/s (padding not counted, first step left "
         f"out); {m['train_seconds']:.1f} s"),
        (f"micro-batch {m['micro_batch']} x {m['grad_accum']} accumulation; peak GPU "
         f"{fmt_bytes(m['peak_gpu_bytes_train'])}, CPU RSS "
         f"{fmt_bytes(m['peak_cpu_rss_bytes_train'])}")]
    if m.get("num_processes", 1) > 1:
        lines.insert(3, (f"{m['num_processes']} processes x micro-batch {m['micro_batch']} x "
                         f"{m['grad_accum']} accumulation = {m['global_batch']} rows per "
                         "optimizer step; tokens summed over the processes; peak memory of the "
                         "main process"))
    if m.get("resumed_from_step"):
        lines.append(f"resumed from checkpoint-{m['resumed_from_step']}")
    return "\n".join(lines)


# ============================================================================ one call


@dataclass
class TrainResult:
    """What :func:`train` returns: the figures for the manifest (``metrics``), the logged steps
    (``history``: loss, learning rate, gradient norm), where the adapter is, the notes
    (micro-batch, resume) and the Trainer itself (for a closer look)."""

    metrics: dict
    history: list
    adapter_dir: Path | None
    notes: list = field(default_factory=list)
    trainer: object = field(default=None, repr=False)

    def summary(self) -> str:
        """:func:`summary` of the metrics, and where the adapter is."""
        adapter = [f"adapter: {self.adapter_dir}"] if self.adapter_dir is not None else []
        return "\n".join([summary(self.metrics)] + adapter)


def make_trainer(cfg, model, tokenizer, train_dataset, collator, micro_batch: int,
                 callbacks=(), dtype=None, args: TrainingArguments | None = None) -> Trainer:
    """The plain ``Trainer`` of notebook 05 for this Config, with ``callbacks``, without the
    Trainer's printing of every step's log. ``args``: arguments already built for this Config
    (default: :func:`training_arguments` at ``micro_batch`` and ``dtype``)."""
    args = args or training_arguments(cfg, micro_batch, dtype, model)
    trainer = Trainer(model=model, args=args,
                      train_dataset=train_dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)
    return trainer


def train(cfg, model, tokenizer, train_dataset, eval_dataset, collator, *,
          callbacks=(), estimate_fn=None, live: bool | None = None,
          verbose: bool = True) -> TrainResult:
    """Notebook 05's training cells in one call: train the LoRA adapters of ``model`` (a peft
    model on a 4-bit base) on ``train_dataset`` with the Config's settings, and return a
    :class:`TrainResult`. For the command line, notebook 06 when notebook 05 has not run, and
    tests.

    In order: refuse a train set without label tokens; the chunked loss (CHUNKED_LOSS); packed
    rows' attention without a mask (PACKING, :mod:`helpers.attention`); the activations in CPU
    memory (ACTIVATION_OFFLOAD, :mod:`helpers.offload`); the MLP a chunk of tokens at a time
    (TILED_MLP, :mod:`helpers.tiling`); the micro-batch
    (:func:`helpers.budget.choose_micro_batch`; a resumed run keeps its micro-batch); the
    arguments; RESUME: check the latest checkpoint's run signature, else start
    over (:func:`helpers.checkpoints.resume_point`); evaluate before; train with the callbacks
    (live loss curve, memory, throughput, resume, NaN/zero guard: :class:`TrainingStopped` if it
    stopped the run) plus ``callbacks``; evaluate after (out of memory there: the loss after is
    NaN and a note says why, and the adapter is still saved); save the adapter with its model card in
    ``RUN_DIR/adapter`` and the curve as ``RUN_DIR/loss_curve.png``. ``metrics``:
    :func:`training_metrics`. ``live``: draw the loss curve for Jupyter (default: when a front
    end is attached); ``verbose``: print the notes as they are made.
    """
    if not cfg.run_dir:
        raise ValueError("RUN_DIR is empty: helpers.config.start(...) sets it (runs/interactive)")
    loss_tokens = require_label_tokens(train_dataset)
    run_dir = Path(cfg.run_dir)
    verbose = verbose and env.is_main_process()  # one process prints, one writes
    sharded = env.fsdp_active() and torch.cuda.is_available()
    if sharded:  # the Trainer's sharded checkpoints then hold the adapter, and resuming restores it
        fsdp.match_peft_names_under_fsdp()
    if env.world()["world_size"] > 1:
        fsdp.accept_indexed_cpu_locations()
    notes = [losses.use_chunked_loss(model)] if cfg.chunked_loss else []
    if cfg.packing:
        notes.append(attention.use_packed_attention(model))
    notes.append(offload.use_activation_offload(model, cfg))  # ACTIVATION_OFFLOAD
    notes.append(tiling.use_tiled_mlp(model, cfg))  # TILED_MLP, after the offload's decision
    dtype = env.compute_dtype(cfg.compute_dtype)
    micro, fit_notes = choose_micro_batch(keep_resumed_micro_batch(cfg), model,
                                          estimate_fn=estimate_fn)
    notes += fit_notes
    args = training_arguments(cfg, micro, dtype, model)
    if not cfg.learning_rate:
        notes.append(f"LEARNING_RATE=0: {args.learning_rate:.2g} for this model's width "
                     f"(2e-4 x 4096 / hidden size)")
    signature = run_signature(cfg, model, train_dataset, args)
    resume_from, resume_notes = resume_point(cfg, signature)
    notes += resume_notes
    eval_set = eval_dataset
    if eval_set is None or len(eval_set) == 0:
        eval_set = train_dataset.select(range(min(64, len(train_dataset))))
        notes.append("no eval split: before/after losses are measured on the first train rows")
    if sharded:  # the model is sharded only when training starts: measured after, not before
        notes.append("FSDP: the held-out loss before training is not measured (the model is "
                     "not sharded yet, and whole it may not fit one GPU)")
    if verbose:
        print("\n".join(notes))
    before = (math.nan, math.nan) if sharded else evaluate_loss(model, eval_set, collator, micro,
                                                                 dtype)

    curve = LossCurveCallback(run_dir / LOSS_CURVE, live=live)
    curve.add_eval(0, before[0], "eval before")
    trainer = make_trainer(cfg, model, tokenizer, train_dataset, collator, micro, args=args,
                           callbacks=[ResumeCallback(signature), curve, MemoryCallback(),
                                      ThroughputCallback(), ProgressBar(live), *callbacks,
                                      TrainingGuard(loss_tokens)])
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except torch.cuda.OutOfMemoryError:
        raise BudgetError(
            f"out of GPU memory during training at micro-batch {micro} (the probe fitted; the "
            f"optimizer state or a longer batch did not): set MICRO_BATCH = {max(1, micro // 2)} "
            f"and GRAD_ACCUM = {cfg.grad_accum * 2} (the same examples per step), restart the "
            "runtime to free the GPU, and set RESUME = True to continue from the last "
            "checkpoint") from None

    # under FSDP the wrapped model, whose layers are gathered in turn on every process
    try:
        after = evaluate_loss(trainer.model_wrapped if sharded else model, eval_set, collator,
                              micro, dtype)
    except BudgetError as err:  # the trained adapter is saved all the same
        after = (math.nan, math.nan)
        notes.append(f"the held-out loss after training was not measured: {err}")
        if verbose:
            print(notes[-1])
    curve.add_eval(trainer.state.global_step, after[0], "eval after")
    metrics = training_metrics(trainer, before, after, resume_from)
    save = None
    if sharded:  # every process takes part in gathering the LoRA weights from the shards
        save = functools.partial(fsdp.save_sharded_adapter, model,
                                 tensors=fsdp.gather_trainable(trainer.model_wrapped))
    adapter_dir = save_adapter(model, run_dir / ADAPTER, model_card(cfg, trainer, metrics),
                               save=save) if trainer.args.should_save else None
    return TrainResult(metrics=metrics, history=curve.history, adapter_dir=adapter_dir,
                       notes=notes, trainer=trainer)


# ============================================================================ command line


def train_from_config(cfg, *, device=None, live: bool = False, verbose: bool = True,
                      callbacks=()) -> TrainResult:
    """Notebook 05's steps in one call: load the model in 4-bit, prepare and attach LoRA, load or
    prepare the dataset, train. For scripts, ``python -m helpers.train`` and notebooks that need
    an adapter when notebook 05 has not run (:func:`ensure_adapter`).

    In a launch of several processes every process loads its own model (DDP: whole, on its
    GPU; FSDP: see :func:`helpers.loading.load_model`); the main process prepares the dataset
    first and the others then read it (accelerate's ``main_process_first``), so no two
    processes write RUN_DIR at once."""
    tokenizer = loading.load_tokenizer(cfg.model)
    model = loading.load_model(cfg.model, quant_type=cfg.quant_type, double_quant=cfg.double_quant,
                              compute_dtype=cfg.compute_dtype, device=device, tokenizer=tokenizer,
                              quant_storage=cfg.quant_storage)
    lora.prepare_for_training(model, cfg.gradient_checkpointing, cfg.upcast_norms_and_head)
    model = lora.attach(model, cfg)
    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():
        prepared = data.load_or_prepare(cfg, tokenizer, verbose=verbose and env.is_main_process())
    return train(cfg, model, tokenizer, prepared.train, prepared.eval,
                 data.CompletionCollator(tokenizer), live=live, verbose=verbose,
                 callbacks=callbacks)


QUICK_ADAPTER_STEPS = 20  # what a notebook run alone trains when it finds no adapter


def ensure_adapter(cfg, steps: int = QUICK_ADAPTER_STEPS) -> Path:
    """``RUN_DIR/adapter`` when notebook 05 saved one there; otherwise a short one trained now
    (at most ``steps`` optimizer steps, notebook 05's settings otherwise), so that notebook 06
    run alone is quick; it says so, and records ``adapter_quick_steps`` in the manifest.
    Notebook 05 (run later in the same RUN_DIR) trains the full adapter over it. Introduced in
    notebook 06."""
    folder = Path(cfg.run_dir) / ADAPTER
    if (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists():
        return folder
    quick = dataclasses.replace(cfg, max_steps=min(cfg.max_steps or steps, steps), epochs=0.0,
                                resume=False)
    print(f"no adapter in {folder}: training a short one first ({quick.max_steps} steps, "
          f"notebook 05 trains {cfg.max_steps or 'the epochs'}), enough to show the steps here; "
          "run notebook 05 in this RUN_DIR for the real one")
    result = train_from_config(quick, verbose=False)
    del result.trainer
    free()
    if manifest._CURRENT.get("notebook"):  # inside a notebook started by helpers.config.start
        manifest.record({"adapter_quick_steps": quick.max_steps})
    return Path(result.adapter_dir)


def main(argv=None) -> int:
    """``python -m helpers.train RUN_DIR [--resume | --start-over]``: train with the parameters
    recorded in ``RUN_DIR/manifest.json`` - the path notebook 05 takes, for scripts and for
    ``accelerate launch --config_file RUN_DIR/accelerate_ddp.yaml -m helpers.train RUN_DIR``
    on several GPUs (see :mod:`helpers.scaling`).

    Before anything is loaded the launch is checked (:func:`helpers.scaling.check_plan`:
    processes against visible GPUs, FSDP's needs), and so is RUN_DIR: an earlier run's
    checkpoints and adapter are continued (``--resume``), moved aside (``--start-over``) or the
    command is refused (:func:`helpers.config.check_run_dir`). One model per process, on the GPU
    of its LOCAL_RANK. Only the main process prints the summary and writes: the adapter, the loss
    curve, and the final figures in the manifest's ``train`` entry (``metrics``, ``status``).
    Exit status: 0 trained; 2 refused before starting (the message says what to change);
    1 failed while running (the manifest's ``train.error`` says how)."""
    ap = argparse.ArgumentParser(prog="python -m helpers.train", description=main.__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--start-over", action="store_true",
                    help="move an earlier run's checkpoints and adapter aside and start again")
    args = ap.parse_args(argv)
    launch = env.world()
    is_main = launch["rank"] == 0
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    def record(status: str, **entry) -> None:  # the manifest's train entry (main process)
        if is_main and Path(args.run_dir).is_dir():
            manifest.update(args.run_dir, lambda d: d.__setitem__("train", {
                "status": status, "started": started, "metrics": {}, **entry}))

    def fail(err, code: int) -> int:
        where = f"[process {launch['rank']}] " if launch["world_size"] > 1 else ""
        print(f"{where}error: {err}", file=sys.stderr)
        record("refused" if code == 2 else "failed",
               error=f"{type(err).__name__}: {str(err)[:1000]}")
        return code

    if not manifest.path(args.run_dir).is_file():
        return fail(FileNotFoundError(
            f"{args.run_dir} has no {manifest.FILE}: write the parameters first (notebook 05, "
            "helpers.scaling.write_launch_config, or python -m helpers.run)"), 2)
    try:
        # a local MODEL or DATASET is recorded relative to RUN_DIR: found from where it is now
        recorded = manifest.resolve(manifest.load(args.run_dir).get("parameters", {}),
                                    args.run_dir)
        # what this command says, not what a notebook recorded, decides about earlier results
        params = {k: v for k, v in recorded.items()
                  if k in config_mod.PARAMETERS and k not in ("RESUME", "START_OVER")}
        cfg = config_mod.make_config(**{**params, "RUN_DIR": args.run_dir,
                                        "RESUME": args.resume, "START_OVER": args.start_over})
        mode = "fsdp" if launch["fsdp"] else "ddp"
        notes = scaling.check_plan(cfg, launch["local_world_size"], mode,
                                   cuda_devices=torch.cuda.device_count())
        if is_main:  # the others wait for it in the dataset's main_process_first
            notes += config_mod.check_run_dir(cfg, training=True)
    except (config_mod.ConfigError, scaling.LaunchError, ValueError) as err:
        return fail(err, 2)
    if is_main and launch["world_size"] > 1:
        print(f"{launch['world_size']} processes ({mode.upper()})")
    if is_main and notes:
        print("\n".join(f"  {n}" for n in notes))
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
    record("ok", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), metrics=result.metrics,
           launch={"num_processes": launch["world_size"], "mode": mode})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

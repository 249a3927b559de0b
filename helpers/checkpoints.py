"""Checkpoints, resume and the saved adapter (notebook 05): a run signature that refuses to resume
another run's checkpoints, the check before resuming (:func:`resume_point`), the callback that
keeps checkpoints and schedule in step with it, and the final adapter with its model card in
``RUN_DIR/adapter``. The checkpoints themselves are the Trainer's (adapter, optimizer,
scheduler and RNG state), so a resumed run continues to the same result.

Nothing here survives only if no kill comes: a checkpoint counts as complete once the run
signature is written into it, atomically, after the Trainer wrote its last file, and resume takes
the newest complete one (:func:`latest_checkpoint`); the adapter is written beside
``RUN_DIR/adapter`` and swapped in whole (:func:`save_adapter`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate import PartialState
from safetensors import safe_open
from transformers import TrainerCallback

from helpers import env, rundir
from helpers.config import ConfigError, check_run_dir
from helpers.formats import public_name

CHECKPOINTS = rundir.CHECKPOINTS  # RUN_DIR/checkpoints: the Trainer's checkpoint-N folders
ADAPTER = rundir.ADAPTER  # RUN_DIR/adapter: the final adapter, its config and model card
SIGNATURE = "run_signature.json"


class ResumeError(ValueError):
    """RESUME=True found checkpoints of another run; the message names the differences."""


def dataset_fingerprint(dataset) -> str:
    """A hash of a dataset's token content (input_ids, labels, position_ids, attention_mask) and
    row count: equal for the same rows in the same order, however they were prepared."""
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
    config = model.config  # a peft model's is its base model's
    # by its public name: the same run, whether MODEL came from a notebook or, relative to a
    # moved RUN_DIR, from the manifest (python -m helpers.train)
    return {"model": public_name(cfg.model), "name": Path(str(config._name_or_path or "")).name,
            "type": config.model_type,
            "hidden": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None),
            "vocab": getattr(config, "vocab_size", None),
            "quant_type": cfg.quant_type, "double_quant": cfg.double_quant}


# fields that must agree to resume; the rest of a signature is informative
_MUST_MATCH = ("model", "lora", "max_length", "data", "micro_batch", "grad_accum", "optimizer",
               "learning_rate", "lr_schedule", "warmup_steps")


def run_signature(cfg, model, train_dataset, args) -> dict:
    """What a checkpoint must share with this run to be resumed: the model, the LoRA config, the
    data (a fingerprint of its tokens), MAX_LENGTH, and from the ``TrainingArguments``
    ``args`` the micro-batch, gradient accumulation, optimizer, learning rate and schedule; plus
    informative fields (max_steps, seed, compute dtype, versions). Introduced in notebook 05."""
    return {
        "model": _model_identity(cfg, model),
        "lora": _lora_identity(model),
        "max_length": cfg.max_length,
        "data": {"rows": len(train_dataset), "fingerprint": dataset_fingerprint(train_dataset)},
        "micro_batch": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "optimizer": args.optim.value,  # TrainingArguments keeps enums
        "learning_rate": args.learning_rate,
        "lr_schedule": args.lr_scheduler_type.value,
        "warmup_steps": args.warmup_steps,
        "max_steps": args.max_steps,
        "epochs": args.num_train_epochs,
        "seed": args.seed,
        "compute_dtype": str(env.compute_dtype(cfg.compute_dtype)).replace("torch.", ""),
        "versions": {k: v for k, v in env.versions().items()
                     if k in ("torch", "transformers", "peft", "bitsandbytes")},
    }


def write_signature(folder, signature: dict) -> Path:
    """``folder/run_signature.json``, written atomically (in a checkpoint: its completion mark)."""
    return rundir.write_text(Path(folder) / SIGNATURE,
                             json.dumps(signature, indent=1, default=str) + "\n")


def signature_differences(saved: dict, current: dict) -> list:
    """The fields that must match to resume and do not, as readable lines."""
    out = []
    for key in _MUST_MATCH:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{sub}: checkpoint {a.get(sub)!r}, now {b.get(sub)!r}"
                    for sub in sorted(set(a) | set(b)) if a.get(sub) != b.get(sub)]
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def _checkpoints_newest_first(run_dir) -> list:
    folder = Path(run_dir) / CHECKPOINTS
    found = [p for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def is_complete(checkpoint, processes: int = 1, fsdp: bool = False) -> bool:
    """Whether a checkpoint was written to the end: its run signature (written last, atomically,
    by :class:`ResumeCallback`) reads, and it holds every file :func:`checkpoint_files` names."""
    try:
        json.loads((Path(checkpoint) / SIGNATURE).read_text())
    except (OSError, ValueError):
        return False
    return all(checkpoint_files(checkpoint, processes, fsdp).values())


def latest_checkpoint(run_dir, processes: int = 1, fsdp: bool = False) -> Path | None:
    """The complete ``checkpoint-N`` folder (:func:`is_complete`) with the highest N in
    ``RUN_DIR/checkpoints``, or None: one a kill cut short while it was written is passed over."""
    return next((p for p in _checkpoints_newest_first(run_dir)
                 if is_complete(p, processes, fsdp)), None)


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


def _saved_signature(checkpoint) -> dict:
    path = Path(checkpoint) / SIGNATURE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def keep_resumed_micro_batch(cfg):
    """``cfg`` with MICRO_BATCH set to the micro-batch of the checkpoints it resumes (RESUME =
    True, MICRO_BATCH = 0 and checkpoints there): a resumed run keeps its micro-batch, which a
    different card might choose otherwise. Introduced in notebook 05."""
    if not cfg.resume or cfg.micro_batch:
        return cfg
    last = latest_checkpoint(cfg.run_dir, PartialState().num_processes,
                             env.fsdp_active() and torch.cuda.is_available())
    saved = _saved_signature(last).get("micro_batch") if last else None
    return dataclasses.replace(cfg, micro_batch=int(saved)) if saved else cfg


def resume_point(cfg, signature: dict) -> tuple:
    """``(checkpoint, notes)``: the checkpoint folder to pass to ``trainer.train(
    resume_from_checkpoint=...)`` (None: start from step 0), and what was decided.

    RESUME = True: the newest complete checkpoint (:func:`latest_checkpoint`; newer ones a kill
    cut short are named and passed over), after checking that it belongs to this run: else
    :class:`ResumeError` naming what differs. A changed MAX_STEPS is noted
    (:class:`ResumeCallback` moves the learning rate to the new schedule). RESUME = False:
    checkpoints of an earlier run are never deleted: START_OVER = True moves them aside with
    the adapter and merged model (:func:`helpers.config.check_run_dir`), otherwise
    :class:`ResumeError` names the choices. The main process then writes ``signature`` beside
    the checkpoints. Introduced in notebook 05."""
    sharded = env.fsdp_active() and torch.cuda.is_available()
    processes = PartialState().num_processes
    notes, last = [], latest_checkpoint(cfg.run_dir, processes, sharded)
    newer = [p.name for p in _checkpoints_newest_first(cfg.run_dir)
             if last is None or int(p.name.split("-")[-1]) > int(last.name.split("-")[-1])]
    where = f"{Path(cfg.run_dir).name}/{CHECKPOINTS}/{last.name}" if last else ""
    unsigned = [n for n in newer if all(checkpoint_files(Path(cfg.run_dir) / CHECKPOINTS / n,
                                                         processes, sharded).values())]
    if cfg.resume and unsigned and not _saved_signature(Path(cfg.run_dir) / CHECKPOINTS):
        raise ResumeError(f"{Path(cfg.run_dir).name}/{CHECKPOINTS}/{unsigned[0]} has no "
                          f"{SIGNATURE}, so nothing shows that it belongs to this model, data and "
                          "settings. Resume only checkpoints this series wrote; or set "
                          "START_OVER = True to start again (the checkpoints are moved to "
                          "RUN_DIR/previous-<time>/).")
    if cfg.resume and newer:
        notes.append(f"{', '.join(newer)}: incomplete (cut short while it was written), "
                     "passed over")
    if cfg.resume and last is None:
        notes.append("RESUME = True, but no complete checkpoint yet: starting from step 0")
    elif cfg.resume:
        saved = _saved_signature(last)
        diffs = signature_differences(saved, signature)
        if diffs:
            raise ResumeError(f"cannot resume from {where}: it was written by a different run.\n  "
                              + "\n  ".join(diffs)
                              + "\nUse the same parameters as that run, choose another RUN_DIR, "
                                "or set START_OVER = True to start again (its checkpoints are "
                                "moved to RUN_DIR/previous-<time>/).")
        notes.append(f"resuming from {last.name}")
        before = saved.get("max_steps", signature["max_steps"])
        if before != signature["max_steps"]:
            notes.append(f"MAX_STEPS changed from {before} to {signature['max_steps']}: "
                         "the learning-rate schedule now ends at the new last step")
    elif env.is_main_process():
        try:  # refused, or moved aside under START_OVER: never deleted
            notes += check_run_dir(cfg, training=True)
        except ConfigError as err:
            raise ResumeError(str(err)) from None
    if env.is_main_process():
        write_signature(Path(cfg.run_dir) / CHECKPOINTS, signature)
    return (str(last) if cfg.resume and last else None), notes


class ResumeCallback(TrainerCallback):
    """Keeps the Trainer's checkpoints resumable as this series checks them: copies the run
    signature into every checkpoint folder once the Trainer has written it whole (its completion
    mark, :func:`is_complete`; a checkpoint moved elsewhere still says which run it belongs to;
    put this callback first, so that the mark comes as soon as the files are there), and at the
    start of training puts the current schedule's learning rate into the optimizer. The Trainer
    restores the optimizer state with the rate of the schedule it was saved under, and the
    scheduler sets the new one only after the next step, so a run resumed with a different
    MAX_STEPS would take its first step at the old rate (for an unchanged schedule, and a fresh
    run, the rate written is the one already there). For the Trainer's schedules, which are
    ``LambdaLR``."""

    def __init__(self, signature: dict):
        self.signature = signature

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR) or optimizer is None:
            return
        step = lr_scheduler.last_epoch
        rates = [base * fn(step) for base, fn in zip(lr_scheduler.base_lrs,
                                                     lr_scheduler.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        lr_scheduler._last_lr = rates

    def on_step_end(self, args, state, control, **kwargs):
        # a checkpoint about to be written again (over one a kill cut short) is not complete
        if control.should_save and args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / SIGNATURE).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # after the Trainer's last file: the checkpoint is complete
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                public_files(folder)
                write_signature(folder, self.signature)


# the keys under which peft and transformers record where a base model was loaded from
NAME_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")
NAMED_IN = ("adapter_config.json", "config.json", "tokenizer_config.json", "README.md")


def public_files(folder) -> list:
    """Make the files of a saved adapter or model ``folder`` name its base model as people may
    see it (:func:`helpers.formats.public_name`: a Hub id as it is, a local folder or the
    embedded model by its folder's name), never by a path of this machine: peft records the
    path the base was loaded from (``base_model_name_or_path``, and in the README.md it writes
    into checkpoints). :func:`helpers.adapters.check_adapter` accepts the name for the folder.
    Returns the names of the files changed; used on checkpoints, the adapter, merged models."""
    folder, renamed, changed = Path(folder), {}, []
    for name in NAMED_IN[:-1]:
        file = folder / name
        try:
            settings = json.loads(file.read_text()) if file.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(settings, dict):
            continue
        public = {key: public_name(value) if key in NAME_KEYS and isinstance(value, str)
                  and value else value for key, value in settings.items()}
        if public != settings:
            renamed.update({settings[k]: public[k] for k in NAME_KEYS
                            if settings.get(k) != public.get(k)})
            rundir.write_text(file, json.dumps(public, indent=2, sort_keys=True) + "\n")
            changed.append(name)
    card = folder / NAMED_IN[-1]
    if renamed and card.is_file():
        text = original = card.read_text()
        for value in sorted(renamed, key=len, reverse=True):
            text = text.replace(value, renamed[value])
        if text != original:
            rundir.write_text(card, text)
            changed.append(card.name)
    return sorted(set(changed))


def save_adapter(model, folder, card: str, save=None) -> Path:
    """The adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and its model card
    (README.md, :func:`model_card`) in ``folder``. ``save(folder)`` writes the weights where
    ``model.save_pretrained`` cannot (under FSDP: :func:`helpers.fsdp.save_sharded_adapter`). A
    file without weights is an error, not an adapter. Everything is written into a folder beside
    ``folder`` and swapped in whole (:func:`helpers.rundir.replace_folder`): a kill while it is
    written leaves the earlier adapter as it was. Introduced in notebook 05."""
    folder = Path(folder)
    work = rundir.partial_folder(folder)
    if save is not None:
        save(work)
    else:
        model.save_pretrained(str(work), safe_serialization=True)
    weights = work / "adapter_model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"the adapter was not saved as safetensors in {folder}")
    with safe_open(str(weights), framework="pt") as f:
        if not list(f.keys()):  # an adapter that would load as the untrained one
            raise RuntimeError(f"the adapter saved in {folder} holds no weights: the LoRA "
                               "layers were not found under their names (see "
                               "helpers.fsdp.save_sharded_adapter)")
    (work / "README.md").write_text(card)
    public_files(work)
    return rundir.replace_folder(work, folder)


def model_card(cfg, trainer, metrics: dict) -> str:
    """A short model card in Markdown for the adapter that ``trainer`` trained: base model,
    dataset, date, steps, batch, optimizer, learning rate, LoRA, MAX_LENGTH, and the figures of
    :func:`helpers.train.training_metrics` (``metrics``). A local model or dataset is named by
    its file or folder name (:func:`helpers.formats.public_name`), never by a path of the machine
    it was trained on. Introduced in notebook 05."""
    m, lora_id, processes = metrics, _lora_identity(trainer.model), metrics["num_processes"]
    model = public_name(cfg.model)  # a local folder or file by its name: no path of this machine
    rows = {"base model": model, "dataset": public_name(cfg.dataset),
            "trained": time.strftime("%Y-%m-%d"),
            "optimizer steps": m["train_steps"],
            "micro-batch x accumulation": f"{m['micro_batch']} x {m['grad_accum']}"
                                          + (f" x {processes} processes" if processes > 1 else ""),
            "optimizer": cfg.optimizer,
            "learning rate": f"{trainer.args.learning_rate:g} ({cfg.lr_schedule})",
            "LoRA": f"r={lora_id.get('r')}, alpha={lora_id.get('alpha')}, "
                    f"targets {lora_id.get('targets')}",
            "MAX_LENGTH": cfg.max_length,
            "eval loss before": m["eval_loss_before"], "eval loss after": m["eval_loss_after"],
            "eval perplexity before": m["perplexity_before"],
            "eval perplexity after": m["perplexity_after"],
            "final train loss": m["train_loss_final"], "tokens trained on": m["train_tokens_seen"]}
    lines = [f"# LoRA adapter for {model}", "",
             ("A QLoRA adapter: the base model loaded in 4-bit, these low-rank weights trained on "
              "top of it. Load the base model, then this folder with "
              "`peft.PeftModel.from_pretrained(base, path)`."), "", "| | |", "|---|---|"]
    lines += [f"| {k} | {f'{v:.4f}' if isinstance(v, float) else v} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"

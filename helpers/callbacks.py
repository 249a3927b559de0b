"""The Trainer callbacks the series adds (notebook 05): the live loss curve
(:class:`LossCurveCallback`), the NaN / zero-loss guard that explains the likely cause
(:class:`TrainingGuard`), memory per step (:class:`MemoryCallback`), real tokens per second
(:class:`ThroughputCallback`) and a progress bar.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
import torch
from transformers import TrainerCallback
from helpers.checkpoints import write_signature
from helpers.tokens import IGNORE_INDEX


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


LOSS_CURVE = "loss_curve.png"


class TrainingStopped(RuntimeError):
    """Training was stopped by :class:`TrainingGuard`; the message explains why and what to do.

    ``kind`` is "nan" or "zero"; ``step`` the optimizer step it happened at; ``history`` the
    logged steps up to it (for :func:`helpers.plots.loss_curve`).
    """

    def __init__(self, explanation: str, kind: str = "", step: int = 0, history=None):
        super().__init__(explanation)
        self.explanation, self.kind, self.step = explanation, kind, step
        self.history = list(history or [])


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
    the start of training, and not per step, so a ``helpers.footprint.track`` stage around the
    training still reads the training's peak), ``gpu_allocated_bytes`` (held between steps:
    weights, adapters, optimizer state) and ``cpu_rss_bytes``. Zeros for the GPU on CPU."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, args, state, control, **kwargs):
        from helpers import footprint

        cuda = torch.cuda.is_available()
        self.steps.append({
            "step": state.global_step,
            "peak_gpu_bytes": int(torch.cuda.max_memory_allocated()) if cuda else 0,
            "gpu_allocated_bytes": int(torch.cuda.memory_allocated()) if cuda else 0,
            "cpu_rss_bytes": int(footprint.cpu_rss())})

    @property
    def peak_gpu_bytes(self) -> int:
        return max((s["peak_gpu_bytes"] for s in self.steps), default=0)

    @property
    def peak_cpu_rss_bytes(self) -> int:
        return max((s["cpu_rss_bytes"] for s in self.steps), default=0)


class ProgressBar(TrainerCallback):
    """One progress bar over the optimizer steps with the latest loss and learning rate: a widget
    in Jupyter (:func:`helpers.env.has_frontend`), text elsewhere (papermill, scripts), where
    it redraws at most every ``text_interval`` seconds. It replaces the Trainer's own bar, which
    also prints every step's log as a line (or a table row in Jupyter)."""

    def __init__(self, live: bool | None = None, text_interval: float = 10.0):
        if live is None:
            from helpers import env

            live = env.has_frontend()
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
    :func:`helpers.env.has_frontend`), and as ``path`` (RUN_DIR/loss_curve.png) at every
    checkpoint and at the end."""

    def __init__(self, path, live: bool | None = None, min_interval: float = 2.0):
        self.path = Path(path)
        self.history: list[dict] = []
        self.eval_points: list = []
        if live is None:
            from helpers import env

            live = env.has_frontend()
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

"""The Trainer callbacks the series adds (notebook 05): the live loss curve
(:class:`LossCurveCallback`), the NaN / zero-loss guard that explains the likely cause
(:class:`TrainingGuard`), memory per step (:class:`MemoryCallback`) and real tokens per second
(:class:`ThroughputCallback`) and one progress bar with the loss (:class:`ProgressBar`). Each is
passed to a plain ``transformers.Trainer`` in ``callbacks=[...]``.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from IPython.display import Image, display
from tqdm import tqdm
from tqdm.auto import tqdm as tqdm_notebook
from transformers import ProgressCallback, TrainerCallback

from helpers import env, plots
from helpers.footprint import cpu_rss
from helpers.tokens import IGNORE_INDEX


LOSS_CURVE = "loss_curve.png"


class TrainingStopped(RuntimeError):
    """Training was stopped by :class:`TrainingGuard`; the message explains why and what to do.

    ``kind`` is "nan" or "zero"; ``step`` the optimizer step it happened at (the loss curve
    shows the steps up to it).
    """

    def __init__(self, explanation: str, kind: str = "", step: int = 0):
        super().__init__(explanation)
        self.kind, self.step = kind, step


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ThroughputCallback(TrainerCallback):
    """Real tokens and seconds of each optimizer step (``steps``), and :attr:`tokens_per_second`
    without the run's first step, whose time includes warm-up (allocations, kernel selection, the
    optimizer's state creation). The tokens are the Trainer's own count
    (``include_num_input_tokens_seen="non_padding"``: padding left out, summed over the
    processes of a launch) before and after each step; the Trainer's own tokens per second would
    count warm-up and checkpoint saving too. At the end the timed seconds are the slowest
    process's (accelerate's ``gather_object``), so tokens/s is the whole launch's."""

    def __init__(self):
        self.steps: list[dict] = []
        self._start, self._seen, self._seconds = 0.0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self._start, self._seen = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.steps.append({"step": state.global_step,
                           "tokens": int(state.num_input_tokens_seen - self._seen),
                           "seconds": time.perf_counter() - self._start})

    def _timed(self) -> list:
        return self.steps[1:] if len(self.steps) > 1 else self.steps

    def on_train_end(self, args, state, control, **kwargs):
        self._seconds = max(gather_object([sum(s["seconds"] for s in self._timed())]))

    @property
    def tokens_per_second(self) -> float:
        timed = self._timed()
        seconds = self._seconds if self._seconds is not None else sum(s["seconds"] for s in timed)
        return sum(s["tokens"] for s in timed) / seconds if seconds > 0 else 0.0


class MemoryCallback(TrainerCallback):
    """Peak memory of the training: ``peak_gpu_bytes`` (``torch.cuda.max_memory_allocated`` at the
    end of each optimizer step; the peak counter is reset once, at the start of training, and not
    per step, so a ``helpers.footprint.track`` stage around the training still reads the
    training's peak; 0 on CPU) and ``peak_cpu_rss_bytes``. At the end of training,
    ``peak_gpu_bytes_every_process``: each process's peak, gathered by accelerate (the largest is
    what a card must hold; equal under DDP, near-equal shards under FSDP)."""

    def __init__(self):
        self.peak_gpu_bytes = self.peak_cpu_rss_bytes = 0
        self.peak_gpu_bytes_every_process = [0]

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            env.reset_gpu_peak()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated())
        self.peak_cpu_rss_bytes = max(self.peak_cpu_rss_bytes, int(cpu_rss()))

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_gpu_bytes_every_process = gather_object([self.peak_gpu_bytes])


class ProgressBar(ProgressCallback):
    """The Trainer's progress bar over the optimizer steps, showing the latest loss and learning
    rate instead of writing every step's log as a line: a widget in Jupyter
    (:func:`helpers.env.has_frontend`), text elsewhere (papermill, scripts), where it redraws at
    most every ``text_interval`` seconds."""

    def __init__(self, live: bool | None = None, text_interval: float = 10.0):
        super().__init__()
        self.live = env.has_frontend() if live is None else live
        self.text_interval = text_interval

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        if not state.is_world_process_zero:
            return
        bar = tqdm_notebook if self.live else tqdm
        self.training_bar = bar(total=state.max_steps, initial=state.global_step, unit="step",
                                desc="training", dynamic_ncols=True,
                                mininterval=0.1 if self.live else self.text_interval)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if self.training_bar is not None and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}",
                                          lr=f"{logs.get('learning_rate', 0):.2g}", refresh=False)


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
        self.live = env.has_frontend() if live is None else live
        # headless in a kernel (papermill): no redraws while training, the finished curve shown
        self.final = self.live or (live is None and _in_kernel())
        self.min_interval = min_interval
        self._handle = None
        self._drawn = 0.0
        self._saved = False

    def figure(self):
        return plots.loss_curve(self.history, eval_points=self.eval_points)

    def save(self):
        if not self.history:
            return None
        self._saved = True
        return plots.save(self.figure(), self.path)

    def add_eval(self, step: int, loss: float, label: str) -> None:
        """A held-out loss on the curve ("eval before" at step 0, "eval after" at the last step):
        redrawn, and the file written again if training wrote it."""
        self.eval_points.append((step, loss, label))
        self._redraw(force=True)
        if self._saved:
            self.save()

    def _redraw(self, force: bool = False):
        now = time.perf_counter()
        waiting = not force and now - self._drawn < self.min_interval
        if not (self.live or (force and self.final)) or not self.history or waiting:
            return
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


def _in_kernel() -> bool:
    """Inside an IPython kernel (a notebook, live or run by papermill), not a plain process."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return hasattr(get_ipython(), "kernel")


def _finite(x) -> bool:
    return x is None or math.isfinite(x)


class TrainingGuard(TrainerCallback):
    """Stops training cleanly on a NaN/inf loss, a non-finite gradient norm, or a loss of exactly
    zero, and explains the likely cause in ``problem`` (``kind``: "nan"/"zero").

    It acts on each step's log, before that step's checkpoint would be written, and cancels the
    checkpoint, so no broken weights are saved. Under fp16 the gradient scaler skips steps whose
    gradients overflow - normal while it finds its scale - so a non-finite gradient norm with a
    finite loss stops the run only after ``fp16_patience`` such steps in a row. When training
    ends it raises :class:`TrainingStopped` with the explanation (so ``trainer.train()`` does):
    put it last in ``callbacks``, after those that save the curve and read the figures.

    The explanation names a batch without label tokens, whose mean loss is 0/0; neither the
    Trainer nor its logs say how many label tokens a step had, so a forward pre-hook on the model
    adds them up during training, on the device (read back only when something went wrong, so no
    step waits for it). ``dataset_loss_tokens``: the train set's, for the zero-loss explanation.
    """

    def __init__(self, dataset_loss_tokens: int | None = None, fp16_patience: int = 8):
        self.fp16_patience = fp16_patience
        self.dataset_loss_tokens = dataset_loss_tokens
        self.problem: str | None = None
        self.kind = ""
        self.step = 0
        self._bad_grad_steps = 0
        self._last_good: dict | None = None
        self._hook = None
        self._step_tokens = self._labels_seen = 0

    def _count_labels(self, _module, _args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None:
            self._labels_seen = self._labels_seen + (labels[..., 1:] != IGNORE_INDEX).sum()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count_labels, with_kwargs=True)

    def on_step_end(self, args, state, control, **kwargs):
        self._step_tokens, self._labels_seen = self._labels_seen, 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = _log_entry(state, logs or {})
        if entry is None or self.problem:
            return
        loss, grad = entry["loss"], entry.get("grad_norm")
        if _finite(loss) and _finite(grad) and loss != 0.0:
            self._bad_grad_steps, self._last_good = 0, {"step": state.global_step, "loss": loss}
            return
        if _finite(loss) and not _finite(grad):  # under fp16 the scaler skips a few such steps
            self._bad_grad_steps += 1
            if args.fp16 and self._bad_grad_steps < self.fp16_patience:
                return
        self.kind = "zero" if _finite(loss) and _finite(grad) else "nan"
        self.step = state.global_step
        step_tokens = int(self._step_tokens) if self._hook is not None else None
        self.problem = (explain_nan(args, state.global_step, loss, grad, self._last_good,
                                    step_tokens, self._bad_grad_steps)
                        if self.kind == "nan" else
                        explain_zero(args, state.global_step, step_tokens,
                                     self.dataset_loss_tokens))
        control.should_training_stop = True
        control.should_save = False  # keep the last good checkpoint the latest one
        print(self.problem)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.problem:
            raise TrainingStopped(self.problem, self.kind, self.step)


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
        cap = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None
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
    return "\n".join(lines + ["Likely causes, most likely first:"] + [f"  - {c}" for c in causes]
                     + ["The checkpoints before this step are intact; after changing the setting, "
                        "start again with RESUME = False (or resume from the last checkpoint with "
                        "a lower LEARNING_RATE only if the loss was healthy there)."])


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
    return "\n".join(lines + ["Likely causes:"] + [f"  - {c}" for c in causes])

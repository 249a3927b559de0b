"""Matplotlib figures for the series (memory bars, length histograms, loss curves).

Every function returns a ``matplotlib.figure.Figure`` and draws nothing global, so a notebook can
show it and a run can save it as PNG in RUN_DIR. Inside IPython (Jupyter, Colab, papermill) a
figure displays as a PNG image wherever it is a cell's value or passed to ``display``, whatever
the matplotlib backend (:func:`display_figures_as_images`, done on import).
"""

from __future__ import annotations

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "ipympl")):
    matplotlib.use("Agg")  # headless (papermill, CI); notebooks keep their inline backend

from pathlib import Path  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def describe(fig) -> str:
    """A figure in words: its titles (what a text-only view shows instead of the image)."""
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) else ""
    text = "; ".join(t.replace("\n", " ") for t in [suptitle, *titles] if t)
    return f"[figure: {text}]" if text else "[figure]"


def display_figures_as_images(shell=None) -> bool:
    """Make IPython show every matplotlib ``Figure`` as a PNG (and in words as its text form).

    A bare ``Figure`` shows as the text ``<Figure size ...>`` until pyplot's inline backend is
    active, and the series never uses pyplot: this registers the same kind of formatter the inline
    backend would, for JupyterLab, classic Notebook, Colab and papermill alike. False outside
    IPython (a plain process), where figures are saved, not shown.
    """
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return False
    formatters = shell.display_formatter.formatters
    formatters["image/png"].for_type(Figure, _png)
    formatters["text/plain"].for_type(Figure, lambda fig, printer, cycle:
                                      printer.text(describe(fig)))
    return True


display_figures_as_images()


def save(fig, path) -> Path:
    """Save a figure as PNG (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def length_histogram(lengths, max_length: int, title: str = "Tokens per example"):
    """Histogram of example lengths in tokens, with MAX_LENGTH marked and the overlong counted.

    Bars past MAX_LENGTH (examples that will be truncated) are drawn in another colour.
    Introduced in notebook 04 (dataset preparation).
    """
    import numpy as np

    a = np.asarray(list(lengths), dtype=np.int64)
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    if a.size == 0:
        ax.text(0.5, 0.5, "no examples", ha="center", va="center", transform=ax.transAxes)
        return fig
    top = max(int(a.max()), max_length) + 1
    step = max(1, int(np.ceil(top / 60)))
    bins = np.arange(0, top + step, step)
    over = a > max_length
    ax.hist(a[~over], bins=bins, color="#4c72b0", label="fits")
    if over.any():
        ax.hist(a[over], bins=bins, color="#dd8452", label="truncated")
    ax.axvline(max_length, color="#c44e52", linestyle="--", linewidth=1.2,
               label=f"MAX_LENGTH = {max_length}")
    p95 = float(np.percentile(a, 95))
    ax.set_title(f"{title}: n={a.size:,}, median {np.median(a):.0f}, p95 {p95:.0f}, "
                 f"max {a.max()}; {int(over.sum()):,} over MAX_LENGTH", fontsize=10)
    ax.set_xlabel("tokens (EOS included, before truncation)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ memory (notebooks 01, 02)

# How the estimator's items are grouped into the bars' segments: (label, item keys, colour).
MEMORY_SEGMENTS = (
    ("4-bit weights + constants", ("weights_4bit", "quant_constants"), "#4c72b0"),
    ("16-bit layers (embeddings, head, norms)", ("embeddings", "lm_head", "norms_biases"),
     "#55a868"),
    ("LoRA, gradients, optimizer", ("lora_params", "lora_grads", "optimizer", "optimizer_paged"),
     "#8172b2"),
    ("cuBLAS workspaces", ("cublas_workspace",), "#64b5cd"),
    ("saved activations", ("activations",), "#dd8452"),
    ("logits, head copy", ("logits", "head_copy"), "#c44e52"),
    ("one block in backward, dequantization", ("block_recompute", "dequant_temp"), "#937860"),
    ("CUDA context + allocator slack", ("cuda_context", "allocator_slack"), "#b0b0b0"),
)


def memory_bars(estimates: dict, budget_bytes: float | None = None,
                title: str = "Predicted GPU memory of a training step"):
    """One stacked bar per estimate (label -> :class:`helpers.estimator.Estimate`), in GB
    (1 GB = 1e9 bytes), with the card's memory as a dashed line when ``budget_bytes`` is given.

    Segments group the estimate's items as held at the predicted peak (see MEMORY_SEGMENTS).
    Introduced in notebook 01 (will it fit?).
    """
    labels = list(estimates)
    fig = Figure(figsize=(max(5.5, 1.4 * len(labels) + 4.5), 3.8))
    ax = fig.add_subplot()
    bottoms = [0.0] * len(labels)
    for seg_label, keys, colour in MEMORY_SEGMENTS:
        heights = [sum(estimates[k].breakdown().get(key, 0) for key in keys) / 1e9
                   for k in labels]
        if not any(heights):
            continue
        ax.bar(labels, heights, bottom=bottoms, color=colour, label=seg_label, width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, k in enumerate(labels):
        ax.text(i, bottoms[i], f"{estimates[k].total_device / 1e9:.1f} GB", ha="center",
                va="bottom", fontsize=9)
    top = max(bottoms) if bottoms else 1.0
    if budget_bytes:
        ax.axhline(budget_bytes / 1e9, color="#c44e52", linestyle="--", linewidth=1.3,
                   label=f"GPU memory {budget_bytes / 1e9:.0f} GB")
        top = max(top, budget_bytes / 1e9)
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel("GB (1e9 bytes)")
    import textwrap

    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def footprint_bars(rows: list, title: str = "What the loaded model weighs, part by part"):
    """Horizontal bars of :func:`helpers.footprint.footprint_breakdown` rows; hatched bars are the
    quantization constants that ``get_memory_footprint()`` leaves out. Introduced in notebook 02.
    """
    from helpers.units import fmt_bytes

    rows = list(rows)
    fig = Figure(figsize=(7.5, 0.38 * len(rows) + 1.2))
    ax = fig.add_subplot()
    names = [r["part"] for r in rows][::-1]
    sizes = [r["bytes"] for r in rows][::-1]
    counted = [r["in_footprint"] for r in rows][::-1]
    unit, scale = ("GB", 1e9) if max(sizes, default=0) >= 1e9 else ("MB", 1e6)
    bars = ax.barh(names, [s / scale for s in sizes],
                   color=["#4c72b0" if c else "#dd8452" for c in counted])
    for bar, c in zip(bars, counted):
        if not c:
            bar.set_hatch("//")
    for y, s in enumerate(sizes):
        ax.text(s / scale, y, " " + fmt_bytes(s), va="center", fontsize=8)
    ax.set_xlim(0, max(sizes, default=1) / scale * 1.25 or 1)
    ax.set_xlabel(f"{unit} (1 {unit} = {scale:.0e} bytes)")
    total = sum(s for s, c in zip(sizes, counted) if c)
    ax.set_title(f"{title}\nget_memory_footprint = {fmt_bytes(total)}; hatched: not counted "
                 "by it", fontsize=9)
    fig.tight_layout()
    return fig


def loss_curve(history, eval_points=None, title: str = "Training"):
    """Loss per optimizer step (with a moving average), and below it the learning rate and the
    gradient norm, from the logged steps of :class:`helpers.callbacks.LossCurveCallback`.

    ``history``: dicts with ``step``, ``loss`` and, where logged, ``learning_rate`` and
    ``grad_norm``. ``eval_points``: ``(step, loss, label)`` markers, e.g. the held-out loss
    before and after training. Non-finite losses are drawn as red marks at the top of the axis.
    Introduced in notebook 05 (redrawn live while it trains).
    """
    import math

    import pandas as pd

    fig = Figure(figsize=(7.5, 4.8))
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    rows = [h for h in history if "loss" in h]
    if not rows:
        ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=ax.transAxes)
        return fig
    steps = [h["step"] for h in rows]
    finite = [(s, h["loss"]) for s, h in zip(steps, rows) if math.isfinite(h["loss"])]
    if finite:
        xs, ys = zip(*finite)
        ax.plot(xs, ys, color="#4c72b0", alpha=0.45, linewidth=1, label="train loss (step)")
        k = max(1, len(ys) // 10)
        if k > 1:
            smooth = pd.Series(ys).rolling(k, min_periods=1).mean()
            ax.plot(xs, smooth, color="#4c72b0", linewidth=2, label=f"moving mean of {k}")
    bad = [s for s, h in zip(steps, rows) if not math.isfinite(h["loss"])]
    if bad:
        top = max((y for _, y in finite), default=1.0)
        ax.scatter(bad, [top] * len(bad), color="#c44e52", marker="x", zorder=3,
                   label="NaN / inf loss")
    for step, loss, label in eval_points or []:
        if loss is not None and math.isfinite(loss):
            ax.scatter([step], [loss], s=45, zorder=4, label=f"{label}: {loss:.3f}")
    last = finite[-1][1] if finite else float("nan")
    ax.set_title(f"{title}: step {steps[-1]}, loss {last:.4f}", fontsize=10)
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)

    lr = [(h["step"], h["learning_rate"]) for h in rows if h.get("learning_rate") is not None]
    if lr:
        ax_lr.plot(*zip(*lr), color="#55a868", label="learning rate")
    ax_lr.set_ylabel("learning rate", color="#55a868")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.set_xlabel("optimizer step")
    from matplotlib.ticker import MaxNLocator

    ax_lr.xaxis.set_major_locator(MaxNLocator(integer=True))
    grad = [(h["step"], h["grad_norm"]) for h in rows
            if h.get("grad_norm") is not None and math.isfinite(h["grad_norm"])]
    if grad:
        ax_g = ax_lr.twinx()
        ax_g.plot(*zip(*grad), color="#dd8452", linewidth=1, label="gradient norm")
        ax_g.set_ylabel("gradient norm", color="#dd8452")
    fig.tight_layout()
    return fig

"""Matplotlib figures for the series (memory bars, length histograms, loss curves).

Every function returns a ``matplotlib.figure.Figure`` and draws nothing global, so a notebook can
show it and a run can save it as PNG in RUN_DIR.
"""

from __future__ import annotations

import matplotlib

if not matplotlib.get_backend().lower().startswith(("module://", "inline", "nbagg", "ipympl")):
    matplotlib.use("Agg")  # headless (papermill, CI); notebooks keep their inline backend

from pathlib import Path  # noqa: E402


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
    from matplotlib.figure import Figure

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

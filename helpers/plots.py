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

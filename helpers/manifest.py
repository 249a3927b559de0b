"""The run manifest, ``RUN_DIR/manifest.json``: what ran, on what, with which parameters, and
each notebook's key figures (a flat name -> number mapping per notebook).

Notebooks call :func:`record`; ``python -m helpers.run`` adds status and seconds; tests and
``--compare`` read it back. Introduced in notebook 01.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

FILE = "manifest.json"


def path(run_dir) -> Path:
    return Path(run_dir) / FILE


def load(run_dir_or_file) -> dict:
    """The manifest of a run directory (or a manifest file); an empty one if none exists yet."""
    p = Path(run_dir_or_file)
    if p.is_dir():
        p = p / FILE
    if not p.exists():
        return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "notebooks": {}}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not a valid manifest ({err}); delete it or choose another run") from None


def save(run_dir, data: dict) -> Path:
    """Write atomically (a crash never leaves half a manifest)."""
    p = path(run_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=1, sort_keys=False) + "\n")
    tmp.replace(p)
    return p


def update(run_dir, fn) -> dict:
    data = load(run_dir)
    fn(data)
    save(run_dir, data)
    return data


def _entry(data: dict, notebook: str) -> dict:
    return data.setdefault("notebooks", {}).setdefault(notebook, {"metrics": {}})


def record_parameters(run_dir, parameters: dict) -> None:
    """Merge ``parameters`` into the run's ``parameters`` (what ``python -m helpers.train
    RUN_DIR`` trains with)."""
    update(run_dir, lambda data: data.setdefault("parameters", {}).update(parameters))


def begin_notebook(run_dir, notebook: str, parameters: dict) -> None:
    """Record that a notebook started, with its parameters (no secrets are ever parameters)."""

    def fn(data):
        # a fresh entry: figures, status and errors of an earlier run of this notebook go
        data.setdefault("notebooks", {})[notebook] = {
            "metrics": {}, "parameters": parameters,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        data.setdefault("parameters", {}).update(parameters)

    update(run_dir, fn)
    _CURRENT["run_dir"], _CURRENT["notebook"] = str(run_dir), notebook


_CURRENT: dict = {}


def record(metrics: dict, *, run_dir=None, notebook=None) -> dict:
    """Add figures (numbers; bools become 0/1) to the current notebook's entry and return them."""
    run_dir = run_dir or _CURRENT.get("run_dir")
    notebook = notebook or _CURRENT.get("notebook")
    if not run_dir or not notebook:
        raise RuntimeError("call helpers.config.start(...) before recording figures")
    for k, v in metrics.items():
        if not isinstance(v, (int, float)):  # bool is an int
            raise TypeError(f"manifest figure {k!r} must be a number, got {type(v).__name__}")
    clean = {k: int(v) if isinstance(v, bool) else v for k, v in metrics.items()}
    update(run_dir, lambda data: _entry(data, notebook)["metrics"].update(clean))
    return Figures(clean)


class Figures(dict):
    """Recorded figures; a notebook shows them as a table with readable units (bytes in GB/MB,
    fractions to four significant digits), the values themselves unchanged."""

    @staticmethod
    def readable(name: str, value) -> str:
        from helpers.units import fmt_bytes

        if "bytes" in name and isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{fmt_bytes(value)} ({value:,})" if abs(value) >= 1e3 else f"{value} B"
        if isinstance(value, float):
            return f"{value:,.4g}" if math.isfinite(value) else str(value)
        return f"{value:,}" if isinstance(value, int) else str(value)

    def _rows(self):
        return [(name, self.readable(name, value)) for name, value in self.items()]

    def _repr_pretty_(self, printer, cycle) -> None:
        width = max((len(k) for k in self), default=0)
        printer.text(f"recorded in the manifest ({len(self)} figures):\n" + "\n".join(
            f"  {name:<{width}}  {text}" for name, text in self._rows()))

    def _repr_html_(self) -> str:
        from html import escape

        body = "".join(f"<tr><td><code>{escape(n)}</code></td><td>{escape(t)}</td></tr>"
                       for n, t in self._rows())
        return (f"recorded in the manifest ({len(self)} figures)<table><thead><tr><th>figure"
                f"</th><th>value</th></tr></thead><tbody>{body}</tbody></table>")


def record_info(section: str, info: dict, *, run_dir=None) -> None:
    """Add descriptive, non-numeric facts (versions, machine) under a top-level section."""
    run_dir = run_dir or _CURRENT.get("run_dir")
    update(run_dir, lambda data: data.setdefault(section, {}).update(info))


def set_status(run_dir, notebook: str, status: str, seconds: float, **extra) -> None:
    """A notebook's status ("ok", "failed") and seconds, as ``python -m helpers.run`` saw them."""
    update(run_dir, lambda data: _entry(data, notebook).update(
        status=status, seconds=round(seconds, 2), **extra))


def _clean(obj):
    """JSON-safe: NaN/inf become strings so the file stays valid JSON."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj

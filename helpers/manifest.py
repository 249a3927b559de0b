"""The run manifest, ``RUN_DIR/manifest.json``: what ran, on what, with which parameters, and
each notebook's key figures (a flat name -> number mapping per notebook).

Notebooks call :func:`record`; ``python -m helpers.run`` adds status and seconds; tests and
``--compare`` read it back. Introduced in notebook 01.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from pathlib import Path
from helpers import env

from helpers import rundir

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
    """Write atomically (a kill never leaves half a manifest: :func:`helpers.rundir.write_text`),
    with no path of this machine in it (:func:`_machine_paths`)."""
    text = json.dumps(_clean(data, _machine_paths(run_dir)), indent=1) + "\n"
    return rundir.write_text(path(run_dir), text)


def update(run_dir, fn) -> dict:
    data = load(run_dir)
    fn(data)
    save(run_dir, data)
    return data


def _entry(data: dict, notebook: str) -> dict:
    return data.setdefault("notebooks", {}).setdefault(notebook, {"metrics": {}})


def record_parameters(run_dir, parameters: dict) -> None:
    """Merge ``parameters`` into the run's ``parameters`` (what ``python -m helpers.train
    RUN_DIR`` trains with), local paths relative to RUN_DIR (:func:`portable`)."""
    portable_ones = portable(parameters, run_dir)
    update(run_dir, lambda data: data.setdefault("parameters", {}).update(portable_ones))


# Parameters that may name a local file or folder, which python -m helpers.train reads back
LOCAL_PARAMETERS = ("MODEL", "DATASET")


def _names_local(value: str) -> bool:
    """Whether a MODEL or DATASET value is a local file or folder (not "embedded", a rehearsal
    or a Hub id)."""
    if value in ("", "embedded") or value.startswith("rehearsal:"):
        return False
    path = Path(value).expanduser()
    return value.startswith(("~", "./", "../")) or path.is_absolute() or path.exists()


def portable(parameters: dict, run_dir) -> dict:
    """``parameters`` as the manifest keeps them, with no path of this machine: RUN_DIR as "."
    (the folder the manifest is in), a local MODEL or DATASET relative to RUN_DIR
    ("./quotes.jsonl" inside it, "../data/quotes.jsonl" beside it), so the run directory can be
    moved with its data and still be trained from (:func:`resolve` reads them back); "embedded",
    rehearsals and Hub ids as they are. A relative path is taken from the current directory, as
    the notebook or command that was given it does."""
    out = dict(parameters)
    if "RUN_DIR" in out:
        out["RUN_DIR"] = "."
    base = Path(run_dir).expanduser().resolve()
    for name in LOCAL_PARAMETERS:
        value = out.get(name)
        if isinstance(value, str) and _names_local(value.strip()):
            target = Path(value.strip()).expanduser().resolve()
            try:
                rel = Path(os.path.relpath(target, base)).as_posix()
            except ValueError:  # another drive (Windows): no relative form; its name
                out[name] = target.name
                continue
            out[name] = rel if rel == ".." or rel.startswith("../") else f"./{rel}"
    return out


def resolve(parameters: dict, run_dir) -> dict:
    """The recorded ``parameters`` with a local MODEL or DATASET that :func:`portable` recorded
    relative to RUN_DIR ("./x", "../x") made a path again, from where ``run_dir`` is now; one
    that is not there is refused, saying where it was looked for."""
    out = dict(parameters)
    for name in LOCAL_PARAMETERS:
        value = out.get(name)
        if not (isinstance(value, str) and value.startswith(("./", "../"))):
            continue
        found = (Path(run_dir).expanduser() / value).resolve()
        if not found.exists():
            raise ValueError(
                f"{name}={value!r} in {path(run_dir)} is relative to the run directory, and "
                f"{found} does not exist: the run directory was moved without it. Put it there, "
                f"or set parameters.{name} in the manifest to where it is now")
        out[name] = str(found)
    return out


_CURRENT: dict = {}


def begin_notebook(run_dir, notebook: str, parameters: dict, budgets: dict | None = None) -> None:
    """Record that a notebook started, with its parameters (no secrets are ever parameters;
    local paths relative to RUN_DIR: :func:`portable`) and its memory ``budgets`` (bytes); start
    measuring its peaks (:func:`record_peaks`)."""
    parameters = portable(parameters, run_dir)

    def fn(data):
        # a fresh entry: figures, status and errors of an earlier run of this notebook go
        data.setdefault("notebooks", {})[notebook] = {
            "metrics": {}, "parameters": parameters, "budgets": budgets or {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        data.setdefault("parameters", {}).update(parameters)

    update(run_dir, fn)
    _CURRENT.update(run_dir=str(run_dir), notebook=notebook, budgets=budgets or {}, recorded={},
                    warned=set())
    env.gpu_peak_allocated(restart=True)
    env.peak_host_rss(restart=True)
    # 0: this platform cannot restart the host mark, so the figure is the kernel's lifetime peak
    record({"peak_host_rss_from_notebook_start": env.host_peak_is_scoped()},
           run_dir=run_dir, notebook=notebook)
    _after_every_cell()


def record_peaks() -> dict:
    """The current notebook's peaks so far, recorded: ``peak_gpu_allocated_bytes``
    (``torch.cuda.max_memory_allocated`` since the notebook's start) and ``peak_host_rss_bytes``
    (the kernel's resident-memory high-water mark); a peak over its budget is said once. In a
    notebook this runs after every cell, so the figures are there even when a cell fails."""
    if not _CURRENT.get("notebook"):
        return {}
    peaks = {"peak_gpu_allocated_bytes": env.gpu_peak_allocated(),
             "peak_host_rss_bytes": env.peak_host_rss()}
    if peaks != _CURRENT["recorded"]:
        record(peaks)
        _CURRENT["recorded"] = peaks
    for name, key in (("GPU", "gpu_bytes"), ("host RAM", "host_bytes")):
        limit = _CURRENT["budgets"].get(key)
        peak = peaks["peak_gpu_allocated_bytes" if key == "gpu_bytes" else "peak_host_rss_bytes"]
        if limit and peak > limit and key not in _CURRENT["warned"]:
            _CURRENT["warned"].add(key)
            print(f"warning: this notebook's {name} peak {peak / 1e9:.2f} GB is over its "
                  f"{limit / 1e9:.2f} GB budget")
    return peaks


def _post_cell(*_) -> None:
    if Path(_CURRENT.get("run_dir", "")).is_dir():  # a run directory deleted since is left alone
        record_peaks()


def _after_every_cell() -> None:
    """Have :func:`record_peaks` run after every cell of the IPython kernel this runs in (once per
    kernel); elsewhere (a script) call it when the figures are wanted."""
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        return
    if shell is not None and _post_cell not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _post_cell)


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
    """A notebook's status ("ok", "failed") and seconds, as ``python -m helpers.run`` saw them;
    the run is no longer marked as running it (:func:`mark_running`)."""

    def fn(data):
        _entry(data, notebook).update(status=status, seconds=round(seconds, 2), **extra)
        data.pop(RUNNING, None)

    update(run_dir, fn)


RUNNING = "running"  # the manifest's mark of the notebook a run is executing now


def mark_running(run_dir, notebook: str) -> None:
    """Mark ``notebook`` as being executed by this process (``python -m helpers.run`` does, before
    each notebook; :func:`set_status` clears it): a mark whose process is gone shows a run that
    was killed in that notebook (:func:`interrupted`)."""
    update(run_dir, lambda data: data.__setitem__(RUNNING, {
        "notebook": notebook, "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def interrupted(run_dir) -> dict | None:
    """The running mark (:func:`mark_running`) of ``run_dir``'s manifest with ``alive``: whether
    its process still runs ``python -m helpers.run`` on this machine (a run going on now) or not
    (the run was killed in that notebook); None without a mark."""
    try:
        mark = load(run_dir).get(RUNNING) if path(run_dir).is_file() else None
    except ValueError:
        return None
    if not isinstance(mark, dict):
        return None
    return {**mark, "alive": mark.get("host") == socket.gethostname()
            and _runs_the_series(mark.get("pid"))}


def _runs_the_series(pid) -> bool:
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():  # no /proc (macOS): a live process of that id is taken as the run
        return True
    return b"helpers.run" in cmdline.read_bytes()


def interruption_note(mark: dict) -> str:
    """A line saying that the run of ``mark`` (:func:`interrupted`) was killed, and where."""
    return (f"the earlier run in this RUN_DIR was interrupted in {mark.get('notebook')} (started "
            f"{mark.get('started')}, never finished)")


def close_interrupted(run_dir, mark: dict) -> None:
    """Record the notebook a killed run left unfinished as ``interrupted`` and clear the mark."""

    def fn(data):
        _entry(data, mark.get("notebook", "?")).update(status="interrupted")
        data.pop(RUNNING, None)

    update(run_dir, fn)


def _machine_paths(run_dir) -> list:
    """``(pattern, shown as)`` for the paths of this machine a manifest must not hold, longest
    first: the run directory (``RUN_DIR``) and the home directory (``~``), each only as a whole
    path or the start of one."""
    places = {}
    for p in (Path(run_dir).expanduser().absolute(), Path(run_dir).expanduser().resolve()):
        places[str(p)] = "RUN_DIR"
    home = str(Path.home())
    if len(Path(home).parts) > 1:  # a home of "/" would match every path
        places.setdefault(home, "~")
        places.setdefault(str(Path(home).resolve()), "~")
    return [(re.compile(re.escape(p) + r"(?![\w-]|\.\w)"), shown)
            for p, shown in sorted(places.items(), key=lambda kv: -len(kv[0]))]


def _clean(obj, places=()):
    """JSON-safe: NaN/inf become strings so the file stays valid JSON; in text, the paths of
    ``places`` (:func:`_machine_paths`: a command line, an error message) are replaced."""
    if isinstance(obj, dict):
        return {str(k): _clean(v, places) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, places) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, str):
        for pattern, shown in places:
            obj = pattern.sub(shown, obj)
    return obj

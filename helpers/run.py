"""The main job: execute the notebook series with papermill into a run directory.

    python -m helpers.run                       # the whole series on the embedded default
    python -m helpers.run -p MAX_STEPS 200 -p MODEL EleutherAI/gpt-j-6b
    python -m helpers.run --only 01,05 --run-dir runs/try
    python -m helpers.run --compare runs/baseline/manifest.json   # regression run

Each notebook is executed in a fresh kernel; the executed copies, figures, dataset, checkpoints,
adapter and ``manifest.json`` land in the run directory. On a failure the job stops, names the
notebook and the cell, keeps the executed copy and exits non-zero.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from helpers import NOTEBOOKS, __version__, manifest
from helpers.config import (PARAMETERS, TRAINING_NOTEBOOK, ConfigError, check_run_dir, coerce,
                            default_run_dir, make_config)

REPO_NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class RunError(Exception):
    """A problem with the command line or the run directory; the message says what to do."""


def notebook_dir() -> Path:
    """Where the numbered notebooks are (the repository's notebooks/, or QLORA_NOTEBOOKS)."""
    return Path(os.environ.get("QLORA_NOTEBOOKS", REPO_NOTEBOOKS))


def available() -> list[str]:
    found = sorted(p.stem for p in notebook_dir().glob("[0-9][0-9]_*.ipynb"))
    return [s for s in found if s in NOTEBOOKS] + [s for s in found if s not in NOTEBOOKS]


def select(only: str | None) -> list[str]:
    """Notebook stems to run, from ``--only 01,05`` (numbers or full names)."""
    have = available()
    if not have:
        raise RunError(f"no notebooks found in {notebook_dir()}")
    if not only:
        return have
    chosen = []
    for item in (x.strip() for x in only.split(",") if x.strip()):
        match = [s for s in have if s == item or s.split("_")[0] == item.zfill(2)]
        if not match:
            raise RunError(f"no notebook {item!r}; available: {', '.join(have)}")
        chosen += [m for m in match if m not in chosen]
    return sorted(chosen, key=have.index)


def parse_parameters(pairs: list[list[str]]) -> dict:
    """``-p NAME VALUE`` pairs -> typed values; unknown names are refused with the valid list,
    and every value is checked as the notebooks will check it (:func:`helpers.config.check`:
    types, ranges, choices, rules between parameters), so no notebook starts with a bad one."""
    out = {}
    for name, value in pairs:
        if name not in PARAMETERS:
            close = [p for p in PARAMETERS if p.startswith(name[:3].upper())]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise RunError(f"unknown parameter {name!r}{hint}; valid names: "
                           + ", ".join(PARAMETERS))
        if name == "RUN_DIR":
            raise RunError("give the run directory with --run-dir, not -p RUN_DIR")
        try:
            out[name] = coerce(name, value, PARAMETERS[name])
        except ConfigError as err:
            raise RunError(str(err)) from None
    try:
        make_config(**out)
    except ConfigError as err:
        raise RunError(str(err)) from None
    return out


def prepare_run_dir(run_dir: str | None, parameters: dict | None = None,
                    stems: list | None = None) -> tuple:
    """``(path, notes)``: the run directory, created, after checking what an earlier run left
    there (:func:`helpers.config.check_run_dir`: an earlier training's checkpoints, adapter and
    merged model are resumed with RESUME, moved aside with the whole earlier run by START_OVER,
    or refused; a run killed in a notebook is noted)."""
    path = Path(run_dir or default_run_dir()).resolve()
    notes = []
    if path.is_dir():
        cfg = make_config(**(parameters or {}), RUN_DIR=str(path))
        try:
            notes = check_run_dir(cfg, training=TRAINING_NOTEBOOK in (stems or []), whole=True)
        except ConfigError as err:
            raise RunError(str(err)) from None
        except OSError as err:
            raise RunError(f"cannot use the run directory {path} ({err}); choose another with "
                           "--run-dir") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"cannot write to the run directory {path} ({err.strerror or err}); "
                       "choose another with --run-dir") from None
    return path, notes


# Lines a kernel writes to the terminal that ask nothing of the person running the series: the
# kernel's notice that its local connection is not encrypted (its sockets listen on 127.0.0.1),
# and its log line when the client interrupts it while shutting it down after the last cell (a
# run stopped by the person ends with papermill's own error, which still shows).
KERNEL_NOISE = (b"Kernel is running over TCP without encryption",
                b"[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel")


def _forward_kernel_stderr(fd: int, noise=KERNEL_NOISE) -> None:
    """Copy the kernel's stderr to ours line by line, leaving out the lines in ``noise``."""
    with os.fdopen(fd, "rb") as lines:
        for line in lines:
            if not any(n in line for n in noise):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()


def quiet_kernel_manager():
    """jupyter_client's kernel manager, with the kernel's stderr passed through
    :func:`_forward_kernel_stderr` (everything else it writes still reaches the terminal)."""
    import threading

    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            read, write = os.pipe()
            try:
                await super()._async_launch_kernel(kernel_cmd, **{**kw, "stderr": write})
            except BaseException:
                os.close(read)
                raise
            finally:
                os.close(write)  # the kernel holds its own copy
            threading.Thread(target=_forward_kernel_stderr, args=(read,), daemon=True).start()

    return QuietKernelManager


def execute(stem: str, run_dir: Path, parameters: dict) -> None:
    """Run one notebook with papermill into the run directory (raises on a failing cell)."""
    import papermill

    src = notebook_dir() / f"{stem}.ipynb"
    papermill.execute_notebook(
        str(src), str(run_dir / f"{stem}.ipynb"),
        parameters={**parameters, "RUN_DIR": str(run_dir)},
        kernel_name="python3", progress_bar=False, log_output=False,
        cwd=str(run_dir), report_mode=False, kernel_manager_class=quiet_kernel_manager(),
    )


def run(stems: list[str], run_dir: Path, parameters: dict, echo=print) -> bool:
    """Execute the notebooks in order; record status and seconds; stop at the first failure."""
    from helpers import env

    os.environ["QLORA_SERIES_STATIC"] = "1"  # widgets render their static twins
    os.environ["QLORA_RUNNER_PID"] = str(os.getpid())  # the notebooks' running mark is this run's
    logging.getLogger("papermill").setLevel(logging.ERROR)
    # a local MODEL or DATASET relative to the run directory (the notebooks' current
    # directory), as the manifest records it; the command line with the run directory and the
    # home directory as RUN_DIR and ~ (manifest.save)
    recorded = manifest.portable({**PARAMETERS, **parameters}, run_dir)
    parameters = {name: recorded[name] for name in parameters}
    manifest.update(run_dir, lambda d: d.update(
        series_version=__version__, started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        command=" ".join(["python -m helpers.run"] + [shlex.quote(a) for a in sys.argv[1:]]),
        versions=env.versions(), machine=env.machine_info(), parameters=recorded,
    ))
    for i, stem in enumerate(stems, 1):
        echo(f"[{i}/{len(stems)}] {stem} ...", end=" ", flush=True)  # one line per notebook
        manifest.mark_running(run_dir, stem)  # cleared by set_status; left behind by a kill
        t0 = time.perf_counter()
        try:
            execute(stem, run_dir, parameters)
        except Exception as err:  # papermill's execution error, or kernel death
            secs = time.perf_counter() - t0
            ename = getattr(err, "ename", type(err).__name__)
            evalue = str(getattr(err, "evalue", err))
            manifest.set_status(run_dir, stem, "failed", secs, error=f"{ename}: {evalue[:500]}")
            echo(f"FAILED after {secs:.1f} s", flush=True)
            # the notebook and the cell that failed, with the error's last line
            cell = getattr(err, "exec_count", None) or getattr(err, "cell_index", None)
            last = evalue.strip().splitlines()
            echo(f"{stem} failed in {f'cell {cell}' if cell is not None else 'a cell'}: "
                 f"{ename}: {last[-1] if last else ''}\n"
                 f"  the executed copy is kept: {run_dir / (stem + '.ipynb')}")
            return False
        secs = time.perf_counter() - t0
        manifest.set_status(run_dir, stem, "ok", secs)
        echo(f"ok ({secs:.1f} s)", flush=True)
    manifest.update(run_dir, lambda d: d.update(finished=time.strftime("%Y-%m-%dT%H:%M:%S")))
    return True


# ----------------------------------------------------------------- regression comparison

# (pattern, direction, relative tolerance, absolute tolerance); first match wins.
# direction: "lower" (smaller is better), "higher", "equal" (must match), "ignore".
TOLERANCES = [
    ("*_free_bytes", "ignore", 0, 0),
    ("*available_bytes", "ignore", 0, 0),
    ("*ram_total_bytes", "ignore", 0, 0),
    ("cpu_cores", "ignore", 0, 0),
    ("*seconds*", "lower", 0.5, 5.0),
    ("*_s", "lower", 0.5, 5.0),
    ("*tokens_per_second*", "higher", 0.25, 0),
    ("*per_second*", "higher", 0.25, 0),
    ("*agreement*", "higher", 0.0, 0.01),
    ("*_ok", "higher", 0, 0),
    ("*accuracy*", "higher", 0.02, 0),
    ("*loss*", "lower", 0.05, 0.02),
    ("*perplexity*", "lower", 0.10, 0.1),
    ("*logit_diff*", "lower", 0.5, 1e-3),
    ("*error*", "lower", 0.10, 1e-3),
    ("*bytes*", "lower", 0.10, 1 << 20),
    ("*", "equal", 0.0, 1e-9),
]


def compare(current: dict, baseline: dict) -> list[dict]:
    """Every figure of the baseline manifest against the current one, with a verdict each."""
    rows = []
    cur_nbs = current.get("notebooks", {})
    for stem, entry in baseline.get("notebooks", {}).items():
        if stem not in cur_nbs:
            continue  # not run this time (--only)
        cur = cur_nbs[stem].get("metrics", {})
        for name, base in entry.get("metrics", {}).items():
            # the first pattern of TOLERANCES that matches (the last, "*", matches every name)
            direction, rel, abs_ = next(rule[1:] for rule in TOLERANCES
                                        if fnmatch.fnmatch(name, rule[0]))
            row = {"notebook": stem, "figure": name, "baseline": base, "current": cur.get(name),
                   "rule": direction, "verdict": "ok"}
            if direction == "ignore":
                row["verdict"] = "ignored"
            elif name not in cur:
                row["verdict"] = "REGRESSION (missing)"
            elif not all(isinstance(v, (int, float)) for v in (base, cur[name])):
                row["verdict"] = "ok" if base == cur[name] else "REGRESSION (changed)"
            else:
                value = cur[name]
                slack = max(abs(base) * rel, abs_)
                # how much worse than the baseline (negative: better); "equal" is never better
                worse_by = {"lower": value - base, "higher": base - value,
                            "equal": abs(value - base)}[direction]
                row["verdict"] = ("REGRESSION" if worse_by > slack
                                  else "better" if worse_by < -slack else "ok")
                row["tolerance"] = slack
            rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> str:
    """The rows of :func:`compare` as a text table, with a closing count of regressions."""
    import pandas as pd

    def fmt(v):  # byte counts stay whole numbers, measured floats get 6 digits
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    columns = ["notebook", "figure", "baseline", "current", "verdict"]
    table = pd.DataFrame(rows, columns=columns, dtype=object)
    bad = [r for r in rows if r["verdict"].startswith("REGRESSION")]
    return (table.to_string(index=False, formatters={"baseline": fmt, "current": fmt}) + "\n"
            f"{len(rows)} figures compared, {len(bad)} regression(s)"
            + (": " + ", ".join(f"{r['notebook']}:{r['figure']}" for r in bad) if bad else ""))


def load_baseline(path: str) -> dict:
    """The baseline manifest (a file, or a run directory holding one) for ``--compare``."""
    p = Path(path)
    if not (manifest.path(p) if p.is_dir() else p).exists():
        raise RunError(f"baseline manifest {p} does not exist")
    try:
        return manifest.load(p)
    except ValueError as err:
        raise RunError(f"baseline {err}") from None


# ------------------------------------------------------------------------------ command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m helpers.run",
        description="Execute the QLoRA notebook series with papermill into a run directory.")
    ap.add_argument("--run-dir", help="where results go (default runs/<timestamp>)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                    metavar=("NAME", "VALUE"), help="a notebook parameter (repeatable)")
    ap.add_argument("--only", help="a subset of notebooks, e.g. 01,05")
    ap.add_argument("--compare", metavar="BASELINE_MANIFEST",
                    help="after the run, compare every figure with a baseline manifest")
    ap.add_argument("--list", action="store_true", help="list notebooks and parameters, then exit")
    args = ap.parse_args(argv)
    try:
        if args.list:
            print("notebooks:", ", ".join(available()))
            print("parameters:", ", ".join(f"{k}={v!r}" for k, v in PARAMETERS.items()))
            return 0
        stems = select(args.only)
        parameters = parse_parameters(args.parameter)
        baseline = load_baseline(args.compare) if args.compare else None
        run_dir, notes = prepare_run_dir(args.run_dir, parameters, stems)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}")
    for note in notes:
        print(f"  {note}")
    ok = run(stems, run_dir, parameters)
    print(f"manifest: {run_dir / manifest.FILE}")
    if not ok:
        return 1
    print(f"executed notebooks, figures, dataset and adapter: {run_dir}")
    if baseline is not None:
        rows = compare(manifest.load(run_dir), baseline)
        print(format_comparison(rows))
        if any(r["verdict"].startswith("REGRESSION") for r in rows):
            return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The run directory's files: written so that a kill at any moment leaves the previous good version
usable, and an earlier run's results moved aside, never deleted, when a run starts over.

A file is written beside its target and renamed onto it (:func:`write_text`): a rename is atomic,
so a reader sees the old file or the new one, never half of one. A folder (the adapter, the
merged model, the prepared dataset) is built beside its target and swapped in by
:func:`replace_folder`, which moves the old folder aside before renaming the new one in; a kill
between those two renames leaves the old one aside, and :func:`recover` puts it back (every
notebook's ``helpers.config.start`` does, and ``python -m helpers.run`` before it starts).

What an earlier run made (:data:`PRODUCTS`: checkpoints, the adapter, the merged model) is found by
:func:`earlier_products` and moved by :func:`move_aside` into ``RUN_DIR/previous-<time>/``;
``START_OVER`` asks for that (``helpers.config``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

CHECKPOINTS, ADAPTER, MERGED = "checkpoints", "adapter", "merged"
PRODUCTS = (CHECKPOINTS, ADAPTER, MERGED)  # what training and merging make, in RUN_DIR
TRAINING_FILES = (*PRODUCTS, "loss_curve.png")  # moved aside together when training starts over
PREVIOUS = "previous-"  # RUN_DIR/previous-<time>: an earlier run, moved aside
_ASIDE = ".replaced"  # RUN_DIR/.<name>.replaced: the old folder during replace_folder


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: into a file beside it, then renamed onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def partial_folder(target) -> Path:
    """An empty folder beside ``target`` to build its new version in (for :func:`replace_folder`);
    a leftover of an interrupted build is removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}{_ASIDE}")


def replace_folder(new, target) -> Path:
    """Put the complete folder ``new`` in place of ``target``: the old ``target`` is renamed aside,
    ``new`` renamed onto ``target``, then the old one removed. Until the second rename the old
    version is whole (in place, or aside, where :func:`recover` finds it)."""
    new, target = Path(new), Path(target)
    old = _aside(target)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover: the target itself is the good one
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def recover(run_dir) -> list:
    """Folders of ``run_dir`` that a kill left aside in :func:`replace_folder`, put back (their
    names); a build left unfinished (``.<name>.partial``) is removed."""
    run_dir, back = Path(run_dir), []
    if not run_dir.is_dir():
        return back
    for old in run_dir.glob(f".*{_ASIDE}"):
        target = run_dir / old.name[1:-len(_ASIDE)]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
            back.append(target.name)
    for tmp in run_dir.glob(".*.partial"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif not _alive(tmp.name.split(".")[-2]):  # a file being written by a live process stays
            tmp.unlink(missing_ok=True)
    return back


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def earlier_products(run_dir) -> dict:
    """What an earlier run left in ``run_dir`` that a new training would replace: ``{name:
    description}`` for the checkpoints (their steps), the adapter and the merged model."""
    run_dir, found = Path(run_dir), {}
    steps = sorted(int(p.name.split("-")[-1]) for p in (run_dir / CHECKPOINTS).glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[-1].isdigit())
    if steps:
        found[CHECKPOINTS] = "checkpoints " + ", ".join(f"checkpoint-{s}" for s in steps)
    if (run_dir / ADAPTER).is_dir() and any((run_dir / ADAPTER).iterdir()):
        found[ADAPTER] = "an adapter (adapter/)"
    if (run_dir / MERGED).is_dir() and any((run_dir / MERGED).iterdir()):
        found[MERGED] = "a merged model (merged/)"
    return found


def move_aside(run_dir, names=None) -> Path | None:
    """Move ``names`` (default: every entry of ``run_dir`` but earlier ``previous-*`` folders) into
    a new ``run_dir/previous-<time>/``; returns that folder (None when there was nothing)."""
    run_dir = Path(run_dir)
    if names is None:
        entries = [p for p in run_dir.iterdir() if not p.name.startswith(PREVIOUS)]
    else:
        entries = [run_dir / n for n in names if (run_dir / n).exists()]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"{PREVIOUS}{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"{PREVIOUS}{stamp}-{n}"
    dest.mkdir()
    for p in entries:
        os.replace(p, dest / p.name)
    return dest


def describe_moved(dest: Path) -> str:
    """One line naming what :func:`move_aside` moved and where."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in dest.iterdir())
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"START_OVER: the earlier run's {shown} moved to {dest.parent.name}/{dest.name}/"

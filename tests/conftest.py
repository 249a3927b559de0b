"""Shared fixtures: the series executed once per test session, and the CUDA skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (the README's command): on CPU one process per core, at most 4, each test file
    in one process (``--dist loadfile``); on a CUDA machine one process, since the GPU tests
    measure one card's memory and the fault tests fork, which autograd refuses in a process that
    has run a backward on the GPU."""
    import torch

    if torch.cuda.is_available():
        return 0
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def series_run(tmp_path_factory):
    """The whole series executed by the main job, once; yields (run_dir, manifest dict).

    ``QLORA_TEST_RUN_DIR`` reuses an existing run directory instead (for quick iteration).
    """
    from helpers import manifest

    reuse = os.environ.get("QLORA_TEST_RUN_DIR")
    if reuse:
        run_dir = Path(reuse)
    else:
        run_dir = tmp_path_factory.mktemp("series")
        proc = subprocess.run([sys.executable, "-m", "helpers.run", "--run-dir", str(run_dir)],
                              cwd=ROOT, capture_output=True, text=True, timeout=1500)
        print(proc.stdout[-5000:], proc.stderr[-5000:])
        assert proc.returncode == 0, f"series failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run_dir, manifest.load(run_dir)

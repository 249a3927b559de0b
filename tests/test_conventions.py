"""The notebooks keep the series' conventions (STYLE.md): each rule is checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import GITHUB_REPOSITORY, NOTEBOOKS, REVISION, nbtools

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_numbered_notebooks_exist():
    assert [p.stem for p in FILES] == [s for s in NOTEBOOKS if (ROOT / "notebooks" / f"{s}.ipynb").exists()]
    assert FILES, "no notebooks"
    assert FILES[0].stem == NOTEBOOKS[0]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_notebook_keeps_every_convention(path):
    assert nbtools.problems(path) == []


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_parameters_cell_then_config_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[1]["metadata"].get("tags", [])
    assert f'helpers.config.start("{path.stem}", globals())' in code[2]["source"]
    assert "RUN_DIR" in nbtools.parameters_of(nb)


def test_setup_cell_holds_the_repository_constant():
    assert f"github.com/{GITHUB_REPOSITORY}@{REVISION}" in nbtools.SETUP_SOURCE
    assert nbtools.badge_url("01_environment_and_cuda").endswith(
        f"{GITHUB_REPOSITORY}/blob/{REVISION}/notebooks/01_environment_and_cuda.ipynb")


# ------------------------------------------------------------- the checker catches each fault


def _broken(tmp_path, mutate, name="01_environment_and_cuda"):
    nb = json.loads(FILES[0].read_text())
    mutate(nb)
    p = tmp_path / f"{name}.ipynb"
    p.write_text(json.dumps(nb, indent=1, sort_keys=True) + "\n")
    return nbtools.problems(p)


def test_checker_fails_a_notebook_with_outputs(tmp_path):
    def add_output(nb):
        nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x"}]

    assert any("outputs" in p for p in _broken(tmp_path, add_output))


def test_checker_fails_a_different_setup_cell(tmp_path):
    def edit(nb):
        nb["cells"][1]["source"] += "\nimport torch"

    assert any("setup cell" in p for p in _broken(tmp_path, edit))


def test_checker_fails_a_badge_for_another_path(tmp_path):
    problems = _broken(tmp_path, lambda nb: None, name="02_renamed")
    assert any("Colab badge" in p for p in problems)


def test_checker_fails_a_missing_parameters_cell(tmp_path):
    def untag(nb):
        for c in nb["cells"]:
            c["metadata"].pop("tags", None)

    assert any("parameters" in p for p in _broken(tmp_path, untag))


def test_checker_fails_unnormalized_json(tmp_path):
    p = tmp_path / "01_environment_and_cuda.ipynb"
    p.write_text(json.dumps(json.loads(FILES[0].read_text())))  # not indented / sorted
    assert any("normalized" in x for x in nbtools.problems(p))


def test_checker_fails_two_titles(tmp_path):
    def two(nb):
        nb["cells"].append({"cell_type": "markdown", "id": "x", "metadata": {}, "source": "# Two"})

    assert any("H1" in p for p in _broken(tmp_path, two))


# ------------------------------------------------------------------ the Colab bootstrap path


def test_setup_cell_installs_helpers_from_a_local_source(tmp_path):
    """The setup cell, pointed at this checkout, installs `helpers` into a fresh environment."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {**os.environ, "QLORA_SERIES_SOURCE": str(ROOT), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    code = nbtools.SETUP_SOURCE + "\nprint(helpers.__file__)"
    proc = subprocess.run([str(py), "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(venv) in proc.stdout, proc.stdout  # imported from the new environment


def test_setup_cell_does_nothing_locally(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QLORA_SERIES_SOURCE"}
    proc = subprocess.run([sys.executable, "-c", nbtools.SETUP_SOURCE + "\nprint('ok')"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok"
    assert "pip" not in proc.stderr

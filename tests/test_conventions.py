"""The notebooks keep the series' conventions (STYLE.md): each rule is checked here."""

from __future__ import annotations

import ast
import json
import os
import statistics
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


# ------------------------------------------------------------------ the lesson's cells (rule 4, 5)


def _is_record_cell(source: str) -> bool:
    """A cell that records figures: it starts with ``helpers.manifest.record(`` or holds only
    ``helpers.manifest.record...(...)`` statements."""
    if source.lstrip().startswith("helpers.manifest.record("):
        return True
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return bool(body) and all(
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
        and ast.unparse(s.value.func).startswith("helpers.manifest.record") for s in body)


def _teaching_cells(nb: dict) -> list[str]:
    """Code cells other than the setup, parameters, config and record cells."""
    out = []
    for c in nb["cells"]:
        src = c["source"] if isinstance(c["source"], str) else "".join(c["source"])
        if (c["cell_type"] != "code" or src == nbtools.SETUP_SOURCE
                or "parameters" in c.get("metadata", {}).get("tags", [])
                or src.lstrip().startswith("cfg = helpers.config.start(") or _is_record_cell(src)):
            continue
        out.append(src.strip("\n"))
    return out


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_teaching_cells_are_short(path):
    """Median at most 5 lines, none over 12, no line over 100 characters."""
    cells = _teaching_cells(json.loads(path.read_text()))
    assert cells, "a notebook without teaching cells"
    sizes = [len(c.splitlines()) for c in cells]
    assert statistics.median(sizes) <= 5, sorted(sizes)
    long_cells = [c.splitlines()[0] for c, n in zip(cells, sizes) if n > 12]
    assert not long_cells, f"cells over 12 lines start with: {long_cells}"
    long_lines = [ln for c in cells for ln in c.splitlines() if len(ln) > 100]
    assert not long_lines, f"lines over 100 characters: {long_lines}"


def test_teaching_cells_rule_sees_record_cells():
    assert _is_record_cell('helpers.manifest.record(x)\nprint("done")')
    assert _is_record_cell("helpers.manifest.record_info('env', {})\nhelpers.manifest.record({})")
    assert not _is_record_cell("x = 1\nhelpers.manifest.record({'x': x})")


LIBRARY_OBJECTS = {  # what a reader copies from each notebook's cells (STYLE.md rule 5)
    "02_load_in_4bit": ["BitsAndBytesConfig("],
    "03_lora_setup": ["LoraConfig(", "get_peft_model("],
    "05_paged_optimizer_training": ["TrainingArguments(", "Trainer("],
    "06_inference_and_merge": ["PeftModel.from_pretrained("],
}


@pytest.mark.parametrize("stem", sorted(LIBRARY_OBJECTS))
def test_the_library_objects_are_built_in_cells(stem):
    nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
    code = [c["source"] for c in nb["cells"] if c["cell_type"] == "code"]
    for needle in LIBRARY_OBJECTS[stem]:
        assert any(needle in src for src in code), f"no code cell of {stem} holds {needle}"
    if stem.startswith("05"):
        assert any(".train(" in src for src in code), "no code cell of 05 calls .train("


# ------------------------------------------------------------------ the package's layout


def _helpers_imports() -> dict:
    """helpers module -> the helpers modules it imports (anywhere, functions included)."""
    folder = ROOT / "helpers"
    modules = {p.stem for p in folder.glob("*.py")}
    graph = {}
    for p in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names
                          if a.name.startswith("helpers.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "helpers":
                    found |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith("helpers."):
                    found.add(node.module.split(".")[1])
        graph[p.stem] = found & modules - {p.stem, "__init__"}
    return graph


def _circle(graph: dict) -> list | None:
    """An import circle of ``graph`` (module -> imported modules) as a path, or None."""
    done = set()

    def visit(module, path):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for other in sorted(graph.get(module, ())):
            found = visit(other, path + [module])
            if found:
                return found
        done.add(module)
        return None

    return next((c for c in (visit(m, []) for m in sorted(graph)) if c), None)


def test_helpers_has_no_import_circle_and_no_module_over_600_lines():
    graph = _helpers_imports()
    assert {"units", "env"} <= set().union(*graph.values())  # the parser sees the imports
    circle = _circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "helpers").glob("*.py")}
    assert not {n: k for n, k in sizes.items() if k > 600}, sizes


def test_the_circle_finder_finds_one():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


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


def test_setup_cell_does_nothing_locally(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "QLORA_SERIES_SOURCE"}
    proc = subprocess.run([sys.executable, "-c", nbtools.SETUP_SOURCE + "\nprint('ok')"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok"
    assert "pip" not in proc.stderr


def test_every_module_is_reachable_as_an_attribute_of_helpers():
    """Notebooks write ``helpers.attention.use_packed_attention(...)`` after ``import helpers``:
    every module of the package is in its lazy list."""
    import helpers

    modules = {p.stem for p in (ROOT / "helpers").glob("*.py")} - {"__init__"}
    assert modules == set(helpers._MODULES)

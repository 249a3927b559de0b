"""The notebooks' conventions, written once: the standard header (title, Colab badge, overview,
setup cell, parameters cell), a normalized JSON form with no outputs, and a checker that the tests
and ``python -m helpers.nbtools check`` run.

``python -m helpers.nbtools normalize notebooks/*.ipynb`` rewrites notebooks into the committed
form (outputs stripped, stable cell ids, sorted keys).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import GITHUB_REPOSITORY, REVISION

SETUP_SOURCE = f'''# Setup, the same in every notebook. On Colab it installs this series' `helpers` package
# (and with it the packages Colab lacks); locally, after `pip install -e .`, it does nothing.
import os, subprocess, sys, time
SERIES = "git+https://github.com/{GITHUB_REPOSITORY}@{REVISION}"  # repository @ revision
source = os.environ.get("QLORA_SERIES_SOURCE", SERIES)  # or a local path / file:// URL
if "google.colab" in sys.modules or "QLORA_SERIES_SOURCE" in os.environ:
    if "://" not in source and not source.startswith("git+"):
        source = "file://" + os.path.abspath(source)
    print("installing helpers and the packages this runtime lacks (1-3 minutes) ...", flush=True)
    t0, pip = time.time(), [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"qlora-series @ {{source}}"], check=True)
    # a fresh process imports what was installed: transformers and peft must work together
    check = subprocess.run([sys.executable, "-m", "helpers.env"], capture_output=True, text=True)
    print(check.stdout.strip(), f"({{time.time() - t0:.0f}} s)")
    if check.returncode:
        raise SystemExit("the installed packages do not work together (above); nothing else ran")
try:
    import helpers
except ImportError:
    raise SystemExit("helpers is not installed: in a clone of the repository run "
                     f"`pip install -e .`, anywhere else `pip install 'qlora-series @ {{SERIES}}'`"
                     ) from None'''


def badge_url(stem: str) -> str:
    return (f"https://colab.research.google.com/github/{GITHUB_REPOSITORY}/blob/{REVISION}"
            f"/notebooks/{stem}.ipynb")


def normalize(nb: dict) -> dict:
    """Strip outputs and execution counts, number the cell ids, keep only standard metadata."""
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"c{i:02d}"
        if isinstance(cell.get("source"), list):
            cell["source"] = "".join(cell["source"])
        tags = cell.get("metadata", {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
        if cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.pop("attachments", None) if not cell.get("attachments") else None
    keep = ("accelerator", "colab", "kernelspec", "language_info")
    nb["metadata"] = {k: v for k, v in nb["metadata"].items() if k in keep}
    nb["metadata"]["colab"] = {"provenance": []}
    nb["metadata"]["language_info"] = {"name": "python"}
    return nb


def dumps(nb: dict) -> str:
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def parameters_of(nb: dict) -> dict:
    """Names and literal values of the notebook's parameters cell."""
    import ast

    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        return {}
    values = {}
    for node in ast.parse(cells[0]["source"]).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def form_dropdowns(nb: dict) -> dict:
    """NAME -> (options, free values allowed) of the parameters cell's Colab dropdowns
    (``NAME = 'a'  # @param ["a", "b"]``, with ``{allow-input: true}`` for free values)."""
    import ast
    import re

    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    found = {}
    for line in (cells[0]["source"].splitlines() if cells else []):
        m = re.match(r"^(\w+)\s*=.*#\s*@param\s*(\[.*\])\s*(\{.*\})?\s*$", line)
        if m:
            found[m.group(1)] = (ast.literal_eval(m.group(2)),
                                 "allow-input: true" in (m.group(3) or ""))
    return found


def dropdown_problems(nb: dict) -> list[str]:
    """A parameter with a fixed set of values (a ``Literal`` in helpers.config.Config) must be a
    dropdown of exactly those values; a dropdown of another parameter must allow free input."""
    import typing

    from helpers.config import Config

    fixed = {n.upper(): list(typing.get_args(t))
             for n, t in typing.get_type_hints(Config).items() if typing.get_args(t)}
    params, forms, out = parameters_of(nb), form_dropdowns(nb), []
    for name in params:
        options, free = forms.get(name, (None, False))
        if name in fixed and (options != fixed[name] or free):
            out.append(f"parameter {name} needs the dropdown  # @param {fixed[name]}".replace(
                "'", '"'))
        elif name not in fixed and options is not None and not free:
            out.append(f"parameter {name} takes free values: add {{allow-input: true}}")
        if options is not None and params[name] not in options and not free:
            out.append(f"parameter {name}={params[name]!r} is not among its dropdown's options")
    return out


def problems(path) -> list[str]:
    """Every convention the notebook breaks (empty when it keeps them all)."""
    path = Path(path)
    out = []
    text = path.read_text()
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as err:
        return [f"{path.name}: not valid JSON ({err})"]
    if '"output_type"' in text or any(c.get("outputs") for c in nb.get("cells", [])):
        out.append(f"{path.name}: carries outputs (run `python -m helpers.nbtools normalize`)")
    if text != dumps(normalize(json.loads(text))):
        out.append(f"{path.name}: not in normalized form (run `python -m helpers.nbtools normalize`)")
    cells = nb.get("cells", [])
    h1 = [ln for c in cells if c["cell_type"] == "markdown"
          for ln in "".join(c["source"]).splitlines() if ln.startswith("# ")]
    if len(h1) != 1:
        out.append(f"{path.name}: needs exactly one H1 title, found {len(h1)}")
    first = "".join(cells[0]["source"]) if cells else ""
    if badge_url(path.stem) not in first:
        out.append(f"{path.name}: first cell lacks a Colab badge pointing at {badge_url(path.stem)}")
    setup = [c for c in cells if c["cell_type"] == "code"][:1]
    if not setup or "".join(setup[0]["source"]) != SETUP_SOURCE:
        out.append(f"{path.name}: first code cell is not the standard setup cell")
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        out.append(f"{path.name}: needs exactly one cell tagged 'parameters', found {len(tagged)}")
    else:
        try:
            params = parameters_of(nb)
        except (ValueError, SyntaxError):
            out.append(f"{path.name}: parameters cell must hold literals only")
            params = {}
        from helpers.config import PARAMETERS

        bad = sorted(set(params) - set(PARAMETERS))
        if bad:
            out.append(f"{path.name}: parameters not in helpers.config.PARAMETERS: {bad}")
        out += [f"{path.name}: {problem}" for problem in dropdown_problems(nb)]
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("check", "normalize"):
        print("usage: python -m helpers.nbtools check|normalize NOTEBOOK...", file=sys.stderr)
        return 2
    verb, paths = argv[0], argv[1:] or sorted(Path("notebooks").glob("*.ipynb"))
    bad = 0
    for p in paths:
        if verb == "normalize":
            Path(p).write_text(dumps(normalize(json.loads(Path(p).read_text()))))
        for problem in problems(p):
            print(problem)
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The shape the book promises: small cells, lines that fit the code column, no giant functions.

The book's code column is 100 characters wide and a cell is read on one screen, so every notebook
code cell has at most 60 lines and every line the notebooks write (in the notebooks and in the
exported `dpo_lit/*.py`) at most 100 characters; a long figure caption or alt text continues on
further `#| fig-cap:` / `#| fig-alt:` lines. The only lines left to their tool are what nbdev 2.4
generates itself: the `__all__` list, wrapped by nbdev at 120 characters, and the symbol index
`_modidx.py`, neither shown in the book.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
MODULES = sorted(p for p in (ROOT / "dpo_lit").glob("*.py") if p.name != "_modidx.py")
WIDTH, CELL_LINES, UNIT_LINES = 100, 60, 150


def code_cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            yield i, "".join(cell["source"]).splitlines()


def generated_all(lines):
    "Line numbers (from 0) of nbdev's generated `__all__ = [...]` statement."
    out, inside = set(), False
    for n, line in enumerate(lines):
        inside = line.startswith("__all__ = [") or (inside and line.startswith(" " * 11))
        if inside: out.add(n)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_cells_fit_the_page(path):
    long_cells = [(i, len(src)) for i, src in code_cells(path) if len(src) > CELL_LINES]
    assert not long_cells, f"{path.name}: cells over {CELL_LINES} lines (cell, lines): {long_cells}"
    wide = [(i, n + 1, len(l)) for i, src in code_cells(path) for n, l in enumerate(src)
            if len(l) > WIDTH]
    assert not wide, f"{path.name}: code lines over {WIDTH} characters (cell, line, width): {wide}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_library_lines_and_units(path):
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    skip = generated_all(lines)
    wide = [n + 1 for n, l in enumerate(lines) if len(l) > WIDTH and n not in skip]
    assert not wide, f"dpo_lit/{path.name}: lines over {WIDTH} characters: {wide}"
    units = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    big = [(name, n) for name, n in units if n > UNIT_LINES]
    assert not big, f"dpo_lit/{path.name}: classes or functions over {UNIT_LINES} lines: {big}"


def test_the_rules_can_fail():
    "The helpers above catch what they are for (a checker that cannot fail checks nothing)."
    lines = ["__all__ = ['a',", " " * 11 + "'b']", "x = 1", " " * 11 + "y"]
    assert generated_all(lines) == {0, 1}

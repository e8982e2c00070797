"""Sphinx glue that lets Jupyter Book 1 render nbdev notebooks as they are.

nbdev marks cells with directive comments (``#| export``, ``#| hide``, ``#| slow``); myst-nb
understands cell *tags*. This extension reads each notebook in memory, turns the directives into
tags and strips the directive lines from the displayed source, so the notebooks on disk stay
exactly as nbdev writes them. It also serves MathJax from the built book, so pages typeset
offline.
"""
from __future__ import annotations

import configparser
import os
import re
import shutil
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[2]
_DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def _skip_flags() -> set[str]:
    "The flags nbdev_test skips by default (`tst_flags` in settings.ini): never executed in the book."
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return set(cfg["DEFAULT"].get("tst_flags", "").split())


def cell_tags(directives: list[tuple[str, str]], skip_flags: set[str]) -> list[str]:
    "Jupyter Book tags for a code cell carrying these nbdev `(name, value)` directives."
    tags = []
    for name, value in directives:
        value = value.strip().lower()
        if name in ("hide", "default_exp") or (name == "include" and value == "false"):
            tags.append("remove-cell")
        elif name == "echo" and value == "false":
            tags.append("remove-input")
        elif name == "output" and value == "false":
            tags.append("remove-output")
        elif name == "code-fold":
            tags.append("hide-input")
        elif (name == "eval" and value == "false") or name in skip_flags:
            tags.append("skip-execution")
    return list(dict.fromkeys(tags))


def split_directives(source: str) -> tuple[list[tuple[str, str]], str]:
    "Separate the leading `#|` directive lines of a cell from the code that follows them."
    lines = source.splitlines()
    directives = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m:
            directives.append((m.group(1), m.group(2)))
        elif lines[i].strip():
            break
        i += 1
    return directives, "\n".join(lines[i:])


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    return value


def figure_metadata(directives: list[tuple[str, str]]) -> dict:
    """myst-nb cell metadata for a figure, from Quarto-style directives that nbdev keeps:
    `#| fig-cap: caption`, `#| label: fig-name` (the target of {numref}) and `#| fig-alt: text`.
    A caption makes the cell's image a numbered figure; the alt text describes it in words.
    A long caption or alt text continues on further lines with the same key, joined by spaces,
    so that every line of the cell fits the 100-character code column."""
    d = {}
    for name, value in directives:
        value = _unquote(value)
        joins = name in ("fig-cap", "fig-alt") and name in d
        d[name] = f"{d[name]} {value}" if joins else value
    meta = {}
    if d.get("fig-cap"):
        meta["figure"] = {"caption": d["fig-cap"]}
        if d.get("label", "").startswith("fig-"):
            meta["figure"]["name"] = d["label"]
    if d.get("fig-alt"):
        meta["image"] = {"alt": d["fig-alt"]}
    return meta


def read_nbdev_notebook(text: str) -> nbformat.NotebookNode:
    "myst-nb reader: an nbdev notebook with its directives turned into tags and stripped."
    nb = nbformat.reads(text, as_version=4)
    flags = _skip_flags()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        directives, code = split_directives(cell.source)
        if not directives:
            continue
        tags = cell.metadata.setdefault("tags", [])
        tags.extend(t for t in cell_tags(directives, flags) if t not in tags)
        fig = figure_metadata(directives)
        if fig:
            cell.metadata.setdefault("mystnb", {}).update(fig)
        cell.source = code
    return nb


def _mathjax_dir() -> Path:
    import mathjax  # django-static-mathjax: MathJax 3 vendored in a wheel

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def _copy_mathjax(app, exception):
    if exception is None and app.builder.format == "html":
        shutil.copytree(_mathjax_dir(), Path(app.outdir) / "_static" / "mathjax", dirs_exist_ok=True)


def _config_inited(app, config):
    # A relative mathjax_path is resolved against _static/ by Sphinx.
    config.mathjax_path = "mathjax/tex-chtml.js"
    # The book's own stylesheet (a wider text column for code), served from _static/.
    config.html_static_path = [*config.html_static_path, str(Path(__file__).parent / "static")]


def _kernel_profile() -> str:
    """A fresh IPython directory whose kernel profile draws inline figures at twice the pixel
    density (\"retina\"), so that they stay sharp on high-density screens; a temporary folder, so
    that the kernels' history files never land in the repository."""
    ipython_dir = Path(tempfile.mkdtemp(prefix="dpo_lit-ipython-"))
    profile = ipython_dir / "profile_default"
    profile.mkdir()
    (profile / "ipython_kernel_config.py").write_text(
        "c.InlineBackend.figure_formats = {'retina'}\n", encoding="utf-8")
    return str(ipython_dir)


def setup(app):
    # Kernels inherit this process's environment; a non-inline MPLBACKEND (Agg, say) would make
    # plt.show() draw nothing, and every figure would silently vanish from the book.
    os.environ.pop("MPLBACKEND", None)
    os.environ["IPYTHONDIR"] = _kernel_profile()
    app.connect("config-inited", _config_inited)
    app.connect("build-finished", _copy_mathjax)
    app.add_css_file("dpo_lit.css")
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# Citations in round brackets, author-year: "(Rafailov et al., 2023)", "Rafailov et al. (2023)",
# "(Rafailov et al., 2023, Theorem 1)"; sphinxcontrib-bibtex's author_year style uses square ones.
import dataclasses  # noqa: E402

from sphinxcontrib.bibtex.plugin import register_plugin  # noqa: E402
from sphinxcontrib.bibtex.style.referencing import BracketStyle  # noqa: E402
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle  # noqa: E402


def _round() -> BracketStyle:
    return BracketStyle(left="(", right=")")


def _round_list() -> BracketStyle:
    return BracketStyle(left="(", right=")", sep="; ")


@dataclasses.dataclass
class RoundAuthorYearStyle(AuthorYearReferenceStyle):
    "Author-year citations in round brackets: (Rafailov et al., 2023; Azar et al., 2023)."
    bracket_parenthetical: BracketStyle = dataclasses.field(default_factory=_round_list)
    bracket_textual: BracketStyle = dataclasses.field(default_factory=_round)
    bracket_author: BracketStyle = dataclasses.field(default_factory=_round)
    bracket_label: BracketStyle = dataclasses.field(default_factory=_round)
    bracket_year: BracketStyle = dataclasses.field(default_factory=_round)


register_plugin("sphinxcontrib.bibtex.style.referencing", "author_year_round", RoundAuthorYearStyle,
                force=True)

"""The book's Sphinx extension (nbs/_ext/nbdev_book.py): nbdev directives become Jupyter Book cell
tags at read time, their lines vanish from the displayed code, and the notebooks stay untouched."""
from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import nbformat
import pytest

from conftest import ROOT, read_yaml

EXT = ROOT / "nbs" / "_ext" / "nbdev_book.py"


@pytest.fixture(scope="module")
def ext():
    spec = importlib.util.spec_from_file_location("nbdev_book_under_test", EXT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod            # dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod


FLAGS = {"slow", "gpu"}


@pytest.mark.parametrize(
    "directives, tags",
    [
        ([("hide", "")], ["remove-cell"]),
        ([("default_exp", "reference")], ["remove-cell"]),
        ([("include", "false")], ["remove-cell"]),
        ([("include", "true")], []),
        ([("echo", "false")], ["remove-input"]),
        ([("echo", "False")], ["remove-input"]),
        ([("echo", "true")], []),
        ([("output", "false")], ["remove-output"]),
        ([("output", "true")], []),
        ([("code-fold", "true")], ["hide-input"]),
        ([("eval", "false")], ["skip-execution"]),
        ([("eval", "true")], []),
        ([("slow", "")], ["skip-execution"]),
        ([("gpu", "")], ["skip-execution"]),
        ([("export", "")], []),
        ([("exporti", "")], []),
        ([("exports", "")], []),
        ([("notest", "")], []),  # not a skip flag unless settings.ini lists it
        ([("hide", ""), ("default_exp", "x")], ["remove-cell"]),  # no duplicates
        ([("export", ""), ("slow", ""), ("gpu", "")], ["skip-execution"]),
        ([("export", ""), ("code-fold", "true"), ("output", "false")], ["hide-input", "remove-output"]),
    ],
)
def test_cell_tags(ext, directives, tags):
    assert ext.cell_tags(directives, FLAGS) == tags


def test_skip_flags_follow_tst_flags(ext, settings):
    assert ext._skip_flags() == set(settings["tst_flags"].split()) == {"slow", "gpu"}
    assert ext.cell_tags([("notest", "")], {"notest"}) == ["skip-execution"]
    assert ext.cell_tags([("slow", "")], set()) == []


@pytest.mark.parametrize(
    "source, directives, code",
    [
        ("#| export\ndef f(): pass", [("export", "")], "def f(): pass"),
        ("#|export\nx = 1", [("export", "")], "x = 1"),
        ("# | hide\nx = 1", [("hide", "")], "x = 1"),
        ("#| echo: false\nplot()", [("echo", "false")], "plot()"),
        ("#| code-fold: true\n#| slow\n\ntrain()", [("code-fold", "true"), ("slow", "")], "train()"),
        ("#| default_exp reference", [("default_exp", "reference")], ""),
        ("x = 1\n#| hide", [], "x = 1\n#| hide"),  # only leading lines are directives
        ("# a comment\n#| export", [], "# a comment\n#| export"),
        ("y = 2", [], "y = 2"),
        ("", [], ""),
    ],
)
def test_split_directives(ext, source, directives, code):
    assert ext.split_directives(source) == (directives, code)


def make_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('#| hide\nimport sys\nif "google.colab" in sys.modules: pass'),
        nbformat.v4.new_code_cell("#| default_exp reference"),
        nbformat.v4.new_markdown_cell("# Title\n\n#| not a directive in markdown"),
        nbformat.v4.new_code_cell("#| export\ndef dpo(): return 1"),
        nbformat.v4.new_code_cell("assert dpo() == 1"),
        nbformat.v4.new_code_cell("#| slow\nbig_run()", metadata={"tags": ["skip-execution", "mine"]}),
        nbformat.v4.new_code_cell("#| echo: false\nshow()"),
    ]
    return nb


def test_read_nbdev_notebook(ext):
    text = nbformat.writes(make_notebook())
    nb = ext.read_nbdev_notebook(text)
    c = nb.cells
    assert c[0].metadata.tags == ["remove-cell"] and c[0].source.startswith("import sys")
    assert c[1].metadata.tags == ["remove-cell"] and c[1].source == ""
    assert c[2].source == "# Title\n\n#| not a directive in markdown" and "tags" not in c[2].metadata
    assert c[3].metadata.tags == [] and c[3].source == "def dpo(): return 1"
    assert "tags" not in c[4].metadata and c[4].source == "assert dpo() == 1"
    assert c[5].metadata.tags == ["skip-execution", "mine"] and c[5].source == "big_run()"
    assert c[6].metadata.tags == ["remove-input"] and c[6].source == "show()"
    for cell in nb.cells:  # nothing left for a reader to see
        assert cell.cell_type == "markdown" or "#|" not in cell.source
    original = nbformat.reads(text, as_version=4)
    assert [x.source for x in original.cells] == [x.source for x in make_notebook().cells]
    nbformat.validate(nb)


def test_real_notebooks_lose_every_directive(ext):
    "Every notebook of the book, read as the build reads it, shows no `#|` line and hides its Colab cell."
    nbs = sorted((ROOT / "nbs").glob("*.ipynb"))
    if not nbs:
        pytest.skip("no notebooks in nbs/ yet")
    for path in nbs:
        before = path.read_bytes()
        nb = ext.read_nbdev_notebook(path.read_text(encoding="utf-8"))
        assert path.read_bytes() == before
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            tags = cell.metadata.get("tags", [])
            shown = [ln for ln in cell.source.splitlines() if ln.lstrip().startswith("#|")]
            assert not shown or "remove-cell" in tags, f"{path.name} cell {i}: directive lines {shown} would be shown"
        assert "remove-cell" in nb.cells[0].metadata.get("tags", []), f"{path.name}: the Colab cell is not hidden"


def test_mathjax_is_served_from_the_build(ext):
    assert (ext._mathjax_dir() / "tex-chtml.js").is_file(), "the vendored MathJax 3 is missing"
    config = SimpleNamespace(mathjax_path=None, html_static_path=["_static"])
    ext._config_inited(None, config)
    assert config.mathjax_path == "mathjax/tex-chtml.js"
    assert not config.mathjax_path.startswith(("http:", "https:", "//"))
    # the book's stylesheet directory is added to, not substituted for, the static path
    assert config.html_static_path[0] == "_static"
    assert (EXT.parent / "static" / "dpo_lit.css").is_file()
    assert (EXT.parent / "static").resolve() in [ROOT.joinpath(p).resolve() for p in config.html_static_path]


def test_setup_registers_the_hooks(ext):
    events = []
    css = []
    app = SimpleNamespace(connect=lambda event, fn: events.append((event, fn)), add_css_file=css.append)
    meta = ext.setup(app)
    assert dict(events) == {"config-inited": ext._config_inited, "build-finished": ext._copy_mathjax}
    assert css == ["dpo_lit.css"]
    assert meta["parallel_read_safe"]


def test_config_wires_the_reader():
    cfg = read_yaml(ROOT / "_config.yml")
    sphinx = cfg["sphinx"]
    assert (ROOT / sphinx["local_extensions"]["nbdev_book"] / "nbdev_book.py").resolve() == EXT.resolve()
    reader = sphinx["config"]["nb_custom_formats"][".ipynb"]
    assert reader[0] == "nbdev_book.read_nbdev_notebook"
    assert cfg["execute"]["execute_notebooks"] in ("force", "cache"), "the book build must execute notebooks"
    assert sphinx["config"].get("nb_execution_raise_on_error") is True


def test_book_build_keeps_figures_inline(ext, monkeypatch):
    "A non-inline MPLBACKEND in the environment would reach the kernels and drop every figure."
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ext.setup(SimpleNamespace(connect=lambda *a: None, add_css_file=lambda *a: None))
    import os
    assert "MPLBACKEND" not in os.environ


@pytest.mark.parametrize(
    "directives, meta",
    [
        ([("fig-cap", "The loss"), ("label", "fig-loss"), ("fig-alt", "A falling curve")],
         {"figure": {"caption": "The loss", "name": "fig-loss"}, "image": {"alt": "A falling curve"}}),
        ([("fig-cap", '"Quoted: a caption"')], {"figure": {"caption": "Quoted: a caption"}}),
        ([("label", "fig-x")], {}),                      # a label without a caption is no figure
        ([("label", "tbl-x"), ("fig-cap", "c")], {"figure": {"caption": "c"}}),
        ([("fig-cap", "A long"), ("fig-alt", "Two"), ("fig-cap", "caption."), ("fig-alt", "lines.")],
         {"figure": {"caption": "A long caption."}, "image": {"alt": "Two lines."}}),
        ([("export", "")], {}),
    ],
)
def test_figure_metadata(ext, directives, meta):
    assert ext.figure_metadata(directives) == meta


def test_figure_directives_reach_myst_nb(ext):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "#| fig-cap: The DPO loss against the margin\n#| label: fig-dpo-loss\n"
        "#| fig-alt: A curve falling from the top left\nplt.plot(z, loss)")]
    cell = ext.read_nbdev_notebook(nbformat.writes(nb)).cells[0]
    assert cell.source == "plt.plot(z, loss)"
    assert cell.metadata["mystnb"]["figure"] == {"caption": "The DPO loss against the margin",
                                                "name": "fig-dpo-loss"}
    assert cell.metadata["mystnb"]["image"] == {"alt": "A curve falling from the top left"}


def test_kernels_draw_retina_figures(ext, monkeypatch):
    "The kernels get a profile that draws figures at twice the pixel density, outside the repository."
    monkeypatch.delenv("IPYTHONDIR", raising=False)
    ext.setup(SimpleNamespace(connect=lambda *a: None, add_css_file=lambda *a: None))
    import os
    from pathlib import Path
    ipython_dir = Path(os.environ["IPYTHONDIR"])
    assert ROOT not in ipython_dir.parents
    config = (ipython_dir / "profile_default" / "ipython_kernel_config.py").read_text()
    assert "retina" in config


def test_citations_in_round_brackets(ext):
    "The book's citation style: author-year, in round brackets, several separated by semicolons."
    from sphinxcontrib.bibtex.plugin import find_plugin
    style = find_plugin("sphinxcontrib.bibtex.style.referencing", "author_year_round")()
    assert (style.bracket_parenthetical.left, style.bracket_parenthetical.right) == ("(", ")")
    assert style.bracket_parenthetical.sep == "; " and style.bracket_textual.left == "("
    cfg = read_yaml(ROOT / "_config.yml")
    assert cfg["sphinx"]["config"]["bibtex_reference_style"] == "author_year_round"

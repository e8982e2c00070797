"""The built book read as a reader reads it: checks on the HTML of _build/html, page by page.

(a) no typed chapter, section, figure or equation numbers in running text, and no internal labels
    (`eq. (dpo-loss)`, `opt-gibbs-policy`) as text: numbers come from links the toolchain numbers;
(b) no displayed code or output line wider than the code column (100 characters);
(c) every figure image sits in a numbered figure with a caption, and has an alt text that
    describes it (not empty, not a file path);
(d) the bibliography page exists and lists the references; every chapter that names a paper cites
    it through a link into the bibliography, and no chapter keeps a typed citation or its own
    "References" list.

What counts as running text: the page's article, without code (`pre`, `code`), math, the text of
internal links (chapter titles, equation and figure numbers that the toolchain generated), the
section and caption numbers Sphinx adds, and citations (`span.bibtex-citation`). The one place a
number may be typed is therefore inside a citation, as its post-text: {cite:p}`key{Figure 2}`
renders "(Rafailov et al., 2023, Figure 2)", a reference to another work's figure, which is allowed.

Chapters not yet converted are listed in ALLOWLIST, per check. The list only shrinks: a test fails
when an allowlisted page has no violation left (remove it from the list), and pages not listed
must be clean. The checks on pages are marked `browser`: they run after the book build in
`make test`; a missing build skips locally and fails under CI=true. The tests of the rules
themselves need no build. Environment: DPO_LIT_BOOK_DIR (default _build/html), DPO_LIT_TOC
(default the repository's _toc.yml).
"""
from __future__ import annotations

import copy
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import pytest

from conftest import NBS, ROOT, missing, read_yaml, toc_files

BOOK = Path(os.environ.get("DPO_LIT_BOOK_DIR", ROOT / "_build" / "html")).resolve()
PAGES = toc_files(read_yaml(Path(os.environ.get("DPO_LIT_TOC", ROOT / "_toc.yml"))))
BIBLIOGRAPHY = "nbs/bibliography"
CODE_COLUMN = 100          # characters a code block shows without scrolling sideways

# Pages that still break a check, until they are converted. Only ever remove entries.
ALLOWLIST: dict[str, set[str]] = {
    "typed_numbers": set(),
    "internal_labels": set(),
    "code_width": set(),
    "figures": set(),
    "citations": set(),
}

# (a) A typed number: a word that names a part of a document, followed by a number or a section
# sign with one. Matched case-insensitively in running text (see the module docstring for what is
# left out of it, citations included).
TYPED_NUMBER = re.compile(
    r"(?:\b(?:chapters?|sections?|figures?|figs?\.|equations?|eqs?\.|tables?|appendix|part)"
    r"\s*\(?\d|§\s*\d)", re.I)
# (d) A typed citation: "Author et al., 2023", "Author & Other (2019)", "Author (2023)" or
# "(Author, 1959" outside a citation role.
TYPED_CITATION = re.compile(
    r"\b[A-Z][\w'’-]+ et al\.,? \(?(?:19|20)\d\d"
    r"|\b[A-Z][\w'’-]+ (?:&|and) [A-Z][\w'’-]+,? \(?(?:19|20)\d\d"
    r"|\b[A-Z][\w'’-]+ \((?:19|20)\d\d[a-z]?\)"
    r"|\((?:[a-z]+ )*[A-Z][\w'’-]+, (?:19|20)\d\d[a-z]?[;),]")
# (c) Images that are not figures: the launch badges and the theme's own logos.
BADGE_LINKS = ("https://colab.research.google.com",)
PATH_LIKE = re.compile(r"^(?:\S*/\S*|\S+\.(?:png|svg|jpe?g|gif))$", re.I)


def bs4():
    try:
        import bs4 as module
    except ImportError:
        missing("beautifulsoup4 is not installed: install the dev extras")
    return module


def html_path(doc: str) -> Path:
    return BOOK / f"{doc}.html"


@lru_cache(maxsize=None)
def article(doc: str):
    "The parsed main article of a built page."
    if not (BOOK / "nbs" / "index.html").is_file() and not (BOOK / "index.html").is_file():
        missing(f"no built book at {BOOK}: run `make book` first")
    path = html_path(doc)
    assert path.is_file(), f"{doc}: not built ({path} is missing)"
    soup = bs4().BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    node = soup.select_one("article.bd-article") or soup.body
    return node


@lru_cache(maxsize=None)
def running_text(doc: str) -> str:
    "The prose of a page: no code, math, generated numbers, internal link texts or citations."
    node = copy.copy(article(doc))                     # a deep copy: the cached tree stays whole
    for junk in node.select("pre, code, script, style, .math, span.section-number, "
                            "span.caption-number, a.headerlink, a.reference.internal, "
                            "span.bibtex-citation, div.citation-list"):
        junk.decompose()
    return re.sub(r"\s+", " ", node.get_text(" "))


def context(text: str, m: re.Match, width: int = 40) -> str:
    return "…" + text[max(0, m.start() - width):m.end() + width].strip() + "…"


@lru_cache(maxsize=None)
def internal_labels() -> frozenset[str]:
    "Every equation label `$$ (label)` and MyST target `(label)=` in the notebooks."
    labels = set()
    for path in NBS.glob("*.ipynb"):
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "markdown":
                labels.update(re.findall(r"^\$\$ *\(([\w-]+)\) *$", src, re.M))
                labels.update(re.findall(r"^\(([\w-]+)\)= *$", src, re.M))
            labels.update(re.findall(r"^#\| *label: *(fig-[\w-]+)", src, re.M))
    return frozenset(l for l in labels if "-" in l)      # one-word labels could be prose


# ---- the checks: each returns the page's violations as readable strings ---------------------

def typed_numbers(doc: str) -> list[str]:
    text = running_text(doc)
    return [context(text, m) for m in TYPED_NUMBER.finditer(text)]


def internal_label_text(doc: str) -> list[str]:
    "Internal labels shown as text, in prose or in rendered docstrings (code left out)."
    text = running_text(doc)
    return [context(text, m) for m in label_pattern().finditer(text)]


@lru_cache(maxsize=None)
def label_pattern() -> re.Pattern:
    "One pattern for every internal label, as a whole word."
    alternatives = "|".join(re.escape(l) for l in sorted(internal_labels(), key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])")


def code_width(doc: str) -> list[str]:
    found = []
    for pre in article(doc).select("pre"):
        for line in pre.get_text().expandtabs(4).splitlines():
            if len(line) > CODE_COLUMN:
                found.append(f"{len(line)} chars: {line[:60]}…")
    return found


def figures(doc: str) -> list[str]:
    found = []
    for img in article(doc).select("img"):
        if any(a.get("href", "").startswith(BADGE_LINKS) for a in img.find_parents("a")):
            continue
        src, alt = img.get("src", ""), (img.get("alt") or "").strip()
        fig = img.find_parent("figure")
        if fig is None or fig.find("figcaption") is None:
            found.append(f"{src}: not in a captioned figure")
        elif fig.select_one("span.caption-number") is None:
            found.append(f"{src}: its figure is not numbered")
        if not alt or PATH_LIKE.match(alt) or alt == Path(src).name:
            found.append(f"{src}: alt text {alt!r} is empty or a file path")
    return found


def citations(doc: str) -> list[str]:
    if doc == BIBLIOGRAPHY:
        return []
    node, text = article(doc), running_text(doc)
    found = [f"typed citation {context(text, m)}" for m in TYPED_CITATION.finditer(text)]
    cites = node.select("span.bibtex-citation")
    links = [a for a in node.select("a[href]")
             if Path(a["href"].split("#")[0]).stem == "bibliography"
             and a.find_parent("nav") is None]
    if cites and not links:
        found.append("cites papers but links to no bibliography entry")
    for h in node.select("h2, h3"):
        if re.sub(r"[\d.\s#]+", " ", h.get_text()).strip().lower() == "references":
            found.append("keeps its own References list: cite into the bibliography instead")
    return found


CHECKS = {
    "typed_numbers": typed_numbers,
    "internal_labels": internal_label_text,
    "code_width": code_width,
    "figures": figures,
    "citations": citations,
}


@pytest.mark.browser
@pytest.mark.parametrize("doc", PAGES, ids=lambda d: Path(d).name)
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_page(check, doc):
    if doc in ALLOWLIST[check]:
        pytest.skip(f"{doc} is on the {check} allowlist")
    problems = CHECKS[check](doc)
    shown = "\n  ".join(problems[:20])
    assert not problems, f"{doc}: {len(problems)} {check} violation(s):\n  {shown}"


@pytest.mark.browser
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_allowlist_is_not_stale(check):
    "Every allowlisted page is in the book and still breaks the check; else drop it from the list."
    stale = [doc for doc in sorted(ALLOWLIST[check]) if doc not in PAGES or not CHECKS[check](doc)]
    assert not stale, (f"remove from ALLOWLIST[{check!r}]: {stale} "
                       "(no violations left, or not in the book)")


@pytest.mark.browser
def test_bibliography_page():
    "The bibliography is in the book, built, and lists the references of nbs/references.bib."
    assert BIBLIOGRAPHY in PAGES, f"{BIBLIOGRAPHY} is not in _toc.yml"
    node = article(BIBLIOGRAPHY)
    entries = node.select('[role="doc-biblioentry"], div.citation')
    n_keys = len(re.findall(r"^@\w+\{", (NBS / "references.bib").read_text(encoding="utf-8"), re.M))
    assert len(entries) >= n_keys > 20, f"{len(entries)} entries shown, {n_keys} in references.bib"
    text = node.get_text(" ")
    assert "Direct preference optimization" in text or "Direct Preference Optimization" in text


# ---- the rules themselves, on small HTML snippets: a check that cannot fail is no check -------

def _rule_text(html: str) -> str:
    node = bs4().BeautifulSoup(f"<article class='bd-article'>{html}</article>", "html.parser")
    for junk in node.select("pre, code, .math, span.section-number, span.caption-number, "
                            "a.reference.internal, span.bibtex-citation"):
        junk.decompose()
    return re.sub(r"\s+", " ", node.get_text(" "))


@pytest.mark.parametrize("html, bad", [
    ("<p>as chapter 4 shows</p>", True),
    ("<p>see Chapter 2 and §3.3</p>", True),
    ("<p>in section 2 we</p>", True),
    ("<p>Equation (3.2) says</p>", True),
    ("<p>Equation <a class='reference internal' href='#e'>(3.2)</a> says</p>", False),
    ("<p>see <a class='reference internal' href='x.html'>The DPO objective</a></p>", False),
    ("<p><span class='bibtex-citation'>(<a>Rafailov et al., 2023</a>, Figure 2)</span></p>", False),
    ("<p>Rafailov et al. (2023, Figure 2) plot</p>", True),
    ("<p>with 4 chapters to go, 2 figures</p>", False),
    ("<h2><span class='section-number'>4.2. </span>Losses</h2>", False),
])
def test_typed_number_rule(html, bad):
    assert bool(TYPED_NUMBER.search(_rule_text(html))) is bad


@pytest.mark.parametrize("html, bad", [
    ("<p>the random-utility view (Luce, 1959; McFadden, 1974)</p>", True),
    ("<p>as Rafailov et al. (2023) show</p>", True),
    ("<p>Adam (Kingma &amp; Ba, 2015)</p>", True),
    ("<p>noted by Mitchell (2023)</p>", True),
    ("<p><span class='bibtex-citation'>(<a>Kingma and Ba, 2015</a>)</span></p>", False),
    ("<p>the Bradley-Terry model of 1952 and ICLR 2018</p>", False),
])
def test_typed_citation_rule(html, bad):
    assert bool(TYPED_CITATION.search(_rule_text(html))) is bad


@pytest.mark.browser
def test_no_empty_general_index():
    "The book builds no general index page (the API reference lists every public name instead)."
    article(PAGES[0])                                   # the book is built (else skip or fail)
    assert not (BOOK / "genindex.html").exists(), "genindex.html is built: an empty index page"
    assert "genindex.html" not in html_path(PAGES[0]).read_text(encoding="utf-8")


@pytest.mark.browser
def test_every_internal_link_lands():
    "Every relative link of every page reaches a built file and, with a #fragment, an element there."
    from urllib.parse import unquote, urlsplit
    ids: dict[Path, set[str]] = {}

    def targets(path: Path) -> set[str]:
        if path not in ids:
            soup = bs4().BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
            ids[path] = {t["id"] for t in soup.select("[id]")} | {a["name"] for a in
                                                                   soup.select("a[name]")}
        return ids[path]

    broken = []
    for doc in PAGES:
        page = html_path(doc)
        node = article(doc)
        for a in node.select("a[href]"):
            href = a["href"]
            parts = urlsplit(href)
            if parts.scheme or href.startswith(("mailto:", "//")):
                continue                                        # external: not checked offline
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.is_file():
                broken.append(f"{doc}: {href} (no file)")
            elif parts.fragment and target.suffix == ".html" and \
                    unquote(parts.fragment) not in targets(target):
                broken.append(f"{doc}: {href} (no #{parts.fragment} there)")
    assert not broken, f"{len(broken)} broken link(s): {broken[:10]}"

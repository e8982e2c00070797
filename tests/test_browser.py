"""The built book in a real browser: every page of _build/html opens in headless Chromium with the
network cut off, typesets its math, loads its images, shows no nbdev directive, carries its Colab
launch link, and leaves a full-page screenshot in _build/screenshots/ for people to look at.

Environment: DPO_LIT_BOOK_DIR (default _build/html), DPO_LIT_TOC (default: the _toc.yml two levels
above the book directory, else the repository's), DPO_LIT_SCREENSHOT_DIR (default _build/screenshots),
DPO_LIT_CHROMIUM (default /usr/bin/chromium). Missing Chromium or book: skipped locally, a failure
under CI=true.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from types import SimpleNamespace
from pathlib import Path

import pytest

from conftest import COLAB, ROOT, check_link, launch_url, missing, read_yaml, toc_files

pytestmark = pytest.mark.browser

BOOK = Path(os.environ.get("DPO_LIT_BOOK_DIR", ROOT / "_build" / "html")).resolve()
SHOTS = Path(os.environ.get("DPO_LIT_SCREENSHOT_DIR", ROOT / "_build" / "screenshots")).resolve()
CHROMIUM = os.environ.get("DPO_LIT_CHROMIUM") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium") or "/usr/bin/chromium"
)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# Pages whose subject is nbdev's directives: "#|" in their code is content, not a leak.
ABOUT_DIRECTIVES = {"nbs/10b_gpu_check"}

def _toc_path() -> Path:
    if os.environ.get("DPO_LIT_TOC"):
        return Path(os.environ["DPO_LIT_TOC"])
    beside = BOOK.parents[1] / "_toc.yml"
    return beside if "DPO_LIT_BOOK_DIR" in os.environ and beside.is_file() else ROOT / "_toc.yml"


PAGES = toc_files(read_yaml(_toc_path()))
# Console noise from the Jupyter Book 1 theme itself, not from the book: sphinx-thebe's inline config
# script is emitted twice per page, and pydata-sphinx-theme reports an unset stored colour mode.
THEME_NOISE = ("Identifier 'THEBE_JS_URL' has already been declared", "Got invalid theme mode")
RAW_TEX = ["$$", "\\frac", "\\begin{", "\\(", "\\[", "\\mathrm", "\\pi_"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def server():
    "The book served from 127.0.0.1 only (file:// would block MathJax's fonts in Chromium)."
    if not (BOOK / "nbs" / "index.html").is_file() and not (BOOK / "index.html").is_file():
        missing(f"no built book at {BOOK}: run `make book` first")
    handler = functools.partial(_Quiet, directory=str(BOOK))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (Python) is not installed: install the dev extras")
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        missing(f"no Chromium at {CHROMIUM}: `apt-get install chromium` (or set DPO_LIT_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    except Exception as e:  # a broken browser install is a failure, never a skip
        pw.stop()
        pytest.fail(f"Chromium at {CHROMIUM} did not start: {e}")
    yield b
    b.close()
    pw.stop()


@pytest.fixture()
def tab(browser, server):
    "A page whose every request outside the local server is blocked and recorded."
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    p = context.new_page()
    tab = SimpleNamespace(page=p, blocked=[], bad=[], errors=[])

    def route(r):
        if r.request.url.startswith(server):
            r.continue_()
        else:
            tab.blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    p.on("response", lambda resp: resp.status >= 400 and not resp.url.endswith("/favicon.ico")
         and tab.bad.append(f"{resp.status} {resp.url}"))

    def error(text):
        if not any(noise in text for noise in THEME_NOISE):
            tab.errors.append(text)

    p.on("pageerror", lambda exc: error(str(exc)))
    p.on("console", lambda msg: msg.type == "error" and error(f"console: {msg.text}"))
    yield tab
    context.close()


WAIT_MATHJAX = """async () => {
  const mj = window.MathJax;
  if (!mj || !mj.startup || !mj.startup.promise) return false;
  await mj.startup.promise;
  return true;
}"""

# Text the reader sees, minus code (a code cell may print TeX or talk about `#|` legitimately).
PROSE_TEXT = """() => {
  const out = [];
  const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (w.nextNode()) {
    const el = w.currentNode.parentElement;
    if (!el || el.closest('script, style, noscript, pre, code, textarea, mjx-container, mjx-assistive-mml')) continue;
    if (!el.checkVisibility()) continue;
    out.push(w.currentNode.textContent);
  }
  return out.join(' ');
}"""

# All text in the page, shown or not, except inline code in prose (where a chapter may name `#| export`).
ALL_TEXT = """() => {
  const out = [];
  const w = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (w.nextNode()) {
    const el = w.currentNode.parentElement;
    if (el && el.closest('script, style, code.literal')) continue;
    out.push(w.currentNode.textContent);
  }
  return out.join('\\n');
}"""

MATH = """() => {
  const math = [...document.querySelectorAll('.math')];
  return {
    math: math.length,
    containers: document.querySelectorAll('mjx-container').length,
    untypeset: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
    errors: [...document.querySelectorAll('mjx-merror, [data-mjx-error]')].map(e => e.getAttribute('data-mjx-error') || e.textContent.slice(0, 80)),
  };
}"""

IMAGES = """async () => {
  const imgs = [...document.images];
  for (const img of imgs) { img.loading = 'eager'; }
  await Promise.all(imgs.map(img => img.complete ? null :
    new Promise(res => { img.addEventListener('load', res); img.addEventListener('error', res); setTimeout(res, 15000); })));
  return imgs.map(img => ({src: img.currentSrc || img.src, ok: img.complete && img.naturalWidth > 0}));
}"""


def test_every_toc_entry_has_a_page(server):
    missing_pages = [doc for doc in PAGES if not (BOOK / f"{doc}.html").is_file()]
    assert not missing_pages, f"_toc.yml entries without a built page in {BOOK}: {missing_pages}"


def test_site_root_opens_the_landing_page(tab, server):
    tab.page.goto(server, wait_until="load")
    tab.page.wait_for_url(f"{server}{PAGES[0]}.html", timeout=10_000)
    assert not tab.blocked, f"requests outside the book: {tab.blocked}"


@pytest.mark.parametrize("doc", PAGES, ids=lambda d: Path(d).name)
def test_page(tab, server, doc):
    page = tab.page
    html = BOOK / f"{doc}.html"
    assert html.is_file(), f"_toc.yml entry {doc} has no built page ({html} missing)"
    page.goto(f"{server}{doc}.html", wait_until="load", timeout=60_000)
    has_mathjax = page.evaluate(WAIT_MATHJAX)
    math = page.evaluate(MATH)
    images = page.evaluate(IMAGES)
    page.wait_for_load_state("networkidle", timeout=30_000)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{Path(doc).name}.png"), full_page=True)

    problems = []
    if tab.blocked:
        problems.append(f"requests outside the book (the book must work offline): {tab.blocked}")
    if tab.bad:
        problems.append(f"failed requests: {tab.bad}")
    if tab.errors:
        problems.append(f"script errors: {tab.errors}")
    if math["math"]:
        if not has_mathjax:
            problems.append("the page has math but MathJax did not start")
        if math["untypeset"] or not math["containers"]:
            problems.append(f"math not typeset by MathJax: {math['untypeset'][:5]}")
    if math["errors"]:
        problems.append(f"MathJax errors: {math['errors'][:5]}")
    prose = page.evaluate(PROSE_TEXT)
    raw = [t for t in RAW_TEX if t in prose]
    if raw:
        at = prose.find(raw[0])
        problems.append(f"raw TeX {raw} in the page text, e.g. …{prose[max(0, at - 60):at + 60]}…")
    broken = [i["src"] for i in images if not i["ok"]]
    if broken:
        problems.append(f"images that did not load: {broken}")
    text = page.evaluate(ALL_TEXT)
    # a directive line left in the page; the GPU-check chapter parses directives, so its code
    # and its test data hold "#|" strings by design
    directive = None if doc in ABOUT_DIRECTIVES else re.search(r"(?m)^[ \t]*#\|", text)
    if directive:
        at = directive.start()
        problems.append(f"nbdev directive text in the page: …{text[max(0, at - 60):at + 60]}…")
    if '"google.colab" in sys.modules' in text:
        problems.append("the hidden Colab install cell is shown")
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(a => a.href)")
    expected = launch_url(doc)
    if expected not in hrefs:
        problems.append(f"no Colab launch link {expected} (found {[h for h in hrefs if h.startswith(COLAB)]})")
    for href in hrefs:
        if href.startswith(f"{COLAB}/github/"):
            try:
                check_link(href)
            except AssertionError as e:
                problems.append(f"bad Colab link: {e}")
    assert not problems, f"{doc}:\n  " + "\n  ".join(problems)

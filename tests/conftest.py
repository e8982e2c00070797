"""Shared helpers for the pytest suites: the repository root, settings.ini, the book's table of contents."""
from __future__ import annotations

import configparser
import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
COLAB = "https://colab.research.google.com"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def read_settings() -> configparser.SectionProxy:
    "The `[DEFAULT]` section of settings.ini, the single source of the version and the dependencies."
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def read_yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def toc_files(toc: dict | None = None) -> list[str]:
    "Every `file:` of _toc.yml (root first, then parts, chapters and sections in order), without suffix."
    toc = read_yaml(ROOT / "_toc.yml") if toc is None else toc
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    walk(toc.get("parts"))
    walk(toc.get("chapters"))
    return [str(Path(f).with_suffix("")) if Path(f).suffix in (".ipynb", ".md") else f for f in files]


def check_link(url: str) -> str:
    "The notebook path a Colab link opens, after checking it opens this repository's branch."
    s = read_settings()
    parts = urlparse(url).path.split("/")  # '', 'github', owner, repo, 'blob', branch, *path
    assert parts[1] == "github" and parts[4] == "blob", url
    assert (parts[2], parts[3]) == (s["user"], s["repo"]), f"{url}: not {s['user']}/{s['repo']}"
    assert parts[5] == s["branch"], f"{url}: branch {parts[5]}, expected {s['branch']}"
    path = "/".join(parts[6:])
    assert path.startswith("nbs/") and path.endswith(".ipynb"), url
    assert (ROOT / path).is_file(), f"{url}: {path} does not exist"
    return path


def launch_url(docname: str) -> str:
    "The Colab launch link sphinx-book-theme builds for a page, from _config.yml."
    cfg = read_yaml(ROOT / "_config.yml")
    repo = urlparse(cfg["repository"]["url"]).path.strip("/")
    branch = cfg["repository"].get("branch", "main")
    book = (cfg["repository"].get("path_to_book") or "").strip("/")
    rel = f"{book}/{docname}.ipynb" if book else f"{docname}.ipynb"
    return f"{cfg['launch_buttons']['colab_url'].rstrip('/')}/github/{repo}/blob/{branch}/{rel}"


def missing(reason: str):
    "Fail under CI (a missing prerequisite there is a broken pipeline), skip with the reason elsewhere."
    if IN_CI:
        pytest.fail(reason + " (CI=true: this check must run)", pytrace=False)
    pytest.skip(reason)


def need(module):
    "Import an optional dependency: a missing one fails under CI (dev extras are installed there), skips elsewhere."
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(f"{module} is not installed: install the dev extras")


@pytest.fixture(scope="session")
def settings():
    return read_settings()


@pytest.fixture(scope="session")
def toc():
    return read_yaml(ROOT / "_toc.yml")


def ragged_pairs(n, seed=0):
    "Ragged pairs: after 'V:' vowels beat digits, after 'D:' the reverse (the chapters' task)."
    from dpo_lit.train import preference_task
    return preference_task(n, seed)


@pytest.fixture
def one_torch_thread():
    "Run a test with one torch thread (tiny models are fastest so), then restore the count."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

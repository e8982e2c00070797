"""The GitHub Actions workflows parse, and hold the triggers, jobs and steps that `make test` and
`make book` rely on: tests on every push and pull request, the book deployed to Pages from main."""
from __future__ import annotations

import pytest
import yaml

from conftest import ROOT

WORKFLOWS = ROOT / ".github" / "workflows"


def load(name: str) -> dict:
    path = WORKFLOWS / name
    assert path.is_file(), f"missing workflow {path.relative_to(ROOT)}"
    wf = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(wf, dict) and wf.get("jobs"), f"{name}: not a workflow (no jobs)"
    # YAML 1.1 reads the bare key `on` as the boolean True.
    wf["on"] = wf.pop(True) if True in wf else wf.get("on")
    return wf


def triggers(wf: dict) -> dict:
    on = wf["on"]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return {t: None for t in on}
    return dict(on)


def steps(job: dict) -> list[dict]:
    assert isinstance(job.get("steps"), list) and job["steps"], "job has no steps"
    for s in job["steps"]:
        assert ("uses" in s) != ("run" in s), f"a step needs exactly one of uses/run: {s}"
    return job["steps"]


def uses(step: dict, action: str) -> bool:
    "Whether a step uses `action` at a pinned major version (owner/name@vN or a commit)."
    ref = step.get("uses", "")
    return ref.split("@")[0] == action and "@" in ref and ref.split("@")[1] != ""


def find(job_steps: list[dict], action: str) -> dict:
    found = [s for s in job_steps if uses(s, action)]
    assert len(found) == 1, f"expected one step using {action}, found {len(found)}"
    return found[0]


def index(job_steps, step) -> int:
    return next(i for i, s in enumerate(job_steps) if s is step)


def runs(job_steps: list[dict], needle: str) -> list[dict]:
    return [s for s in job_steps if needle in s.get("run", "")]


def check_python_setup(job_steps):
    "Checkout first, then Python 3.11 with the pip cache keyed on the files that declare the dependencies."
    checkout = find(job_steps, "actions/checkout")
    assert index(job_steps, checkout) == 0, "checkout must be the first step"
    py = find(job_steps, "actions/setup-python")
    w = py.get("with", {})
    assert str(w.get("python-version")) == "3.11", "Python 3.11 (quote it: 3.10 would read as 3.1)"
    assert w.get("cache") == "pip"
    keyed = set(str(w.get("cache-dependency-path", "")).split())
    assert {"setup.py", "settings.ini"} <= keyed, f"pip cache must be keyed on setup.py and settings.ini, got {keyed}"
    return checkout, py


def check_cpu_torch(wf, job):
    "torch==2.13.0 comes from the PyTorch CPU index, not as CUDA wheels from PyPI."
    env = {**(wf.get("env") or {}), **(job.get("env") or {})}
    assert env.get("PIP_EXTRA_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def test_wf():
    return load("test.yml")


@pytest.fixture(scope="module")
def book_wf():
    return load("book.yml")


def test_workflow_files_are_yaml():
    names = sorted(p.name for p in WORKFLOWS.glob("*.y*ml"))
    assert names == ["book.yml", "test.yml"], names
    for name in names:
        load(name)


def test_tests_run_on_push_and_pull_request(test_wf):
    on = triggers(test_wf)
    assert "push" in on and "pull_request" in on, on
    # No branch filter: every push and every pull request is tested.
    assert not (on["push"] or {}).get("branches") and not (on["pull_request"] or {}).get("branches")


def test_test_job_runs_make_test(test_wf):
    assert list(test_wf["jobs"]) == ["test"]
    job = test_wf["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"
    job_steps = steps(job)
    _, py = check_python_setup(job_steps)
    check_cpu_torch(test_wf, job)
    install = [s for s in runs(job_steps, "chromium") if "apt-get install" in s["run"]]
    assert len(install) == 1, "one step installs Chromium with apt-get"
    make = [s for s in job_steps if s.get("run", "").strip() == "make test"]
    assert len(make) == 1, "one step runs exactly `make test`"
    assert index(job_steps, py) < index(job_steps, install[0]) < index(job_steps, make[0])
    assert not make[0].get("continue-on-error"), "a failing `make test` must fail the job"
    assert (test_wf.get("permissions") or job.get("permissions")) == {"contents": "read"}


def test_book_deploys_from_main(book_wf):
    on = triggers(book_wf)
    assert set(on) == {"push", "workflow_dispatch"}, on
    assert on["push"]["branches"] == ["main"]
    assert book_wf["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert book_wf["concurrency"]["group"] == "pages"
    assert book_wf["concurrency"].get("cancel-in-progress") is False, "never cancel a deployment half-way"


def test_book_build_job(book_wf):
    job = book_wf["jobs"]["build"]
    assert job["runs-on"] == "ubuntu-latest"
    job_steps = steps(job)
    _, py = check_python_setup(job_steps)
    check_cpu_torch(book_wf, job)
    build = [s for s in job_steps if s.get("run", "").strip() == "make book"]
    assert len(build) == 1, "one step runs exactly `make book` (every notebook executed)"
    upload = find(job_steps, "actions/upload-pages-artifact")
    assert upload["with"]["path"].rstrip("/") == "_build/html"
    assert index(job_steps, py) < index(job_steps, build[0]) < index(job_steps, upload)


def test_book_deploy_job(book_wf):
    job = book_wf["jobs"]["deploy"]
    assert job["needs"] in ("build", ["build"])
    assert job["environment"]["name"] == "github-pages"
    deploy = find(steps(job), "actions/deploy-pages")
    assert deploy.get("id"), "the deploy step needs an id for the environment url"
    assert job["environment"]["url"].replace(" ", "") == "${{steps.%s.outputs.page_url}}" % deploy["id"]


def test_makefile_has_the_targets_the_workflows_call():
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("test", "book"):
        assert f"\n{target}:" in text, f"Makefile has no `{target}` target"

"""The package as users get it: `python -m build` makes an sdist and a wheel that pass `twine check`;
the wheel, installed into a fresh virtualenv without the dev extras, imports every dpo_lit module,
computes a DPO loss and takes a training step; it declares only numpy, torch, matplotlib and tqdm
(the rest are extras), at the version settings.ini gives."""
from __future__ import annotations

import contextlib
import email.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, read_settings

RUNTIME = {"numpy", "torch", "matplotlib", "tqdm"}
TIMES: dict[str, float] = {}


def torch_pin() -> str:
    "The torch requirement the Makefile installs (the CPU build), so the fresh venv gets the same one."
    m = re.search(r"^TORCH_PIN\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    return m.group(1) if m else "torch==2.13.0"


def sh(*args, cwd=None, timeout=600, env=None) -> str:
    out = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@contextlib.contextmanager
def timed(name):
    t0 = time.perf_counter()
    yield
    TIMES[name] = time.perf_counter() - t0
    print(f"\npackage step {name}: {TIMES[name]:.1f} s")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    "sdist and wheel built the way a release is: the wheel from the sdist, in an isolated environment."
    out = tmp_path_factory.mktemp("dist")
    with timed("build"):
        sh(sys.executable, "-m", "build", "--outdir", out, ROOT, cwd=ROOT)
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope="module")
def metadata(dist):
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode("utf-8"))


@pytest.fixture(scope="module")
def wheel_modules(dist):
    "Every importable module the wheel ships, from its file list."
    wheel, _ = dist
    with zipfile.ZipFile(wheel) as z:
        files = [n for n in z.namelist() if n.startswith("dpo_lit/") and n.endswith(".py")]
    mods = []
    for f in sorted(files):
        parts = f[: -len(".py")].split("/")
        mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(mods))


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    "A fresh virtualenv (no system site-packages) with the CPU torch and the wheel, no extras."
    wheel, _ = dist
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    py = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", py]  # this pip drives the venv: no ensurepip needed
    with timed("venv + install"):
        sh(sys.executable, "-m", "venv", "--without-pip", env_dir)
        sh(*pip, "install", "-q", torch_pin(), wheel, timeout=900)
    sh(*pip, "check")
    return env_dir


def test_twine_check(dist):
    with timed("twine check"):
        out = sh(sys.executable, "-m", "twine", "check", "--strict", *dist)
    assert out.count("PASSED") == 2, out


def test_version_has_one_source(dist, metadata):
    version = read_settings()["version"]
    wheel, sdist = dist
    assert metadata["Version"] == version
    assert wheel.name.startswith(f"dpo_lit-{version}-") and sdist.name == f"dpo_lit-{version}.tar.gz"
    init = (ROOT / "dpo_lit" / "__init__.py").read_text(encoding="utf-8")
    assert f'__version__ = "{version}"' in init, "nbdev_export writes settings.ini's version into __init__.py"
    assert not re.search(r'version\s*=\s*["\']\d', (ROOT / "setup.py").read_text()), "setup.py must read it"


def test_runtime_dependencies(metadata):
    base, extras = set(), {}
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        marker = str(req.marker or "")
        m = re.search(r'extra\s*==\s*"([^"]+)"', marker)
        if m:
            extras.setdefault(m.group(1), set()).add(canonicalize_name(req.name))
        else:
            base.add(canonicalize_name(req.name))
    assert base == RUNTIME, f"runtime dependencies must be exactly {sorted(RUNTIME)}, got {sorted(base)}"
    assert set(metadata.get_all("Provides-Extra") or []) >= set(extras)
    optional = set().union(*(v for k, v in extras.items() if k != "dev"))
    assert {"transformers", "datasets", "peft"} <= optional, extras
    assert any(k.startswith("bench") for k in extras), f"no benchmarking extra: {sorted(extras)}"
    assert metadata["Requires-Python"], "Requires-Python is declared"
    assert metadata["License-Expression"] == "Apache-2.0" or "Apache" in (metadata["License"] or "")


def test_wheel_contents(dist, wheel_modules):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dpo_lit"}, f"unexpected top-level entries: {top}"
    assert any(n.endswith("LICENSE") and ".dist-info/" in n for n in names), "LICENSE is not in the wheel"
    source = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "dpo_lit").rglob("*.py")
    )
    assert wheel_modules == source, f"the wheel's modules differ from dpo_lit/: {set(wheel_modules) ^ set(source)}"
    modidx = {}
    exec((ROOT / "dpo_lit" / "_modidx.py").read_text(encoding="utf-8"), modidx)
    assert set(modidx["d"]["syms"]) <= set(wheel_modules), "a module nbdev indexes is missing from the wheel"
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    for f in ("LICENSE", "CHANGELOG.md", "README.md", "settings.ini", "setup.py", "pyproject.toml"):
        assert f in members, f"{f} missing from the sdist"


# Runs inside the fresh virtualenv, from a directory outside the repository.
SMOKE = r"""
import importlib, importlib.util, json, math, sys, time
from pathlib import Path
modules, version = json.loads(sys.argv[1]), sys.argv[2]
report = {}
for m in modules:
    importlib.import_module(m)
import dpo_lit
assert Path(dpo_lit.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), dpo_lit.__file__
assert dpo_lit.__version__ == version, dpo_lit.__version__
for dev in ("nbdev", "fastcore", "transformers", "datasets", "peft", "trl", "pytest"):
    assert importlib.util.find_spec(dev) is None, f"{dev} is installed without the extras"

import numpy as np
from dpo_lit.objective import dpo_loss, dpo_gradients
beta = 0.1
pc, pr = np.array([-3.0, -7.5, -1.25]), np.array([-4.0, -6.0, -9.0])
rc, rr = np.array([-3.5, -7.0, -2.0]), np.array([-3.75, -6.5, -8.0])
z = beta * ((pc - rc) - (pr - rr))
expected = float(np.mean([math.log1p(math.exp(-v)) for v in z]))
assert abs(dpo_loss(pc, pr, rc, rr, beta=beta) - expected) < 1e-12
g = dpo_gradients(pc, pr, rc, rr, beta=beta)
sig = 1 / (1 + np.exp(z))
assert np.allclose(g["grad_chosen"], -beta * sig / 3) and np.allclose(g["grad_rejected"], beta * sig / 3)
report["dpo_loss"] = expected

import torch
losses_mod = importlib.import_module("dpo_lit.losses") if importlib.util.find_spec("dpo_lit.losses") else None
if losses_mod is not None:
    T = lambda a: torch.tensor(a, dtype=torch.float64)
    losses, chosen, rejected = losses_mod.preference_loss(T(pc), T(pr), T(rc), T(rr), beta=beta, loss_type="sigmoid")
    assert abs(float(losses.mean()) - expected) < 1e-9
    assert torch.allclose(chosen, beta * (T(pc) - T(rc))) and torch.allclose(rejected, beta * (T(pr) - T(rr)))
    assert "sigmoid" in losses_mod.LOSS_TYPES
    report["loss_types"] = list(losses_mod.LOSS_TYPES)
else:
    report["missing"] = ["dpo_lit.losses"]

if importlib.util.find_spec("dpo_lit.train") and importlib.util.find_spec("dpo_lit.data"):
    from dpo_lit.train import DPOConfig, DPOTrainer
    from dpo_lit.data import ByteTokenizer
    torch.manual_seed(0)
    tok = ByteTokenizer()
    vocab = getattr(tok, "vocab_size", None) or len(tok)

    class TinyLM(torch.nn.Module):
        "A bigram model: enough to have logits that depend on the tokens."
        def __init__(self, vocab, dim=16):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, vocab)
        def forward(self, input_ids, attention_mask=None):
            return self.head(self.emb(input_ids))

    data = [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "sky is ", "chosen": "blue", "rejected": "green"},
        {"prompt": "cat says ", "chosen": "meow", "rejected": "woof"},
        {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
    ]
    model = TinyLM(vocab)
    config = DPOConfig(beta=0.1, max_steps=2, batch_size=2, learning_rate=1e-2, seed=0, device="cpu",
                       precision="fp32", output_dir=None, progress_bar=False, verbose=False)
    before = [q.detach().clone() for q in model.parameters()]
    t0 = time.perf_counter()
    history = DPOTrainer(model, ref_model=None, tokenizer=tok, train_dataset=data, config=config).train()
    report["train_seconds"] = time.perf_counter() - t0
    assert history, "train() returned no history"
    first = history[0]
    for key in ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in first, f"history lacks {key}: {sorted(first)}"
    # With the reference a frozen copy of the policy, the first step's loss is log 2.
    assert abs(float(first["loss"]) - math.log(2)) < 1e-4, first["loss"]
    assert all(math.isfinite(float(h["loss"])) for h in history)
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters())), "no parameter moved"
    report["history"] = [{k: float(v) for k, v in h.items() if isinstance(v, (int, float))} for h in history]
else:
    report.setdefault("missing", []).extend(m for m in ("dpo_lit.train", "dpo_lit.data") if not importlib.util.find_spec(m))
print(json.dumps(report))
"""


def test_fresh_install_imports_and_trains(venv, wheel_modules, tmp_path):
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["MPLBACKEND"] = "Agg"
    with timed("smoke run"):
        out = sh(py, "-c", SMOKE, json.dumps(wheel_modules), read_settings()["version"], cwd=tmp_path, env=env)
    report = json.loads(out.strip().splitlines()[-1])
    print("\nfresh-venv smoke run:", json.dumps(report))
    assert not report.get("missing"), f"modules the package should have are missing: {report['missing']}"


def test_console_script(venv):
    "The `dpo-lit` command that settings.ini declares is installed and answers --help."
    scripts = read_settings().get("console_scripts", "").split()
    if not scripts:
        pytest.skip("settings.ini declares no console script")
    for spec in scripts:
        name = spec.split("=")[0]
        out = subprocess.run([venv / "bin" / name, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), f"`{name} --help` failed:\n{out.stderr[-2000:]}"


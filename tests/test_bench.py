"""Smoke tests of the benchmark harness `dpo_lit.bench` on tiny sizes: the instruments measure what
they claim (known allocations, call order, token counts), the suites run end to end and write their
JSON, and the command line answers bad input with one line. No assertion here depends on timing."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_lit import bench

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dpo_lit.bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_peak_memory_counts_known_allocations():
    "The benchmarks measure peak memory with dpo_lit.logprobs.peak_memory, the one implementation of the method."
    from dpo_lit.logprobs import peak_memory
    assert bench.peak_memory is peak_memory and not hasattr(bench, "peak_bytes")

    def fn():
        a = torch.empty(250_000)            # 1 MB
        b = torch.empty(500_000)            # 2 MB, both held: 3 MB
        del a
        c = torch.empty(125_000)            # 0.5 MB, 2.5 MB held
        return b, c
    assert bench.peak_memory(fn) == 3_000_000
    held = torch.ones(1_000_000)            # held before: not counted
    assert bench.peak_memory(lambda: torch.empty(1000)) == 4000
    del held
    with pytest.raises(ValueError, match="peak_memory"):
        bench.peak_memory(lambda: None, device="meta")


def test_measure_and_compare():
    calls = []
    out = bench.compare({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, repeats=3)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    for r in out.values():
        assert r["q1"] <= r["median"] <= r["q3"] and len(r["times"]) == 3 and r["iqr"] >= 0
    with pytest.raises(ValueError, match="warmup"):
        bench.measure(lambda: None, warmup=-1)
    with pytest.raises(ValueError, match="fns"):
        bench.compare({})


def test_step_clock_counts_non_pad_tokens_of_gradient_forwards():
    model = bench.small_gpt2(32, n_embd=8, n_layer=1, n_head=2)
    clock = bench.StepClock(model)
    ids = torch.randint(3, 32, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 2:] = 0
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    clock.remove()
    model(input_ids=ids, attention_mask=mask)          # after removal: not counted
    assert clock.tokens == [12, 12, 12]
    r = clock.rate(warmup=1, steps=1)
    assert r["tokens"] == 12 and r["seconds"] > 0
    with pytest.raises(RuntimeError, match="forwards"):
        clock.rate(warmup=2, steps=1)


def test_numpy_bench_warnings_and_agreement():
    r = bench.bench_numpy(2000, repeats=1)
    assert r["warnings"]["reference"] == 0 and r["warnings"]["straightforward"] > 0
    assert abs(r["loss"]["reference"] - r["loss"]["straightforward"]) < 1e-9


def test_logprob_methods_agree():
    rows = bench.bench_logprobs((300,), n_tokens=40, hidden=8, repeats=1)
    assert [r["method"] for r in rows] == list(bench.LOGPROB_METHODS)
    assert all(r["max_rel_diff"] < 1e-5 and r["peak_bytes"] > 0 for r in rows)
    with pytest.raises(ValueError, match="method"):
        bench.logprob_step("magic", *bench.logprob_problem(10, n_tokens=4, hidden=2))


def test_flop_count():
    assert bench.step_flops(100, 10) == 8000 and bench.step_flops(100, 10, live_reference=False) == 6000
    model = bench.small_gpt2(32, n_embd=8, n_layer=1, n_head=2)
    # tied output layer counted once; position/token embeddings are lookups, not products
    per_layer = 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8
    assert bench.matmul_params(model) == per_layer + 32 * 8


@pytest.mark.parametrize("args, message", [
    (["--suite", "tpu"], "invalid choice"),
    (["--repeats", "0"], "--repeats"),
    (["--vocab-sizes", "32k"], "--vocab-sizes"),
    (["--device", "gpu"], "--device"),
    (["--suite", "numpy", "--bogus"], "unrecognized"),
])
def test_cli_bad_arguments_are_one_line(args, message):
    p = run_cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr


def test_cli_help_lists_suites():
    p = run_cli("--help")
    assert p.returncode == 0
    for suite in bench.SUITES:
        assert suite in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_gpu_suite_without_gpu_is_one_line():
    p = run_cli("--suite", "gpu")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "CUDA" in p.stderr


@pytest.mark.parametrize("suite", ["numpy", "logprobs"])
def test_cli_suite_smoke_writes_json(tmp_path, suite):
    out = tmp_path / f"{suite}.json"
    p = run_cli("--suite", suite, "--smoke", "--out", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["suite"] == suite and res["smoke"] and suite in res["results"]
    assert {"date", "cpu", "cores", "torch", "numpy"} <= set(res["machine"])
    assert bench.load_results(tmp_path)[0]["suite"] == suite


@pytest.mark.slow
def test_trainer_suite_smoke(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "trainer.json"
    p = run_cli("--suite", "trainer", "--smoke", "--out", str(out))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())["results"]["trainer"]
    for setting in ("equal", "best"):
        s = res["settings"][setting]
        assert s["dpo_lit"]["tokens_per_s"] > 0 and s["trl"]["tokens_per_s"] > 0 and s["ratio"] > 0

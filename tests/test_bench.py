"""Smoke tests of the benchmark harness `dpo_lit.bench` on tiny sizes: the instruments measure what
they claim (known allocations, call order, token counts), the suites run end to end and write their
JSON, and the command line answers bad input with one line. No assertion here depends on timing."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpo_lit import bench

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "dpo_lit.bench", *args], cwd=ROOT,
                          capture_output=True,
                          text=True, timeout=timeout)


def test_peak_memory_counts_known_allocations():
    "Allocation sizes do not depend on the CPU's kernels: these are exact."

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
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = bench.compare(fns, warmup=2, repeats=3)
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
    "Two different expressions of the loss agree to float64 rounding (relative, not bitwise)."
    cases = bench.bench_numpy_cases(2000, repeats=1)["cases"]
    assert set(cases) == set(bench.NUMPY_CASES) == {"realistic", "extreme"}
    for r in cases.values():
        assert r["warnings"]["dpo_loss"] == 0
        loss = r["loss"]
        assert abs(loss["dpo_loss"] / loss["both branches"] - 1) < 1e-12
    realistic, extreme = cases["realistic"], cases["extreme"]
    assert realistic["overflowing_pairs"] == 0 and realistic["warnings"]["both branches"] == 0
    assert realistic["median_abs_z"] < 5                      # beta 0.1, spread 10: |z| ~ 1
    assert extreme["overflowing_pairs"] > 1000 and extreme["warnings"]["both branches"] > 0
    # the NumPy loss against an independent float64 reference: log1p(exp(-z)) in extended form
    z = np.array([-800.0, -30.0, -1.0, 0.0, 2.0, 40.0, 900.0])
    expected = np.mean(np.logaddexp(0.0, -z))                 # -log sigma(z), overflow-free
    zero = np.zeros_like(z)
    with np.errstate(over="ignore"):                           # the unused branch overflows
        got = bench.straightforward_dpo_loss(z, zero, zero, zero, beta=1.0)
    assert got == pytest.approx(expected, rel=1e-12)


def test_logprob_methods_agree():
    "Different code paths: compared with a float32 tolerance, relative to the largest sum."
    rows = bench.bench_logprobs((300,), n_tokens=40, hidden=8, repeats=1)
    assert [r["method"] for r in rows] == list(bench.LOGPROB_METHODS)
    assert all(r["max_rel_diff"] < 1e-5 and r["peak_bytes"] > 0 for r in rows)
    with pytest.raises(ValueError, match="method"):
        bench.logprob_step("magic", *bench.logprob_problem(10, n_tokens=4, hidden=2))


def test_logps_memory_benchmark_scores_n_tokens_and_orders_the_paths():
    "N scored tokens: rows of N/rows + 1 ids; the naive path holds at least logits + log-softmax."
    h, W, ids, mask = bench.logprob_problem(64, n_tokens=32 + 4, hidden=4, rows=4)
    assert ids.shape == (4, 9) and int(mask[:, 1:].sum()) == 32
    mem = bench.logps_memory_benchmark(1024, 4096, hidden_size=64, rows=8, chunk_size=64)
    logits = 8 * (1024 // 8 + 1) * 4096 * 4
    assert mem["naive"] >= 2 * 1024 * 4096 * 4 and mem["chunked"] >= 2 * logits
    assert 4 * mem["fused"] < mem["chunked"] < mem["naive"]


def test_no_duplicate_helpers_in_bench():
    "bench imports the library's log-prob paths and the NumPy loss rather than copying them."
    import dpo_lit.logprobs as L
    from dpo_lit.objective import dpo_loss
    assert bench.sequence_logps is L.sequence_logps
    assert bench.fused_sequence_logps is L.fused_sequence_logps and bench.dpo_loss is dpo_loss
    from dpo_lit.cli import OneLineParser
    assert isinstance(bench.build_parser(), OneLineParser)


def test_flop_count():
    assert bench.step_flops(100, 10) == 8000
    assert bench.step_flops(100, 10, live_reference=False) == 6000
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
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


def made_up_trainer(dpo=(0.1, 20), trl=(0.2, 10), steps=10):
    "A trainer result whose numbers are known: (seconds per step, tokens per step) per side."
    def side(seconds, tokens):
        run = {"tokens": tokens * steps, "seconds": seconds * steps,
               "tokens_per_s": tokens / seconds, "step_s": {"median": seconds}}
        return {"tokens_per_s": tokens / seconds, "tokens_per_s_iqr": 0.0, "flops_per_s": 1e9,
                "runs": [run]}
    ratio = (dpo[1] / dpo[0]) / (trl[1] / trl[0])
    return {"steps": steps, "n_params": 1000, "settings": {
        s: {"options": {"precompute_ref": s == "best"}, "ratio": ratio, "ratios": [ratio],
            "dpo_lit": side(*dpo), "trl": side(*trl)} for s in ("equal", "best")}}


def test_ratio_explanation_connects_step_time_and_tokens_per_second():
    text = bench.ratio_explanation(made_up_trainer((0.1, 30), (0.25, 10)))
    assert "**2.50×** by step time" in text and "factor of 3.000" in text
    assert "2.50 × 3.000 = 7.50" in text and "**7.50×**" in text


def test_targets_never_mark_a_gpu_target_met_without_gpu_results():
    numpy = {"cases": {"realistic": {"speedup": 1.5, "warnings": {"dpo_loss": 0}}}}
    logprobs = [{"method": "fused", "vocab": 8, "memory_vs_naive": 0.2, "time_vs_naive": 1.0}]
    rows = bench.targets(numpy, logprobs, made_up_trainer(), gpu=None)
    gpu = [r for r in rows if r["target"].startswith("GPU")]
    assert len(gpu) == len(bench.GPU_TARGETS) and all(r["ok"] is None for r in gpu)
    table = bench.targets_table(rows, markdown=True).splitlines()
    assert all(line.endswith("| not measured |") for line in table if line.startswith("| GPU"))
    trainer = [line for line in table if line.startswith("| trainer")]
    assert len(trainer) == 2 and all(line.endswith("| met on CPU only |") for line in trainer)
    slow = bench.targets(numpy, logprobs, made_up_trainer((0.4, 10), (0.2, 10)), gpu=None)
    assert [r["ok"] for r in slow if r["target"].startswith("trainer")] == [False, False]


def test_mfu_is_quoted_to_two_significant_figures():
    "MFU = achieved FLOP/s (1e9 in the made-up result) over the matmul rate, to two figures."
    rate = {"flops_per_s": 1.5e9, "n": 64}
    rows = bench.floor_rows(made_up_trainer(), rate)
    assert all(r["mfu"] == pytest.approx(2 / 3) for r in rows)
    table = bench.floor_table(made_up_trainer(), rate)
    assert "67%" in table and "66.7" not in table
    summary = bench.mfu_summary(made_up_trainer(), rate, 3e9)
    assert summary.count("67%") == 4 and "66.7" not in summary and "3 GFLOP/s" in summary


def test_results_file_parts_are_found_and_described():
    folder = ROOT / "nbs" / "bench_results"
    files = bench.load_results(folder)
    assert files, "no result file in nbs/bench_results"
    numpy = bench.latest_results(files, "numpy", lambda part: "cases" in part)
    assert numpy is not None and set(numpy["results"]["numpy"]["cases"]) == set(bench.NUMPY_CASES)
    trainer = bench.latest_results(files, "trainer", lambda part: part["device"] == "cpu")
    assert trainer is not None and trainer["machine"]["gpu"] is None
    assert bench.latest_results(files, "trainer", lambda p: p["device"].startswith("cuda")) is None
    assert "GPU: none" in bench.describe_run(trainer)

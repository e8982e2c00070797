"""Distributed training under torchrun on CPU (gloo), through the command line: 2 processes with
micro-batches of 4 reach the weights of 1 process with batches of 8 (DDP and FSDP), and a 2-process
run with a precomputed reference, stopped and resumed, reaches the weights of an uninterrupted one."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

STEPS = 4
COMMON = ["--model", "tiny", "--max-steps", str(STEPS), "--learning-rate", "3e-4", "--lr-scheduler", "constant",
          "--max-length", "48", "--progress-bar", "false", "--verbose", "false", "--save-steps", "2"]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"): e.pop(k, None)
    return e


def one(args, timeout=120):
    res = subprocess.run([sys.executable, "-m", "dpo_lit", "train", *args], capture_output=True, text=True,
                         env=env(), timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def two(args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dpo_lit", "train", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return res


def weights(run, step=STEPS):
    return torch.load(run / f"checkpoint-{step}" / "model.pt", map_location="cpu", weights_only=True)


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The single-process reference run, shared by the tests."
    tmp = tmp_path_factory.mktemp("dist")
    rng = random.Random(0)
    with open(tmp / "prefs.jsonl", "w") as f:
        for _ in range(36):     # 36 = 4 full windows of 8 and a last window of 4 (2 pairs per rank)
            kind = rng.choice("VD")
            v = "".join(rng.choice("aeiou") for _ in range(rng.randint(1, 10)))
            d = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 10)))
            f.write(json.dumps(dict(prompt="x" * rng.randint(0, 6) + kind + ":", chosen=v if kind == "V" else d,
                                    rejected=d if kind == "V" else v)) + "\n")
    data = ["--data", str(tmp / "prefs.jsonl")]
    one([*data, *COMMON, "--batch-size", "8", "--output-dir", str(tmp / "single")])
    return tmp, data


def test_ddp_two_ranks_match_one_process(runs):
    tmp, data = runs
    res = two([*data, *COMMON, "--batch-size", "4", "--output-dir", str(tmp / "ddp"), "--verbose", "true"])
    ref, got = weights(tmp / "single"), weights(tmp / "ddp")
    start = torch.load(tmp / "single" / "checkpoint-2" / "model.pt", weights_only=True)
    assert max_diff(ref, start) > 1e-4                      # the weights did move
    assert max_diff(ref, got) <= 1e-6
    # only rank 0 logs and writes: one summary, one metrics line per step, averaged over ranks
    assert res.stdout.count("DPOTrainer:") == 1 and "on 2 ranks (ddp)" in res.stdout
    rows = [json.loads(l) for l in (tmp / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(l) for l in (tmp / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(rows, single):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), (k, a[k], b[k])
    # accuracies count margins > 0: at step 1 the policy is its own frozen copy, every margin is 0
    # (a tie, counted as one half) in both runs; later the margins must stand far above float32
    # rounding for the counts to be comparable
    assert rows[0]["rewards/accuracies"] == single[0]["rewards/accuracies"] == 0.5
    for a, b in zip(rows[1:], single[1:]):
        assert abs(b["rewards/margins"]) > 1e-4, b
        assert a["rewards/accuracies"] == b["rewards/accuracies"], (a["step"], a, b)


def test_fsdp_two_ranks_match_one_process(runs):
    tmp, data = runs
    two([*data, *COMMON, "--batch-size", "4", "--distributed", "fsdp", "--output-dir", str(tmp / "fsdp")])
    assert max_diff(weights(tmp / "single"), weights(tmp / "fsdp")) <= 1e-6
    assert (tmp / "fsdp" / "final" / "model.pt").exists()


def test_resume_across_ranks_with_precomputed_reference(runs):
    tmp, data = runs
    args = [*data, *COMMON, "--batch-size", "4", "--precompute-ref", "true", "--output-dir", str(tmp / "pre")]
    two([*args, "--max-steps", "2"])
    assert not (tmp / "pre" / f"checkpoint-{STEPS}").exists()
    res = two([*args, "--resume", "--verbose", "true"])
    assert res.stdout.count("reusing cached reference log-probs") == 1      # rank 0 says it, once per data set
    assert max_diff(weights(tmp / "single"), weights(tmp / "pre")) <= 1e-6

"""Tests of dpo_lit.tracking beyond the chapter's lessons: TensorBoard event files and offline
W&B run files read back and compared with what was logged, the arguments W&B receives, trackers
that fail while logging or while starting, and the errors for bad names, missing packages and
run names."""
import dataclasses
import glob
import time
import json
import os
import random
import struct
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dpo_lit.tracking as tracking
from dpo_lit.tracking import (Tracker, Trackers, TrackerWarning, make_trackers, parse_report_to,
                              scalar_metrics)
from conftest import need

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}


def f32(x):
    "x rounded to IEEE float32, independently of numpy and torch."
    return struct.unpack("<f", struct.pack("<f", x))[0]


def trainer_rows(n_steps, logging_steps=3, seed=0):
    "Rows shaped like the trainer's (every `logging_steps` and the last step), flags, eval rows."
    rng = random.Random(seed)
    rows = []
    for step in range(1, n_steps + 1):
        if step % logging_steps and step != n_steps:
            continue
        row = {"step": step, "epoch": step / n_steps, "loss": rng.uniform(0.1, 0.8),
               "rewards/chosen": rng.gauss(0, 1), "rewards/rejected": rng.gauss(-1, 1),
               "rewards/accuracies": rng.choice([0.5, 0.625, 1.0]),
               "rewards/margins": rng.gauss(1, 1),
               "logps/chosen": rng.gauss(-40, 5), "logps/rejected": rng.gauss(-45, 5),
               "nll_loss": rng.uniform(1, 3), "grad_norm": rng.uniform(0, 5),
               "lr": 1e-3 * step / n_steps,
               "tokens_per_second": rng.uniform(1e3, 1e4)}
        if step % 4 == 0:
            row["skipped"] = True
        if step % 6 == 0:
            row.update({"eval_loss": rng.uniform(0.1, 0.8),
                        "eval_rewards/accuracies": rng.random()})
        row["note"] = "not a number"
        rows.append(row)
    return rows


def numeric_items(row):
    "The entries a tracker must plot, computed without dpo_lit: numbers (bool as 0/1), not step."
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


# ----- names, values, arguments -----

def test_scalar_metrics_accepts_tensors_and_arrays_and_drops_the_rest():
    row = {"step": 3, "a": torch.tensor(2.5), "b": torch.tensor([1.5]), "c": torch.ones(2),
           "d": np.int64(4), "e": np.float32(0.1), "f": False, "g": None, "h": "x", "i": [1.0]}
    assert scalar_metrics(row) == {"a": 2.5, "b": 1.5, "d": 4.0, "e": f32(0.1), "f": 0.0}


@pytest.mark.parametrize("spec, names", [
    (None, ()), ([], ()), ("none", ()), ("NONE", ()), ((), ()), ("wandb", ("wandb",)),
    (" tensorboard , wandb ", ("tensorboard", "wandb")), (["wandb", "wandb"], ("wandb",)),
    (("tensorboard",), ("tensorboard",))])
def test_parse_report_to(spec, names):
    assert parse_report_to(spec) == names


@pytest.mark.parametrize("spec, error, words", [
    ("mlflow", ValueError, ["unknown tracker 'mlflow'", "'none'", "'tensorboard'", "'wandb'"]),
    (["tensorboard", "comet"], ValueError, ["'comet'"]),
    ("none,wandb", ValueError, ["'none' cannot be combined"]),
    ({"wandb"}, TypeError, ["report_to: expected"]), ([1], TypeError, ["report_to: expected"])])
def test_parse_report_to_errors_name_the_problem(spec, error, words):
    with pytest.raises(error) as e:
        make_trackers(spec, output_dir="unused")
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_missing_package_is_an_import_error_naming_the_extra(name, tmp_path, monkeypatch):
    other = {"tensorboard": "wandb", "wandb": "tensorboard"}[name]
    monkeypatch.setitem(sys.modules, name, None)             # import fails as if not installed
    monkeypatch.setitem(sys.modules, other, types.ModuleType(other))   # the other one is there
    with pytest.raises(ImportError) as e:
        make_trackers(["tensorboard", "wandb"], output_dir=tmp_path)
    msg = str(e.value)
    assert f"report_to={name!r}" in msg and "pip install 'dpo_lit[tracking]'" in msg
    assert list(tmp_path.iterdir()) == []                    # checked before anything started


@pytest.mark.parametrize("run_name", ["", ".", "..", "a/b", "../up", 3])
def test_bad_run_name(run_name, tmp_path):
    with pytest.raises(ValueError, match="run_name: expected a folder name"):
        make_trackers("tensorboard", output_dir=tmp_path, run_name=run_name)


def test_tensorboard_needs_output_dir():
    with pytest.raises(ValueError, match="output_dir: report_to='tensorboard' needs one"):
        make_trackers(["wandb", "tensorboard"])


def test_none_writes_nothing(tmp_path):
    for spec in (None, [], "none"):
        with make_trackers(spec, output_dir=tmp_path) as t:
            for row in trainer_rows(10):
                t.log(row, row["step"])
        assert t.names == ()
    assert list(tmp_path.iterdir()) == []


def test_bad_log_arguments_raise_before_any_tracker_sees_them():
    seen = []

    class Recorder(Tracker):
        def log(self, metrics, step): seen.append(step)

    t = Trackers([Recorder()])
    for step in (-1, 1.0, True, "3", None):
        with pytest.raises(ValueError, match="step: expected a non-negative integer"):
            t.log({"loss": 1.0}, step)
    with pytest.raises(TypeError, match="metrics: expected a dict"):
        t.log([("loss", 1.0)], 1)
    assert seen == []
    t.close()
    t.close()                                               # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        t.log({"loss": 1.0}, 1)


# ----- TensorBoard: the event file read back -----

def read_events(log_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def expected_curves(rows):
    out = {}
    for r in rows:
        for k, v in numeric_items(r).items():
            out.setdefault(k, []).append((r["step"], f32(v)))
    return out


def test_tensorboard_event_file_holds_what_was_logged(tmp_path):
    need("tensorboard")
    from dpo_lit.train import DPOConfig
    cfg = DPOConfig(beta=0.25, output_dir=str(tmp_path))
    rows = trainer_rows(40)
    with make_trackers("tensorboard", output_dir=tmp_path, config=cfg, run_name="r1") as t:
        for r in rows:
            t.log(r, r["step"])
    acc = read_events(tmp_path / "runs" / "r1")
    got = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}
    assert got == expected_curves(rows)
    assert "note" not in got and "step" not in got and got["skipped"][0] == (12, 1.0)
    assert {"rewards/accuracies", "eval_rewards/accuracies"} <= set(got)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
    assert config["beta"] == 0.25 and config["output_dir"] == str(tmp_path)
    assert set(config) == {f.name for f in dataclasses.fields(DPOConfig)}


def test_tensorboard_default_run_name_and_a_second_run(tmp_path):
    need("tensorboard")
    with make_trackers("tensorboard", output_dir=tmp_path) as t:
        t.log({"loss": 0.5}, 1)
    (run,) = list((tmp_path / "runs").iterdir())
    assert run.name.endswith("_" + __import__("socket").gethostname()) and run.name[:8].isdigit()
    with make_trackers("tensorboard", output_dir=tmp_path, run_name="second") as t:
        t.log({"loss": 0.25}, 1)
    assert [(e.step, e.value) for e in read_events(run).Scalars("loss")] == [(1, 0.5)]
    assert [(e.step, e.value) for e in read_events(tmp_path / "runs" / "second").Scalars("loss")] \
        == [(1, 0.25)]


def test_tensorboard_curves_are_on_disk_before_close(tmp_path):
    "A crashed run keeps its curves: every row is flushed when log returns."
    need("tensorboard")
    t = make_trackers("tensorboard", output_dir=tmp_path, run_name="live")
    rows = trainer_rows(9)
    for r in rows:
        t.log(r, r["step"])
    got = {k: [(e.step, e.value) for e in read_events(tmp_path / "runs" / "live").Scalars(k)]
           for k in ("loss", "grad_norm")}
    assert got == {k: expected_curves(rows)[k] for k in ("loss", "grad_norm")}
    t.close()


# ----- W&B: the arguments, and an offline run file read back -----

class FakeRun:
    def __init__(self, **kw):
        self.kw, self.rows, self.finished = kw, [], 0

    def log(self, values, step):
        self.rows.append((step, dict(values)))

    def finish(self):
        self.finished += 1


def fake_wandb(monkeypatch, init=None):
    runs = []
    mod = types.ModuleType("wandb")

    def default_init(**kw):
        runs.append(FakeRun(**kw))
        return runs[-1]
    mod.init = init or default_init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return runs


def test_wandb_init_arguments_and_rows(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    rows = trainer_rows(12)
    with make_trackers("wandb", output_dir=tmp_path / "out", config={"beta": 0.1, "p": Path("x")},
                       run_name="r") as t:
        for r in rows:
            t.log(r, r["step"])
    (run,) = runs
    assert run.kw == dict(project="my-project", config={"beta": 0.1, "p": "x"}, name="r",
                          reinit="create_new", dir=str(tmp_path / "out"))
    assert (tmp_path / "out").is_dir()
    assert run.rows == [(r["step"], numeric_items(r)) for r in rows] and run.finished == 1
    monkeypatch.delenv("WANDB_PROJECT")
    with make_trackers("wandb") as t:
        pass
    assert (runs[1].kw["project"], runs[1].kw["dir"], runs[1].kw["name"]) == ("dpo_lit", None, None)


def test_wandb_offline_run_file_holds_what_was_logged(tmp_path, monkeypatch):
    need("wandb")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    rows = trainer_rows(1500, logging_steps=2)        # > 32 KiB: records cross LevelDB blocks
    with make_trackers("wandb", output_dir=tmp_path, config={"beta": 0.1}, run_name="w") as t:
        for r in rows:
            t.log(r, r["step"])
    (run_file,) = glob.glob(f"{tmp_path}/wandb/offline-run-*/run-*.wandb")
    # wandb 0.31 in offline mode returns from finish() while its writer may still be appending:
    # wait (at most 30 s) for the last row instead of reading a file that is still growing
    deadline, hist = time.monotonic() + 30, []
    while time.monotonic() < deadline:
        try:
            hist = tracking._wandb_offline_history(run_file)
        except ValueError:
            hist = []
        if len(hist) >= len(rows):
            break
        time.sleep(0.2)
    assert os.path.getsize(run_file) > 4 * 32768
    assert [h["_step"] for h in hist] == [r["step"] for r in rows]
    for h, r in zip(hist, rows):                             # JSON keeps float64: exact
        assert {k: v for k, v in h.items() if not k.startswith("_")} == numeric_items(r)


def test_wandb_reader_rejects_other_files(tmp_path):
    need("wandb")
    p = tmp_path / "x.wandb"
    p.write_bytes(b"not a run")
    with pytest.raises(ValueError, match="not a W&B run file"):
        tracking._wandb_offline_history(p)


# ----- failures: while logging, while starting, while closing -----

def log_row(path, row, tracker):
    "The trainer's contract: the row goes to metrics.jsonl first, then to the trackers."
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    tracker.log(row, row["step"])


def test_failing_tensorboard_loses_no_metrics_jsonl_row(tmp_path, monkeypatch):
    need("tensorboard")
    runs = fake_wandb(monkeypatch)
    rows = trainer_rows(30)
    fail_at = rows[4]["step"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = make_trackers(["tensorboard", "wandb"], output_dir=tmp_path, run_name="f")
        tb = t.trackers[0]
        add_scalar = tb.writer.add_scalar

        def full_disk(tag, value, global_step):
            if global_step >= fail_at:
                raise OSError(28, "No space left on device")
            add_scalar(tag, value, global_step=global_step)
        monkeypatch.setattr(tb.writer, "add_scalar", full_disk)
        for r in rows:
            log_row(tmp_path / "metrics.jsonl", r, t)
        assert t.names == ("wandb",) and tb.writer is None    # switched off and closed
        t.close()
    saved = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert saved == rows
    assert runs[0].rows == [(r["step"], numeric_items(r)) for r in rows]
    (w,) = [w for w in caught if w.category is TrackerWarning]
    assert f"tensorboard tracker failed at step {fail_at}" in str(w.message)
    assert "No space left on device" in str(w.message)
    loss = [(e.step, e.value) for e in read_events(tmp_path / "runs" / "f").Scalars("loss")]
    assert loss == [x for x in expected_curves(rows)["loss"] if x[0] < fail_at]


def test_a_tracker_failing_to_start_closes_those_started(tmp_path, monkeypatch):
    closed = []

    class FakeTB(Tracker):
        name = "tensorboard"
        def __init__(self, log_dir, config=None): self.log_dir = log_dir
        def close(self): closed.append(self.log_dir)

    def no_login(**kw):
        raise RuntimeError("wandb: not logged in")
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setattr(tracking, "TensorBoardTracker", FakeTB)
    fake_wandb(monkeypatch, init=no_login)
    with pytest.raises(RuntimeError, match="not logged in"):
        make_trackers(["tensorboard", "wandb"], output_dir=tmp_path, run_name="s")
    assert closed == [tmp_path / "runs" / "s"]


def test_close_failure_is_a_warning_and_the_others_still_close():
    closed = []

    class BadClose(Tracker):
        name = "bad"
        def close(self): raise OSError("disk gone")

    class Good(Tracker):
        name = "good"
        def close(self): closed.append(1)

    with pytest.warns(TrackerWarning, match="bad tracker: close failed"):
        with Trackers([BadClose(), Good()]):
            pass
    assert closed == [1]


def test_close_runs_when_the_training_fails(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    with pytest.raises(KeyError):
        with make_trackers("wandb", output_dir=tmp_path):
            raise KeyError("the run's own error")
    assert runs[0].finished == 1


# ----- the trainer: the curves hold the rows of metrics.jsonl -----

def test_trainer_curves_equal_metrics_jsonl(tmp_path):
    "Live once DPOConfig has `report_to`: every numeric metrics.jsonl entry is on a curve."
    need("tensorboard")
    from torch import nn
    from dpo_lit.train import DPOConfig, DPOTrainer
    from conftest import ragged_pairs
    if "report_to" not in {f.name for f in dataclasses.fields(DPOConfig)}:
        pytest.skip("DPOConfig has no report_to field yet")

    class GRULM(nn.Module):
        def __init__(self, vocab_size=258, d=16):
            super().__init__()
            self.emb, self.gru = nn.Embedding(vocab_size, d), nn.GRU(d, d, batch_first=True)

        def forward(self, input_ids, attention_mask=None):
            return self.gru(self.emb(input_ids))[0] @ self.emb.weight.T

    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = DPOConfig(learning_rate=1e-2, batch_size=4, max_steps=5, max_length=32,
                        logging_steps=2, output_dir=str(tmp_path), report_to=["tensorboard"],
                        progress_bar=False, verbose=False)
        DPOTrainer(GRULM(), train_dataset=ragged_pairs(16), config=cfg).train()
    finally:
        torch.set_num_threads(n)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (run,) = list((tmp_path / "runs").iterdir())
    acc = read_events(run)
    got = {k: [(e.step, e.value) for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}
    assert [r["step"] for r in rows] == [2, 4, 5]
    assert got == expected_curves(rows)
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(got)

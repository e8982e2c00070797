"""The `dpo-lit` command line: train, resume and eval with the built-in tiny model and with a local
transformers model directory; options typed and documented from DPOConfig's own fields; and every
anticipated failure (bad input, an unusable output folder, damaged checkpoints, divergence, out of
memory, a missing reference) injected on purpose: one line on stderr, its exit status, and nothing
that was already written lost. A bug keeps its traceback."""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch

from dpo_lit import __version__, cli
from dpo_lit.train import DPOConfig, DPOTrainer
from conftest import need, ragged_pairs

FAST = ["--max-length", "32", "--batch-size", "4", "--learning-rate", "1e-2",
        "--lr-scheduler", "constant", "--progress-bar", "false", "--verbose", "false"]


def write_pairs(path, n=16, seed=0):
    "A .jsonl file of the shared vowel/digit preference task."
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in ragged_pairs(n, seed)))
    return path


def run(*args, script=False, cwd=None, preexec=None):
    "The command as a separate program: the dpo-lit script, or python -m dpo_lit."
    exe = Path(sys.executable).parent / "dpo-lit"
    cmd = [str(exe)] if script and exe.exists() else [sys.executable, "-m", "dpo_lit"]
    return subprocess.run([*(preexec or []), *cmd, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line_error(res, *needles, status=2):
    "The one stderr line of a program that failed as anticipated, checked for `needles`."
    assert res.returncode == status, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


def main_in_process(capsys, *argv):
    "(exit status, stderr lines) of cli.main run in this process."
    try:
        cli.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.strip().splitlines()


def fingerprint(folder):
    "sha256 of every file under `folder`, by relative path: what must survive a failure."
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def metric_steps(run_dir):
    rows = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in rows]


@pytest.fixture()
def data(tmp_path):
    return write_pairs(tmp_path / "prefs.jsonl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    "A 2-step run of the tiny model, checkpointed after each step; tests damage copies of it."
    root = tmp_path_factory.mktemp("finished")
    data = write_pairs(root / "prefs.jsonl")
    torch.set_num_threads(1)
    cli.run_command(["train", "--data", str(data), "--model", "tiny", "--output-dir",
                     str(root / "run"), "--max-steps", "2", "--save-steps", "1", *FAST])
    return root / "run", data


def copy_run(finished_run, tmp_path):
    run_dir, data = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", data


# ----- the happy path -----

def test_train_resume_eval_as_programs(tmp_path, data, monkeypatch):
    "Relative paths at training time; eval from another working folder finds the reference."
    shutil.copy(data, tmp_path / "p.jsonl")
    res = run("train", "--data", "p.jsonl", "--model", "tiny", "--output-dir", "run",
              "--max-steps", 2, *FAST, script=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "run"
    assert (out / "final" / "model.pt").exists() and (out / "checkpoint-2").is_dir()
    assert json.loads((out / "run.json").read_text())["ref_model"] == "tiny"
    monkeypatch.chdir(tmp_path)                                  # the resume, in this process
    t = cli.run_command(["train", "--data", "p.jsonl", "--model", "tiny", "--output-dir", "run",
                         "--max-steps", "3", "--resume", *FAST])
    assert [r["step"] for r in t.history] == [1, 2, 3] and metric_steps(out) == [1, 2, 3]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run("eval", "--data", data, "--model", out / "final", cwd=elsewhere)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["loss"] < math.log(2) and 0 <= metrics["rewards/accuracies"] <= 1


def test_run_json_paths_are_absolute_or_relative_to_itself(tmp_path, monkeypatch):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    run_dir = tmp_path / "runs" / "r1"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(dict(model="../../models/base",
                                                      ref_model="../../models/base")))
    monkeypatch.chdir(tmp_path / "models")                        # a working folder that misleads
    for spec in (run_dir, run_dir / "final"):
        assert Path(cli.recorded_reference(str(spec))) == base.resolve()
    assert cli.recorded_reference("tiny") is None
    assert cli.recorded_reference(str(base)) is None              # no run.json beside it


# ----- options from DPOConfig's fields -----

def test_one_line_parser(capsys):
    p = cli.OneLineParser(prog="x")
    p.add_argument("--n", type=int, required=True)
    for argv in (["--n", "two"], [], ["--n", "1", "--m"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("x: error: "), err
        assert err[0].endswith("(see x --help)"), err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dpo-lit {__version__}"


def test_every_default_reads_back_from_its_text():
    "For every field, the default written as the help shows it parses back to the default."
    hints = typing.get_type_hints(DPOConfig)
    for f in dataclasses.fields(DPOConfig):
        default = cli.field_default(f)
        assert cli.option_type(hints[f.name])(cli._show(default)) == default, f.name


def test_option_types_follow_real_types():
    read = cli.option_type
    assert read(float | None)("none") is None and read(float | None)("2.5") == 2.5
    assert read(int)("7") == 7 and read(bool)("off") is False and read(bool)("yes") is True
    assert read(str | list[str])("a,b") == ["a", "b"] and read(str | list)("a") == "a"
    assert read(list[float])("1,2.5") == [1.0, 2.5]
    assert read(dict | None)("tau=0.1,name=x,on=true") == {"tau": 0.1, "name": "x", "on": True}
    with pytest.raises(Exception, match="expected an integer or none"):
        read(int | None)("1.5")
    with pytest.raises(TypeError, match="no command-line reader"):
        read(set)


def test_help_documents_every_option():
    "Help from the field's metadata: its line, its default and (for a fixed set) its choices."
    from dpo_lit import losses, scale, train
    fixed = dict(loss_type=losses.LOSS_TYPES, f_divergence=losses.F_DIVERGENCES,
                 lr_scheduler=train.LR_SCHEDULERS, precision=train.PRECISIONS,
                 on_nonfinite=train.ON_NONFINITE, distributed=scale.DISTRIBUTED)
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices["train"]
    options = {a.dest: a for a in sub._actions}
    missing = [f.name for f in dataclasses.fields(DPOConfig) if not f.metadata.get("help")]
    assert not missing, f"DPOConfig fields without metadata['help']: {missing}"
    for f in dataclasses.fields(DPOConfig):
        text = " ".join(options[f.name].help.split())
        assert f.metadata["help"].rstrip(".") in text, f.name
        assert f"default: {cli._show(cli.field_default(f))}" in text, (f.name, text)
        if f.name in fixed:
            assert f"one of: {', '.join(fixed[f.name])};" in text, (f.name, text)


def test_bare_flag_means_true():
    base = ["train", "--data", "x", "--model", "tiny"]
    parse = cli.build_parser().parse_args
    assert cli.make_config(parse([*base, "--fused-lm-head"])).fused_lm_head is True
    assert cli.make_config(parse([*base, "--fused-lm-head", "false"])).fused_lm_head is False
    assert cli.make_config(parse([*base, "--progress-bar", "--beta", "0.3"])).beta == 0.3


def test_loss_params_repeatable():
    args = cli.build_parser().parse_args(
        ["train", "--data", "x", "--model", "tiny", "--loss-type", "discopop",
         "--loss-params", "discopop_tau=0.2", "--loss-params", "discopop_tau=0.1"])
    assert cli.make_config(args).loss_params == {"discopop_tau": 0.1}


def test_loss_registered_after_import(tmp_path, data):
    "A loss registered now is in --help and trains, with no list captured at import."
    from dpo_lit import losses
    losses.register_loss("cli_probe", inputs=lambda b: (b.z,))(
        lambda z: torch.nn.functional.softplus(-z))
    try:
        sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["train"]
        assert "cli_probe" in sub.format_help()
        t = cli.run_command(["train", "--data", str(data), "--model", "tiny", "--output-dir",
                             str(tmp_path / "o"), "--max-steps", "1", "--loss-type", "cli_probe",
                             *FAST])
        assert t.config.loss_type == "cli_probe"
        assert abs(t.history[0]["loss"] - math.log(2)) < 1e-6     # softplus(0), like sigmoid
    finally:
        losses.unregister_loss("cli_probe")
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["train"]
    assert "cli_probe" not in sub.format_help()


@pytest.mark.parametrize("args, needles", [
    (["--beta", "-1"], ["DPOConfig.beta"]),
    (["--beat", "0.2"], ["unrecognized arguments: --beat"]),
    (["--batch-size", "two"], ["--batch-size", "two"]),
    (["--precision", "fp8"], ["DPOConfig.precision"]),
    (["--distributed", "horovod"], ["DPOConfig.distributed"]),
    (["--loss-type", "no_such_loss"], ["loss_type", "no_such_loss"]),
    (["--model", "no/such/dir"], ["--model no/such/dir", "no such directory"]),
])
def test_bad_options_in_process(tmp_path, data, capsys, args, needles):
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", tmp_path / "o", *FAST, *args)
    assert status == 2 and len(err) == 1 and all(n in err[0] for n in needles), err


def test_yaml_and_json_config(tmp_path, data, capsys):
    (tmp_path / "run.yaml").write_text("beta: 0.3\nmax-steps: 1\nbatch_size: 4\nmax_length: 32\n"
                                       "verbose: false\nprogress_bar: false\n")
    t = cli.run_command(["train", "--data", str(data), "--model", "tiny", "--output-dir",
                         str(tmp_path / "o"), "--config", str(tmp_path / "run.yaml"),
                         "--beta", "0.2"])
    assert (t.config.beta, t.config.max_steps, t.state["step"]) == (0.2, 1, 1)
    (tmp_path / "bad.json").write_text(json.dumps({"beta": 0.1, "learning_rat": 1e-3}))
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", tmp_path / "o", "--config", tmp_path / "bad.json")
    assert status == 2 and "bad.json: DPOConfig has no field(s) learning_rat" in err[0]
    (tmp_path / "broken.yaml").write_text("beta: [0.1\n")
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--config", tmp_path / "broken.yaml")
    assert status == 2 and len(err) == 1 and "not valid YAML" in err[0]


# ----- anticipated failures: one line, its status, nothing lost -----

def test_output_dir_is_a_file(tmp_path, data, capsys):
    "Checked before the model is loaded: the error names the output folder, not the bad --model."
    (tmp_path / "f").write_text("keep me\n")
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "no/such/dir",
                                  "--output-dir", tmp_path / "f", *FAST)
    assert status == 2 and len(err) == 1, err
    assert f"output_dir {tmp_path / 'f'}" in err[0] and "file" in err[0], err
    assert (tmp_path / "f").read_text() == "keep me\n"


def test_read_only_output_dir(finished_run, tmp_path):
    "A folder the user cannot write: as root, the program runs without CAP_DAC_OVERRIDE."
    run_dir, data = copy_run(finished_run, tmp_path)
    before = fingerprint(run_dir)
    for p in [run_dir, *run_dir.rglob("*")]:
        if p.is_dir(): p.chmod(0o555)
    drop = ([shutil.which("setpriv"), "--inh-caps=-dac_override,-dac_read_search",
             "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else [])
    if drop and drop[0] is None: pytest.skip("running as root without setpriv")
    try:
        res = run("train", "--data", data, "--model", "tiny", "--output-dir", run_dir,
                  "--max-steps", 3, "--resume", *FAST, preexec=drop)
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            if p.is_dir(): p.chmod(0o755)
    one_line_error(res, f"output_dir {run_dir}", "not writable")
    assert fingerprint(run_dir) == before


def damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f: f.truncate(path.stat().st_size // 2)
    else:                               # 16 bytes of finite floats in the middle: bit-rot
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            f.write(torch.full((4,), 3.0).numpy().tobytes())


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_damaged_newest_checkpoint_falls_back(finished_run, tmp_path, capsys, how):
    "Resume warns (one line, naming checkpoint-2), goes on from checkpoint-1; steps logged once."
    run_dir, data = copy_run(finished_run, tmp_path)
    damage(run_dir / "checkpoint-2" / "model.pt", how)
    intact = fingerprint(run_dir / "checkpoint-1")
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", run_dir, "--max-steps", 3, "--save-steps", 1,
                                  "--resume", *FAST)
    assert status == 0, err
    assert len(err) == 1 and "warning" in err[0] and "checkpoint-2" in err[0], err
    assert "model.pt" in err[0]
    assert metric_steps(run_dir) == [1, 2, 3]
    assert fingerprint(run_dir / "checkpoint-1") == intact
    if how == "overwritten":            # the fall-back run ends where an uninterrupted one does
        ref = cli.run_command(["train", "--data", str(data), "--model", "tiny", "--output-dir",
                               str(tmp_path / "straight"), "--max-steps", "3", "--save-steps", "1",
                               *FAST])
        got = torch.load(run_dir / "final" / "model.pt", weights_only=True)
        want = torch.load(tmp_path / "straight" / "final" / "model.pt", weights_only=True)
        assert ref.state["step"] == 3 and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)   # same code, shapes, threads


def test_no_intact_checkpoint(finished_run, tmp_path, capsys):
    run_dir, data = copy_run(finished_run, tmp_path)
    for c in ("checkpoint-1", "checkpoint-2"): damage(run_dir / c / "model.pt", "truncated")
    before = fingerprint(run_dir)
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", run_dir, "--max-steps", 3, "--resume", *FAST)
    assert status == 2 and len(err) == 1 and "no intact checkpoint" in err[0], err
    assert fingerprint(run_dir) == before


def test_divergence_names_the_step(tmp_path, data, capsys):
    "A learning rate of 1e20: the step-2 loss is not finite; checkpoint-1 and metrics row 1 stay."
    out = tmp_path / "nan"
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", out, *FAST, "--learning-rate", "1e20",
                                  "--save-steps", 1, "--max-steps", 4)
    assert status == 1 and len(err) == 1, err
    assert "step 2" in err[0] and "--on-nonfinite skip" in err[0], err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    assert metric_steps(out) == [1]


def test_data_errors_name_file_and_line(tmp_path, data, capsys):
    bad = tmp_path / "bad-byte.jsonl"
    lines = data.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(lines[:2]) + b'{"prompt": "V:", "chosen": "a\xff", "rejected": "1"}\n'
                    + b"".join(lines[2:]))
    res = run("train", "--data", bad, "--model", "tiny", "--output-dir", tmp_path / "o", *FAST)
    one_line_error(res, "bad-byte.jsonl", "line 3")
    long = tmp_path / "long.jsonl"
    long.write_bytes(data.read_bytes() + json.dumps(dict(prompt="V:" + "a" * 10_000_000, chosen="a",
                                                         rejected="1")).encode() + b"\n")
    t0 = time.perf_counter()
    status, err = main_in_process(capsys, "train", "--data", long, "--model", "tiny",
                                  "--output-dir", tmp_path / "o", *FAST)
    seconds = time.perf_counter() - t0
    assert status == 2 and len(err) == 1 and "long.jsonl" in err[0] and "line 17" in err[0], err
    assert seconds < 5, seconds


def test_missing_file_is_one_line(tmp_path, capsys):
    status, err = main_in_process(capsys, "train", "--data", tmp_path / "missing.jsonl", "--model",
                                  "tiny", "--output-dir", tmp_path / "o")
    assert status == 2 and len(err) == 1 and "missing.jsonl: no such file" in err[0], err


def test_out_of_memory_names_the_batch_size(tmp_path, data, capsys, monkeypatch):
    def oom(self, resume_from=None): raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
    monkeypatch.setattr(DPOTrainer, "train", oom)
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", tmp_path / "o", *FAST, "--batch-size", 6)
    assert status == 1 and len(err) == 1, err
    for needle in ("--batch-size 6", "--batch-size 3 --grad-accum-steps 2", "--fused-lm-head",
                   "--max-length"):
        assert needle in err[0], (needle, err)


def test_a_bug_keeps_its_traceback(tmp_path, data, capsys, monkeypatch):
    "An unanticipated exception leaves main as itself; --debug does the same for anticipated ones."
    def bug(self, resume_from=None): raise ValueError("an unexpected bug inside a step")
    monkeypatch.setattr(DPOTrainer, "train", bug)
    argv = ["train", "--data", str(data), "--model", "tiny", "--output-dir", str(tmp_path / "o"),
            *FAST]
    with pytest.raises(ValueError, match="unexpected bug"):
        cli.main(argv)
    (tmp_path / "f").write_text("")
    from dpo_lit.checkpoint import OutputDirError
    with pytest.raises(OutputDirError):
        cli.main([*argv, "--output-dir", str(tmp_path / "f"), "--debug"])
    res = run("train", "--data", data, "--model", "tiny", "--output-dir", tmp_path / "f", "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr and "OutputDirError" in res.stderr


# ----- eval and its reference -----

def test_eval_refuses_without_a_reference(finished_run, tmp_path, capsys):
    run_dir, data = finished_run
    status, err = main_in_process(capsys, "eval", "--data", data, "--model", "tiny")
    assert status == 2 and len(err) == 1, err
    assert "--ref-model" in err[0] and "--self-reference" in err[0], err
    away = tmp_path / "copied-final"
    shutil.copytree(run_dir / "final", away)                     # no run.json beside it
    status, err = main_in_process(capsys, "eval", "--data", data, "--model", away)
    assert status == 2 and len(err) == 1 and str(away) in err[0], err
    m = cli.run_command(["eval", "--data", str(data), "--model", str(away), "--self-reference"])
    assert abs(m["loss"] - math.log(2)) < 1e-6 and m["rewards/margins"] == 0.0
    m_ref = cli.run_command(["eval", "--data", str(data), "--model", str(away),
                             "--ref-model", "tiny"])
    m_run = cli.run_command(["eval", "--data", str(data), "--model", str(run_dir)])
    assert abs(m_ref["loss"] - m_run["loss"]) < 1e-6 and m_run["loss"] != pytest.approx(math.log(2))


def test_eval_builds_no_optimizer(finished_run, monkeypatch):
    run_dir, data = finished_run
    def no(*a, **k): raise AssertionError("eval built an optimizer")
    monkeypatch.setattr(torch.optim, "AdamW", no)
    m = cli.run_command(["eval", "--data", str(data), "--model", str(run_dir)])
    assert m["loss"] < math.log(2)


# ----- models -----

def save_gpt2(path):
    "A random GPT-2 with a character-level tokenizer built offline, as a transformers folder."
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    fast.save_pretrained(path)
    return path


def test_local_transformers_model_and_lora(tmp_path, data, capsys):
    need("transformers")
    model_dir = save_gpt2(tmp_path / "gpt2")
    t = cli.run_command(["train", "--data", str(data), "--model", str(model_dir), "--output-dir",
                         str(tmp_path / "full"), "--max-steps", "2", *FAST])
    assert abs(t.history[0]["loss"] - 0.693147) < 1e-5 and t.ref_kind == "copy"
    assert (tmp_path / "full" / "final" / "config.json").exists()
    assert (tmp_path / "full" / "final" / "tokenizer.json").exists()
    record = json.loads((tmp_path / "full" / "run.json").read_text())
    assert record == dict(model=str(model_dir.resolve()), ref_model=str(model_dir.resolve()))
    capsys.readouterr()
    m = cli.run_command(["eval", "--data", str(data), "--model", str(tmp_path / "full")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == m
    need("peft")
    t = cli.run_command(["train", "--data", str(data), "--model", str(model_dir), "--output-dir",
                         str(tmp_path / "lora"), "--max-steps", "2", "--lora-r", "2", *FAST])
    assert t.ref_kind == "adapters off" and t.ref_model is None
    assert abs(t.history[0]["loss"] - 0.693147) < 1e-5


def test_missing_peft_is_one_line(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)      # `import peft` fails as if not installed
    status, err = main_in_process(capsys, "train", "--data", data, "--model", "tiny",
                                  "--output-dir", tmp_path / "o", "--lora-r", "2", *FAST)
    assert status == 2 and len(err) == 1 and "peft" in err[0] and "pip install" in err[0], err

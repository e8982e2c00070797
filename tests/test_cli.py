"""The `dpo-lit` command line: train, resume and eval with the built-in tiny model and with a local
transformers model directory; YAML configuration; LoRA; every input error is one line on stderr and
exit status 2, never a traceback."""
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpo_lit import cli
from conftest import need


ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-length", "32", "--batch-size", "4", "--learning-rate", "1e-2", "--lr-scheduler", "constant",
        "--progress-bar", "false", "--verbose", "false"]


def write_pairs(path, n=16, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            kind = rng.choice("VD")
            v = "".join(rng.choice("aeiou") for _ in range(rng.randint(1, 6)))
            d = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))
            f.write(json.dumps(dict(prompt=kind + ":", chosen=v if kind == "V" else d, rejected=d if kind == "V" else v)) + "\n")
    return path


def run(*args, script=False):
    "The command as a separate program: the dpo-lit script, or python -m dpo_lit."
    exe = Path(sys.executable).parent / "dpo-lit"
    cmd = [str(exe)] if script and exe.exists() else [sys.executable, "-m", "dpo_lit"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line_error(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles: assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture()
def data(tmp_path):
    return write_pairs(tmp_path / "prefs.jsonl")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_resume_eval_as_programs(tmp_path, data):
    out = tmp_path / "run"
    res = run("train", "--data", data, "--model", "tiny", "--output-dir", out, "--max-steps", 2, *FAST, script=True)
    assert res.returncode == 0, res.stderr
    assert (out / "final" / "model.pt").exists() and (out / "checkpoint-2").is_dir()
    assert json.loads((out / "run.json").read_text())["ref_model"] == "tiny"
    res = run("train", "--data", data, "--model", "tiny", "--output-dir", out, "--max-steps", 3, "--resume", *FAST)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    res = run("eval", "--data", data, "--model", out)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["loss"] < 0.6931 and 0 <= metrics["rewards/accuracies"] <= 1


def test_errors_are_one_line(tmp_path, data):
    one_line_error(run("train", "--data", tmp_path / "missing.jsonl", "--model", "tiny", "--output-dir", tmp_path / "o"),
                   "missing.jsonl", "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"prompt": "V:", "chosen": "a"}\n')
    one_line_error(run("train", "--data", bad, "--model", "tiny", "--output-dir", tmp_path / "o"),
                   "--data", "bad.jsonl, line 17: missing key 'rejected'")


@pytest.mark.parametrize("args, needles", [
    (["--beta", "-1"], ["DPOConfig.beta"]),
    (["--beat", "0.2"], ["unrecognized arguments: --beat"]),
    (["--batch-size", "two"], ["--batch-size", "two"]),
    (["--precision", "fp8"], ["DPOConfig.precision"]),
    (["--distributed", "horovod"], ["DPOConfig.distributed"]),
    (["--model", "no/such/dir"], ["--model no/such/dir", "no such directory"]),
])
def test_bad_options_in_process(tmp_path, data, capsys, args, needles):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", str(data), "--model", "tiny", "--output-dir", str(tmp_path / "o"), *FAST, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in needles), err


def test_yaml_and_json_config(tmp_path, data, capsys):
    (tmp_path / "run.yaml").write_text("beta: 0.3\nmax-steps: 1\nbatch_size: 4\nmax_length: 32\nverbose: false\n"
                                       "progress_bar: false\n")
    t = cli.run_command(["train", "--data", str(data), "--model", "tiny", "--output-dir", str(tmp_path / "o"),
                  "--config", str(tmp_path / "run.yaml"), "--beta", "0.2"])
    assert (t.config.beta, t.config.max_steps, t.state["step"]) == (0.2, 1, 1)
    (tmp_path / "bad.json").write_text(json.dumps({"beta": 0.1, "learning_rat": 1e-3}))
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(data), "--model", "tiny", "--output-dir", str(tmp_path / "o"),
                  "--config", str(tmp_path / "bad.json")])
    assert "bad.json: DPOConfig has no field(s) learning_rat" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("beta: [0.1\n")
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(data), "--model", "tiny", "--config", str(tmp_path / "broken.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML" in err[0]


def save_gpt2(path):
    "A random GPT-2 with a character-level tokenizer built offline, as a transformers model directory."
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<eos>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=1, eos_token_id=1, pad_token_id=0)).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    return path


def test_local_transformers_model_and_lora(tmp_path, data, capsys):
    need("transformers")
    model_dir = save_gpt2(tmp_path / "gpt2")
    t = cli.run_command(["train", "--data", str(data), "--model", str(model_dir), "--output-dir", str(tmp_path / "full"),
                  "--max-steps", "2", *FAST])
    assert abs(t.history[0]["loss"] - 0.693147) < 1e-5 and t.ref_kind == "copy"
    assert (tmp_path / "full" / "final" / "config.json").exists()
    assert (tmp_path / "full" / "final" / "tokenizer.json").exists()
    capsys.readouterr()
    m = cli.run_command(["eval", "--data", str(data), "--model", str(tmp_path / "full")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == m
    need("peft")
    t = cli.run_command(["train", "--data", str(data), "--model", str(model_dir), "--output-dir", str(tmp_path / "lora"),
                  "--max-steps", "2", "--lora-r", "2", *FAST])
    assert t.ref_kind == "adapters off" and t.ref_model is None
    assert abs(t.history[0]["loss"] - 0.693147) < 1e-5


def test_missing_peft_is_one_line(tmp_path, data, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)      # `import peft` now fails as if it were not installed
    with pytest.raises(SystemExit):
        cli.main(["train", "--data", str(data), "--model", "tiny", "--output-dir", str(tmp_path / "o"), "--lora-r", "2", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "peft" in err[0] and "pip install" in err[0], err


def test_help_lists_every_config_field():
    import dataclasses
    from dpo_lit.train import DPOConfig
    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(DPOConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name

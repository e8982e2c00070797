"Properties of dpo_lit.pretrained and dpo_lit.gpu_check that do not belong in the chapters."
import json
import math
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from dpo_lit import gpu_check, pretrained as P  # noqa: E402
from dpo_lit.data import load_preferences  # noqa: E402
from dpo_lit.train import DPOConfig  # noqa: E402

from conftest import NBS, ROOT  # noqa: E402

SAMPLE = NBS / "data" / P.SAMPLE


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_config(rng):
    "A random small Llama- or Qwen2-style config dict, with or without tied embeddings and biases."
    kind = rng.choice(["qwen2", "llama"])
    n_kv = rng.choice([1, 2])
    n_h = n_kv * rng.choice([1, 2, 3])
    d_h = rng.choice([8, 16])
    cfg = dict(model_type=kind, vocab_size=rng.randint(16, 300), hidden_size=n_h * d_h,
               intermediate_size=rng.randint(8, 100), num_hidden_layers=rng.randint(1, 3),
               num_attention_heads=n_h, num_key_value_heads=n_kv,
               tie_word_embeddings=rng.random() < 0.5, max_position_embeddings=64)
    if kind == "llama":
        cfg.update(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)
    return cfg


def build(cfg, **kw):
    c = dict(cfg)
    with torch.device("meta"):
        config = AutoConfig.for_model(c.pop("model_type"), **c)
        return AutoModelForCausalLM.from_config(config, **kw)


@pytest.mark.parametrize("seed", range(8))
def test_counts_match_the_built_model(seed):
    "N, P and the forward FLOPs against the model transformers builds and peft wraps."
    cfg = random_config(random.Random(seed))
    model = build(cfg)
    assert P.count_params(cfg) == sum(p.numel() for p in model.parameters())
    r = 1 + seed % 4
    lora = P.add_lora(model, r=r, alpha=r)
    trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert P.count_lora_params(cfg, r) == trained


@pytest.mark.parametrize("seed", range(3))
def test_forward_flops_are_exact(seed):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = random_config(random.Random(100 + seed))
    c = dict(cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(c.pop("model_type"), **c),
                                             attn_implementation="eager")
    B, T = 3, 17
    with FlopCounterMode(display=False) as fc:
        model(torch.randint(0, cfg["vocab_size"], (B, T)))
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    assert fc.get_total_flops() == B * T * (2 * P.matmul_params(cfg) + 4 * L * T * d)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="model_type"):
        P.count_params(dict(P.QWEN25_05B, model_type="mistral"))
    with pytest.raises(ValueError, match="r must"):
        P.count_lora_params(P.QWEN25_05B, 2.5)
    with pytest.raises(ValueError, match="gpu must"):
        P.plan_run(P.QWEN25_05B, "K80")


def test_plan_scales_as_the_equations_say():
    "Doubling the micro-batch doubles the activations; time is linear in pairs; LoRA < full memory."
    a = P.memory_bytes(P.QWEN25_05B, micro_batch=2)
    b = P.memory_bytes(P.QWEN25_05B, micro_batch=4)
    assert b["activations"] == 2 * a["activations"] and b["weights"] == a["weights"]
    assert P.memory_bytes(P.QWEN25_05B, fused_lm_head=False)["logits"] > 0
    assert P.memory_bytes(P.QWEN25_05B, lora_r=None)["total"] > a["total"]
    p1, p2 = P.plan_run(P.QWEN25_05B, pairs=800), P.plan_run(P.QWEN25_05B, pairs=1600)
    assert p2["steps"] == 2 * p1["steps"] and math.isclose(p2["minutes"], 2 * p1["minutes"])
    fast = P.plan_run(P.QWEN25_05B, "H100")
    assert math.isclose(p1["step_s"] / fast["step_s"], P.GPUS["H100"][1] / P.GPUS["T4"][1])


def test_sample_file_schema():
    "The shipped sample: TRL's explicit-prompt conversational format, 24 distinct records."
    records = P.read_jsonl(SAMPLE)
    assert len(records) == 24
    assert len({r["prompt"][0]["content"] for r in records}) == 24
    for r in records:
        assert set(r) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        assert [m["role"] for m in r["prompt"]] == ["user"]
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in r[side]] == ["assistant"]
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
        assert 0 <= r["score_rejected"] < r["score_chosen"] <= 10
    tok = P.offline_chat_tokenizer(P.conversation_texts(records))
    assert len(load_preferences(str(SAMPLE), tokenizer=tok)) == 24


def test_read_jsonl_names_the_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=r"x.jsonl, line 3"):
        P.read_jsonl(f)
    with pytest.raises(FileNotFoundError, match="not found"):
        P.find_sample(tmp_path / "none.jsonl")


def test_chat_template_is_a_prefix_and_round_trips():
    tok = P.offline_chat_tokenizer(["hello there", "general kenobi"])
    conv = [{"role": "user", "content": "hello there"}]
    head = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(conv + [{"role": "assistant", "content": "general kenobi"}],
                                   tokenize=False)
    assert full == head + "general kenobi<|im_end|>\n"
    assert full.startswith("<|im_start|>system\n")
    with_system = [{"role": "system", "content": "Be brief."}] + conv
    assert "helpful" not in tok.apply_chat_template(with_system, tokenize=False)
    assert tok.decode(tok.encode(full)) == full
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special)) == 1


def peaky(seed, vocab=5):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(P.tiny_config(P.QWEN25_05B, vocab_size=vocab,
                                                       tie_word_embeddings=False)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)
    return m


def test_sampler_draws_from_softmax():
    "One-token completions: frequencies match softmax(logits) (a chi-square bound)."
    m, x, n = peaky(3), [1, 2], 6000
    with torch.no_grad():
        p = m(torch.tensor([x])).logits[0, -1].double().softmax(-1)
    ys = P.sample(m, x, n, max_new_tokens=1, eos_token_id=0, seed=1)
    counts = torch.bincount(torch.tensor([y[0] for y in ys]), minlength=len(p)).double()
    keep = p * n > 5
    chi2 = float((((counts - n * p) ** 2) / (n * p))[keep].sum())
    assert chi2 < 30, (chi2, counts, n * p)          # 4 degrees of freedom at most: p < 1e-5


def test_kl_of_a_model_to_itself_is_zero_and_seeds_reproduce():
    m = peaky(4)
    est = P.kl_from_samples(m, m, [[1, 2], [3]], n=16, max_new_tokens=4, eos_token_id=0)
    assert est["kl"] == 0.0 and est["samples"] == 32
    a = P.sample(m, [1], 8, max_new_tokens=5, eos_token_id=0, seed=7)
    assert a == P.sample(m, [1], 8, max_new_tokens=5, eos_token_id=0, seed=7)
    assert all(len(y) <= 5 and (0 not in y[:-1]) for y in a)   # stops at the first EOS


@pytest.mark.parametrize("seed", [5, 6])
def test_kl_estimate_is_unbiased(seed):
    "Against the exact KL over every completion of at most two tokens."
    pi, ref, x = peaky(seed), peaky(seed + 10), [1, 2, 3]

    def step(m, prefix):
        with torch.no_grad():
            return m(torch.tensor([x + prefix])).logits[0, -1].double().log_softmax(-1)
    ys = [[0]] + [[a, b] for a in range(1, 5) for b in range(5)]

    def exact(m):
        return torch.tensor([step(m, [])[y[0]] + (step(m, y[:1])[y[1]] if len(y) > 1 else 0.0)
                             for y in ys])
    lp, lr = exact(pi), exact(ref)
    kl = float((lp.exp() * (lp - lr)).sum())
    est = P.kl_from_samples(pi, ref, [x], n=1500, max_new_tokens=2, eos_token_id=0, seed=seed,
                            batch_size=500)
    assert abs(est["kl"] - kl) < 4 * est["stderr"], (est, kl)


def test_full_fine_tuning_path():
    "lora_r=None: a frozen copy is the reference; it does not move, the first loss is ln 2."
    model, tok, train, held_out = P.offline_setup(str(SAMPLE), n_eval=4)
    cfg = P.ExperimentConfig(
        dpo=DPOConfig(learning_rate=1e-3, batch_size=4, max_steps=3, max_length=96, device="cpu",
                      progress_bar=False, verbose=False),
        lora_r=None, kl_prompts=2, kl_samples=2, max_new_tokens=4, show=1, train_probe=4)
    trained, res = P.dpo_experiment(model, tok, train, held_out, cfg)
    assert trained is model and res["trained"] == res["params"]
    assert abs(res["loss_first"] - math.log(2)) < 1e-5 and res["reference_drift"] == 0.0
    assert res["before"]["reward_accuracy"] == 0.5 and res["steps"] == 3
    assert res["generations"][0]["prompt"] == held_out[0]["prompt"][0]["content"]
    json.dumps(res)


def test_experiment_rejects_bad_arguments():
    model, tok, train, held_out = P.offline_setup(str(SAMPLE))
    with pytest.raises(TypeError, match="ExperimentConfig"):
        P.dpo_experiment(model, tok, train, held_out, DPOConfig())
    with pytest.raises(ValueError, match="eval_pairs is empty"):
        P.dpo_experiment(model, tok, train, [], P.ExperimentConfig())


# ---- gpu_check


def test_every_gpu_cell_that_downloads_is_flagged_network():
    "A gpu cell that fetches from the hub must carry `#| network`, or --offline would run it."
    for nb in sorted(NBS.glob("*.ipynb")):
        for i, d, src in gpu_check._code_cells(nb):
            if "gpu" in d and ("from_pretrained(" in src or "load_dataset(" in src):
                assert "network" in d, f"{nb.name}, cell {i}: downloads but is not flagged network"


def test_cell_extraction_finds_every_gpu_cell():
    "Against a plain scan of the notebooks' JSON: the same gpu cells, in the same order."
    for nb in gpu_check.gpu_notebooks(NBS):
        cells = json.loads(nb.read_text())["cells"]
        def flagged(c):
            lines = "".join(c["source"]).splitlines()
            return any(line.strip() in ("#| gpu", "#|gpu") for line in lines
                       if line.startswith("#|"))
        raw = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and flagged(c)]
        found = [i for i, d, _ in gpu_check.notebook_cells(nb, ("gpu", "slow")) if "gpu" in d]
        assert found == raw, nb.name


def test_command_without_a_gpu(tmp_path):
    "No CUDA: says so, writes nothing, exits 0; --dry-run lists the plan."
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dpo_lit.gpu_check", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120, env=env)
    p = run("--offline", "--out", str(tmp_path / "r.json"))
    assert p.returncode == 0 and "no CUDA GPU" in p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "r.json").exists()
    p = run("--dry-run", "--offline")
    assert p.returncode == 0 and "train-fp16" in p.stdout, p.stdout + p.stderr
    assert "bench-gpu" in p.stdout
    p = run("--budget")
    assert p.returncode == 2 and "expected one argument" in p.stderr, p.stdout + p.stderr


def test_run_all_runs_notebooks_in_a_copy(tmp_path):
    "Notebook checks run in a copy of nbs/ (data there, writes stay there); others in the root."
    nbs = tmp_path / "repo" / "nbs"
    (nbs / "data").mkdir(parents=True)
    (nbs / "data" / "x.txt").write_text("42")
    cells = ["import pathlib, dpo_lit",
             "#| gpu\nassert pathlib.Path('data/x.txt').read_text() == '42'\n"
             "pathlib.Path('written.txt').write_text('x')"]
    nb = {"cells": [{"cell_type": "code", "source": s, "metadata": {}, "outputs": [],
                     "execution_count": None} for s in cells], "metadata": {}, "nbformat": 4,
          "nbformat_minor": 5}
    (nbs / "demo.ipynb").write_text(json.dumps(nb))
    me = ["-m", "dpo_lit.gpu_check", "--worker"]
    checks = [dict(name="notebook demo", notebook="demo.ipynb", group="pool", timeout=120, note="",
                   argv=me + ["notebook", "demo.ipynb"]),
              dict(name="root", group="first", timeout=120, note="",
                   argv=["-c", "import pathlib; assert pathlib.Path('nbs/demo.ipynb').is_file()"])]
    results, scratch = gpu_check.run_all(checks, root=nbs.parent, budget=240, jobs=2,
                                         log=lambda line: None)
    assert [r["status"] for r in results] == ["ok", "ok"], results
    assert (scratch / "nbs" / "written.txt").is_file() and not (nbs / "written.txt").exists()
    table = gpu_check.summary_table(results)
    assert table.splitlines()[0].split() == ["check", "status", "seconds", "detail"]

"""dpo_lit.online: exact resume of iterative DPO, sampling from transformers models, bad judges."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from dpo_lit.bandit import BanditProblem
from dpo_lit.online import (BANDIT_TOKENIZER, JudgeError, TabularPolicy, bandit_judge,
                            bandit_prompts, bt_probs, build_pairs, completion_logprobs,
                            implicit_reward_judge, iterative_dpo, online_dpo, pairwise_probs,
                            reward_scores, sample_completions)
from dpo_lit.toy import MarkovLanguage, TinyLM
from dpo_lit.train import DPOConfig

torch.set_num_threads(1)
LANG = MarkovLanguage(seed=0)
TOK = LANG.tokenizer
GEN = dict(max_new_tokens=LANG.completion_len + 1, eos_token_id=TOK.eos_token_id)


def true_reward(prompts, completions):
    return LANG.reward(completions)


def prompts_for(r):
    return LANG.sample(24, seed=100 + r)[0].tolist()


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM.from_config(vocab_size=TOK.vocab_size)


class Interrupt:
    "Forward hook: KeyboardInterrupt at the n-th forward pass in training mode (as Ctrl-C would)."

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, module, args, output):
        self.calls += module.training
        if module.training and self.calls == self.n:
            raise KeyboardInterrupt


def run_two_rounds(folder, *, refresh, resume=False, hook=None, labels="bradley_terry"):
    policy = tiny_lm()
    if hook is not None:
        policy.register_forward_hook(hook)
    cfg = DPOConfig(beta=0.1, learning_rate=3e-3, batch_size=4, grad_accum_steps=2, max_steps=3,
                    save_steps=1, lr_scheduler="linear", max_length=16, seed=3, device="cpu",
                    output_dir=str(folder), progress_bar=False, verbose=False)
    log = iterative_dpo(policy, None, prompts_for, true_reward, rounds=2, config=cfg,
                        tokenizer=TOK, refresh_reference=refresh, resume=resume, seed=11,
                        labels=labels, **GEN)
    return policy, log


def first_forward(step):
    "The training forward pass starting step `step` of round 2 (3 steps of 2 micro-batches each)."
    return 3 * 2 + 2 * (step - 1) + 1


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("refresh", [False, True])
@pytest.mark.parametrize("cut_at", [1, 2, 3])
def test_two_round_resume_is_bit_exact(tmp_path, refresh, cut_at):
    "Interrupted at step `cut_at` of round 2 and resumed: the uninterrupted run's weights, exactly."
    whole, whole_log = run_two_rounds(tmp_path / "whole", refresh=refresh)
    with pytest.raises(KeyboardInterrupt):
        run_two_rounds(tmp_path / "cut", refresh=refresh, hook=Interrupt(first_forward(cut_at)))
    assert not (tmp_path / "cut" / "round-2" / "policy").exists()
    resumed, log = run_two_rounds(tmp_path / "cut", refresh=refresh, resume=True)
    assert same(resumed, whole)
    assert [r["loss"] for r in log] == [r["loss"] for r in whole_log]
    # a fresh run does move the weights: equality above is not trivial
    assert not same(resumed, tiny_lm())


def test_resume_before_round_two_trained(tmp_path):
    "Stopped after round 2's pairs were saved but before its first step: same weights."
    whole, _ = run_two_rounds(tmp_path / "whole", refresh=True)
    with pytest.raises(KeyboardInterrupt):
        run_two_rounds(tmp_path / "cut", refresh=True, hook=Interrupt(first_forward(1)))
    for ckpt in (tmp_path / "cut" / "round-2").glob("checkpoint-*"):   # as if none was written
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    assert (tmp_path / "cut" / "round-2" / "pairs" / "pairs.json").exists()
    resumed, _ = run_two_rounds(tmp_path / "cut", refresh=True, resume=True)
    assert same(resumed, whole)


def test_round_pairs_are_the_policy_samples(tmp_path):
    "Round 1's saved pairs are exactly what the starting policy samples and the judge labels."
    run_two_rounds(tmp_path, refresh=False, labels="deterministic")
    saved = json.loads((tmp_path / "round-1" / "pairs" / "pairs.json").read_text())
    for p in saved["pairs"]:
        assert LANG.reward([p["chosen_ids"]]) > LANG.reward([p["rejected_ids"]])
        assert p["chosen_score"] == pytest.approx(float(LANG.reward([p["chosen_ids"]])))
    assert saved["stats"]["pairs"] + saved["stats"]["ties"] == 24


def test_resume_needs_output_dir():
    cfg = DPOConfig(max_length=16, device="cpu", progress_bar=False, verbose=False)
    with pytest.raises(ValueError, match="output_dir"):
        iterative_dpo(tiny_lm(), None, prompts_for, true_reward, rounds=1, config=cfg,
                      tokenizer=TOK, resume=True, **GEN)


def test_online_run_is_reproducible_and_counts_ties():
    "Same seed, same weights (same computation); every judged pair is trained on or a tie."
    problem = BanditProblem.random(seed=1)
    cfg = DPOConfig(beta=1.0, learning_rate=0.1, batch_size=16, max_grad_norm=None, max_length=4,
                    device="cpu", progress_bar=False, verbose=False)
    runs = []
    for _ in range(2):
        policy, ref = TabularPolicy(problem.ref_probs), TabularPolicy(problem.ref_probs)
        hist = online_dpo(policy, ref, lambda t: bandit_prompts(problem, 16, seed=t),
                          bandit_judge(problem), steps=5, config=cfg,
                          tokenizer=BANDIT_TOKENIZER, seed=2, max_new_tokens=1)
        runs.append((policy.theta.detach().clone(), hist))
    assert torch.equal(runs[0][0], runs[1][0])
    hist = runs[0][1]
    assert all(r["pairs"] + r["ties"] == 16 for r in hist)
    assert hist[-1]["judged_pairs"] == 5 * 16
    assert not torch.equal(runs[0][0], TabularPolicy(problem.ref_probs).theta.detach())


class JudgeInterrupt:
    "A reward judge that raises KeyboardInterrupt at its n-th call (Ctrl-C while judging)."

    def __init__(self, n):
        self.n, self.calls, self.__name__ = n, 0, "judge_interrupt"

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return true_reward(prompts, completions)


def run_online(folder, *, judge=true_reward, resume=None, steps=4):
    torch.manual_seed(0)
    policy = TinyLM.from_config(vocab_size=TOK.vocab_size, dropout=0.1)   # steps draw masks
    cfg = DPOConfig(beta=0.1, learning_rate=3e-3, batch_size=4, save_steps=2, max_length=16,
                    seed=3, device="cpu", output_dir=str(folder), progress_bar=False,
                    verbose=False, disable_dropout=False)
    hist = online_dpo(policy, None, prompts_for, judge, steps=steps, config=cfg, tokenizer=TOK,
                      seed=5, temperature=1.0, resume_from=resume, **GEN)
    return policy, hist


@pytest.mark.parametrize("cut_at", [2, 3])
def test_online_resume_is_bit_exact(tmp_path, cut_at):
    "Ctrl-C while judging step `cut_at`, resumed from 'latest': the same samples and weights."
    whole, whole_hist = run_online(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_online(tmp_path / "cut", judge=JudgeInterrupt(cut_at))
    saved = sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*"))
    assert saved == [f"checkpoint-{cut_at - 1}"]           # the step before the one cut
    resumed, hist = run_online(tmp_path / "cut", resume="latest")
    assert same(resumed, whole)
    keys = ("loss", "pairs", "ties", "mean_length", "mean_score", "judged_pairs")
    assert [[r[k] for k in keys] for r in hist] == [[r[k] for k in keys] for r in whole_hist]
    rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]          # each step logged once
    assert not same(resumed, tiny_lm())


def test_online_resume_needs_the_rng_restored(tmp_path, monkeypatch):
    "The check above can fail: a checkpoint without the random state resumes elsewhere."
    import dpo_lit.train as train
    whole, _ = run_online(tmp_path / "whole")
    run_online(tmp_path / "cut", steps=2)
    monkeypatch.setattr(train, "set_rng_state", lambda state: None)   # forget the saved RNG
    torch.manual_seed(99)
    resumed, _ = run_online(tmp_path / "cut", resume="latest")
    assert not same(resumed, whole)


class Source:
    "A pair source returning `out(pairs)` each step."

    def __init__(self, out):
        self.out = out

    def next_pairs(self, trainer, step):
        ys = sample_completions(trainer.unwrapped_model, prompts_for(step)[:4], 2, seed=step, **GEN)
        pairs = [dict(prompt_ids=x, chosen_ids=y[0], rejected_ids=y[1])
                 for x, y in zip(prompts_for(step)[:4], ys)]
        return self.out(pairs)


@pytest.mark.parametrize("out, error, message", [
    (lambda p: p, TypeError, "train_dataset: Source.next_pairs must return (pairs, a dict"),
    (lambda p: (p, {"loss": 1.0}), ValueError, "reports ['loss'], names the trainer's rows use"),
    (lambda p: ([], {}), ValueError, "the pairs of step 1 is empty"),
])
def test_bad_pair_sources_are_named(out, error, message):
    from dpo_lit.train import DPOTrainer
    cfg = DPOConfig(max_length=16, max_steps=2, device="cpu", progress_bar=False, verbose=False)
    t = DPOTrainer(tiny_lm(), tokenizer=TOK, train_dataset=Source(out), config=cfg)
    with pytest.raises(error, match=re.escape(message)):
        t.train()
    assert t.state["step"] == 0


def test_online_source_errors_name_the_problem():
    "A pair source needs max_steps and a live reference; all-tie draws stop naming the step."
    from dpo_lit.online import OnlinePairs
    from dpo_lit.train import DPOTrainer
    src = OnlinePairs(prompts_for, true_reward, **GEN)
    cfg = DPOConfig(max_length=16, device="cpu", progress_bar=False, verbose=False)
    with pytest.raises(ValueError, match="max_steps"):
        DPOTrainer(tiny_lm(), tokenizer=TOK, train_dataset=src, config=cfg)
    with pytest.raises(ValueError, match="precompute_ref"):
        DPOTrainer(tiny_lm(), tokenizer=TOK, train_dataset=src,
                   config=dataclasses.replace(cfg, max_steps=2, precompute_ref=True))
    with pytest.raises(ValueError, match="DPOConfig.grad_accum_steps=2: a pair source's step"):
        DPOTrainer(tiny_lm(), tokenizer=TOK, train_dataset=src,
                   config=dataclasses.replace(cfg, max_steps=2, grad_accum_steps=2))
    with pytest.raises(ValueError, match="train_dataset is empty"):
        DPOTrainer(tiny_lm(), tokenizer=TOK, train_dataset=[], config=cfg)
    with pytest.raises(ValueError, match="k: expected an integer >= 2"):
        OnlinePairs(prompts_for, true_reward, k=1, **GEN)
    with pytest.raises(TypeError, match=re.escape("unknown sampling argument(s) ['eval_dataset']")):
        OnlinePairs(prompts_for, true_reward, eval_dataset=[], **GEN)
    with pytest.raises(TypeError, match="max_new_tokens: OnlinePairs needs"):
        OnlinePairs(prompts_for, true_reward)
    with pytest.raises(ValueError, match="max_draws"):
        OnlinePairs(prompts_for, true_reward, max_draws=0, **GEN)
    with pytest.raises(TypeError, match="prompt_fn"):
        OnlinePairs([[1, 2]], true_reward, **GEN)
    # greedy sampling: both completions of a prompt are the same, so every pair is a tie
    with pytest.raises(ValueError, match="step 1: every judged pair was a tie in 2 draws"):
        online_dpo(tiny_lm(), None, prompts_for, true_reward, steps=2, config=cfg, tokenizer=TOK,
                   temperature=0.0, max_draws=2, **GEN)


def gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=TOK.vocab_size, n_positions=32, n_embd=16,
                                  n_layer=1, n_head=2, eos_token_id=TOK.eos_token_id,
                                  pad_token_id=0, bos_token_id=TOK.eos_token_id)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_sampling_from_a_transformers_model():
    "k rows per prompt, reproducible by seed, cut after EOS; log-probs match a manual forward."
    model = gpt2()
    xs = LANG.sample(6, seed=1)[0].tolist()
    xs[2] = xs[2][1:]                                   # prompts of different lengths
    ys = sample_completions(model, xs, 3, seed=5, top_p=0.9, **GEN)
    assert [len(r) for r in ys] == [3] * 6
    assert ys == sample_completions(model, xs, 3, seed=5, top_p=0.9, **GEN)
    assert ys != sample_completions(model, xs, 3, seed=6, top_p=0.9, **GEN)
    flat = [y for r in ys for y in r]
    assert all(1 <= len(y) <= GEN["max_new_tokens"] for y in flat)
    assert all(TOK.eos_token_id not in y[:-1] for y in flat)
    x, y = xs[2], ys[2][0]                              # an independent reference: one row
    with torch.no_grad():
        logits = model(torch.tensor([x + y])).logits[0].double().log_softmax(-1)
    manual = sum(logits[len(x) - 1 + t, tok].item() for t, tok in enumerate(y))
    got = completion_logprobs(model, [x], [y]).item()
    assert got == pytest.approx(manual, rel=1e-4, abs=1e-4)
    judge = implicit_reward_judge(model, gpt2(seed=1), 0.5)
    scores = reward_scores(judge, xs, ys)
    assert scores.shape == (6, 3) and np.isfinite(scores).all()


def test_sampling_temperature_zero_is_greedy():
    model = tiny_lm()
    xs = LANG.sample(4, seed=2)[0].tolist()
    ys = sample_completions(model, xs, 2, temperature=0, **GEN)
    assert all(r[0] == r[1] for r in ys)


def test_tiny_lm_top_p_keeps_the_nucleus():
    "A nucleus of mass 1e-6 holds only the most probable token: greedy decoding, through the cache."
    model = tiny_lm(3)
    xs = LANG.sample(8, seed=4)[0].tolist()
    greedy = sample_completions(model, xs, 2, temperature=0, **GEN)
    assert sample_completions(model, xs, 2, top_p=1e-6, seed=9, **GEN) == greedy
    wide = sample_completions(model, xs * 8, 2, top_p=0.95, seed=9, **GEN)
    assert any(a != b for a, b in wide)                 # a wide nucleus does sample


def test_bad_judges_name_judge_prompt_and_problem():
    xs = LANG.sample(3, seed=1)[0].tolist()
    ys = sample_completions(tiny_lm(), xs, 2, seed=1, **GEN)

    def inf_judge(prompts, completions):
        s = LANG.reward(completions)
        s[5] = float("inf")
        return s

    with pytest.raises(JudgeError, match=r"judge inf_judge: score inf for prompt 2 .*completion 1"):
        reward_scores(inf_judge, xs, ys)
    with pytest.raises(JudgeError, match=r"judge <lambda>: returned shape \(3, 2\)"):
        reward_scores(lambda p, c: LANG.reward(c).reshape(3, 2), xs, ys)

    class Broken:
        def __call__(self, prompt, a, b):
            return float("nan")

    with pytest.raises(JudgeError, match=r"judge Broken: probability nan for prompt 0"):
        pairwise_probs(Broken(), xs, ys)
    with pytest.raises(JudgeError, match=r"returned str"):
        pairwise_probs(lambda x, a, b: "a", xs, ys)
    # equal scores for some completions only: ties, dropped and counted, not an error
    scores = np.array([[1.0, 1.0], [0.0, 2.0], [3.0, 3.0]])
    pairs, stats = build_pairs(xs, ys, bt_probs(scores))
    assert stats == dict(pairs=1, ties=2, prompts=3) and len(pairs) == 1


def test_pairwise_and_reward_judges_build_the_same_pairs():
    xs = LANG.sample(8, seed=3)[0].tolist()
    ys = sample_completions(tiny_lm(), xs, 4, seed=2, **GEN)
    s = reward_scores(true_reward, xs, ys)

    def bt(prompt, a, b):
        return 1.0 / (1.0 + math.exp(-(float(LANG.reward([a])) - float(LANG.reward([b])))))

    p = pairwise_probs(bt, xs, ys)
    np.testing.assert_allclose(p, bt_probs(s), rtol=0, atol=1e-12)
    for mode in ("best_worst", "all"):
        a, _ = build_pairs(xs, ys, p, mode=mode, seed=4)
        b, _ = build_pairs(xs, ys, bt_probs(s), mode=mode, seed=4)
        assert [(q["chosen_ids"], q["rejected_ids"]) for q in a] == \
            [(q["chosen_ids"], q["rejected_ids"]) for q in b]

"Properties of dpo_lit.toy that do not belong in the chapter: input validation and invariances."
import math

import numpy as np
import pytest
import torch

from dpo_lit.toy import (ChainLM, MarkovLanguage, TinyLM, TinyLMConfig, WordTokenizer, best_of_n,
                         bon_kl_bound, chain_frontier, completion_logps, generate, pack_completions,
                         reference_partition, sft_train, tilted_chain)


@pytest.fixture(scope="module")
def lang():
    return MarkovLanguage(seed=0)


@pytest.fixture(scope="module")
def model(lang):
    torch.manual_seed(0)
    return TinyLM.from_config(vocab_size=lang.tokenizer.vocab_size).eval()


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="words"):
        WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="words"):
        WordTokenizer(["two words"])
    tok = WordTokenizer(["a", "b"])
    assert tok.encode(" a  b ") == [2, 3] and tok("a")["input_ids"] == [2]
    with pytest.raises(ValueError, match="'c'"):
        tok.encode("a c")


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("d_model", 3.0), ("n_layers", True), ("dropout", 1.0)])
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        TinyLMConfig(**{field: value})


def test_from_config_takes_config_or_keywords():
    with pytest.raises(TypeError):
        TinyLM.from_config(TinyLMConfig(), d_model=64)
    assert TinyLM.from_config(d_model=16, n_heads=4).config.d_model == 16


def test_language_validation_and_exact_length(lang):
    with pytest.raises(ValueError, match="completion_len"):
        MarkovLanguage(completion_len=0)
    x, y = lang.sample(5, seed=3)
    assert torch.equal(x, lang.sample(5, seed=3)[0])
    assert ((y[:, :-1] >= lang.offset) & (y[:, :-1] < lang.tokenizer.vocab_size)).all()
    np.testing.assert_allclose(lang.P.sum(1), 1.0)


def test_generate_validates_and_handles_ragged_prompts(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[2]], 0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[2]], 1, top_k=0)
    with pytest.raises(ValueError, match="prompts_ids"):
        generate(model, [[]], 1)
    prompts = [[2, 3, 4, 5], [6], [7, 8]]
    together = generate(model, prompts, 5, temperature=0)
    alone = [generate(model, [p], 5, temperature=0)[0] for p in prompts]
    assert together == alone                       # left padding does not change greedy decoding


def test_generate_stops_at_eos_and_batches_do_not_matter(model):
    ids, lps = generate(model, [[2, 3]] * 64, 8, eos_token_id=1, seed=0, return_logps=True)
    for y, lp in zip(ids, lps):
        assert len(y) == len(lp) and 1 <= len(y) <= 8
        assert 1 not in y[:-1]
    logps = completion_logps(model, [[2, 3]] * 64, ids)
    torch.testing.assert_close(torch.stack([lp.sum() for lp in lps]), logps, atol=1e-4, rtol=1e-5)
    small = completion_logps(model, [[2, 3]] * 64, ids, batch_size=7)
    torch.testing.assert_close(small, logps, atol=1e-5, rtol=1e-5)


def test_pack_completions_mask(lang):
    ids, am, cm = pack_completions([[2, 3], [4]], [[5, 1], [6, 7, 1]])
    assert ids.tolist() == [[2, 3, 5, 1], [4, 6, 7, 1]]
    assert cm.tolist() == [[False, False, True, True], [False, True, True, True]]
    with pytest.raises(ValueError, match="completions"):
        pack_completions([[2]], [[3], [4]])


def test_sft_validates_and_reduces_loss(lang):
    torch.manual_seed(0)
    m = TinyLM.from_config(vocab_size=lang.tokenizer.vocab_size)
    x, y = lang.sample(512, seed=0)
    with pytest.raises(ValueError, match="steps"):
        sft_train(m, x, y, steps=0)
    losses = sft_train(m, x, y, steps=60, seed=0)
    assert np.mean(losses[-10:]) < losses[0] - 0.3


def test_frontier_limits(lang):
    x, _ = lang.sample(64, seed=0)
    far = chain_frontier(lang, x, [1e6])[0]
    assert abs(far[0]) < 1e-6                      # β → ∞: π* = P
    near = chain_frontier(lang, x, [1e-3])[0]
    assert near[1] == pytest.approx(lang.completion_len * lang.scores.max(), abs=1e-3)  # β → 0: the best words
    with pytest.raises(ValueError, match="beta"):
        chain_frontier(lang, x, [0.0])


def test_bon_bound_and_validation(lang, model):
    assert bon_kl_bound(1) == 0.0 and bon_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="pool"):
        best_of_n(model, lang, [[2, 3, 4]], ns=(1, 8), pool=4)
    out = best_of_n(model, lang, [[2, 3, 4]] * 4, ns=(1, 2, 4), pool=16, seed=0)
    assert (out["kl"] <= out["bound"] + 1e-12).all()


def test_generate_temperature_and_top_k_sample_the_right_distribution(lang):
    "First-token frequencies against softmax(logits / T), restricted to the top k and renormalised."
    torch.manual_seed(1)
    model = TinyLM.from_config(vocab_size=lang.tokenizer.vocab_size).eval()
    with torch.no_grad():
        model.tok.weight.mul_(15)                                    # sharp logits, so that T and k matter
    prompt = [2, 3, 4]
    logits = model(torch.tensor([prompt]))[0, -1].detach().double()
    n = 20_000
    for temperature, top_k in ((0.5, None), (2.0, 3)):
        z = logits / temperature
        if top_k is not None:
            z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
        expected = z.softmax(-1)
        first = torch.tensor([y[0] for y in generate(model, [prompt] * n, 1, temperature=temperature, top_k=top_k,
                                                     seed=7, batch_size=4096)])
        freq = torch.bincount(first, minlength=len(expected)).double() / n
        assert (freq[expected == 0] == 0).all()                      # nothing outside the top k
        assert (freq - expected).abs().max() < 5 * (0.25 / n) ** 0.5, (temperature, top_k)
        assert (logits.softmax(-1) - expected).abs().max() > 0.05      # T = 1 and no top-k would be detected


def _brute_force_partition(model, lang, prompt, beta):
    "log Z and E[r] under π* ∝ π_ref·exp(r/β) by listing every completion within L + 1 tokens."
    import itertools
    L, o, eos = lang.completion_len, lang.offset, lang.tokenizer.eos_token_id
    V = lang.tokenizer.vocab_size
    words = range(o, V)
    comps = [list(w) + [eos] for t in range(L + 1) for w in itertools.product(words, repeat=t)]
    comps += [list(w) + [v] for w in itertools.product(words, repeat=L) for v in range(V) if v != eos]
    lp = completion_logps(model, [prompt] * len(comps), comps).double()
    r = lang.reward(comps)
    logw = lp + r / beta
    log_z = torch.logsumexp(logw, 0)
    return log_z.item(), (torch.exp(logw - log_z) * r).sum().item()


class _PerturbedChain(torch.nn.Module):
    "The chain, with every token possible at every step and a tilt that depends on the whole prefix."

    def __init__(self, lang):
        super().__init__()
        self.chain = ChainLM(lang)

    def forward(self, input_ids, attention_mask=None):
        base = self.chain(input_ids).clamp(min=-4.0)              # eos / pad / off-chain words: small
        history = input_ids.cumsum(1).double()[..., None]          # depends on every earlier token
        v = torch.arange(base.shape[-1], dtype=torch.float64)
        return base + 0.4 * torch.sin(0.7 * history * (v + 1))


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_reference_partition_is_exact_in_expectation(beta, monkeypatch):
    """Eq. (toy-ref-partition) is an identity: averaged over EVERY path, each weighted by its proposal
    probability, the estimator equals the sum over every completion, for a non-Markov reference."""
    import itertools
    import dpo_lit.toy as toy
    lang = MarkovLanguage(completion_len=2, seed=3)
    model, K = _PerturbedChain(lang), len(lang.words)
    paths = np.array(list(itertools.product(range(K), repeat=lang.completion_len)))

    def every_path(language, Q, last, samples, rng):
        u = np.repeat(last, len(paths))
        words = np.tile(paths, (len(last), 1))
        logq, prev = [np.zeros(len(u))], u
        for t, q in enumerate(Q):
            logq.append(logq[-1] + np.log(q[prev, words[:, t]]))
            prev = words[:, t]
        logq = np.stack(logq, 1)
        # the estimator averages uniformly over its "samples": weigh each path by n * Q(path)
        return words, logq - logq[:, -1:] - np.log(len(paths))

    monkeypatch.setattr(toy, "_tilted_paths", every_path)
    prompts, _ = lang.sample(3, seed=5)
    log_z, er = toy.reference_partition(model, lang, prompts, beta, samples=len(paths))
    for i, p in enumerate(prompts.tolist()):
        lz, e = _brute_force_partition(model, lang, p, beta)
        # completion_logps sums in float32: agreement to float32 rounding of the sums
        assert log_z[i] == pytest.approx(lz, abs=1e-6) and er[i] == pytest.approx(e, abs=1e-6)


def test_reference_partition_by_sampling(lang):
    "The sampled estimate converges to the listed sum (sampling error of 40,000 paths)."
    lang = MarkovLanguage(completion_len=2, seed=3)
    model = _PerturbedChain(lang)
    prompts, _ = lang.sample(3, seed=5)
    log_z, er = reference_partition(model, lang, prompts, 0.5, samples=40_000, seed=6)
    for i, p in enumerate(prompts.tolist()):
        lz, e = _brute_force_partition(model, lang, p, 0.5)
        assert log_z[i] == pytest.approx(lz, abs=0.02) and er[i] == pytest.approx(e, abs=0.03)


def test_chain_as_model_gives_the_exact_partition(lang):
    x, _ = lang.sample(32, seed=8)
    log_z, _ = reference_partition(ChainLM(lang), lang, x, 0.4, samples=4, seed=0)
    exact = tilted_chain(lang, 0.4)[1][x[:, -1].numpy() - lang.offset]
    assert np.abs(log_z - exact).max() < 1e-9
    with pytest.raises(ValueError, match="beta"):
        reference_partition(ChainLM(lang), lang, x, 0.0)

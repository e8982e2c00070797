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


# ---- sampling with a key-value cache, and nucleus (top-p) sampling ----

def _sharp_model(vocab_size, seed=3):
    "A random TinyLM with large embeddings: logits far from uniform, positions that matter."
    torch.manual_seed(seed)
    model = TinyLM.from_config(vocab_size=vocab_size).eval()
    with torch.no_grad():
        model.tok.weight.mul_(15)
        model.pos.weight.mul_(15)
    return model


def _step_through(model, prompts, steps, eos, pad=0):
    "Logits of the last position at every step, cached and recomputed, as `generate` feeds them."
    from dpo_lit.toy import _left_pad
    ids, am = _left_pad(prompts, pad)
    live = torch.ones(len(ids), dtype=torch.bool)
    cached, full, lives = [], [], []
    with torch.no_grad():
        logits, past = model(ids, attention_mask=am, use_cache=True)
        for t in range(steps.shape[1]):
            cached.append(logits[:, -1]); full.append(model(ids, attention_mask=am)[:, -1])
            lives.append(live.clone())
            nxt = torch.where(live, steps[:, t], pad)
            ids, am = torch.cat([ids, nxt[:, None]], 1), torch.cat([am, live.long()[:, None]], 1)
            live = live & (nxt != eos)
            logits, past = model(nxt[:, None], attention_mask=am, past=past, use_cache=True)
    return torch.stack(cached, 1), torch.stack(full, 1), torch.stack(lives, 1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_cached_logits_equal_a_full_recompute(lang, dtype, tol):
    "Ragged left-padded prompts, rows ending at EOS at different steps: every live step agrees."
    model = _sharp_model(lang.tokenizer.vocab_size).to(dtype)
    g = torch.Generator().manual_seed(0)
    x, _ = lang.sample(120, seed=2)
    prompts = [(p + p[::-1])[: 1 + i % 5] for i, p in enumerate(x.tolist())]  # lengths 1 to 5
    steps = torch.randint(2, lang.tokenizer.vocab_size, (120, 7), generator=g)
    steps[torch.arange(120) % 4 == 0, 1] = 1          # a quarter of the rows end after two tokens
    steps[torch.arange(120) % 4 == 1, 4] = 1          # another quarter after five
    cached, full, live = _step_through(model, prompts, steps, eos=1)
    torch.testing.assert_close(cached[live], full[live], rtol=tol, atol=tol)
    assert live[:, -1].sum() == 60 and not live[::4, 2:].any()
    # the comparison can fail: the same logits with positions counted from the padding differ
    with torch.no_grad():
        from dpo_lit.toy import _left_pad
        ids, am = _left_pad(prompts, 0)
        wrong = model(ids)[:, -1]
    assert (wrong - full[:, 0])[torch.arange(120) % 5 != 4].abs().amax(-1).min() > 1e-2


def test_cache_in_chunks_and_the_prefill_equal_the_plain_forward(lang):
    "A prefill, then several tokens at once after a cache: all positions as in one plain pass."
    model = _sharp_model(lang.tokenizer.vocab_size, seed=5)
    from dpo_lit.toy import _left_pad
    ids, am = _left_pad([[2, 3, 4, 5, 6, 7, 8, 9], [4, 5, 6], [9, 8, 7, 6, 5]], 0)
    with torch.no_grad():
        full = model(ids, attention_mask=am)
        a, past = model(ids[:, :3], attention_mask=am[:, :3], use_cache=True)
        b, past = model(ids[:, 3:7], attention_mask=am[:, :7], past=past, use_cache=True)
        c, past = model(ids[:, 7:], attention_mask=am, past=past, use_cache=True)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-5, atol=1e-5)
    assert len(past) == model.config.n_layers and past[0][0].shape[2] == ids.shape[1]
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, 7:], attention_mask=am[:, 1:], past=past[:0] or None, use_cache=True)
    with pytest.raises(ValueError, match="past"):
        model(ids[:, 7:], past=past[:1], use_cache=True)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(3, 9, dtype=torch.long), past=past, use_cache=True)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=6, top_p=0.9),
                                dict(temperature=0)])
def test_generate_cached_and_recomputed_draw_the_same(lang, kw):
    "Same seed, same RNG use: the same completions (a rounding flip of a draw could change a row:"
    " at most 1%), and the same log-probabilities to float32 rounding."
    model = _sharp_model(lang.tokenizer.vocab_size, seed=7)
    x, _ = lang.sample(400, seed=4)
    prompts = [p[: 1 + i % 3] for i, p in enumerate(x.tolist())]
    # the end token: the commonest greedy first token, inside every nucleus, so rows stop early
    eos = torch.tensor(generate(model, prompts, 1, temperature=0)).flatten().mode().values.item()
    a, a_lp = generate(model, prompts, 7, eos_token_id=eos, seed=3, return_logps=True, **kw)
    b, b_lp = generate(model, prompts, 7, eos_token_id=eos, seed=3, return_logps=True,
                       use_cache=False, **kw)
    same = [i for i in range(len(a)) if a[i] == b[i]]
    assert len(same) >= 0.99 * len(a)
    assert len({len(y) for y in a}) > 1                                   # some rows stop early
    torch.testing.assert_close(torch.cat([a_lp[i] for i in same]),
                               torch.cat([b_lp[i] for i in same]), rtol=1e-5, atol=1e-5)


def test_generate_without_a_cache_path_recomputes(lang):
    chain = ChainLM(lang)
    x, _ = lang.sample(50, seed=6)
    ys = generate(chain, x.tolist(), lang.completion_len + 1, eos_token_id=1, seed=0)
    assert all(len(y) == lang.completion_len + 1 and y[-1] == 1 for y in ys)
    assert ys == generate(chain, x.tolist(), lang.completion_len + 1, eos_token_id=1, seed=0,
                          use_cache=False)
    with pytest.raises(ValueError, match="use_cache"):
        generate(chain, x.tolist(), 2, use_cache=True)


@pytest.mark.parametrize("top_p", [0.0, -0.2, 1.5, float("nan"), True])
def test_top_p_is_validated(model, top_p):
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[2]], 1, top_p=top_p)


def _nucleus_reference(prob, top_p):
    "P^(p) in float64: the smallest most-probable set with mass >= p, renormalised."
    order = np.argsort(-prob, kind="stable")
    k_star = int(np.searchsorted(np.cumsum(prob[order]), top_p)) + 1
    out = np.zeros_like(prob)
    out[order[:k_star]] = prob[order[:k_star]]
    return out / out.sum()


@pytest.mark.parametrize("temperature, top_k, top_p",
                         [(1.0, None, 0.6), (0.8, 6, 0.85), (2.0, None, 0.3)])
def test_generate_top_p_samples_the_nucleus(lang, temperature, top_k, top_p):
    "First-token frequencies through `generate` against the exact nucleus of softmax(z / T), top k."
    model = _sharp_model(lang.tokenizer.vocab_size, seed=1)
    prompt = [2, 3, 4]
    with torch.no_grad():
        z = model(torch.tensor([prompt]))[0, -1].double() / temperature
    if top_k is not None:
        z = z.masked_fill(z < z.topk(top_k).values[-1], float("-inf"))
    prob = z.softmax(-1).numpy()
    edge = np.abs(np.cumsum(np.sort(prob)[::-1]) - top_p).min()
    assert edge > 5e-3                       # no token within rounding of the nucleus edge
    expected = _nucleus_reference(prob, top_p)
    assert 2 <= (expected > 0).sum() < (prob > 0).sum()  # the cut is neither trivial nor everything
    n = 20_000
    ys = generate(model, [prompt] * n, 1, temperature=temperature, top_k=top_k, top_p=top_p,
                  seed=11, batch_size=4096)
    first = torch.tensor([y[0] for y in ys])
    freq = torch.bincount(first, minlength=len(expected)).double().numpy() / n
    assert (freq[expected == 0] == 0).all()  # nothing outside the nucleus
    se = np.sqrt(expected * (1 - expected) / n)
    assert (np.abs(freq - expected) <= 5 * se + 1e-12).all(), (freq, expected)


def test_top_p_one_is_no_truncation(lang):
    "top_p=1.0 and top_p=None are the same computation: the same draws, exactly."
    model = _sharp_model(lang.tokenizer.vocab_size, seed=2)
    x, _ = lang.sample(300, seed=9)
    kw = dict(temperature=1.3, eos_token_id=1, seed=5)
    assert generate(model, x.tolist(), 6, top_p=1.0, **kw) == generate(model, x.tolist(), 6, **kw)
    assert generate(model, x.tolist(), 6, top_p=0.5, **kw) != generate(model, x.tolist(), 6, **kw)


def test_nucleus_ties_are_broken_by_id():
    "Three equal logits, p = 0.5: the nucleus is the two lowest of their ids (a stable sort)."
    from dpo_lit.toy import _nucleus
    z = torch.tensor([[0.0, 2.0, 2.0, 2.0, -1.0]])
    kept = torch.isfinite(_nucleus(z, 0.5))[0].tolist()
    assert kept == [False, True, True, False, False]
    assert torch.isfinite(_nucleus(z, 1e-6))[0].tolist() == [False, True, False, False, False]


def test_nucleus_agrees_with_transformers():
    "The kept set equals that of transformers' TopPLogitsWarper, away from the nucleus edge."
    TopP = pytest.importorskip("transformers").TopPLogitsWarper
    from dpo_lit.toy import _nucleus
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(500, 30, generator=g)
    for top_p in (0.3, 0.75, 0.95):
        mass = z.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
        clear = ((mass - top_p).abs() > 1e-4).all(-1)                # rows with no token at the edge
        ours = torch.isfinite(_nucleus(z, top_p))[clear]
        theirs = torch.isfinite(TopP(top_p)(None, z.clone()))[clear]
        assert clear.sum() > 450 and torch.equal(ours, theirs)
        assert 1 < ours.sum(-1).float().mean() < 29

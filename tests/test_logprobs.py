"""Property tests for dpo_lit.logprobs: float64 references, padding invariance, fused == unfused.

Different code paths (chunked or not, fused or not, other batch shapes) are compared with a
tolerance chosen from float32 (relative 1e-5), never bit for bit: PyTorch picks its CPU kernels at
run time, so their last bits differ between machines. Exact equality is kept for integers (token
counts) and for values that are exact by construction (the 0 of an empty completion)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpo_lit.logprobs import concatenated_forward, fused_sequence_logps, sequence_logps
from conftest import need


def naive_logps(logits, ids, mask, average=False):
    "Float64 reference: full log_softmax, gather, masked sum (or mean, 0 for empty rows)."
    logp = logits.double().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:].double()
    total = (logp * m).sum(1)
    return total / m.sum(1).clamp(min=1) if average else total


def random_case(seed, dtype=torch.float32):
    "Random B, T, V, logits, ids and a completion mask of random prompt/completion lengths."
    g = torch.Generator().manual_seed(seed)
    B, T, V = (int(torch.randint(lo, hi, (1,), generator=g))
               for lo, hi in ((1, 7), (2, 30), (2, 80)))
    logits = (4 * torch.randn(B, T, V, generator=g)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        p = int(torch.randint(0, T, (1,), generator=g))
        c = int(torch.randint(0, T - p + 1, (1,), generator=g))
        mask[b, p:p + c] = True
    return logits, ids, mask, g


@pytest.mark.parametrize("seed", range(12))
def test_sequence_logps_matches_float64_in_value_and_gradient(seed):
    logits, ids, mask, g = random_case(seed)
    chunk = int(torch.randint(1, 10, (1,), generator=g))
    w = torch.randn(logits.shape[0], generator=g)
    for average in (False, True):
        x = logits.clone().requires_grad_()
        x64 = logits.double().requires_grad_()
        got, counts = sequence_logps(x, ids, mask, average=average, return_counts=True,
                                     chunk_size=chunk)
        ref = naive_logps(x64, ids, mask, average=average)
        assert got.dtype == torch.float32 and counts.dtype == torch.int64
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(counts, mask[:, 1:].sum(1))
        (got * w).sum().backward()
        (ref * w.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_fused_equals_unfused_and_float64_gradients(seed):
    _, ids, mask, g = random_case(seed)
    B, T = ids.shape
    V, H = int(ids.max()) + 1 + int(torch.randint(0, 5, (1,), generator=g)), 6
    h = torch.randn(B, T, H, generator=g)
    W, c = torch.randn(V, H, generator=g) / 2, torch.randn(V, generator=g)
    w = torch.randn(B, generator=g)
    chunk = int(torch.randint(1, 12, (1,), generator=g))

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        y = fn(*xs)
        grads = torch.autograd.grad((y * w.to(y.dtype)).sum(), xs, allow_unused=True)
        return [y.detach()] + list(grads)

    for average in (False, True):
        fused = run(lambda a, b, d: fused_sequence_logps(a, b, ids, mask, average=average,
                                                         lm_head_bias=d,
                                                         chunk_size=chunk), h, W, c)
        unfused = run(lambda a, b, d: sequence_logps(F.linear(a, b, d), ids, mask,
                                                     average=average), h, W, c)
        ref = run(lambda a, b, d: naive_logps(F.linear(a, b, d), ids, mask, average=average),
                  h.double(), W.double(), c.double())
        for a, u, r in zip(fused, unfused, ref):
            torch.testing.assert_close(a, u, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)
    # without bias, and with the weight frozen (no weight gradient requested)
    Wf = W.clone()
    hh = h.clone().requires_grad_()
    fused_sequence_logps(hh, Wf, ids, mask).sum().backward()
    hu = h.clone().requires_grad_()
    sequence_logps(F.linear(hu, Wf), ids, mask).sum().backward()
    torch.testing.assert_close(hh.grad, hu.grad, rtol=1e-5, atol=1e-6)


def test_bf16_logits_use_float32_log_softmax():
    logits, ids, mask, _ = random_case(3)
    lb = (8 * logits).bfloat16().requires_grad_()
    got = sequence_logps(lb, ids, mask, chunk_size=2)
    ref = naive_logps(lb.detach(), ids, mask)                 # float64 on the very same bf16 values
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-4)
    got.sum().backward()
    assert lb.grad.dtype == torch.bfloat16 and torch.isfinite(lb.grad.float()).all()
    # fused path with bf16 hidden states and weight
    g = torch.Generator().manual_seed(0)
    h = torch.randn(*ids.shape, 8, generator=g).bfloat16()
    W = torch.randn(logits.shape[-1], 8, generator=g).bfloat16()
    torch.testing.assert_close(fused_sequence_logps(h, W, ids, mask),
                               naive_logps(F.linear(h, W), ids, mask).float(), rtol=1e-5, atol=1e-3)


def test_empty_completions_give_zero_not_nan():
    logits, ids, _, _ = random_case(5)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 0] = True                                          # position 0 is never scored
    x = logits.clone().requires_grad_()
    for average in (False, True):
        got, counts = sequence_logps(x, ids, mask, average=average, return_counts=True)
        assert (got == 0).all() and (counts == 0).all()
        got.sum().backward()
        assert (x.grad == 0).all()
    h = torch.randn(*ids.shape, 4, requires_grad=True)
    W = torch.randn(logits.shape[-1], 4, requires_grad=True)
    out = fused_sequence_logps(h, W, ids, mask, average=True)
    assert (out == 0).all()
    out.sum().backward()
    assert (h.grad == 0).all() and (W.grad == 0).all()


def test_non_contiguous_logits_and_errors():
    logits, ids, mask, _ = random_case(7)
    nc = logits.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not nc.is_contiguous() or logits.shape[0] == 1
    torch.testing.assert_close(sequence_logps(nc, ids, mask), sequence_logps(logits, ids, mask))
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(logits[:, :-1], ids, mask)
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logps(logits, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(logits, ids, mask, chunk_size=-1)
    bad = ids.clone()
    bad[mask] = logits.shape[-1]
    if mask[:, 1:].any():
        with pytest.raises(ValueError, match="outside"):
            sequence_logps(logits, bad, mask)
    with pytest.raises(ValueError, match="lm_head_weight"):
        fused_sequence_logps(torch.randn(*ids.shape, 4), torch.randn(5, 3), ids, mask)


class CausalToy(nn.Module):
    "A causal model without attention mask: embedding, running mean, linear head."
    def __init__(self, V=40, H=12):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, H), nn.Linear(H, V)

    def forward(self, input_ids):
        e = self.emb(input_ids)
        n = torch.arange(1, input_ids.shape[1] + 1)[:, None]
        return self.head(torch.tanh(e.cumsum(1) / n) + e)


def batch_of(pairs, T=None, pad=0):
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = T or max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), pad)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    cm = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attn[i, :len(p) + len(c)] = 1
        cm[i, len(p):len(p) + len(c)] = True
    return {"input_ids": ids, "attention_mask": attn, "completion_mask": cm}


def rand_pair(g, V, lo, hi):
    n = lambda: int(torch.randint(lo, hi, (1,), generator=g))
    s = lambda k: torch.randint(1, V, (k,), generator=g).tolist()
    return s(n()), s(n()), s(n())


@pytest.mark.parametrize("seed", range(6))
def test_padding_invariance_random_lengths(seed):
    torch.manual_seed(seed)
    model = CausalToy()
    g = torch.Generator().manual_seed(seed)
    pair = rand_pair(g, 40, 1, 8)
    others = [rand_pair(g, 40, 10, 60) for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
    alone = concatenated_forward(model, batch_of([pair]))
    slot = int(torch.randint(0, len(others) + 1, (1,), generator=g))
    rows = others[:slot] + [pair] + others[slot:]
    mixed = concatenated_forward(model, batch_of(rows, T=130, pad=5))
    for k in ("chosen_counts", "rejected_counts"):                        # integers: exact
        assert mixed[k][slot] == alone[k][0]
    for k in ("chosen_logps", "rejected_logps", "chosen_logps_sum"):      # other shapes: float32
        torch.testing.assert_close(mixed[k][slot], alone[k][0], rtol=1e-5, atol=1e-5)
    wrapped = concatenated_forward(nn.DataParallel(model), batch_of([pair]))  # looked through
    torch.testing.assert_close(wrapped["chosen_logps"], alone["chosen_logps"])
    avg = concatenated_forward(model, batch_of([pair]), average=True)
    torch.testing.assert_close(avg["chosen_logps"], alone["chosen_logps"] / len(pair[1]))
    torch.testing.assert_close(avg["chosen_logps_sum"], alone["chosen_logps"])


@pytest.fixture(scope="module")
def hf_models():
    transformers = need("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=61, n_positions=96, n_embd=24, n_layer=2, n_head=2))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=61, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=96))
    return {"gpt2": gpt2.eval(), "llama": llama.eval()}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_models_padding_fused_and_reference(hf_models, name):
    model = hf_models[name]
    g = torch.Generator().manual_seed(1)
    pairs = [rand_pair(g, 61, 2, 10) for _ in range(3)] + [rand_pair(g, 61, 20, 40)]
    batch = batch_of(pairs, pad=0)
    out = concatenated_forward(model, batch)
    alone = concatenated_forward(model, batch_of(pairs[:1]))
    for k in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(out[k][0], alone[k][0], rtol=1e-5, atol=1e-5)
    full = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = naive_logps(full, batch["input_ids"], batch["completion_mask"]).float()
    both = torch.cat([out["chosen_logps"], out["rejected_logps"]])
    torch.testing.assert_close(both, ref, rtol=1e-5, atol=1e-4)

    def grads(fused):
        model.zero_grad()
        o = concatenated_forward(model, batch, fused=fused, average=True, chunk_size=7)
        (o["chosen_logps"] - 0.3 * o["rejected_logps"]).sum().backward()
        return o, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (o1, g1), (o2, g2) = grads(False), grads(True)
    for k in o1:
        torch.testing.assert_close(o2[k], o1[k], rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5)


def test_fused_refuses_plain_modules():
    g = torch.Generator().manual_seed(0)
    batch = batch_of([rand_pair(g, 40, 2, 5)])
    with pytest.raises(ValueError, match="fused=False"):
        concatenated_forward(CausalToy(), batch, fused=True)
    with pytest.raises(ValueError, match="completion_mask"):
        concatenated_forward(CausalToy(),
                             {k: v for k, v in batch.items() if k != "completion_mask"})


def test_memory_tools_moved_to_bench():
    "peak_memory and logps_memory_benchmark live in dpo_lit.bench; the old path warns and forwards."
    import dpo_lit.bench as bench
    import dpo_lit.logprobs as L
    assert "peak_memory" not in L.__all__ and "logps_memory_benchmark" not in L.__all__
    for name in ("peak_memory", "logps_memory_benchmark"):
        with pytest.warns(DeprecationWarning, match="dpo_lit.bench"):
            assert getattr(L, name) is getattr(bench, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        L.no_such_name


def test_default_chunk_rows_has_a_floor_on_the_fused_path():
    "Rows per chunk: the CHUNK_ELEMENTS budget; the fused path takes at least MIN_CHUNK_ROWS."
    import dpo_lit.logprobs as L
    assert L._chunk_rows(4096) == L.CHUNK_ELEMENTS // 4096
    assert L._chunk_rows(131072) == L.CHUNK_ELEMENTS // 131072 == 32
    assert L._chunk_rows(131072, min_rows=L.MIN_CHUNK_ROWS) == L.MIN_CHUNK_ROWS == 256
    assert L._chunk_rows(131072, chunk_size=32, min_rows=256) == 32      # an explicit size wins
    seen = []
    apply = L.FusedLinearLogSoftmaxGather.apply
    L.FusedLinearLogSoftmaxGather.apply = lambda *a: (seen.append(a[-1]), apply(*a))[1]
    try:
        h, W = torch.randn(1, 5, 4), torch.randn(2**20, 4)
        L.fused_sequence_logps(h, W, torch.zeros(1, 5, dtype=torch.long),
                               torch.ones(1, 5, dtype=torch.bool))
    finally:
        L.FusedLinearLogSoftmaxGather.apply = apply
    assert seen == [L.MIN_CHUNK_ROWS]

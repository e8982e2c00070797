"""Precomputed reference log-probs and the LoRA reference, beyond the chapter's lessons: the same
losses as a live reference under shuffling, length grouping, accumulation and several epochs; the
cache key reacts to each of its inputs and to nothing else; the reference is released; a peft policy
is its own reference with no copy; peft missing is a clear error."""
import copy
import dataclasses
import sys
import warnings

import pytest
import torch

import dpo_lit.train as train_mod
from dpo_lit.data import ByteTokenizer
from dpo_lit.scale import add_lora, adapters_disabled, reference_fingerprint, require_peft, weights_digest
from dpo_lit.toy import TinyLM, TinyLMConfig
from dpo_lit.train import DPOConfig, DPOTrainer
from conftest import need, ragged_pairs as pairs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def model(seed=0):
    torch.manual_seed(seed)
    return TinyLM(TinyLMConfig(vocab_size=258, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64))


TRAIN, EVAL = pairs(20), pairs(8, seed=1)
CFG = DPOConfig(learning_rate=1e-2, lr_scheduler="constant", batch_size=3, grad_accum_steps=2, num_epochs=3,
                max_length=64, group_by_length=True, rpo_alpha=0.5, progress_bar=False, verbose=False,
                device="cpu", eval_steps=4)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_same_losses_as_live_reference(tmp_path, group_by_length):
    cfg = dataclasses.replace(CFG, group_by_length=group_by_length)
    live = DPOTrainer(model(), train_dataset=TRAIN, eval_dataset=EVAL, config=cfg).train()
    t = DPOTrainer(model(), train_dataset=TRAIN, eval_dataset=EVAL,
                   config=dataclasses.replace(cfg, precompute_ref=True, output_dir=str(tmp_path)))
    pre = t.train()
    assert len(live) == len(pre) == 3 * 4          # 3 epochs of 4 windows: reshuffled each epoch
    for a, b in zip(live, pre):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "nll_loss", "eval_loss"):
            # two code paths (batch shapes differ): float32 rounding, relative to the value
            if k in a:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])), (a["step"], k, a[k], b[k])
    assert t.ref_model is None and t.ref_released


def test_given_reference_is_released_and_used(tmp_path):
    ref = model(1)
    live = DPOTrainer(model(), ref, train_dataset=TRAIN, config=dataclasses.replace(CFG, num_epochs=1)).train()
    t = DPOTrainer(model(), ref, train_dataset=TRAIN,
                   config=dataclasses.replace(CFG, num_epochs=1, precompute_ref=True, ref_cache_dir=str(tmp_path)))
    assert t.ref_model is None
    pre = t.train()
    assert len(live) == len(pre) > 0
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 for a, b in zip(live, pre))
    assert abs(live[0]["loss"] - 0.693147) > 1e-3          # a real reference, not the policy
    with pytest.raises(ValueError, match="released the reference"):
        t.evaluate(pairs(3, seed=5))


def count_passes(monkeypatch):
    "Count the passes over a data set that compute reference log-probs (any reference source)."
    import dpo_lit.scale as scale_mod
    calls = []
    real = scale_mod.precompute_reference_logps
    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(scale_mod, "precompute_reference_logps", counting)   # every source's pass
    return calls


class OtherEOS(ByteTokenizer):
    eos_token_id = 256
    pad_token_id = 257


@pytest.mark.parametrize("change, recompute", [
    (dict(), False),
    (dict(beta=0.5, loss_type="ipo", learning_rate=1e-3), False),     # not in the key: the log-probs do not depend on them
    (dict(max_length=40), True),
    (dict(max_prompt_length=4), True),
    (dict(data=pairs(20, seed=7)), True),
    (dict(model_seed=3), True),
    (dict(tokenizer=OtherEOS()), True),
    (dict(precision="bf16"), True),
])
def test_cache_key(tmp_path, monkeypatch, capsys, change, recompute):
    cfg = dataclasses.replace(CFG, precompute_ref=True, ref_cache_dir=str(tmp_path), verbose=True, num_epochs=1)
    DPOTrainer(model(), train_dataset=TRAIN, config=cfg)
    calls = count_passes(monkeypatch)
    change = dict(change)
    data, seed, tok = change.pop("data", TRAIN), change.pop("model_seed", 0), change.pop("tokenizer", None)
    capsys.readouterr()
    DPOTrainer(model(seed), tokenizer=tok, train_dataset=data, config=dataclasses.replace(cfg, **change))
    said = capsys.readouterr().out
    assert len(calls) == int(recompute)
    assert ("reusing cached reference log-probs" in said) == (not recompute)


def test_fingerprint_covers_weights_bytes_and_skip():
    m = model()
    d = weights_digest(m)
    assert d == weights_digest(copy.deepcopy(m))
    with torch.no_grad(): m.ln_f.bias[0] += 1e-7
    assert weights_digest(m) != d
    assert weights_digest(m, skip=lambda n: n.startswith("ln_f")) == weights_digest(model(), skip=lambda n: n.startswith("ln_f"))
    ex = [dict(prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4])]
    key = reference_fingerprint(ex, ByteTokenizer(), d, max_length=8)
    assert key == reference_fingerprint(copy.deepcopy(ex), ByteTokenizer(), d, max_length=8)
    assert key != reference_fingerprint([dict(ex[0], chosen_ids=[5])], ByteTokenizer(), d, max_length=8)


def test_damaged_cache_is_recomputed(tmp_path, monkeypatch):
    cfg = dataclasses.replace(CFG, precompute_ref=True, ref_cache_dir=str(tmp_path), num_epochs=1)
    t1 = DPOTrainer(model(), train_dataset=TRAIN, config=cfg)
    for f in tmp_path.glob("ref_logps-*.pt"): f.write_bytes(b"\0" * 10)
    calls = count_passes(monkeypatch)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t2 = DPOTrainer(model(), train_dataset=TRAIN, config=cfg)
    assert len(calls) == 1 and any("unreadable" in str(x.message) for x in w)
    assert torch.equal(t1.reference.table["chosen_logps"], t2.reference.table["chosen_logps"])
    assert all("ref_chosen_logps" not in e for e in t1.train_examples)   # the caller's data as given


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="distributed"): DPOConfig(distributed="horovod")
    with pytest.raises(ValueError, match="precompute_ref"): DPOConfig(precompute_ref="yes")
    with pytest.raises(ValueError, match="ref_cache_dir"): DPOConfig(ref_cache_dir=3)


# ----- peft -----
def gpt2():
    transformers = need("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=257, eos_token_id=257, pad_token_id=256))


@pytest.mark.parametrize("precompute", [False, True])
def test_peft_policy_is_its_own_reference(tmp_path, monkeypatch, precompute):
    need("peft")
    base = gpt2()
    untouched = copy.deepcopy(base).eval()
    policy = add_lora(base, r=4, alpha=8, target_modules=["c_attn"])
    ptrs, n = {p.data_ptr() for p in policy.parameters()}, sum(p.numel() for p in policy.parameters())
    real_deepcopy = train_mod.copy.deepcopy
    def no_model_copy(x, *a, **k):
        assert not isinstance(x, torch.nn.Module), "a peft policy's reference must not be a copy"
        return real_deepcopy(x, *a, **k)
    monkeypatch.setattr(train_mod.copy, "deepcopy", no_model_copy)
    cfg = dataclasses.replace(CFG, num_epochs=1, rpo_alpha=0.0, precompute_ref=precompute, output_dir=str(tmp_path))
    t = DPOTrainer(policy, train_dataset=TRAIN, eval_dataset=EVAL, config=cfg)
    monkeypatch.undo()
    assert t.ref_kind == "adapters off" and t.ref_model is None
    h = t.train()
    assert abs(h[0]["loss"] - 0.693147) < 1e-5
    assert {p.data_ptr() for p in t.model.parameters()} == ptrs and sum(p.numel() for p in t.model.parameters()) == n
    assert any(p.abs().sum() > 0 for name, p in policy.named_parameters() if "lora_B" in name)
    b = t._batch(examples=t.eval_examples)      # no indices: a live pass, not the table
    from dpo_lit.logprobs import concatenated_forward
    with torch.no_grad():
        want = concatenated_forward(untouched, b)
    got = t.reference.logps(b)        # a live pass with the adapters off, after training
    # two code paths (peft's disabled adapters, the plain model): equal up to float32 rounding
    torch.testing.assert_close(got["chosen_logps"], want["chosen_logps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["rejected_logps"], want["rejected_logps"], rtol=1e-5, atol=1e-5)
    assert t.evaluate(EVAL)["loss"] == pytest.approx(t.evaluate()["loss"], abs=1e-5)


def test_adapters_disabled_needs_peft_model():
    with pytest.raises(ValueError, match="peft model"):
        with adapters_disabled(model()): pass


def test_missing_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"pip install 'dpo_lit\[peft\]'"):
        require_peft("LoRA")
    with pytest.raises(ImportError, match="add_lora needs the optional dependency peft"):
        add_lora(model())

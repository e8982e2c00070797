"""Tests of dpo_lit.train beyond the chapter's lessons: configuration errors, exact accumulation,
bit-for-bit resume, atomic checkpoints under a simulated crash, rotation, fault handling, fp16 loss
scaling on CPU, and a transformers GPT-2 built from a config."""
import dataclasses
import json
import math
import random

import pytest
import torch
from torch import nn

import dpo_lit.train as train_mod
from dpo_lit.data import ByteTokenizer
from dpo_lit.train import (DPOConfig, DPOTrainer, NonFiniteError, TinyGRU, list_checkpoints,
                           lr_factor, plan_epoch, resolve_precision, tiny_gru)
from conftest import need, ragged_pairs as pairs


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny models: one thread


def model(seed=0, **kw):
    return tiny_gru(seed, **kw)


DATA = pairs(48)
BASE = DPOConfig(learning_rate=1e-2, lr_scheduler="linear", warmup_steps=2, batch_size=8, max_steps=5,
                 max_length=48, progress_bar=False, verbose=False)


def cfg(**kw):
    return dataclasses.replace(BASE, **kw)


def weights(m):
    return [t.detach().clone() for t in m.state_dict().values()]


def same(a, b):
    return len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b))


def losses(history):
    return [r["loss"] for r in history]


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("kwargs, field", [
    (dict(learning_rate=-1e-3), "learning_rate"), (dict(grad_accum_steps=0), "grad_accum_steps"),
    (dict(batch_size=0), "batch_size"), (dict(precision="fp8"), "precision"), (dict(device="tpu"), "device"),
    (dict(device="cuda:x"), "device"), (dict(lr_scheduler="step"), "lr_scheduler"),
    (dict(loss_type="dpo"), "loss_type"), (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights"),
    (dict(max_length=32, max_prompt_length=32), "max_prompt_length"), (dict(max_length=1), "max_length"),
    (dict(beta=0.0), "beta"), (dict(beta=float("nan")), "beta"), (dict(rpo_alpha=-1), "rpo_alpha"),
    (dict(label_smoothing=0.7), "label_smoothing"), (dict(max_grad_norm=0), "max_grad_norm"),
    (dict(max_steps=0), "max_steps"), (dict(num_epochs=0), "num_epochs"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(save_steps=5), "save_steps"), (dict(save_total_limit=0), "save_total_limit"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"), (dict(batch_size=True), "batch_size"),
    (dict(adam_beta2=1.0), "adam_beta2"), (dict(loss_type="exo_pair"), "exo_pair"),
    (dict(f_divergence="hellinger"), "f_divergence"), (dict(fused_lm_head=1), "fused_lm_head"),
])
def test_config_rejects_nonsense_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DPOConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys():
    c = DPOConfig(beta=0.3, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], output_dir="run", save_steps=10)
    assert DPOConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="lerning_rate"):
        DPOConfig.from_dict({"lerning_rate": 1e-3})
    with pytest.raises(ValueError, match="grad_accum_steps"):
        dataclasses.replace(c, grad_accum_steps=0)


def test_lr_schedules():
    for s in ("constant", "linear", "cosine"):
        f = [lr_factor(i, scheduler=s, warmup_steps=4, total_steps=20) for i in range(20)]
        assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0 and all(x > 0 for x in f)
    with pytest.raises(ValueError, match="scheduler"):
        lr_factor(0, scheduler="step")


def test_precision_resolution_on_cpu():
    assert resolve_precision("auto", "cpu") == ("fp32", "auto: no CUDA GPU")
    assert resolve_precision("bf16", "cpu")[0] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


# ---------------------------------------------------------------- data order
def test_plan_is_a_function_of_seed_and_epoch_and_global_batch():
    a = plan_epoch(50, 8, 1, seed=3, epoch=1)
    b = plan_epoch(50, 2, 4, seed=3, epoch=1)
    assert [sum(w, []) for w in a] == [sum(w, []) for w in b]           # same pairs per optimizer step
    assert sorted(sum(sum(a, []), [])) == list(range(50))                # every pair once per epoch
    assert a != plan_epoch(50, 8, 1, seed=3, epoch=2) != plan_epoch(50, 8, 1, seed=4, epoch=1)
    lengths = [random.Random(i).randint(1, 100) for i in range(50)]
    g = plan_epoch(50, 4, 2, seed=0, epoch=0, lengths=lengths, group_by_length=True)
    assert sorted(sum(sum(g, []), [])) == list(range(50)) and all(len(w) <= 2 for w in g)


# ---------------------------------------------------------------- exact accumulation
@pytest.mark.parametrize("extra", [dict(rpo_alpha=1.0), dict(rpo_alpha=0.3, loss_type="ipo", group_by_length=True)])
def test_accumulation_invariance(extra):
    runs = {}
    for b, g in [(8, 1), (4, 2), (2, 4)]:
        t = DPOTrainer(model(0), train_dataset=DATA, config=cfg(batch_size=b, grad_accum_steps=g, max_steps=6, **extra))
        runs[b, g] = (losses(t.train()), weights(t.model))
    ref_losses, ref_w = runs[8, 1]
    for (b, g), (l, w) in runs.items():
        assert l == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), (b, g)
        for x, y in zip(w, ref_w):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_accumulation_with_a_short_last_window():
    # 45 pairs in windows of 8: the last window has 5 pairs, split 4+1 or 2+2+1: uneven micro-batches
    data = DATA[:45]
    runs = [DPOTrainer(model(0), train_dataset=data, config=cfg(batch_size=b, grad_accum_steps=g, num_epochs=1,
                                                                 max_steps=None, rpo_alpha=0.5))
            for b, g in [(8, 1), (4, 2), (2, 4), (1, 8)]]
    hs = [losses(t.train()) for t in runs]
    assert len(hs[0]) == 6
    for h in hs[1:]:
        assert h == pytest.approx(hs[0], rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- resume
@pytest.mark.parametrize("k", [3, 6])          # 6 is an epoch boundary (48 pairs / 8)
def test_resume_is_bit_for_bit(tmp_path, k):
    c = cfg(max_steps=9, save_steps=k, output_dir=str(tmp_path / "a"), disable_dropout=False, lr_scheduler="cosine")
    straight = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA, config=c)
    h1 = straight.train()
    resumed = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA,
                         config=dataclasses.replace(c, output_dir=str(tmp_path / "b")))
    h2 = resumed.train(resume_from=tmp_path / "a" / f"checkpoint-{k}")
    assert same(weights(straight.model), weights(resumed.model))
    assert losses(h1) == losses(h2)
    assert [r["lr"] for r in h1] == [r["lr"] for r in h2]


def test_keyboard_interrupt_saves_then_resume_latest(tmp_path):
    c = cfg(max_steps=6, output_dir=str(tmp_path), disable_dropout=False)
    straight = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA, config=dataclasses.replace(c, output_dir=None))
    straight.train()
    t = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA, config=c)
    calls = [0]
    def interrupt(mod, inputs, output):
        calls[0] += 1
        if calls[0] == 4: raise KeyboardInterrupt
    handle = t.model.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    handle.remove()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    t2 = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA, config=c)
    t2.train(resume_from="latest")
    assert same(weights(straight.model), weights(t2.model))
    assert losses(t2.history) == losses(straight.history)


@pytest.mark.parametrize("where", ["evaluate", "after the update", "logging"])
def test_interrupt_between_update_and_log_resumes_exactly(tmp_path, monkeypatch, where):
    "Ctrl-C after step 3's update (in the schedule step, in evaluate, in the log): same run."
    c = cfg(max_steps=6, eval_steps=3, output_dir=str(tmp_path / "cut"), disable_dropout=False)
    kw = dict(train_dataset=DATA[:40], eval_dataset=DATA[40:])
    straight = DPOTrainer(model(0, dropout=0.2), config=dataclasses.replace(c, output_dir=None),
                          **kw)
    straight.train()
    t = DPOTrainer(model(0, dropout=0.2), config=c, **kw)
    fired = []
    def fire(step):
        if step == 3 and not fired:
            fired.append(step)
            raise KeyboardInterrupt
    if where == "evaluate":
        real = DPOTrainer.evaluate
        def evaluate(self, dataset=None):
            fire(self.state["step"])
            return real(self, dataset)
        monkeypatch.setattr(DPOTrainer, "evaluate", evaluate)
    elif where == "after the update":
        lr_class = type(t.scheduler)
        real_step = lr_class.step
        def step(self, *a):
            fire(self.last_epoch + 1)
            return real_step(self, *a)
        monkeypatch.setattr(lr_class, "step", step)
    else:
        real_log = train_mod.RunLog.step
        def log_step(self, row, last=False):
            fire(row["step"])
            return real_log(self, row, last)
        monkeypatch.setattr(train_mod.RunLog, "step", log_step)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["checkpoint-3"]
    t2 = DPOTrainer(model(0, dropout=0.2), config=c, **kw)
    t2.train(resume_from="latest")
    assert same(weights(straight.model), weights(t2.model))
    after = lambda h: [r["loss"] for r in h if r["step"] > 3]       # the steps run after resuming
    assert after(t2.history) == after(straight.history) and len(after(t2.history)) == 3
    if where != "after the update":       # the row was stored before the interrupt, and logged
        assert [r["step"] for r in t2.history] == list(range(1, 7))
        rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7))


# ---------------------------------------------------------------- checkpoints
def test_atomic_save_survives_a_crash_during_save(tmp_path, monkeypatch):
    c = cfg(max_steps=4, save_steps=2, output_dir=str(tmp_path))
    t = DPOTrainer(model(0), train_dataset=DATA, config=c)
    real_save = torch.save
    def crash_on_second_checkpoint(obj, f, *a, **kw):
        if "checkpoint-4" in str(f) and str(f).endswith("trainer_state.pt"):
            with open(f, "wb") as fh: fh.write(b"half a file")      # a partial write, then the crash
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(train_mod.torch, "save", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        t.train()
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    fresh = DPOTrainer(model(0), train_dataset=DATA, config=c)
    fresh.load_checkpoint(tmp_path)
    assert fresh.state["step"] == 2 and len(fresh.history) == 2
    # a crash at the rename (the last moment) leaves the old checkpoint too
    def failing_replace(src, dst):
        raise OSError("killed at rename")
    monkeypatch.setattr(train_mod.os, "replace", failing_replace)
    import dpo_lit.checkpoint as checkpoint_mod
    monkeypatch.setattr(checkpoint_mod, "_exchange", lambda a, b: False)   # renameat2: a rename too
    with pytest.raises(OSError, match="rename"):
        fresh.save_checkpoint()
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    DPOTrainer(model(0), train_dataset=DATA, config=c).load_checkpoint(tmp_path / "checkpoint-2")


def test_stale_temp_dirs_are_ignored_and_cleaned(tmp_path):
    (tmp_path / ".tmp-checkpoint-9-xyz").mkdir()
    (tmp_path / ".tmp-checkpoint-9-xyz" / "model.pt").write_bytes(b"junk")
    assert list_checkpoints(tmp_path) == []
    DPOTrainer(model(0), train_dataset=DATA, config=cfg(max_steps=1, output_dir=str(tmp_path))).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "final", "metrics.jsonl"]


def test_save_total_limit(tmp_path):
    t = DPOTrainer(model(0), train_dataset=DATA, config=cfg(max_steps=5, save_steps=1, save_total_limit=2,
                                                            output_dir=str(tmp_path)))
    t.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["config"]["save_total_limit"] == 2


def test_save_model(tmp_path):
    t = DPOTrainer(model(0), train_dataset=DATA, config=cfg(max_steps=1))
    t.train()
    p = t.save(tmp_path / "final")
    m = TinyGRU()
    m.load_state_dict(torch.load(p / "model.pt", weights_only=True))
    assert same(weights(m), weights(t.model))
    assert json.loads((p / "dpo_config.json").read_text())["max_steps"] == 1


# ---------------------------------------------------------------- faults
def nan_forward_at(module, calls):
    count = [0]
    def hook(mod, inputs, output):
        count[0] += 1
        return output * float("nan") if count[0] in calls else output
    return module.register_forward_hook(hook)


def nan_grad_at(param, calls):
    count = [0]
    def hook(grad):
        count[0] += 1
        return grad * float("nan") if count[0] in calls else grad
    return param.register_hook(hook)


def test_nan_loss_is_caught_with_the_step_named(tmp_path):
    c = cfg(max_steps=6, save_steps=2, output_dir=str(tmp_path), batch_size=4, grad_accum_steps=2)
    t = DPOTrainer(model(0), train_dataset=DATA, config=c)
    nan_forward_at(t.model, {6})                # step 3, second micro-batch
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite loss \(nan\) in micro-batch 2 of 2") as e:
        t.train()
    assert "checkpoint-2" in str(e.value) and e.value.step == 3
    assert all(torch.isfinite(w).all() for w in weights(t.model))
    assert t.state["step"] == 2 and len(t.history) == 2
    back = DPOTrainer(model(0), train_dataset=DATA, config=c)
    back.load_checkpoint(tmp_path)
    assert same(weights(back.model), weights(t.model))


def test_nan_gradient_names_the_parameter():
    t = DPOTrainer(model(0), train_dataset=DATA, config=cfg(max_steps=4))
    nan_grad_at(t.model.gru.bias_ih_l0, {2})
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient .* of parameter 'gru.bias_ih_l0'"):
        t.train()
    assert all(torch.isfinite(w).all() for w in weights(t.model)) and t.state["step"] == 1


def test_skip_option_counts_skipped_steps():
    t = DPOTrainer(model(0), train_dataset=DATA, config=cfg(max_steps=6, on_nonfinite="skip"))
    nan_forward_at(t.model, {2, 3})
    nan_grad_at(t.model.emb.weight, {5})
    h = t.train()
    assert [r["step"] for r in h if r.get("skipped")] == [2, 3, 5]
    assert t.summary["skipped_steps"] == 3 and t.state["skipped_steps"] == 3
    assert len(h) == 6 and all(torch.isfinite(w).all() for w in weights(t.model))


# ---------------------------------------------------------------- precision, models, data sources
def test_fp16_loss_scaling_path_on_cpu(tmp_path):
    c = cfg(max_steps=4, precision="fp16", device="cpu", save_steps=2, output_dir=str(tmp_path))
    t = DPOTrainer(model(0), train_dataset=DATA, config=c)
    h = t.train()
    assert t.precision == "fp16" and t.scaler.is_enabled()
    assert all("loss_scale" in r for r in h) and h[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    r = DPOTrainer(model(0), train_dataset=DATA, config=c)
    r.load_checkpoint(tmp_path / "checkpoint-2")
    assert r.scaler.get_scale() == h[1]["loss_scale"]


def test_metrics_and_evaluate_keys():
    t = DPOTrainer(model(0), train_dataset=DATA, eval_dataset=pairs(16, seed=5), config=cfg(max_steps=4, eval_steps=2))
    h = t.train()
    keys = {"step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_second"}
    assert keys <= set(h[0])
    assert "eval_loss" in h[1] and "eval_loss" not in h[0]
    ev = t.evaluate()
    assert {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(ev)
    assert ev["loss"] == pytest.approx(h[-1]["eval_loss"])
    assert t.summary["eval"]["loss"] == pytest.approx(ev["loss"])


def test_jsonl_source_and_first_loss_ln2(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in DATA[:16]))
    t = DPOTrainer(model(0), train_dataset=str(f), config=cfg(max_steps=2))
    assert t.train()[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="train_dataset"), pytest.warns(UserWarning, match="dropped 1 of 1"):
        DPOTrainer(model(0), train_dataset=[dict(prompt="p" * 100, chosen="a", rejected="b")],
                   config=cfg(max_length=16))


def test_explicit_reference_and_rpo_alpha():
    ref = model(1)
    h0 = DPOTrainer(model(0), ref_model=ref, train_dataset=DATA, config=cfg(max_steps=1)).train()
    h1 = DPOTrainer(model(0), ref_model=ref, train_dataset=DATA, config=cfg(max_steps=1, rpo_alpha=2.0)).train()
    assert h0[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)          # the reference is not the policy
    assert h1[0]["loss"] == pytest.approx(h0[0]["loss"] + 2.0 * h0[0]["nll_loss"], rel=1e-6)
    m = model(0)
    with pytest.raises(ValueError, match="ref_model"):
        DPOTrainer(m, ref_model=m, train_dataset=DATA, config=BASE)


def test_transformers_gpt2_from_config(tmp_path):
    transformers = need("transformers")
    tok = ByteTokenizer()
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(config)
    t = DPOTrainer(gpt, tokenizer=tok, train_dataset=DATA, config=cfg(max_steps=3, rpo_alpha=0.1))
    h = t.train()
    assert h[0]["loss"] > 0 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in h)
    no_rpo = DPOTrainer(transformers.GPT2LMHeadModel(config), tokenizer=tok, train_dataset=DATA, config=cfg(max_steps=1))
    assert no_rpo.train()[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    p = t.save(tmp_path / "gpt")
    assert (p / "config.json").exists()
    back = transformers.GPT2LMHeadModel.from_pretrained(p)
    assert same(weights(back), weights(gpt))


def test_fused_lm_head_matches_the_plain_forward(tmp_path, monkeypatch):
    "fused_lm_head=True: same losses and weights as False (live, given and precomputed references); cache shared."
    transformers = need("transformers")
    import dpo_lit.logprobs as logprobs
    tok = ByteTokenizer()
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    calls = []
    fused_fn = logprobs.fused_sequence_logps
    monkeypatch.setattr(logprobs, "fused_sequence_logps", lambda *a, **k: (calls.append(1), fused_fn(*a, **k))[1])

    def gpt(seed=0):
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config)

    def run(fused, ref=None, **kw):
        t = DPOTrainer(gpt(), ref_model=ref, tokenizer=tok, train_dataset=DATA,
                       config=cfg(max_steps=3, fused_lm_head=fused, **kw))
        return t.train(), weights(t.model)

    for kw, ref in ((dict(), None), (dict(grad_accum_steps=2, batch_size=4, rpo_alpha=0.5), None),
                    (dict(), gpt(1)), (dict(precompute_ref=True), None)):
        calls.clear()
        (h0, w0), n_plain = run(False, ref, **kw), len(calls)
        (h1, w1) = run(True, ref, **kw)
        assert n_plain == 0 and len(calls) > 0
        assert losses(h1) == pytest.approx(losses(h0), abs=1e-5)
        for k in ("logps/chosen", "rewards/margins"):
            assert [r[k] for r in h1] == pytest.approx([r[k] for r in h0], rel=1e-5, abs=1e-5)
        # AdamW's steps of lr=1e-2 turn float rounding in near-zero gradients into ~1e-5 weight differences
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(w0, w1))

    # the cache key leaves fused_lm_head out: a cache written without it serves a run with it
    cache = str(tmp_path / "cache")
    h0, _ = run(False, precompute_ref=True, ref_cache_dir=cache)
    calls.clear()
    h1, _ = run(True, precompute_ref=True, ref_cache_dir=cache)
    assert len(calls) == 3                     # the policy's three forwards; the reference came from the cache
    assert losses(h1) == pytest.approx(losses(h0), abs=1e-5)

    with pytest.raises(ValueError, match="fused_lm_head"):   # no nn.Linear output layer to fuse
        DPOTrainer(model(0), train_dataset=DATA, config=cfg(fused_lm_head=True))
    with pytest.raises(ValueError, match="ref_model"):
        DPOTrainer(gpt(), ref_model=model(0), tokenizer=tok, train_dataset=DATA, config=cfg(fused_lm_head=True))


def test_auto_precision_on_gpus_without_native_bf16(monkeypatch):
    "A T4 emulates bf16 (torch reports it supported with emulation): auto must pick fp16 with loss scaling there."
    from dpo_lit.train import resolve_precision
    t4 = lambda including_emulation=True: including_emulation        # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4)
    assert resolve_precision("auto", "cuda")[0] == "fp16"
    a100 = lambda including_emulation=True: True                      # native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", a100)
    assert resolve_precision("auto", "cuda")[0] == "bf16"
    assert resolve_precision("auto", "cpu")[0] == "fp32"


# ---------------------------------------------------------------- output folder, damage, final/
def test_output_dir_is_checked_before_any_work(tmp_path):
    from dpo_lit.checkpoint import OutputDirError

    class Untouchable(nn.Module):
        def to(self, *a, **k): raise AssertionError("the model was touched before the check")

    f = tmp_path / "a-file"
    f.write_text("not a folder")
    with pytest.raises(OutputDirError, match=f"^output_dir {f}: "):
        DPOTrainer(Untouchable(), train_dataset=DATA, config=cfg(output_dir=str(f)))
    with pytest.raises(OutputDirError, match="a-file is a file"):
        DPOTrainer(Untouchable(), train_dataset=DATA, config=cfg(output_dir=str(f / "sub")))


@pytest.mark.parametrize("damage", ["bit-rot", "truncated"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage):
    from dpo_lit.checkpoint import CheckpointError, CheckpointWarning
    c = cfg(max_steps=6, save_steps=2, output_dir=str(tmp_path), disable_dropout=False)
    straight = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA, config=cfg(
        max_steps=6, disable_dropout=False))
    straight.train()
    DPOTrainer(model(0, dropout=0.2), train_dataset=DATA,
               config=dataclasses.replace(c, max_steps=4)).train()
    bad = tmp_path / "checkpoint-4" / ("model.pt" if damage == "bit-rot" else "trainer_state.pt")
    data = bytearray(bad.read_bytes())
    if damage == "bit-rot":        # finite floats, same size: would load without error unverified
        data[len(data) // 2: len(data) // 2 + 16] = torch.full((4,), 3.0).numpy().tobytes()
    else:
        data = data[: len(data) // 2]
    bad.write_bytes(bytes(data))
    t = DPOTrainer(model(0, dropout=0.2), train_dataset=DATA, config=c)
    with pytest.warns(CheckpointWarning, match="checkpoint-4.*checkpoint-2"):
        t.train(resume_from="latest")
    assert same(weights(straight.model), weights(t.model))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # an explicitly named damaged checkpoint is one clear error, never a silent load
    bad.write_bytes(b"\0" * 16)
    other = tmp_path / "checkpoint-6" / "model.pt"
    other.write_bytes(other.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="checkpoint-6"):
        t = DPOTrainer(model(0), train_dataset=DATA, config=c)
        t.load_checkpoint(tmp_path / "checkpoint-6")


def test_resumed_metrics_hold_each_step_once(tmp_path):
    c = cfg(max_steps=5, save_steps=2, output_dir=str(tmp_path))
    t = DPOTrainer(model(0), train_dataset=DATA, config=c)
    nan_forward_at(t.model, {5})                       # dies at step 5, after rows 1-4 were logged
    with pytest.raises(NonFiniteError) as e:
        t.train()
    assert e.value.step == 5
    DPOTrainer(model(0), train_dataset=DATA, config=c).train(resume_from="latest")   # from step 4
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def tiny_hf_tokenizer():
    "A character-level transformers tokenizer with a chat template (no download)."
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set("".join(p["prompt"] + p["chosen"] + p["rejected"] for p in DATA)))
    vocab = {"<pad>": 0, "<eos>": 1, **{ch: i + 2 for i, ch in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    return tok


def test_train_ends_with_a_final_folder_transformers_can_load(tmp_path):
    transformers = need("transformers")
    tok = tiny_hf_tokenizer()
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    t = DPOTrainer(gpt, tokenizer=tok, train_dataset=DATA,
                   config=cfg(max_steps=2, output_dir=str(tmp_path)))
    t.train()
    final = tmp_path / "final"
    back = transformers.AutoModelForCausalLM.from_pretrained(final)
    back_tok = transformers.AutoTokenizer.from_pretrained(final)
    assert same(weights(back), weights(t.unwrapped_model))
    assert back_tok("x:ae")["input_ids"] == tok("x:ae")["input_ids"]
    assert back_tok.chat_template == tok.chat_template
    assert (final / "generation_config.json").exists()
    assert json.loads((final / "dpo_config.json").read_text())["max_steps"] == 2


def test_peft_policy_final_folder_is_an_adapter(tmp_path):
    transformers, peft = need("transformers"), need("peft")
    from dpo_lit.scale import add_lora
    config = transformers.GPT2Config(vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=257, eos_token_id=257, pad_token_id=256)
    torch.manual_seed(0)
    policy = add_lora(transformers.GPT2LMHeadModel(config), r=4, alpha=8, target_modules=["c_attn"])
    t = DPOTrainer(policy, train_dataset=DATA, config=cfg(max_steps=2, output_dir=str(tmp_path)))
    t.train()
    assert (tmp_path / "final" / "adapter_config.json").exists()
    torch.manual_seed(0)
    back = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel(config), tmp_path / "final")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, policy(ids).logits)
        merged = back.merge_and_unload()          # the documented merge: a plain GPT-2
        torch.testing.assert_close(merged(ids).logits, policy(ids).logits, rtol=1e-5, atol=1e-5)


def test_trackers_get_the_rows_of_metrics_jsonl(tmp_path, monkeypatch):
    import dpo_lit.tracking as tracking
    logged, closed = [], []

    class Recorder:
        def log(self, metrics, step): logged.append((step, dict(metrics)))
        def close(self): closed.append(1)

    made = []
    def fake(report_to, **kw):
        made.append((report_to, kw))
        return Recorder()
    monkeypatch.setattr(tracking, "make_trackers", fake)
    c = cfg(max_steps=3, output_dir=str(tmp_path), report_to=["tensorboard"])
    DPOTrainer(model(0), train_dataset=DATA, config=c).train()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in logged] == [r["step"] for r in rows] == [1, 2, 3]
    assert all(m["loss"] == r["loss"] for (_, m), r in zip(logged, rows))
    assert closed == [1] and made[0][0] == ["tensorboard"]
    assert made[0][1]["output_dir"] == str(tmp_path)


def test_config_fields_have_help_and_choices_and_loss_params():
    fields = dataclasses.fields(DPOConfig)
    assert all(isinstance(f.metadata.get("help"), str) and f.metadata["help"] for f in fields)
    assert all("\n" not in f.metadata["help"] and len(f.metadata["help"]) <= 80 for f in fields)
    choices = {f.name: f.metadata["choices"] for f in fields if "choices" in f.metadata}
    import dpo_lit.losses as losses
    assert choices["loss_type"]() == tuple(losses.LOSS_TYPES)        # the live registry
    assert set(choices) >= {"loss_type", "lr_scheduler", "precision", "on_nonfinite", "distributed"}
    for name, ch in choices.items():                                 # every choice is accepted
        for v in (ch() if callable(ch) else ch):
            if name != "loss_type": DPOConfig(**{name: v})
    DPOConfig(loss_type="bco_pair", loss_params={"bco_delta": 0.5})
    with pytest.raises(ValueError, match="loss_params"):
        DPOConfig(loss_params=[1.0])
    with pytest.raises(ValueError, match="report_to"):
        DPOConfig(report_to=5)


def test_loss_params_reach_the_loss():
    def first_loss(params):
        c = cfg(max_steps=1, loss_type="bco_pair", loss_params=params)
        return DPOTrainer(model(0), model(1), train_dataset=DATA, config=c).train()[0]["loss"]
    runs = [first_loss(p) for p in (None, {"bco_delta": 0.0}, {"bco_delta": 2.0})]
    assert runs[0] == pytest.approx(runs[1], abs=1e-7) and abs(runs[2] - runs[0]) > 1e-3


def test_tinylm_final_folder_and_umask(tmp_path):
    "toy.TinyLM's own loader reads final/; checkpoint and final folders follow the user's umask."
    import os
    from dpo_lit.toy import TinyLM, TinyLMConfig
    torch.manual_seed(0)
    policy = TinyLM(TinyLMConfig(vocab_size=258, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                 max_len=64))
    old = os.umask(0o027)
    try:
        t = DPOTrainer(policy, train_dataset=DATA,
                       config=cfg(max_steps=2, output_dir=str(tmp_path / "run")))
        t.train()
    finally:
        os.umask(old)
    back = TinyLM.from_pretrained(tmp_path / "run" / "final")
    assert same(weights(back), weights(policy))
    for d in ("run/final", "run/checkpoint-2"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o750, d


def test_add_eos_reaches_the_collator():
    "DPOConfig.add_eos picks the collator's end-of-sequence rule; a bad value names the field."
    from dpo_lit.data import ByteTokenizer
    from dpo_lit.train import DPOConfig, DPOTrainer
    tok = ByteTokenizer()
    pairs = [{"prompt": "a", "chosen": " b", "rejected": " c"}]
    ends = {}
    for rule in ("auto", "always", "never"):
        t = DPOTrainer(torch.nn.Linear(1, 1), tokenizer=tok, eval_dataset=pairs,
                       config=DPOConfig(add_eos=rule, verbose=False, progress_bar=False))
        ex = t.collator.tokenize(pairs[0])
        ends[rule] = ex["chosen_ids"][-1] == tok.eos_token_id
    assert ends == {"auto": True, "always": True, "never": False}     # plain text: EOS unless never
    with pytest.raises(ValueError, match="add_eos"):
        DPOConfig(add_eos="sometimes")

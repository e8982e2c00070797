"""Property tests for `dpo_lit.losses.preference_loss` that do not belong in the lesson.

Every loss type against an independent float64 NumPy formula on random batches, dtype handling, numerics at
large magnitudes, validation messages, gradients of all four inputs, and TRL's DPOTrainer as a peer.
"""
import collections
import math
import types

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

import dpo_lit.losses as losses_module
from dpo_lit.losses import (F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, LOSS_TYPES, SMOOTHED_LOSS_TYPES,
                            check_loss_options, loss_spec, loss_table, preference_loss, register_loss,
                            unregister_loss)

# label smoothing each type is tested with (EXO needs ε > 0; the others use it where they can)
EPS = {"exo_pair": 1e-3, "robust": 0.1, "sigmoid": 0.1, "sigmoid_norm": 0.05, "aot": 0.1, "aot_unpaired": 0.2}


# ---------------------------------------------------------------- independent float64 formulas (NumPy)
def _logsig(x): return -np.logaddexp(0.0, -x)
def _sig(x): return np.exp(_logsig(x))


def _score(rho, fdiv, alpha):
    "f'(u) at u = exp(ρ) (Wang et al., 2023, Table 1), shifted to vanish at u = 1."
    u = np.exp(rho)
    return {"reverse_kl": np.log(u), "forward_kl": 1.0 - 1.0 / u, "js_divergence": np.log(2 * u / (1 + u)),
            "alpha_divergence": (1 - u ** (-alpha)) / alpha}[fdiv]


def np_loss(t, pc, pr, rc, rr, beta, eps=0.0, nc=None, nr=None, fdiv="reverse_kl", alpha=0.5, tau=0.05, delta=0.0):
    "Per-example loss of type `t`, written from the papers' formulas in float64 NumPy."
    rho_w, rho_l = pc - rc, pr - rr
    s_w, s_l = _score(rho_w, fdiv, alpha), _score(rho_l, fdiv, alpha)
    z = beta * (s_w - s_l)
    rw, rl = beta * rho_w, beta * rho_l
    cdpo = lambda m: -(1 - eps) * _logsig(m) - eps * _logsig(-m)
    if t == "sigmoid": return cdpo(z)
    if t == "hinge": return np.maximum(0.0, 1.0 - z)
    if t == "ipo":
        h = s_w - s_l if nc is None else s_w / np.maximum(nc, 1) - s_l / np.maximum(nr, 1)
        return (h - 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        q = np.stack([_sig(z), _sig(-z)])
        p = np.array([1 - eps, eps])[:, None]
        return (q * (np.log(q) - np.log(p))).sum(0)
    if t == "nca_pair": return -_logsig(rw) - 0.5 * _logsig(-rw) - 0.5 * _logsig(-rl)
    if t == "robust": return ((1 - eps) * -_logsig(z) - eps * -_logsig(-z)) / (1 - 2 * eps)
    if t == "bco_pair": return -_logsig(rw - delta) - _logsig(-(rl - delta))
    if t == "sppo_hard": return (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    if t == "aot": return cdpo(beta * (np.sort(pc - pr) - np.sort(rc - rr)))
    if t == "aot_unpaired": return cdpo(beta * (np.sort(rho_w) - np.sort(rho_l)))
    if t == "apo_zero": return 1 - _sig(rw) + _sig(rl)
    if t == "apo_down": return _sig(rw) + 1 - _sig(rw - rl)
    if t == "discopop":
        w = _sig(z / tau)
        return (1 - w) * -_logsig(z) + w * np.exp(-z)
    if t == "sigmoid_norm": return cdpo(beta * (s_w / np.maximum(nc, 1) - s_l / np.maximum(nr, 1)))
    raise KeyError(t)


def random_batch(seed, B=7, dtype=torch.float64, spread=3.0):
    "Policy/reference log-probs of B pairs (log-ratios of scale `spread`) and completion lengths."
    g = torch.Generator().manual_seed(seed)
    rc, rr = -60 + 20 * torch.randn(B, generator=g), -60 + 20 * torch.randn(B, generator=g)
    pc, pr = rc + spread * torch.randn(B, generator=g), rr + spread * torch.randn(B, generator=g)
    nc, nr = torch.randint(1, 50, (B,), generator=g), torch.randint(1, 50, (B,), generator=g)
    return [x.to(dtype) for x in (pc, pr, rc, rr)], (nc, nr)


# ---------------------------------------------------------------- values against the formulas
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_matches_float64_formula(loss_type, beta):
    for seed in range(4):
        logps, (nc, nr) = random_batch(seed)
        kw = dict(label_smoothing=EPS.get(loss_type, 0.0), discopop_tau=0.05)
        with_lengths = loss_type == "sigmoid_norm" or (loss_type == "ipo" and seed % 2 == 0)
        lens = dict(chosen_lengths=nc, rejected_lengths=nr) if with_lengths else {}
        got = preference_loss(*logps, beta=beta, loss_type=loss_type, **kw, **lens)[0]
        want = np_loss(loss_type, *[x.numpy() for x in logps], beta, eps=kw["label_smoothing"], tau=0.05,
                       nc=nc.numpy() if with_lengths else None, nr=nr.numpy() if with_lengths else None)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12, err_msg=f"{loss_type} seed {seed}")


@pytest.mark.parametrize("fdiv", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSS_TYPES)
def test_f_divergences_match_formula(loss_type, fdiv):
    for alpha in (0.3, 0.5, 0.9):
        logps, (nc, nr) = random_batch(11, spread=1.5)
        eps = EPS.get(loss_type, 0.0)
        got = preference_loss(*logps, beta=0.2, loss_type=loss_type, label_smoothing=eps, f_divergence=fdiv,
                              alpha=alpha, chosen_lengths=nc, rejected_lengths=nr)[0]
        want = np_loss(loss_type, *[x.numpy() for x in logps], 0.2, eps=eps, nc=nc.numpy(), nr=nr.numpy(),
                       fdiv=fdiv, alpha=alpha)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_alpha_divergence_limits():
    logps, _ = random_batch(3, spread=1.0)
    rev = preference_loss(*logps)[0]
    fwd = preference_loss(*logps, f_divergence="forward_kl")[0]
    torch.testing.assert_close(preference_loss(*logps, f_divergence="alpha_divergence", alpha=1e-8)[0], rev)
    torch.testing.assert_close(preference_loss(*logps, f_divergence="alpha_divergence", alpha=1.0)[0], fwd)


def test_bco_delta_shift_and_detached():
    logps, _ = random_batch(5)
    delta = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    got = preference_loss(*logps, loss_type="bco_pair", bco_delta=delta)[0]
    want = np_loss("bco_pair", *[x.numpy() for x in logps], 0.1, delta=0.37)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12)
    assert not got.requires_grad  # the running mean is state, not a parameter


def test_sigmoid_matches_numpy_reference():
    from dpo_lit import objective as reference  # part of the package: a failed import must fail the test, not skip it
    for seed in range(5):
        logps, _ = random_batch(seed, B=33, spread=20.0)
        for beta in (0.01, 0.1, 2.0):
            ours = preference_loss(*logps, beta=beta)[0].mean().item()
            assert math.isclose(ours, reference.dpo_loss(*[x.numpy() for x in logps], beta=beta), rel_tol=1e-10)


# ---------------------------------------------------------------- conventions
def test_rewards_are_detached_log_ratios():
    logps, _ = random_batch(0)
    logps = [x.clone().requires_grad_() for x in logps]
    for fdiv in ("reverse_kl", "js_divergence"):
        losses, cw, cl = preference_loss(*logps, beta=0.3, f_divergence=fdiv)
        assert losses.requires_grad and not cw.requires_grad and not cl.requires_grad
        torch.testing.assert_close(cw, 0.3 * (logps[0] - logps[2]).detach())
        torch.testing.assert_close(cl, 0.3 * (logps[1] - logps[3]).detach())


def test_reference_free_is_zero_reference():
    logps, (nc, nr) = random_batch(1)
    for t in LOSS_TYPES:
        kw = dict(loss_type=t, label_smoothing=EPS.get(t, 0.0), chosen_lengths=nc, rejected_lengths=nr)
        a = preference_loss(logps[0], logps[1], None, None, **kw)
        b = preference_loss(logps[0], logps[1], torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64), **kw)
        for x, y in zip(a, b): torch.testing.assert_close(x, y)


def test_ipo_lengths_average_per_token():
    logps, (nc, nr) = random_batch(2)
    pc, pr, rc, rr = logps
    summed = preference_loss(*logps, loss_type="ipo", beta=0.1)[0]
    torch.testing.assert_close(summed, ((pc - rc) - (pr - rr) - 5.0) ** 2)
    averaged = preference_loss(*logps, loss_type="ipo", beta=0.1, chosen_lengths=nc, rejected_lengths=nr)[0]
    torch.testing.assert_close(averaged, ((pc - rc) / nc - (pr - rr) / nr - 5.0) ** 2)


def test_zero_lengths_count_as_one():
    logps, (nc, nr) = random_batch(4)
    zero = torch.zeros_like(nc)
    a = preference_loss(*logps, loss_type="sigmoid_norm", chosen_lengths=zero, rejected_lengths=zero)[0]
    b = preference_loss(*logps, loss_type="sigmoid_norm", chosen_lengths=zero + 1, rejected_lengths=zero + 1)[0]
    torch.testing.assert_close(a, b)


def test_sigmoid_norm_is_invariant_to_repeating_a_completion():
    logps, (nc, nr) = random_batch(6)
    pc, pr, rc, rr = logps
    a = preference_loss(*logps, loss_type="sigmoid_norm", chosen_lengths=nc, rejected_lengths=nr)[0]
    b = preference_loss(2 * pc, pr, 2 * rc, rr, loss_type="sigmoid_norm", chosen_lengths=2 * nc, rejected_lengths=nr)[0]
    torch.testing.assert_close(a, b)


def test_weighted_list_of_loss_types():
    logps, (nc, nr) = random_batch(8)
    types_, weights = ["sigmoid", "ipo", "aot", "nca_pair"], [0.5, 0.01, 2.0, 1.5]
    kw = dict(chosen_lengths=nc, rejected_lengths=nr)
    got = preference_loss(*logps, loss_type=types_, loss_weights=weights, **kw)[0]
    want = sum(w * preference_loss(*logps, loss_type=t, **kw)[0] for t, w in zip(types_, weights))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(preference_loss(*logps, loss_type=types_, **kw)[0],
                               sum(preference_loss(*logps, loss_type=t, **kw)[0] for t in types_))
    torch.testing.assert_close(preference_loss(*logps, loss_type="hinge", loss_weights=[3.0])[0],
                               3 * preference_loss(*logps, loss_type="hinge")[0])


def test_aot_mean_is_permutation_invariant_and_entries_are_quantiles():
    logps, _ = random_batch(9, B=16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    for t in ("aot", "aot_unpaired"):
        a = preference_loss(*logps, loss_type=t)[0]
        b = preference_loss(*[x[perm] for x in logps], loss_type=t)[0]
        torch.testing.assert_close(a, b)  # entry k belongs to the k-th quantile pair, not to example k


def test_values_at_initialisation():
    logps, (nc, nr) = random_batch(10)
    pc, pr = logps[:2]
    beta, eps_exo = 0.25, 0.01
    closed = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": (1 / (2 * beta)) ** 2,
              "exo_pair": -math.log(2) - 0.5 * math.log(eps_exo * (1 - eps_exo)), "nca_pair": 2 * math.log(2),
              "robust": math.log(2), "bco_pair": 2 * math.log(2), "sppo_hard": 2 * (1 / (2 * beta)) ** 2,
              "aot": math.log(2), "aot_unpaired": math.log(2), "apo_zero": 1.0, "apo_down": 1.0,
              "discopop": (1 + math.log(2)) / 2, "sigmoid_norm": math.log(2)}
    assert set(closed) == set(LOSS_TYPES)
    for t, v in closed.items():
        eps = eps_exo if t == "exo_pair" else EPS.get(t, 0.0)
        got = preference_loss(pc, pr, pc, pr, beta=beta, loss_type=t, label_smoothing=eps,
                              chosen_lengths=nc, rejected_lengths=nr)[0]
        torch.testing.assert_close(got, torch.full_like(got, v), msg=t)


# ---------------------------------------------------------------- dtypes and numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    logps, (nc, nr) = random_batch(12, dtype=torch.float32)
    half = [x.to(dtype) for x in logps]
    for t in LOSS_TYPES:
        kw = dict(loss_type=t, label_smoothing=EPS.get(t, 0.0), chosen_lengths=nc, rejected_lengths=nr)
        out = preference_loss(*half, **kw)
        want = preference_loss(*[x.float() for x in half], **kw)
        for o, w in zip(out, want):
            assert o.dtype == torch.float32, t
            assert torch.equal(o, w), t  # exact: the same float32 computation after the upcast, by construction


def test_dtype_promotion_and_non_tensor_inputs():
    logps, _ = random_batch(13, dtype=torch.float32)
    mixed = preference_loss(logps[0].bfloat16(), logps[1], logps[2].half(), logps[3])[0]
    assert mixed.dtype == torch.float32
    assert preference_loss(logps[0].double(), *logps[1:])[0].dtype == torch.float64
    as_lists = preference_loss(*[x.tolist() for x in logps])[0]
    assert as_lists.dtype == torch.float32
    torch.testing.assert_close(as_lists, preference_loss(*logps)[0])
    ints = preference_loss(*[x.round().long() for x in logps])[0]
    assert ints.dtype == torch.float32


@pytest.mark.parametrize("fdiv", ["reverse_kl", "js_divergence"])
def test_finite_at_magnitude_1e4_float32(fdiv):
    g = torch.Generator().manual_seed(0)
    B = 256
    pc, pr, rc, rr = [-1e4 * torch.rand(B, generator=g) for _ in range(4)]  # log-ratios up to ±1e4
    nc, nr = torch.randint(1, 3, (B,), generator=g), torch.randint(1, 3, (B,), generator=g)
    for t in LOSS_TYPES:
        if fdiv != "reverse_kl" and t not in F_DIVERGENCE_LOSS_TYPES: continue
        for beta in (0.01, 0.1, 1.0):
            pol = [pc.clone().requires_grad_(), pr.clone().requires_grad_()]
            loss = preference_loss(*pol, rc, rr, beta=beta, loss_type=t, f_divergence=fdiv,
                                   label_smoothing=EPS.get(t, 0.0), chosen_lengths=nc, rejected_lengths=nr)[0]
            assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), (t, beta)
            grads = torch.autograd.grad(loss.sum(), pol)
            assert all(torch.isfinite(x).all() for x in grads), (t, beta)


def test_large_log_probs_small_ratios_agree_with_float64():
    "Summed log-probs near -1e4 with moderate log-ratios: float32 loses only the rounding of its inputs."
    g = torch.Generator().manual_seed(1)
    rc, rr = -1e4 + 10 * torch.randn(64, generator=g), -1e4 + 10 * torch.randn(64, generator=g)
    pc, pr = rc + 2 * torch.randn(64, generator=g), rr + 2 * torch.randn(64, generator=g)
    for t in LOSS_TYPES:
        kw = dict(loss_type=t, label_smoothing=EPS.get(t, 0.0), chosen_lengths=torch.full((64,), 30),
                  rejected_lengths=torch.full((64,), 30))
        got = preference_loss(pc, pr, rc, rr, **kw)[0]
        want = preference_loss(pc.double(), pr.double(), rc.double(), rr.double(), **kw)[0]
        # ρ = π - π_ref in float32 has absolute error ~1e-3 at 1e4; the losses are smooth in ρ
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=2e-2 if t in ("ipo", "sppo_hard") else 1e-3, msg=t)


def test_discopop_large_negative_margin_is_finite():
    z = torch.tensor([-3e4, -50.0, 0.0, 50.0, 3e4])
    pc = (z / 0.2).requires_grad_()
    loss = preference_loss(pc, torch.zeros(5), None, None, beta=0.1, loss_type="discopop")[0]
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all()
    torch.testing.assert_close(loss[0], torch.tensor(1.5e4))  # margin -1.5e4: logistic branch, -log σ(z) = -z


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck_all_four_inputs(loss_type):
    logps, (nc, nr) = random_batch(14, B=5, spread=1.0)
    inputs = [x.clone().requires_grad_() for x in logps]
    kw = dict(loss_type=loss_type, label_smoothing=EPS.get(loss_type, 0.0), chosen_lengths=nc, rejected_lengths=nr)
    assert gradcheck(lambda *x: preference_loss(*x, **kw)[0], inputs, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- validation
def _batch():
    return random_batch(15, B=4, dtype=torch.float32)[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="dpo"), "unknown loss_type 'dpo'"),
    (dict(loss_type=["sigmoid", "kto"]), "unknown loss_type 'kto'"),
    (dict(loss_type=[]), "empty list"),
    (dict(beta=0.0), "beta must be"),
    (dict(beta=-0.1), "beta must be"),
    (dict(beta=float("nan")), "beta must be"),
    (dict(label_smoothing=-0.1), r"label_smoothing must lie in \[0, 0.5\]"),
    (dict(label_smoothing=0.6), r"label_smoothing must lie in \[0, 0.5\]"),
    (dict(loss_type="robust", label_smoothing=0.5), "'robust' needs label_smoothing"),
    (dict(loss_type="exo_pair"), "'exo_pair' needs label_smoothing > 0"),
    (dict(loss_type="hinge", label_smoothing=0.1), "has no effect on loss_type"),
    (dict(loss_type="sigmoid_norm"), "'sigmoid_norm' needs chosen_lengths and rejected_lengths"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "loss_weights has 1 entries but loss_type has 2"),
    (dict(loss_weights=[1.0, 2.0]), "loss_weights has 2 entries"),
    (dict(f_divergence="hellinger"), "f_divergence must be one of"),
    (dict(loss_type="apo_zero", f_divergence="forward_kl"), r"not to \['apo_zero'\]"),
    (dict(loss_type=["sigmoid", "aot"], f_divergence="js_divergence"), r"not to \['aot'\]"),
    (dict(f_divergence="alpha_divergence", alpha=0.0), "alpha must lie in"),
    (dict(f_divergence="alpha_divergence", alpha=1.5), "alpha must lie in"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
    (dict(chosen_lengths=torch.ones(4)), "both chosen_lengths and rejected_lengths"),
    (dict(chosen_lengths=torch.ones(3), rejected_lengths=torch.ones(4)), r"chosen_lengths has shape \(3,\)"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(*_batch(), **kwargs)


def test_bad_shapes_raise_value_error_naming_the_tensor():
    pc, pr, rc, rr = _batch()
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(3,\)"):
        preference_loss(pc, pr, rc, rr[:3])
    with pytest.raises(ValueError, match=r"policy_chosen_logps must have shape \[B\]"):
        preference_loss(pc[:, None], pr, rc, rr)
    with pytest.raises(ValueError, match=r"policy_rejected_logps must have shape \[B\]"):
        preference_loss(pc, torch.tensor(1.0), rc, rr)
    with pytest.raises(ValueError, match="both None"):
        preference_loss(pc, pr, None, rr)


# ---------------------------------------------------------------- TRL's DPOTrainer as a peer
def _trl_mean_loss(loss_types, weights, logps, lengths, *, beta, eps, fdiv="reverse_kl", alpha=0.5, tau=0.05):
    """Mean loss and policy gradients from TRL's `DPOTrainer._compute_loss`, run without a model.

    TRL computes its losses inside the trainer from a model's token log-probabilities; a stand-in model returns
    per-token log-probs that sum to the given sequence log-probs, and a stand-in trainer carries the attributes
    `_compute_loss` reads. TRL's α-divergence coefficient c corresponds to α = 1 - c here."""
    trl = pytest.importorskip("trl")
    pc, pr, rc, rr = logps
    nc, nr = lengths
    B, T = len(pc), int(max(nc.max(), nr.max())) + 2
    lens = torch.cat([nc, nr])
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()): completion_mask[i, T - n:] = 1
    policy = torch.cat([pc, pr]).clone().requires_grad_()
    per_token = completion_mask[:, 1:].float() * (policy / lens)[:, None]

    class StandIn(torch.nn.Module):
        def forward(self, **kwargs):
            zeros = torch.zeros(2 * B, T - 1)
            return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model = StandIn().train()
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=fdiv, f_alpha_divergence_coef=1 - alpha, loss_types=list(loss_types),
        loss_weights=list(weights), beta=beta, label_smoothing=eps, args=types.SimpleNamespace(discopop_tau=tau),
        use_weighting=False, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.zeros(2 * B, T, dtype=torch.long), attention_mask=torch.ones(2 * B, T, dtype=torch.long),
                  completion_mask=completion_mask, ref_chosen_logps=rc, ref_rejected_logps=rr)
    try:
        loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    except (AttributeError, TypeError, KeyError) as e:
        pytest.skip(f"TRL {trl.__version__}'s DPOTrainer._compute_loss cannot run without a model here: {e!r}")
    loss.backward()
    return loss.detach(), policy.grad[:B], policy.grad[B:]


TRL_CASES = [(t, {}) for t in LOSS_TYPES] + [
    ("sigmoid", dict(fdiv="forward_kl")), ("sigmoid", dict(fdiv="js_divergence")),
    ("sigmoid", dict(fdiv="alpha_divergence", alpha=0.3)), ("hinge", dict(fdiv="js_divergence")),
    ("ipo", dict(fdiv="alpha_divergence", alpha=0.7)), ("sigmoid_norm", dict(fdiv="forward_kl")),
    ("robust", dict(fdiv="js_divergence")), ("discopop", dict(tau=0.2)),
    (["sigmoid", "bco_pair", "apo_zero"], dict(weights=[0.8, 0.2, 0.5])),
]


@pytest.mark.parametrize("loss_type, options", TRL_CASES, ids=lambda c: str(c))
def test_agrees_with_trl(loss_type, options):
    """Mean loss and gradients equal TRL's. TRL's `sigmoid` has no cDPO smoothing and its `ipo` always averages
    per token, so those are compared with ε = 0 and with lengths; `sigmoid` with ε > 0 is checked against the
    formula above instead."""
    types_ = [loss_type] if isinstance(loss_type, str) else loss_type
    weights = options.get("weights", [1.0] * len(types_))
    eps = 0.0 if {"sigmoid", "sigmoid_norm"} & set(types_) else max(EPS.get(t, 0.0) for t in types_)
    fdiv, alpha, tau = options.get("fdiv", "reverse_kl"), options.get("alpha", 0.5), options.get("tau", 0.05)
    logps, lengths = random_batch(21, B=6, dtype=torch.float32, spread=2.0)
    beta = 0.2
    want, want_gc, want_gr = _trl_mean_loss(types_, weights, logps, lengths, beta=beta, eps=eps, fdiv=fdiv,
                                            alpha=alpha, tau=tau)
    pol = [logps[0].clone().requires_grad_(), logps[1].clone().requires_grad_()]
    got = preference_loss(*pol, *logps[2:], beta=beta, loss_type=types_, loss_weights=weights, label_smoothing=eps,
                          f_divergence=fdiv, alpha=alpha, discopop_tau=tau,
                          chosen_lengths=lengths[0], rejected_lengths=lengths[1])[0].mean()
    got.backward()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pol[0].grad, want_gc, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pol[1].grad, want_gr, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the registry
BUILT_IN = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm", "nca_pair", "bco_pair",
            "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired")


@pytest.fixture
def cubic():
    "A throwaway loss type, registered for one test and removed afterwards whatever happens."
    @register_loss("cubic_test", inputs=lambda b: (b.z, b.cubic_c), f_divergence=True, needs_lengths=True,
                   params={"cubic_c": 2.0}, requires={"cubic_c": (lambda c: c > 0, "cubic_c > 0")},
                   paper="nobody (2026)", cite="none", formula="$c(1-z)^2$", use="tests")
    def cubic_loss(z, c): return c * torch.relu(1 - z) ** 3
    yield cubic_loss
    if "cubic_test" in LOSS_TYPES: unregister_loss("cubic_test")


def test_builtin_registry_and_derived_tuples():
    assert tuple(LOSS_TYPES) == BUILT_IN
    assert set(F_DIVERGENCE_LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"}
    assert set(SMOOTHED_LOSS_TYPES) == {"sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired"}
    assert {t for t in LOSS_TYPES if loss_spec(t).needs_lengths} == {"sigmoid_norm"}
    assert all(loss_spec(t).needs_reference for t in LOSS_TYPES)
    assert {t: loss_spec(t).params for t in LOSS_TYPES if loss_spec(t).params} == {
        "discopop": {"discopop_tau": 0.05}, "bco_pair": {"bco_delta": 0.0}}
    for t in LOSS_TYPES:
        s = loss_spec(t)
        assert s.name == t and s.paper and s.cite and s.formula and s.use, t


def test_loss_types_is_a_live_tuple_like_view(cubic):
    imported_before = LOSS_TYPES  # a name bound before the registration, as other modules hold it
    assert "cubic_test" in imported_before and "cubic_test" in F_DIVERGENCE_LOSS_TYPES
    assert "cubic_test" not in SMOOTHED_LOSS_TYPES
    assert len(LOSS_TYPES) == len(BUILT_IN) + 1 and LOSS_TYPES[-1] == "cubic_test"
    assert list(LOSS_TYPES) == [*BUILT_IN, "cubic_test"] and LOSS_TYPES == (*BUILT_IN, "cubic_test")
    assert repr(LOSS_TYPES) == repr((*BUILT_IN, "cubic_test")) and str(LOSS_TYPES) == str(tuple(LOSS_TYPES))
    assert LOSS_TYPES + ("unweighted",) == (*BUILT_IN, "cubic_test", "unweighted")
    assert ("x",) + LOSS_TYPES == ("x", *BUILT_IN, "cubic_test")
    assert losses_module.LOSS_TYPES is LOSS_TYPES
    unregister_loss("cubic_test")
    assert "cubic_test" not in imported_before and tuple(imported_before) == BUILT_IN
    assert "cubic_test" not in F_DIVERGENCE_LOSS_TYPES


def test_registered_loss_is_dispatched_validated_and_tabled(cubic):
    logps, (nc, nr) = random_batch(30, spread=2.0)
    z = 0.1 * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    lens = dict(chosen_lengths=nc, rejected_lengths=nr)
    torch.testing.assert_close(preference_loss(*logps, loss_type="cubic_test", **lens)[0], 2.0 * torch.relu(1 - z) ** 3)
    got = preference_loss(*logps, loss_type=["sigmoid", "cubic_test"], loss_weights=[1.0, 0.5], **lens,
                          loss_params={"cubic_c": 3.0})[0]
    torch.testing.assert_close(got, preference_loss(*logps)[0] + 1.5 * torch.relu(1 - z) ** 3)
    with pytest.raises(ValueError, match="loss_type 'cubic_test' needs chosen_lengths and rejected_lengths"):
        preference_loss(*logps, loss_type="cubic_test")
    with pytest.raises(ValueError, match=r"loss_type 'cubic_test' needs cubic_c > 0, got cubic_c=0"):
        check_loss_options("cubic_test", loss_params={"cubic_c": 0})
    with pytest.raises(ValueError, match=r"loss_params\['cubic_c'\] has no effect .* belongs to \['cubic_test'\]"):
        check_loss_options("sigmoid", loss_params={"cubic_c": 1.0})
    assert "| `cubic_test`, `cubic_c` = 2.0 | $c(1-z)^2$ | — |" in loss_table()


def test_register_loss_rejects_bad_registrations(cubic):
    def other(z): return z
    with pytest.raises(ValueError, match="'cubic_test' is already registered"):
        register_loss("cubic_test", inputs=lambda b: (b.z,))(other)
    register_loss("cubic_test", inputs=lambda b: (b.z, b.cubic_c), params={"cubic_c": 1.0})(cubic)  # a re-run
    assert loss_spec("cubic_test").params == {"cubic_c": 1.0}
    bad = [(dict(name="has space"), "must be an identifier"),
           (dict(params={"beta": 1.0}), "'beta' cannot name a hyperparameter"),
           (dict(params={"z": 1.0}), "'z' cannot name a hyperparameter"),  # a quantity of LossInputs
           (dict(params={"k": "one"}), "the default of k must be a finite number"),
           (dict(params={"k": -1.0}, requires={"k": (lambda k: k > 0, "k > 0")}), "the default k=-1.0 fails"),
           (dict(requires={"label_smoothing": (lambda e: e > 0, "e > 0")}), "requires names 'label_smoothing'"),
           (dict(requires={"k": "k > 0"}), "requires names 'k'")]
    for options, message in bad:
        name = options.pop("name", "bad_test")
        with pytest.raises(ValueError, match=message):
            register_loss(name, inputs=lambda b: (b.z,), **options)(other)
        assert "bad_test" not in LOSS_TYPES
    with pytest.raises(TypeError, match="weigth"):
        register_loss("bad_test", inputs=lambda b: (b.z,), weigth="typo")(other)
    with pytest.raises(ValueError, match="no loss_type 'nope' is registered"):
        unregister_loss("nope")
    with pytest.raises(ValueError, match="unknown loss_type 'nope'"):
        loss_spec("nope")


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss_type="discopop", loss_params={"discopop_tau": -1.0}), "'discopop' needs discopop_tau > 0"),
    (dict(loss_type="discopop", loss_params={"tau": 0.1}), r"loss_params\['tau'\] has no effect.*hyperparameters are"),
    (dict(loss_type="sigmoid", loss_params={"bco_delta": 0.1}), r"it belongs to \['bco_pair'\]"),
    (dict(loss_type="bco_pair", loss_params={"bco_delta": float("inf")}), r"loss_params\['bco_delta'\] must be a finite"),
    (dict(loss_type="bco_pair", loss_params={"bco_delta": True}), r"loss_params\['bco_delta'\] must be a finite"),
    (dict(loss_type="bco_pair", loss_params=[("bco_delta", 0.1)]), "loss_params must be a dict"),
    (dict(loss_type=None), "loss_type must be a name or a list of names"),
    (dict(loss_type=["sigmoid"], loss_weights=["a"]), "loss_weights must be numbers"),
    (dict(loss_type=["sigmoid"], loss_weights=[float("nan")]), "loss_weights must be finite"),
    (dict(loss_type="sigmoid", label_smoothing="0.1"), "label_smoothing must lie in"),
])
def test_check_loss_options_names_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_loss_options(**kwargs)
    with pytest.raises(ValueError, match=message):  # the same validation inside the loss
        preference_loss(*_batch(), **kwargs)


def test_check_loss_options_returns_types_and_weights():
    assert check_loss_options("sigmoid") == (["sigmoid"], [1.0])
    assert check_loss_options(("ipo", "hinge"), loss_weights=(2, 0.5)) == (["ipo", "hinge"], [2.0, 0.5])
    assert check_loss_options("hinge", loss_weights=3) == (["hinge"], [3.0])


def test_loss_params_and_old_keywords_agree():
    logps, _ = random_batch(31)
    new = preference_loss(*logps, loss_type="discopop", loss_params={"discopop_tau": 0.3})[0]
    old = preference_loss(*logps, loss_type="discopop", discopop_tau=0.3)[0]
    np.testing.assert_allclose(new.numpy(), np_loss("discopop", *[x.numpy() for x in logps], 0.1, tau=0.3), rtol=1e-9)
    torch.testing.assert_close(new, old)
    got = preference_loss(*logps, loss_type="bco_pair", loss_params={"bco_delta": 0.4})[0]
    np.testing.assert_allclose(got.numpy(), np_loss("bco_pair", *[x.numpy() for x in logps], 0.1, delta=0.4), rtol=1e-9)
    # the older keywords stay ignored by losses that do not use them
    torch.testing.assert_close(preference_loss(*logps, discopop_tau=0.3, bco_delta=0.4)[0], preference_loss(*logps)[0])
    with pytest.raises(ValueError, match="discopop_tau is given twice"):
        preference_loss(*logps, loss_type="discopop", discopop_tau=0.3, loss_params={"discopop_tau": 0.3})

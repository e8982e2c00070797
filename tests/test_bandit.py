"Properties of dpo_lit.bandit beyond the chapter's lessons: input validation, random problems, joint training."
import numpy as np
import pytest
import torch

from dpo_lit.bandit import (BanditProblem, PreferencePairs, bt_mle_exists, frontier, frontier_gap, ipo_optimal_policy,
                            kl_divergence, train_tabular_policy, unweighted_loss)


@pytest.fixture(scope="module")
def problem():
    return BanditProblem.random(n_prompts=3, n_responses=4, seed=11)


@pytest.mark.parametrize("kwargs, field", [
    (dict(rewards=np.zeros(4), ref_probs=np.full(4, 0.25)), "rewards"),
    (dict(rewards=np.zeros((2, 4)), ref_probs=np.full((2, 3), 1 / 3)), "ref_probs"),
    (dict(rewards=np.zeros((2, 4)), ref_probs=np.full((2, 4), 0.3)), "ref_probs"),
    (dict(rewards=np.full((2, 4), np.nan), ref_probs=np.full((2, 4), 0.25)), "rewards"),
    (dict(rewards=np.zeros((2, 4)), ref_probs=np.full((2, 4), 0.25), prompt_probs=[0.2, 0.2]), "prompt_probs"),
])
def test_problem_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BanditProblem(**kwargs)


def test_train_validation(problem):
    pairs = problem.sample_pairs(50, seed=0)
    with pytest.raises(ValueError, match="beta"):
        train_tabular_policy(problem, [pairs, pairs], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="loss_type"):
        train_tabular_policy(problem, pairs, 1.0, loss_type="nope")
    with pytest.raises(ValueError, match="pairs"):
        train_tabular_policy(problem, PreferencePairs([0], [9], [1]), 1.0)
    with pytest.raises(ValueError, match="steps"):
        train_tabular_policy(problem, pairs, 1.0, steps=-1)
    with pytest.raises(ValueError, match="n must"):
        problem.sample_pairs(0)


def test_train_leaves_thread_count(problem):
    before = torch.get_num_threads()
    train_tabular_policy(problem, problem.population_pairs(), 1.0, steps=5)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("seed", range(3))
def test_population_dpo_recovers_optimum_on_random_problems(seed):
    prob = BanditProblem.random(n_prompts=2, n_responses=5, reward_scale=0.7, seed=seed)
    probs, hist = train_tabular_policy(prob, [prob.population_pairs(), prob.population_pairs(sampler="uniform")],
                                       [0.5, 2.0], steps=400)
    for p, b in zip(probs, [0.5, 2.0]):
        assert prob.kl_from_optimum(p, b) < 1e-6
    assert np.abs(frontier_gap(prob, probs)).max() < 1e-5


def test_joint_training_equals_separate(problem):
    a, b = problem.sample_pairs(200, seed=1), problem.sample_pairs(500, seed=2)
    joint, _ = train_tabular_policy(problem, [a, b], [0.5, 1.5], steps=50)
    for p, d, beta in zip(joint, (a, b), (0.5, 1.5)):
        alone, _ = train_tabular_policy(problem, d, beta, steps=50)
        np.testing.assert_allclose(p, alone, atol=1e-12)


def test_merged_pairs_same_result(problem):
    d = problem.sample_pairs(300, seed=3)
    shuffled = np.random.default_rng(0).permutation(len(d))
    d2 = PreferencePairs(d.x[shuffled], d.chosen[shuffled], d.rejected[shuffled], 2.0 * d.weight[shuffled])
    p1, _ = train_tabular_policy(problem, d, 1.0, steps=30)
    p2, _ = train_tabular_policy(problem, d2, 1.0, steps=30)
    np.testing.assert_allclose(p1, p2, atol=1e-12)       # order and a global weight scale do not matter


def test_frontier_gap_non_negative(problem):
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=(500,) + problem.shape)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert (frontier_gap(problem, probs) > -1e-9).all()
    fr = frontier(problem, [0.1, 1.0, 10.0])
    assert (np.diff(fr["kl"]) < 0).all() and (np.diff(fr["reward"]) < 0).all()


def test_ipo_optimum_bounded_log_ratios(problem):
    for beta in (0.05, 0.5, 5.0):
        p = ipo_optimal_policy(problem, beta, deterministic=True)
        g = np.log(p) - np.log(problem.ref_probs)
        assert (g.max(-1) - g.min(-1) <= 1 / beta + 1e-9).all()


def test_mle_exists_on_population(problem):
    assert bt_mle_exists(problem, problem.population_pairs()).all()
    assert bt_mle_exists(problem, problem.population_pairs(deterministic=True)).sum() == 0   # best response never loses


def test_unweighted_gradient_is_dpo_gradient_without_weight():
    "Autograd of the unweighted loss = autograd of the library's sigmoid DPO loss divided by sigma(-z), pair by pair."
    from dpo_lit.losses import preference_loss
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (3 * torch.randn(6, dtype=torch.float64, generator=g) for _ in range(4))
    grads = []
    for loss_fn in (lambda *a: unweighted_loss(*a, beta=0.2), lambda *a: preference_loss(*a, beta=0.2)[0]):
        c, r = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
        loss_fn(c, r, rc, rr).sum().backward()
        grads.append((c.grad, r.grad))
    weight = torch.sigmoid(-0.2 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(grads[0][0], grads[1][0] / weight)
    torch.testing.assert_close(grads[0][1], grads[1][1] / weight)
    torch.testing.assert_close(grads[0][0], torch.full_like(pc, -0.2))        # a constant gradient: no stationary point


def test_kl_divergence_matches_torch():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6), size=4), rng.dirichlet(np.ones(6), size=4)
    expected = torch.nn.functional.kl_div(torch.log(torch.as_tensor(q)), torch.as_tensor(p), reduction="none").sum(-1)
    np.testing.assert_allclose(kl_divergence(p, q), expected.numpy(), rtol=1e-12)

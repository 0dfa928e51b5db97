"""The RL-update math: masked stats, KL estimators, GAE, keyed group baselines, estimators, PPO losses."""

from __future__ import annotations

import math

import pytest
import torch

from mapoco.training.algorithms import (
    DEFAULT_ESTIMATOR,
    ESTIMATORS,
    AdvantageBatch,
    AdvantageConfig,
    compute_advantages,
    entropy_from_logits,
    gae,
    get_estimator,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_mean,
    token_rewards,
    truncated_is_weights,
    value_loss,
)

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)


def _masked_std(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x[mask.bool()].std(unbiased=False))


# ---------------------------------------------------------------- masked stats


def test_masked_mean_ignores_padding_and_nan():
    x = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert torch.allclose(masked_mean(x, mask, dim=-1), torch.tensor([2.0, 5.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_whiten_uses_only_masked_elements():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert _masked_std(w, mask) == pytest.approx(1.0, abs=1e-4)
    assert torch.all(w[:, 2] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(2.5, abs=1e-5)


# ---------------------------------------------------------------- KL


def test_kl_estimators_hand_example():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])  # logp - ref = 0.5, -1.0
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    k3 = torch.tensor([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])
    assert torch.allclose(kl_penalty(logp, ref, "k3"), k3)


def test_k3_nonnegative_and_all_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 16, generator=g) * 3, torch.randn(64, 16, generator=g) * 3
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), kind), torch.zeros_like(logp))


def test_kl_unknown_kind_names_allowed():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


# ---------------------------------------------------------------- token rewards and GAE


def test_token_rewards_reward_on_last_masked_token():
    kl = torch.full((3, 4), 2.0)
    r = token_rewards(torch.tensor([1.0, 5.0, 9.0]), kl, MASK, kl_coef=0.1)
    expected = torch.tensor(
        [[-0.2, -0.2, 0.8, 0.0], [-0.2, 4.8, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # empty row gets nothing
    )
    assert torch.allclose(r, expected)


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(3, 4, generator=g) * MASK, torch.randn(3, 4, generator=g)
    adv, ret = gae(rewards, values, MASK, gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(adv, (to_go - values) * MASK, atol=1e-6)
    assert torch.allclose(ret, to_go * MASK, atol=1e-6)


def test_gae_hand_example_padding_does_not_leak():
    nan = float("nan")  # padding may hold anything
    rewards = torch.tensor([[0.0, 1.0, 99.0, nan]])
    values = torch.tensor([[0.5, 0.2, 50.0, nan]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    gamma, lam = 0.9, 0.8
    d1 = 1.0 + gamma * 0.0 - 0.2  # value after the last real token is 0
    d0 = 0.0 + gamma * 0.2 - 0.5
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[d0 + gamma * lam * d1, d1, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[d0 + gamma * lam * d1 + 0.5, d1 + 0.2, 0.0, 0.0]]))


def test_gae_skips_unmasked_positions_inside_a_row():
    gapped_r, gapped_v = torch.tensor([[1.0, 7.0, 2.0, 3.0]]), torch.tensor([[0.3, 9.0, 0.1, 0.4]])
    gapped, _ = gae(gapped_r, gapped_v, torch.tensor([[1.0, 0.0, 1.0, 1.0]]), gamma=0.9, lam=0.7)
    compact, _ = gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.3, 0.1, 0.4]]), torch.ones(1, 3), 0.9, 0.7)
    assert torch.allclose(gapped[:, [0, 2, 3]], compact) and gapped[0, 1] == 0


# ---------------------------------------------------------------- keyed group baselines


def _group_batch():
    # Two groups interleaved, plus a singleton; rewards chosen so the groups' stats differ.
    keys = [("q1", 0, 1), ("q2", 0, 1), ("q1", 0, 1), ("q2", 0, 1), ("q1", 0, 1), ("q3", 1, 2), ("q2", 0, 1)]
    rewards = torch.tensor([1.0, 10.0, 0.0, 20.0, 1.0, 7.0, 60.0])
    return keys, rewards


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_group_advantages_keyed_not_positional(kind):
    keys, rewards = _group_batch()
    adv = group_advantages(keys, rewards, kind)
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(3))
    shuffled = group_advantages([keys[i] for i in perm], rewards[perm], kind)
    unshuffled = torch.empty_like(shuffled)
    unshuffled[perm] = shuffled
    assert torch.allclose(adv, unshuffled, atol=1e-6)
    # Interleaved groups do not mix: each group's advantages equal those of the group alone.
    for key in {("q1", 0, 1), ("q2", 0, 1)}:
        rows = [i for i, k in enumerate(keys) if k == key]
        alone = group_advantages([key] * len(rows), rewards[rows], kind)
        assert torch.allclose(adv[rows], alone, atol=1e-6)
    assert adv[5].item() == 0.0  # singleton group


def test_grpo_hand_example_sample_std():
    adv = group_advantages(["a"] * 3, torch.tensor([0.0, 1.0, 2.0]), "grpo", eps=0.0)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0]))  # sample std of (0,1,2) is 1
    unscaled = group_advantages(["a"] * 3, torch.tensor([0.0, 1.0, 5.0]), "grpo", scale_by_std=False)
    assert torch.allclose(unscaled, torch.tensor([-2.0, -1.0, 3.0]))


def test_rloo_hand_example():
    keys, rewards = _group_batch()
    adv = group_advantages(keys, rewards, "rloo")
    # q1 rows 0,2,4 = (1,0,1); q2 rows 1,3,6 = (10,20,60).
    expected = torch.tensor([1 - 0.5, 10 - 40.0, 0 - 1.0, 20 - 35.0, 1 - 0.5, 0.0, 60 - 15.0])
    assert torch.allclose(adv, expected)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="grpo, rloo"):
        group_advantages(["a"], torch.zeros(1), "ppo")
    with pytest.raises(ValueError, match="2 keys for 3"):
        group_advantages(["a", "b"], torch.zeros(3), "grpo")


# ---------------------------------------------------------------- estimators


def _batch(values: bool = True, ref: bool = True) -> AdvantageBatch:
    g = torch.Generator().manual_seed(4)
    b, length = 6, 5
    mask = (torch.arange(length) < torch.tensor([5, 3, 1, 4, 5, 2]).unsqueeze(-1)).float()
    return AdvantageBatch(
        keys=[("q", 0, 1)] * 3 + [("q", 1, 1)] * 3,
        seq_rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]),
        mask=mask,
        logprobs=-torch.rand(b, length, generator=g),
        ref_logprobs=-torch.rand(b, length, generator=g) if ref else None,
        values=torch.randn(b, length, generator=g) if values else None,
    )


def test_registry_and_get_estimator_errors():
    assert DEFAULT_ESTIMATOR == "gae" and AdvantageConfig().estimator == "gae"
    assert {"gae", "grpo", "rloo", "reinforce_pp"} <= set(ESTIMATORS)
    with pytest.raises(ValueError, match="gae, grpo, reinforce_pp, rloo"):
        get_estimator("ppo2")
    with pytest.raises(ValueError, match="allowed"):
        AdvantageConfig(estimator="nope")


def test_gae_estimator_whitens_and_returns_targets():
    batch = _batch()
    cfg = AdvantageConfig(kl_coef=0.1)
    adv, ret = compute_advantages(batch, cfg)
    assert masked_mean(adv, batch.mask).item() == pytest.approx(0.0, abs=1e-5)
    assert _masked_std(adv, batch.mask) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(adv[batch.mask == 0] == 0) and torch.all(ret[batch.mask == 0] == 0)
    rewards = token_rewards(batch.seq_rewards, kl_penalty(batch.logprobs, batch.ref_logprobs), batch.mask, 0.1)
    assert torch.allclose(ret, gae(rewards, batch.values, batch.mask, 1.0, 0.95)[1])
    with pytest.raises(ValueError, match="values"):
        compute_advantages(_batch(values=False), cfg)


def test_kl_in_loss_leaves_rewards_kl_free():
    batch = _batch(ref=False)  # no reference needed once the KL lives in the loss
    with_kl = compute_advantages(batch, AdvantageConfig(kl_coef=0.5, kl_in_reward=False))[0]
    without = compute_advantages(batch, AdvantageConfig(kl_coef=0.0))[0]
    assert torch.allclose(with_kl, without)
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_advantages(batch, AdvantageConfig(kl_coef=0.5))


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_estimators_broadcast_and_kl_to_go(name):
    batch = _batch()
    adv, ret = compute_advantages(batch, AdvantageConfig(estimator=name))
    assert ret is None
    scalar = group_advantages(batch.keys, batch.seq_rewards, name)
    assert torch.allclose(adv, scalar.unsqueeze(-1) * batch.mask)
    kl_adv, _ = compute_advantages(batch, AdvantageConfig(estimator=name, kl_coef=0.2))
    kl = kl_penalty(batch.logprobs, batch.ref_logprobs) * batch.mask
    to_go = kl.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(kl_adv, adv - 0.2 * to_go, atol=1e-6)


def test_reinforce_pp_is_globally_whitened():
    batch = _batch(values=False)
    adv, ret = compute_advantages(batch, AdvantageConfig(estimator="reinforce_pp", kl_coef=0.05, gamma=0.9))
    assert ret is None
    assert masked_mean(adv, batch.mask).item() == pytest.approx(0.0, abs=1e-5)
    assert _masked_std(adv, batch.mask) == pytest.approx(1.0, abs=1e-3)
    assert torch.all(adv[batch.mask == 0] == 0)


# ---------------------------------------------------------------- losses


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -2.0, 7.0], [3.0, 0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.tensor([[-1.0, -0.3, float("-inf")], [-2.0, -0.1, -0.7]])  # padding may be garbage
    loss, stats = policy_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-(1 - 2 + 3 + 0.5 - 9) / 5)
    assert stats["clip_frac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_policy_loss_clips_far_ratios_and_gradient_flows():
    old = torch.zeros(2, 3)
    logp = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, 1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(2, 3), clip_eps=0.2)
    # Clip wins where the ratio left the trust region in the advantage's direction: (0,0) and (1,0).
    assert stats["clip_frac"].item() == pytest.approx(2 / 6)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * 3 / 6)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0 and logp.grad[0, 1] != 0


def test_truncated_is_weights_hand_example():
    behaviour = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, float("nan")]])
    proximal = torch.tensor([[-1.0, -1.0, -0.5 - math.log(4)], [-0.2 + math.log(3), -3.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # padding may hold garbage
    weights = truncated_is_weights(proximal, behaviour, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, 0.25], [2.0, 1.0, 0.0]])  # e^1 and 3 are capped at 2
    assert torch.allclose(weights, expected)


def test_is_weights_scale_each_tokens_surrogate():
    """With ratio 1 the surrogate is -A per token: weights turn the mean into a weighted sum over the tokens."""
    adv = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = torch.zeros(2, 2)
    ones, _ = policy_loss(logp, logp, adv, mask, is_weights=mask.clone())
    plain, _ = policy_loss(logp, logp, adv, mask)
    weighted, _ = policy_loss(logp, logp, adv, mask, is_weights=torch.tensor([[0.5, 2.0], [1.5, 9.0]]))
    assert ones.item() == plain.item() == pytest.approx(-(1 - 2 + 3) / 3)
    assert weighted.item() == pytest.approx(-(0.5 * 1 - 2.0 * 2 + 1.5 * 3) / 3)


def test_micro_batch_losses_sum_to_full_batch_loss():
    g = torch.Generator().manual_seed(5)
    mask = (torch.arange(6) < torch.tensor([6, 2, 4, 1, 5]).unsqueeze(-1)).float()
    logp, old = -torch.rand(5, 6, generator=g), -torch.rand(5, 6, generator=g)
    adv = torch.randn(5, 6, generator=g)
    full, _ = policy_loss(logp, old, adv, mask)
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], normalizer=mask.sum())[0] for s in (slice(0, 2), slice(2, 5))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), rel=1e-6)
    # Without the global normaliser the micro-batch means do not add up to the batch mean.
    local = [policy_loss(logp[s], old[s], adv[s], mask[s])[0] for s in (slice(0, 2), slice(2, 5))]
    assert (local[0] + local[1]).item() != pytest.approx(full.item(), rel=1e-3)


def test_token_mean_weighs_every_token_the_same():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert token_mean(loss, mask).item() == pytest.approx(9 / 5)  # not (1 + 5) / 2: a long answer weighs more
    assert token_mean(loss, mask, normalizer=10.0).item() == pytest.approx(0.9)


def test_value_loss_clipping():
    old = torch.zeros(1, 3)
    values = torch.tensor([[1.0, 0.1, -1.0]])
    returns = torch.tensor([[2.0, 0.0, 1.0]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), clip_eps=0.2)
    # token 0: max((1-2)^2, (0.2-2)^2) = 3.24; token 1: 0.01 both; token 2: max(4, (-0.2-1)^2) = 4
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01 + 4.0) / 3)
    assert stats["vf_clip_frac"].item() == pytest.approx(1 / 3)


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, float("-inf"), -1000.0]])
    ent = entropy_from_logits(logits)
    assert ent[0].item() == pytest.approx(math.log(4))
    assert ent[1].item() == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 7, generator=g)
    assert torch.allclose(entropy_from_logits(z), torch.distributions.Categorical(logits=z).entropy(), atol=1e-6)

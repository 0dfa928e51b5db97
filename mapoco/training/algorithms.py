"""The math of the RL update: masked statistics, KL estimators, advantage estimators and PPO losses.

Pure PyTorch, no distributed state: the learner actors call these on their (micro-)batches.
Every ``[B, L]`` tensor is right-padded over RESPONSE tokens only; ``mask`` (bool or float) is 1 on real
response tokens. A row is one agent's answer at one turn of one discussion, and rows carry explicit ids
(``AdvantageBatch.keys``) so that group baselines never depend on a row's position in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mapoco.config.schema import KL_ESTIMATORS

DEFAULT_ESTIMATOR = "gae"
GROUP_BASELINES = ("grpo", "rloo")


def _choice(kind: str, what: str, allowed: Sequence[str]) -> None:
    if kind not in allowed:
        raise ValueError(f"unknown {what} {kind!r}; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------- masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask``; positions outside the mask are zeroed first so NaN/inf padding cannot leak."""
    masked = torch.where(mask.bool(), x, torch.zeros_like(x)) * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over masked elements (0 where the mask is empty)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.to(x.dtype).clamp_min(1e-8)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise to unit (population) variance over the masked elements; padding comes out 0.

    With ``shift_mean=False`` the mean is kept, only the scale changes.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------- KL to the reference policy


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (http://joschu.net/blog/kl-approx.html).

    k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = exp(-log r) + log r - 1 (unbiased, low variance, always >= 0), with log r = logp - logp_ref.
    """
    _choice(kind, "KL estimator", KL_ESTIMATORS)
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    # Clamp so exp() cannot overflow on a token the reference finds wildly more likely.
    ref_minus = (-log_ratio).clamp(-20.0, 20.0)
    return torch.exp(ref_minus) - ref_minus - 1.0


# ---------------------------------------------------------------- rewards and returns


def last_token_index(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the index of the last masked token, and whether the row has any masked token."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=-1).values
    return last.clamp_min(0), last >= 0


def token_rewards(seq_rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """-kl_coef * kl on every masked token, plus each row's scalar reward on its last masked token."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))
    last, has_tokens = last_token_index(mask)
    bonus = torch.where(has_tokens, seq_rewards.to(rewards.dtype), 0.0)
    return rewards.scatter_add(-1, last.unsqueeze(-1), bonus.unsqueeze(-1))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's masked tokens -> (advantages, returns).

    The value after a row's last masked token is 0. Unmasked positions are skipped (the carries pass through
    them unchanged), so padding never leaks into real tokens; both outputs are 0 there.
    """
    m = mask.to(values.dtype)
    values = torch.where(m > 0, values, torch.zeros_like(values))  # garbage values must not reach the returns
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        running = torch.where(m[:, t] > 0, step, running)
        next_value = torch.where(m[:, t] > 0, values[:, t], next_value)
        advantages[:, t] = running
    return advantages * m, (advantages + values) * m


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """sum_{k>=0} gamma^k r_{t+k} over masked tokens: GAE with zero values and lam=1."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)[0]


# ---------------------------------------------------------------- group baselines


def group_advantages(
    keys: Sequence[Hashable],
    seq_rewards: Tensor,
    kind: str = "grpo",
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Scalar advantage per row against the other rows that share its key (e.g. (question, agent, turn)).

    grpo: (r - group mean), divided by (group SAMPLE std (Bessel, n-1) + eps) when ``scale_by_std``
          (as in DeepSeekMath/TRL; ``scale_by_std=False`` is Dr. GRPO).
    rloo: r_i - mean of the other members of its group (unbiased by construction, never scaled).
    A group of one has no baseline: its advantage is 0.
    """
    _choice(kind, "group baseline", GROUP_BASELINES)
    if len(keys) != seq_rewards.shape[0]:
        raise ValueError(f"{len(keys)} keys for {seq_rewards.shape[0]} rewards")
    ids: dict[Hashable, int] = {}
    group = torch.tensor([ids.setdefault(k, len(ids)) for k in keys], device=seq_rewards.device, dtype=torch.long)
    r = seq_rewards.double()  # group sums in float64: rewards of a large group nearly cancel
    count = torch.zeros(len(ids), dtype=r.dtype, device=r.device).index_add_(0, group, torch.ones_like(r))[group]
    total = torch.zeros(len(ids), dtype=r.dtype, device=r.device).index_add_(0, group, r)[group]
    if kind == "rloo":
        adv = torch.where(count > 1, r - (total - r) / (count - 1).clamp_min(1), 0.0)
    else:
        adv = r - total / count  # exactly 0 for a group of one
        if scale_by_std:
            sq = torch.zeros(len(ids), dtype=r.dtype, device=r.device).index_add_(0, group, adv**2)[group]
            adv = adv / ((sq / (count - 1).clamp_min(1)).sqrt() + eps)
    return adv.to(seq_rewards.dtype)


# ---------------------------------------------------------------- advantage estimators


@dataclass
class AdvantageBatch:
    """One rollout batch for one agent. ``keys[i]`` names row i's group, e.g. (question_id, agent, turn)."""

    keys: list[Hashable]
    seq_rewards: Tensor  # [B]
    mask: Tensor  # [B, L]
    logprobs: Tensor  # [B, L], old (behaviour) policy
    ref_logprobs: Tensor | None = None  # [B, L]
    values: Tensor | None = None  # [B, L]

    def __post_init__(self) -> None:
        shape = tuple(self.mask.shape)
        if len(shape) != 2 or tuple(self.seq_rewards.shape) != shape[:1] or len(self.keys) != shape[0]:
            raise ValueError(f"mask {shape}, seq_rewards {tuple(self.seq_rewards.shape)}, {len(self.keys)} keys")
        for name in ("logprobs", "ref_logprobs", "values"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, mask has {shape}")


@dataclass
class AdvantageConfig:
    estimator: str = DEFAULT_ESTIMATOR
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.0
    kl_estimator: str = "k1"
    kl_in_reward: bool = True  # False: the learner adds the KL to the loss, so rewards carry no KL term
    whiten_advantages: bool = True  # gae only; reinforce_pp always whitens, group baselines never do
    scale_by_std: bool = True  # grpo only

    def __post_init__(self) -> None:
        get_estimator(self.estimator)
        _choice(self.kl_estimator, "KL estimator", KL_ESTIMATORS)


Estimator = Callable[[AdvantageBatch, AdvantageConfig], tuple[Tensor, Tensor | None]]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    def register(fn: Estimator) -> Estimator:
        if name in ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ESTIMATORS[name] = fn
        return fn

    return register


def get_estimator(name: str) -> Estimator:
    _choice(name, "advantage estimator", sorted(ESTIMATORS))
    return ESTIMATORS[name]


def compute_advantages(batch: AdvantageBatch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor | None]:
    """(advantages [B,L], value targets [B,L] or None when the estimator has no critic)."""
    return get_estimator(cfg.estimator)(batch, cfg)


def _reward_kl(batch: AdvantageBatch, cfg: AdvantageConfig) -> Tensor:
    """The per-token KL that goes into the reward (zeros when the KL is off or lives in the loss)."""
    if not cfg.kl_in_reward or cfg.kl_coef == 0:
        return torch.zeros_like(batch.logprobs)
    if batch.ref_logprobs is None:
        raise ValueError("kl_coef > 0 with kl_in_reward needs ref_logprobs")
    return kl_penalty(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator)


def _rewards(batch: AdvantageBatch, cfg: AdvantageConfig) -> Tensor:
    return token_rewards(batch.seq_rewards, _reward_kl(batch, cfg), batch.mask, cfg.kl_coef)


@register_estimator("gae")
def gae_estimator(batch: AdvantageBatch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """MAPoRL's PPO: token rewards -> GAE with the critic's values; returns are the value targets."""
    if batch.values is None:
        raise ValueError("the gae estimator needs values from a critic")
    advantages, returns = gae(_rewards(batch, cfg), batch.values, batch.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, batch.mask)
    return advantages, returns


def _group_estimator(kind: str, batch: AdvantageBatch, cfg: AdvantageConfig) -> tuple[Tensor, None]:
    group = group_advantages(batch.keys, batch.seq_rewards, kind, cfg.scale_by_std)
    m = batch.mask.to(batch.logprobs.dtype)
    # The KL penalty to go (undiscounted); the sequence reward is already in the group advantage.
    kl_to_go = returns_to_go(-cfg.kl_coef * _reward_kl(batch, cfg), batch.mask)
    return group.unsqueeze(-1) * m + kl_to_go, None


@register_estimator("grpo")
def grpo_estimator(batch: AdvantageBatch, cfg: AdvantageConfig) -> tuple[Tensor, None]:
    return _group_estimator("grpo", batch, cfg)


@register_estimator("rloo")
def rloo_estimator(batch: AdvantageBatch, cfg: AdvantageConfig) -> tuple[Tensor, None]:
    return _group_estimator("rloo", batch, cfg)


@register_estimator("reinforce_pp")
def reinforce_pp_estimator(batch: AdvantageBatch, cfg: AdvantageConfig) -> tuple[Tensor, None]:
    """REINFORCE++: token rewards -> discounted return-to-go (no critic) -> whitened over the whole batch."""
    return masked_whiten(returns_to_go(_rewards(batch, cfg), batch.mask, cfg.gamma), batch.mask), None


# ---------------------------------------------------------------- PPO losses


def token_mean(loss_per_token: Tensor, mask: Tensor, normalizer: float | Tensor | None = None) -> Tensor:
    """Sum of a ``[B, L]`` per-token loss over masked tokens / ``normalizer`` (the masked token count of the WHOLE
    batch), so that the micro-batch losses add up to the token mean over the batch and every token weighs the same.
    ``normalizer=None`` uses this micro-batch's own count."""
    total = masked_sum(loss_per_token, mask)
    if normalizer is None:
        normalizer = mask.sum().clamp_min(1).to(total.dtype)
    return total / normalizer


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    normalizer: float | Tensor | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, max(-A r, -A clip(r, 1-eps, 1+eps)) per token, reduced by ``token_mean``.

    ``old_logprobs`` are the learner's own at the update's start (the proximal policy); a sample drawn by older
    weights carries ``is_weights`` (``truncated_is_weights``), which scale its tokens' terms: the decoupled
    objective, whose trust region is around the current policy whatever policy sampled.

    stats (detached, over this micro-batch's masked tokens): clip_frac (share of tokens where the clipped term
    wins), approx_kl (mean of (logp - logp_old)^2 / 2).
    """
    # Padding may hold garbage log-probs; zero the log-ratio there so exp() cannot make inf * 0 = NaN.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = torch.maximum(unclipped, clipped)
    loss = token_mean(surrogate if is_weights is None else is_weights * surrogate, mask, normalizer)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def truncated_is_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Per-token pi_proximal / pi_behaviour, at most ``cap``: reweights tokens the engines sampled with older weights
    to the learner's current policy. Unbiased where the ratio stays under the cap; the cap bounds the variance a rare
    token could add. Zero outside ``mask``."""
    log_ratio = torch.where(mask.bool(), proximal_logprobs - behaviour_logprobs, torch.zeros_like(proximal_logprobs))
    return torch.exp(log_ratio).clamp(max=cap) * mask


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = v_old + clip(v - v_old, +-eps).

    stats: vf_clip_frac (share of masked tokens where the clipped term wins).
    """
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = token_mean(0.5 * torch.maximum(unclipped, clipped), mask, normalizer)
    with torch.no_grad():
        stats = {"vf_clip_frac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy of softmax(logits) over the last dim: logsumexp(z) - sum p z (no log of tiny p)."""
    p = torch.softmax(logits, dim=-1)
    # -inf logits (banned tokens) have p = 0 and contribute 0, not 0 * -inf = NaN.
    pz = torch.where(p > 0, p * logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - pz.sum(-1)

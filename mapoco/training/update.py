"""What one policy's update is made of: the advantages (and value targets) of its batch under the run's algorithm,
from the learners' stats of its rows, and the per-token targets the learner ranks read."""

from __future__ import annotations

import torch

from mapoco.config import AlgorithmConfig
from mapoco.training.algorithms import (
    AdvantageBatch,
    AdvantageConfig,
    compute_advantages,
)
from mapoco.training.batch import AgentBatch, RolloutStats, TokenTargets


def advantages_of(batch: AgentBatch, stats: RolloutStats,
                  algo: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(advantages, value targets or None, response mask), each ``[rows, length]``."""
    lengths = torch.tensor([len(r.response_ids) for r in batch.rows])
    mask = (torch.arange(stats.logprobs.size(1)) < lengths[:, None]).float()
    acfg = AdvantageConfig(estimator=algo.estimator, gamma=algo.gamma, lam=algo.lam, kl_coef=algo.kl_coef,
                           kl_estimator=algo.kl_estimator, kl_in_reward=algo.kl_in_reward,
                           whiten_advantages=algo.whiten_advantages, scale_by_std=algo.scale_by_std)
    adv_batch = AdvantageBatch(keys=batch.keys, seq_rewards=torch.tensor(batch.rewards), mask=mask,
                               logprobs=stats.logprobs, ref_logprobs=stats.ref_logprobs,
                               values=stats.values if algo.estimator == "gae" else None)
    advantages, returns = compute_advantages(adv_batch, acfg)
    return advantages, returns, mask


def token_targets(stats: RolloutStats, advantages: torch.Tensor, returns: torch.Tensor | None) -> TokenTargets:
    """What the learners read per token: the old values ride along where there are value targets."""
    return TokenTargets(stats.logprobs, stats.ref_logprobs, advantages, returns,
                        None if returns is None else stats.values)

"""MAPoRL rewards: influence-aware discounted team reward plus collaboration incentives.

Arrays are indexed ``[agent, turn]`` for one question; turns are 0-based here and 1-based in the docs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INCENTIVE_MODES = ("paper", "reference_code", "none")


@dataclass(frozen=True)
class RewardConfig:
    gamma: float = 0.3
    incentives: str = "paper"
    alpha0: float = 0.0  # resist a wrong majority (keep a right answer)
    alpha1: float = 0.0  # be persuaded by right peers (wrong -> right)
    beta0: float = 0.0  # a wrong answer after which wrong peers become right
    beta1: float = 0.0  # persuade wrong peers with a right answer


def influence_aware(scores: np.ndarray, gamma: float) -> np.ndarray:
    """R(t,a) = (V_ta + sum_{t'>t} g^(t'-t) mean_j V_t'j) / sum_{t'>=t} g^(t'-t); the mean includes agent a."""
    scores = np.asarray(scores, dtype=np.float64)
    num_turns = scores.shape[1]
    team = scores.mean(axis=0)
    rewards = np.empty_like(scores)
    for t in range(num_turns):
        weights = gamma ** np.arange(num_turns - t)
        future = float(np.dot(weights[1:], team[t + 1 :]))
        rewards[:, t] = (scores[:, t] + future) / weights.sum()
    return rewards


def _peer_majority(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (agent, turn): whether the *other* agents are mostly right / mostly wrong (a tie is neither)."""
    num_agents = correct.shape[0]
    if num_agents == 1:
        empty = np.zeros_like(correct, dtype=bool)
        return empty, empty
    peers = (correct.sum(axis=0, keepdims=True) - correct) / (num_agents - 1)
    return peers > 0.5, peers < 0.5


def incentives(correct: np.ndarray, cfg: RewardConfig) -> np.ndarray:
    """Incentive bonus per (agent, turn) from 0/1 gold correctness."""
    correct = np.asarray(correct, dtype=bool)
    bonus = np.zeros(correct.shape, dtype=np.float64)
    if cfg.incentives == "none" or correct.shape[1] < 2:
        return bonus
    peers_right, peers_wrong = _peer_majority(correct)
    mine, prev = correct[:, 1:], correct[:, :-1]
    if cfg.incentives == "paper":
        # Turn t >= 2 looks back at t-1: kept a right answer against a wrong majority, or was persuaded.
        bonus[:, 1:] += cfg.alpha0 * (prev & mine & peers_wrong[:, :-1])
        bonus[:, 1:] += cfg.alpha1 * (~prev & mine & peers_right[:, :-1])
        # Turn t <= T-1 looks ahead: wrong peers at t became right at t+1 after this agent's answer.
        persuaded = peers_wrong[:, :-1] & peers_right[:, 1:]
        bonus[:, :-1] += cfg.beta0 * (~correct[:, :-1] & persuaded)
        bonus[:, :-1] += cfg.beta1 * (correct[:, :-1] & persuaded)
        return bonus
    return _reference_code_incentives(correct, peers_right, peers_wrong, cfg)


def _reference_code_incentives(
    correct: np.ndarray, peers_right: np.ndarray, peers_wrong: np.ndarray, cfg: RewardConfig
) -> np.ndarray:
    """The released MAPoRL code (``bonus_rule``): no bonus at turn 1, and successful persuasion is penalised."""
    bonus = np.zeros(correct.shape, dtype=np.float64)
    num_turns = correct.shape[1]
    for t in range(1, num_turns):
        prev, mine = correct[:, t - 1], correct[:, t]
        caved = prev & ~mine
        fixed = ~prev & mine
        bonus[:, t] -= cfg.alpha0 * (caved & peers_wrong[:, t - 1]) + cfg.alpha1 * (caved & peers_right[:, t - 1])
        bonus[:, t] += cfg.alpha0 * (fixed & peers_right[:, t - 1]) + cfg.alpha1 * (fixed & peers_wrong[:, t - 1])
        if t + 1 < num_turns and correct.shape[0] > 1:
            became_right = peers_wrong[:, t] & peers_right[:, t + 1]
            became_wrong = peers_right[:, t] & peers_wrong[:, t + 1]
            bonus[:, t] -= cfg.beta1 * (became_right & mine) + cfg.beta0 * (became_right & ~mine)
            bonus[:, t] += cfg.beta1 * (became_wrong & ~mine) + cfg.beta0 * (became_wrong & mine)
    return bonus


def maporl_rewards(scores: np.ndarray, correct: np.ndarray, cfg: RewardConfig) -> np.ndarray:
    """Reward per (agent, turn): influence-aware reward of verifier scores plus incentives (added after normalising)."""
    return influence_aware(scores, cfg.gamma) + incentives(correct, cfg)

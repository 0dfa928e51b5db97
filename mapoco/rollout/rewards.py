"""MAPoRL rewards: influence-aware discounted team reward plus collaboration incentives.

Arrays are indexed ``[agent, turn]`` for one question; turns are 0-based here and 1-based in the docs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mapoco.config import RewardConfig
from mapoco.rollout.topology import audience, visible_peers

if TYPE_CHECKING:
    from mapoco.rollout.discussion import DiscussionResult

def influence_aware(scores: np.ndarray, gamma: float) -> np.ndarray:
    """R(t,a) = (V_ta + sum_{t'>t} g^(t'-t) mean_j V_t'j) / sum_{t'>=t} g^(t'-t); the mean includes agent a.

    A NaN score (a flagged sample the verifier could not score) leaves the team mean of its turn, and a turn with no
    score at all leaves both sums; the flagged answer's own reward is NaN (it is not trained on)."""
    scores = np.asarray(scores, dtype=np.float64)
    num_turns = scores.shape[1]
    scored = (~np.isnan(scores)).sum(axis=0)
    team = np.where(scored > 0, np.nansum(scores, axis=0) / np.maximum(scored, 1), 0.0)
    rewards = np.empty_like(scores)
    for t in range(num_turns):
        future = gamma ** np.arange(1, num_turns - t) * (scored[t + 1 :] > 0)
        rewards[:, t] = (scores[:, t] + float(np.dot(future, team[t + 1 :]))) / (1.0 + future.sum())
    return rewards


def _majorities(correct: np.ndarray, scored: np.ndarray, groups: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per (agent, turn): whether the scored agents of ``groups[agent]`` are mostly right / mostly wrong at that
    turn (a tie, or no scored agent, is neither)."""
    right, wrong = np.zeros(correct.shape, dtype=bool), np.zeros(correct.shape, dtype=bool)
    for agent, group in enumerate(groups):
        if group:
            counted = scored[group].sum(axis=0)
            votes = 2 * (correct[group] & scored[group]).sum(axis=0)
            right[agent], wrong[agent] = (counted > 0) & (votes > counted), (counted > 0) & (votes < counted)
    return right, wrong


def incentives(correct: np.ndarray, cfg: RewardConfig, topology: str = "all_to_all",
               scored: np.ndarray | None = None) -> np.ndarray:
    """Incentive bonus per (agent, turn) from 0/1 gold correctness.

    Credit follows ``topology``: being persuaded or resisting (alpha) counts the peers whose answers the agent saw;
    persuading (beta) counts the peers who saw the agent's answer. Unscored answers (``scored`` False: flagged
    samples) earn nothing and count in no majority."""
    correct = np.asarray(correct, dtype=bool)
    scored = np.ones(correct.shape, dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    bonus = np.zeros(correct.shape, dtype=np.float64)
    num_agents = correct.shape[0]
    if cfg.incentives == "none" or correct.shape[1] < 2:
        return bonus
    seen = _majorities(correct, scored, [visible_peers(a, num_agents, topology) for a in range(num_agents)])
    heard = _majorities(correct, scored, [audience(a, num_agents, topology) for a in range(num_agents)])
    right, wrong = correct & scored, ~correct & scored
    if cfg.incentives == "paper":
        # Turn t >= 2 looks back at t-1: kept a right answer against a wrong majority it saw, or was persuaded.
        bonus[:, 1:] += cfg.alpha0 * (right[:, :-1] & right[:, 1:] & seen[1][:, :-1])
        bonus[:, 1:] += cfg.alpha1 * (wrong[:, :-1] & right[:, 1:] & seen[0][:, :-1])
        # Turn t <= T-1 looks ahead: the wrong peers who saw this answer at t were right at t+1.
        persuaded = heard[1][:, :-1] & heard[0][:, 1:]
        bonus[:, :-1] += cfg.beta0 * (wrong[:, :-1] & persuaded)
        bonus[:, :-1] += cfg.beta1 * (right[:, :-1] & persuaded)
        return bonus
    return _reference_code_incentives(right, wrong, seen, heard, cfg)


def _reference_code_incentives(right: np.ndarray, wrong: np.ndarray, seen: tuple[np.ndarray, np.ndarray],
                               heard: tuple[np.ndarray, np.ndarray], cfg: RewardConfig) -> np.ndarray:
    """The released MAPoRL code (``bonus_rule``): no bonus at turn 1, and successful persuasion is penalised."""
    bonus = np.zeros(right.shape, dtype=np.float64)
    num_turns = right.shape[1]
    for t in range(1, num_turns):
        caved, fixed = right[:, t - 1] & wrong[:, t], wrong[:, t - 1] & right[:, t]
        peers_right, peers_wrong = seen[0][:, t - 1], seen[1][:, t - 1]
        bonus[:, t] -= cfg.alpha0 * (caved & peers_wrong) + cfg.alpha1 * (caved & peers_right)
        bonus[:, t] += cfg.alpha0 * (fixed & peers_right) + cfg.alpha1 * (fixed & peers_wrong)
        if t + 1 < num_turns:
            became_right = heard[1][:, t] & heard[0][:, t + 1]
            became_wrong = heard[0][:, t] & heard[1][:, t + 1]
            bonus[:, t] -= cfg.beta1 * (became_right & right[:, t]) + cfg.beta0 * (became_right & wrong[:, t])
            bonus[:, t] += cfg.beta1 * (became_wrong & wrong[:, t]) + cfg.beta0 * (became_wrong & right[:, t])
    return bonus


def maporl_rewards(scores: np.ndarray, correct: np.ndarray, cfg: RewardConfig,
                   topology: str = "all_to_all") -> np.ndarray:
    """Reward per (agent, turn): influence-aware reward of verifier scores (NaN: flagged) plus incentives (added
    after normalising)."""
    scores = np.asarray(scores, dtype=np.float64)
    return influence_aware(scores, cfg.gamma) + incentives(correct, cfg, topology, ~np.isnan(scores))


def team_rewards(result: DiscussionResult, cfg: RewardConfig, topology: str = "all_to_all") -> np.ndarray:
    """``maporl_rewards`` of every question of a discussion, as one ``[question, agent, turn]`` array (NaN: flagged).
    Computed once per rollout; the update, the step's metrics and the summary all read this array."""
    scores, correct = result.grid("score", float), result.grid("correct", bool)
    if not len(result.problems):
        return np.zeros((0, result.num_agents, result.num_turns))
    return np.stack([maporl_rewards(scores[q], correct[q], cfg, topology) for q in range(len(result.problems))])

import numpy as np
import pytest

from mapoco.config import RewardConfig
from mapoco.rollout.rewards import (
    incentives,
    influence_aware,
    maporl_rewards,
)

# The worked example of the MAPoRL reward: A=2, T=3, gamma=0.3.
SCORES = np.array([[0.20, 0.90, 0.95], [0.10, 0.30, 0.85]])


def test_influence_aware_worked_example():
    r = influence_aware(SCORES, gamma=0.3)
    assert r[0, 0] == pytest.approx(0.461 / 1.39, abs=1e-4)
    assert r[0] == pytest.approx([0.3317, 0.9000, 0.9500], abs=1e-4)
    assert r[1] == pytest.approx([0.2597, 0.4385, 0.8500], abs=1e-4)


def test_gamma_zero_is_own_score_and_last_turn_is_own_score():
    assert influence_aware(SCORES, 0.0) == pytest.approx(SCORES)
    assert influence_aware(SCORES, 0.7)[:, -1] == pytest.approx(SCORES[:, -1])


def _bonus(correct, **coefs):
    return incentives(np.array(correct, dtype=bool), RewardConfig(**coefs))


def test_paper_incentives_signs():
    # agent0 right, right; agent1 wrong, right -> agent0 resisted (peer wrong at t1), agent1 was persuaded.
    correct = [[1, 1], [0, 1]]
    assert _bonus(correct, alpha0=1.0)[0].tolist() == [0, 1]
    assert _bonus(correct, alpha0=1.0)[1].tolist() == [0, 0]
    assert _bonus(correct, alpha1=2.0)[1].tolist() == [0, 2]
    # agent0's right answer at turn 1 persuaded the wrong peer, who became right at turn 2.
    assert _bonus(correct, beta1=3.0)[0].tolist() == [3, 0]
    assert _bonus(correct, beta1=3.0)[1].tolist() == [0, 0]
    assert _bonus([[0, 0], [0, 1]], beta0=0.5)[0].tolist() == [0.5, 0]


def test_reference_code_penalises_persuasion_and_skips_turn_one():
    correct = np.array([[1, 1, 1], [0, 0, 1]], dtype=bool)
    ref = incentives(correct, RewardConfig(incentives="reference_code", beta1=1.0))
    paper = incentives(correct, RewardConfig(incentives="paper", beta1=1.0))
    assert ref[0, 1] == -1.0  # peers became right after agent0's right answer: penalised in the released code
    assert paper[0, 1] == 1.0
    assert np.all(incentives(correct, RewardConfig(incentives="reference_code", alpha0=1, alpha1=1, beta0=1,
                                                   beta1=1))[:, 0] == 0)


def test_none_and_single_turn_give_no_bonus():
    correct = np.array([[1, 0], [0, 1]], dtype=bool)
    assert not incentives(correct, RewardConfig(incentives="none", alpha0=5, beta1=5)).any()
    assert maporl_rewards(SCORES[:, :1], correct[:, :1], RewardConfig(alpha0=1)) == pytest.approx(SCORES[:, :1])


# ---------------------------------------------------------------- topology-aware incentives, 3 agents, 2 turns
# Worked by hand. ring: agent a sees a-1 and is seen by a+1; star: agent 0 (the hub) sees and is seen by everyone,
# the others see only the hub. alpha counts the peers an agent saw; beta counts the peers who saw it.
RING = [[1, 1], [0, 1], [0, 0]]  # agent 0 right twice; agent 1 corrected; agent 2 wrong twice
STAR = [[0, 1], [1, 1], [1, 0]]  # the hub corrected; agent 1 right twice; agent 2 right then wrong


def _topology_bonus(correct, topology, **coefs):
    return incentives(np.array(correct, dtype=bool), RewardConfig(**coefs), topology).tolist()


@pytest.mark.parametrize("topology,coef,expected", [
    ("ring", "alpha0", [[0, 1], [0, 0], [0, 0]]),  # agent 0 kept its answer against agent 2, the one it saw
    ("ring", "alpha1", [[0, 0], [0, 1], [0, 0]]),  # agent 1 saw only agent 0 (right) and was persuaded
    ("ring", "beta1", [[1, 0], [0, 0], [0, 0]]),  # agent 1, who saw agent 0's right answer, went wrong -> right
    ("ring", "beta0", [[0, 0], [0, 0], [0, 0]]),
    ("all_to_all", "alpha0", [[0, 1], [0, 0], [0, 0]]),  # both peers wrong at turn 1
    ("all_to_all", "alpha1", [[0, 0], [0, 0], [0, 0]]),  # agent 1 saw one right, one wrong: a tie persuades no one
    ("all_to_all", "beta1", [[0, 0], [0, 0], [0, 0]]),  # agent 0's audience ends tied (1 right, 2 wrong)
])
def test_ring_incentives_credit_only_peers_who_saw_the_answer(topology, coef, expected):
    assert _topology_bonus(RING, topology, **{coef: 1.0}) == expected


@pytest.mark.parametrize("topology,coef,expected", [
    ("star", "alpha0", [[0, 0], [0, 1], [0, 0]]),  # agent 1 saw only the hub, wrong at turn 1, and kept its answer
    ("star", "alpha1", [[0, 1], [0, 0], [0, 0]]),  # the hub saw agents 1 and 2, both right, and was persuaded
    ("star", "beta1", [[0, 0], [1, 0], [1, 0]]),  # each leaf's right answer reached the hub, who came round
    ("star", "beta0", [[0, 0], [0, 0], [0, 0]]),
    ("all_to_all", "alpha0", [[0, 0], [0, 0], [0, 0]]),  # agent 1 saw the wrong hub and the right agent 2: a tie
    ("all_to_all", "beta1", [[0, 0], [0, 0], [0, 0]]),  # each leaf's audience was tied at turn 1
])
def test_star_incentives_credit_only_peers_who_saw_the_answer(topology, coef, expected):
    assert _topology_bonus(STAR, topology, **{coef: 1.0}) == expected


def test_flagged_answers_leave_the_team_mean_and_every_majority():
    # Agent 1's second answer could not be scored (NaN). By hand, gamma 0.5: team means 0.5 and 1.0 (agent 1 out).
    scores = np.array([[1.0, 1.0], [0.0, np.nan]])
    rewards = maporl_rewards(scores, np.array([[1, 1], [0, 0]], dtype=bool), RewardConfig(gamma=0.5))
    assert rewards[0] == pytest.approx([(1.0 + 0.5 * 1.0) / 1.5, 1.0])
    assert rewards[1, 0] == pytest.approx((0.0 + 0.5 * 1.0) / 1.5) and np.isnan(rewards[1, 1])
    # A turn nobody could score leaves both sums: turn 1's reward is then the agent's own score.
    none_scored = maporl_rewards(np.array([[0.25, np.nan], [0.75, np.nan]]), np.zeros((2, 2), bool), RewardConfig())
    assert none_scored[:, 0] == pytest.approx([0.25, 0.75])
    # Agent 0 went wrong -> right; of its peers agent 1 was right and agent 2 unscored: a right majority persuaded it
    # (counting the unscored answer as wrong would make it a tie and no bonus).
    correct = np.array([[0, 1], [1, 1], [0, 0]], dtype=bool)
    scored = np.array([[1, 1], [1, 1], [0, 1]], dtype=bool)
    assert incentives(correct, RewardConfig(alpha1=1.0), "all_to_all", scored)[0].tolist() == [0, 1]
    assert incentives(correct, RewardConfig(alpha1=1.0), "all_to_all")[0].tolist() == [0, 0]

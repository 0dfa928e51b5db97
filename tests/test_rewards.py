import numpy as np
import pytest

from mapoco.rewards import RewardConfig, incentives, influence_aware, maporl_rewards

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

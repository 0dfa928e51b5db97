"""A run's summary from a hand-built discussion, every figure worked out by hand (no engine needed)."""

from __future__ import annotations

import numpy as np
import pytest

from mapoco.config import RewardConfig
from mapoco.evaluation.report import summarize, turn_table
from mapoco.rollout.discussion import DiscussionResult, Record
from mapoco.rollout.rewards import team_rewards
from mapoco.tasks import Problem

# (question, agent, turn) -> (answer, correct, verifier score; None = flagged)
ANSWERS = {
    (0, 0, 0): ("3", True, 1.0), (0, 0, 1): ("3", True, 1.0),
    (0, 1, 0): ("5", False, 0.0), (0, 1, 1): ("3", True, 1.0),  # agent 1 is persuaded by the right agent 0
    (1, 0, 0): ("4", False, 0.0), (1, 0, 1): ("4", False, 0.0),
    (1, 1, 0): ("7", True, 1.0), (1, 1, 1): (None, False, None),  # agent 1's last answer is flagged
}


@pytest.fixture
def discussion() -> DiscussionResult:
    problems = [Problem(id="a", question="1 + 2", gold="3"), Problem(id="b", question="3 + 4", gold="7")]
    result = DiscussionResult(problems, num_agents=2, num_turns=2)
    for (q, a, t), (answer, correct, score) in ANSWERS.items():
        result.records[(q, a, t)] = Record(problems[q].id, a, t + 1, prompt_ids=[1, 2, 3], token_ids=[4, 5],
                                           logprobs=[-0.1, -0.2], text=f"\\boxed{{{answer}}}", finish_reason="stop",
                                           answer=answer, correct=correct, score=score)
    return result


def test_team_rewards_by_hand(discussion):
    """gamma 0.5: R(a, 1) = (V_a1 + 0.5 * team_2) / 1.5 and R(a, 2) = V_a2; alpha1 = 1 pays agent 1's persuasion at
    turn 2 of question 0 (it saw a right majority); a flagged answer has no reward and leaves the team mean."""
    rewards = team_rewards(discussion, RewardConfig(gamma=0.5, alpha1=1.0))
    expected = np.array([
        [[1.0, 1.0], [1 / 3, 2.0]],
        [[0.0, 0.0], [2 / 3, np.nan]],
    ])
    np.testing.assert_allclose(rewards, expected)


def test_summary_by_hand(discussion):
    summary = summarize(discussion, team_rewards(discussion, RewardConfig(gamma=0.5, alpha1=1.0)), skipped=3)
    # Turn 1: both questions tie one right against one wrong (0.5 each); turn 2: question 0 agrees on the right 3,
    # question 1's only vote is the wrong 4.
    assert summary["turn_accuracy"] == [0.5, 0.5]
    assert summary["agent_turn_accuracy"] == [[0.5, 0.5], [0.5, 0.5]]
    (flips,) = summary["transitions"]
    assert (flips["wrong_to_right"], flips["right_to_wrong"]) == (1, 1)
    assert (flips["wrong_to_right_rate"], flips["right_to_wrong_rate"]) == (0.5, 0.5)
    # Mean over the scored questions only: agent 1's turn 2 has question 0's reward alone.
    np.testing.assert_allclose(summary["mean_reward"], [[0.5, 0.5], [0.5, 2.0]])
    assert (summary["flagged"], summary["skipped"], summary["num_questions"]) == (1, 3, 2)
    assert (summary["gen_tokens"], summary["prompt_tokens"]) == (16, 24)


def test_turn_table_by_hand(discussion):
    summary = summarize(discussion, team_rewards(discussion, RewardConfig()), skipped=3)
    lines = turn_table(summary, "title").splitlines()
    assert lines[0] == "title" and lines[1].split() == ["turn", "team", "(vote)", "agent", "1", "agent", "2",
                                                        "wrong->right", "right->wrong"]
    assert lines[3].split() == ["1", "0.500", "0.500", "0.500", "-", "-"]
    assert lines[4].split() == ["2", "0.500", "0.500", "0.500", "1", "1"]
    assert lines[5] == "(2 questions, 3 skipped, 1 flagged)"

import numpy as np

from mapoco.evaluation.metrics import (
    agent_turn_accuracy,
    deferral,
    majority_credit,
    team_answer,
    transitions,
    turn_accuracy,
    vote,
)


def test_majority_credit_ties_are_fractional():
    assert majority_credit(["3", "4"], [True, False]) == 0.5
    assert majority_credit(["3", "3", "4"], [True, True, False]) == 1.0
    assert majority_credit(["4", "4", "3"], [False, False, True]) == 0.0
    assert majority_credit([None, "3"], [False, True]) == 1.0  # no answer, no vote
    assert majority_credit([None, None], [False, False]) == 0.0


def test_turn_accuracy_and_transitions():
    answers = np.array([[["1", "2"], ["1", "2"]], [["5", "7"], ["6", "7"]]], dtype=object)  # [q, agent, turn]
    correct = np.array([[[False, True], [False, True]], [[False, True], [True, True]]])
    assert turn_accuracy(answers, correct) == [0.25, 1.0]
    assert agent_turn_accuracy(correct) == [[0.0, 1.0], [0.5, 1.0]]
    flips = transitions(correct)[0]
    assert flips["turn"] == 2 and flips["wrong_to_right"] == 3 and flips["right_to_wrong"] == 0
    assert flips["wrong_to_right_rate"] == 1.0


def test_vote_lists_the_tied_leaders_in_agent_order():
    assert vote(["3", None, "4", "4"]) == (["4"], {"3": 1, "4": 2})
    assert vote(["5", "4"]) == (["5", "4"], {"5": 1, "4": 1})
    assert vote([None, None]) == ([], {})


def test_team_answer_draws_ties_uniformly_and_the_same_for_one_question():
    assert team_answer(["3", "4", "4"], "q") == "4"  # a clear majority is never drawn
    assert team_answer([None, None], "q") is None
    picks = [team_answer(["3", "4"], f"q{i}") for i in range(2000)]
    assert abs(picks.count("3") / len(picks) - 0.5) < 0.05  # what majority_credit's 0.5 for a tie assumes
    assert all(team_answer(["3", "4"], f"q{i}") == p for i, p in enumerate(picks[:50]))


def test_deferral_counts_kept_answers_by_whether_they_were_right():
    # [question, agent, turn]: agent 0 keeps its right answers (q0, q2) and drops its wrong one (q1); agent 1 keeps its
    # right one (q2) and one of its two wrong ones (q1, not q0)
    answers = np.array([[["7", "7"], ["3", "7"]], [["2", "5"], ["4", "4"]], [["9", "9"], ["6", "6"]]], dtype=object)
    correct = np.array([[[True, True], [False, True]], [[False, True], [False, False]], [[True, True], [True, True]]])
    (turn2,) = deferral(answers, correct)
    assert turn2 == {"turn": 2, "kept_when_right": [1.0, 1.0], "kept_when_wrong": [0.0, 0.5]}
    assert deferral(answers[:, :, :1], correct[:, :, :1]) == []  # one turn: nothing kept or dropped
    always_right = deferral(answers[2:], correct[2:])[0]
    assert always_right["kept_when_wrong"] == [None, None]  # no wrong answer to keep

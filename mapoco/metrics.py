"""Discussion metrics: per-turn team accuracy by majority vote, per-agent accuracy, answer transitions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def majority_credit(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Credit for one question and turn: the share of the tied top-voted answers that are right.

    Agents that gave no parsable answer do not vote; a question with no votes earns 0.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    leaders = [a for a, n in votes.items() if n == top]
    right = {a for a, ok in zip(answers, correct) if ok and a is not None}
    return sum(a in right for a in leaders) / len(leaders)


def turn_accuracy(answers: np.ndarray, correct: np.ndarray) -> list[float]:
    """answers/correct: ``[question, agent, turn]`` object/bool arrays -> team accuracy per turn."""
    num_questions, _, num_turns = correct.shape
    if num_questions == 0:
        return [0.0] * num_turns
    return [
        float(np.mean([majority_credit(answers[q, :, t], correct[q, :, t]) for q in range(num_questions)]))
        for t in range(num_turns)
    ]


def agent_turn_accuracy(correct: np.ndarray) -> list[list[float]]:
    """``[agent][turn]`` accuracy."""
    if correct.shape[0] == 0:
        return [[0.0] * correct.shape[2] for _ in range(correct.shape[1])]
    return correct.mean(axis=0).tolist()


def transitions(correct: np.ndarray) -> list[dict[str, float]]:
    """Per turn t >= 2: how many (question, agent) answers flipped since t-1, as counts and conditional rates."""
    out = []
    for t in range(1, correct.shape[2]):
        prev, now = correct[:, :, t - 1], correct[:, :, t]
        wrong_before, right_before = int((~prev).sum()), int(prev.sum())
        w2r, r2w = int((~prev & now).sum()), int((prev & ~now).sum())
        out.append(
            {
                "turn": t + 1,
                "wrong_to_right": w2r,
                "right_to_wrong": r2w,
                "wrong_to_right_rate": w2r / wrong_before if wrong_before else 0.0,
                "right_to_wrong_rate": r2w / right_before if right_before else 0.0,
            }
        )
    return out

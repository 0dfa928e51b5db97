"""Discussion metrics: per-turn team accuracy by majority vote, per-agent accuracy, answer transitions, and when
each agent keeps its answer."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import numpy as np


def vote(answers: Sequence[str | None]) -> tuple[list[str], dict[str, int]]:
    """The tied top-voted answers (in the order agents gave them) and every answer's votes.

    The team's rule, everywhere: agents without a parsable answer do not vote, and a tie among the leaders is broken
    uniformly at random. ``majority_credit`` scores that rule's expectation; ``team_answer`` draws it."""
    votes = Counter(a for a in answers if a is not None)
    top = max(votes.values(), default=0)
    return [a for a, n in votes.items() if n == top], dict(votes)


def majority_credit(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Credit for one question and turn: the share of the tied leaders that are right (the chance that the team's
    tie-break picks a right one); a question with no votes earns 0."""
    leaders, _ = vote(answers)
    if not leaders:
        return 0.0
    right = {a for a, ok in zip(answers, correct) if ok and a is not None}
    return sum(a in right for a in leaders) / len(leaders)


def team_answer(answers: Sequence[str | None], question_id: str) -> str | None:
    """The team's one answer: the vote's leader, a tie drawn with a generator seeded by the question, so one question
    always gets the same answer and over many questions the served accuracy is what ``majority_credit`` reports."""
    leaders, _ = vote(answers)
    return random.Random(question_id).choice(leaders) if leaders else None


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


def deferral(answers: np.ndarray, correct: np.ndarray) -> list[dict[str, object]]:
    """Per turn t >= 2, per agent: how often it kept its turn t-1 answer when that was right, and when it was wrong.
    An agent that knows when to defer keeps the first and drops the second; one that keeps or adopts at random keeps
    both alike (None: no such answer)."""
    def rate(kept: np.ndarray) -> float | None:
        return float(kept.mean()) if kept.size else None

    out = []
    for t in range(1, correct.shape[2]):
        kept, right = answers[:, :, t] == answers[:, :, t - 1], correct[:, :, t - 1].astype(bool)
        out.append({"turn": t + 1,
                    "kept_when_right": [rate(kept[right[:, a], a]) for a in range(correct.shape[1])],
                    "kept_when_wrong": [rate(kept[~right[:, a], a]) for a in range(correct.shape[1])]})
    return out

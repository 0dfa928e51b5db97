"""The user messages of a discussion. Warm-start data and rollouts both use these, so models see one format.

The text never ends with a space: a BPE tokenizer merges a space with the following number, so a trailing space
would ask the model for a token it never produced in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mapoco.tasks import Problem, instruction


@dataclass(frozen=True)
class PeerAnswer:
    agent: int  # 0-based index in the team
    text: str
    score: float | None = None  # verifier score, shown when the discussion uses reward feedback


def first_turn_message(problem: Problem) -> str:
    return f"{problem.question} {instruction(problem.kind)}"


def later_turn_message(problem: Problem, peers: Sequence[PeerAnswer]) -> str:
    """A later turn: the visible peers' previous answers, then the question again (a lone agent just re-checks)."""
    lines = ["Answers from the other agents:"] if peers else []
    for peer in peers:
        score = "" if peer.score is None else f" (verifier score {peer.score:.2f})"
        lines.append(f"Agent {peer.agent + 1}{score}: {peer.text.strip()}")
    lines.append(f"Check them against your own answer and answer again. {problem.question} {instruction(problem.kind)}")
    return "\n".join(lines)

"""What a co-training method brings to the trainer's loop. The loop itself (learner groups, updates, weight syncs,
checkpoints, resume, logging, faults) is the trainer's and the same for every method; a method says how a batch of
questions becomes a rollout, rewards and each policy's token batch, and how it evaluates and reports.

Two methods implement it: MAPoRL's discussion (``mapoco.training.discussion_method``) and the Conductor
(``mapoco.conductor.method``). The trainer holds one; neither is a subclass of the other or of the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mapoco.config import RunConfig
from mapoco.rollout.discussion import Team
from mapoco.rollout.verifier import VerifierClient
from mapoco.tasks import Problem
from mapoco.training.batch import AgentBatch


class RolloutResult(Protocol):
    """A finished rollout: the questions it sampled (one per sample) and how long generating and verifying took."""

    problems: list[Problem]
    seconds: dict[str, float]


class Method(Protocol):
    """One run's method, built by the trainer once its team and verifier are up (``MethodClass``)."""

    def value_turns(self) -> int:
        """Outputs of each learner's value head (one per turn a policy is trained on)."""

    def rollout(self, problems: list[Problem], seed: int) -> RolloutResult:
        """Every question ``algorithm.samples_per_question`` times (``batch.with_samples``), sampled with ``seed``."""

    def rewards(self, result: RolloutResult) -> np.ndarray:
        """The reward of everything ``result`` holds, computed once: the batches and the metrics read it."""

    def batches(self, result: RolloutResult, rewards: np.ndarray,
                policies: dict[str, list[int]]) -> dict[str, AgentBatch]:
        """Per policy (name -> the seats it plays): its rows, keyed by each sample's group (``Problem.group``)."""

    def evaluate(self, label: str) -> dict[str, Any]:
        """The held-out evaluation: printed as a table, its transcripts written; returns its summary."""

    def eval_metrics(self, summary: dict[str, Any]) -> dict[str, float]:
        """What of an evaluation's summary goes to wandb (``eval/...``)."""

    def rollout_metrics(self, result: RolloutResult, rewards: np.ndarray) -> dict[str, float]:
        """What of a training rollout goes to wandb (``rollout/...``, ``perf/...``)."""

    def progress(self, metrics: dict[str, float], policies: list[str]) -> str:
        """The method's part of a step's progress line (the trainer adds the step, its time and any sync drift)."""

    def samples(self, result: RolloutResult, step: int) -> tuple[str, list[str], list[list[Any]]]:
        """A few samples of the step for wandb: (table name, columns, rows)."""

    def summary(self, before: dict[str, Any] | None, after: dict[str, Any], steps: int) -> dict[str, Any]:
        """The run's summary (summary.json), its figures written and its closing table printed."""

    def close(self) -> None:
        """Releases what the method started (the trainer releases the team, learners and verifier)."""


# How the trainer builds its method: ``method_class(cfg, out, team, verifier, eval_problems)``.
MethodClass = Callable[[RunConfig, Path, Team, VerifierClient, list[Problem]], Method]

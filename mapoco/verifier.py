"""Verifier actor: scores (question, answer) pairs in [0, 1] with rules (gold answer) or a learned model.

Calls are batched. A sample that raises or runs past ``timeout_s`` gets no score and an error string instead:
it is flagged, reported and excluded, while the rest of the batch goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from dataclasses import dataclass

import ray

from mapoco.answers import extract_answer, is_correct
from mapoco.config import VerifierConfig

logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that we own the timeout


@dataclass(frozen=True)
class VerifyItem:
    question: str
    response: str
    gold: str
    kind: str = "math"


@dataclass(frozen=True)
class Verdict:
    score: float | None  # the reward signal: rule 0/1 or the learned verifier's probability
    correct: bool = False  # against the gold answer, for metrics and incentives
    error: str | None = None

    @property
    def flagged(self) -> bool:
        return self.score is None


def check_gold(item: VerifyItem) -> bool:
    return is_correct(extract_answer(item.response, item.kind), item.gold, item.kind)


class Verifier:
    """The actor body. Gold checks run per sample in worker threads so one hung sample times out alone."""

    def __init__(self, cfg: VerifierConfig):
        self.cfg = cfg
        self.model = None
        if cfg.kind == "learned":
            from mapoco.learned_verifier import LearnedVerifier

            self.model = LearnedVerifier.load(cfg.path)

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        checks = self._check_gold(items)
        learned = self._score_learned(items) if self.model is not None else None
        verdicts = []
        for i, (correct, error) in enumerate(checks):
            if learned is not None and error is None:
                score, error = learned[i]
            else:
                score = None if error else float(correct)
            verdicts.append(Verdict(score, bool(correct), error))
        return verdicts

    def _score_learned(self, items: list[VerifyItem]) -> list[tuple[float | None, str | None]]:
        scores: list[tuple[float | None, str | None]] = []
        for start in range(0, len(items), self.cfg.batch_size):
            batch = items[start : start + self.cfg.batch_size]
            try:
                scores += [(s, None) for s in self.model.score([(i.question, i.response) for i in batch])]
            except Exception as exc:  # a broken batch is reported, the next one still runs
                scores += [(None, f"{type(exc).__name__}: {exc}") for _ in batch]
        return scores

    def _check_gold(self, items: list[VerifyItem]) -> list[tuple[bool, str | None]]:
        pool = cf.ThreadPoolExecutor(max_workers=4)
        futures = [pool.submit(check_gold, item) for item in items]
        checks: list[tuple[bool, str | None]] = []
        for future in futures:
            try:
                checks.append((future.result(timeout=self.cfg.timeout_s), None))
            except cf.TimeoutError:
                checks.append((False, f"timed out after {self.cfg.timeout_s}s"))
            except Exception as exc:
                checks.append((False, f"{type(exc).__name__}: {exc}"))
        pool.shutdown(wait=False, cancel_futures=True)  # hung threads are abandoned, not awaited
        return checks


class VerifierClient:
    """Controller-side handle: one call per batch, bounded by a deadline proportional to the batch."""

    def __init__(self, cfg: VerifierConfig):
        self.cfg = cfg
        self.restarts = 0
        self.actor = self._start()

    def _start(self) -> ray.actor.ActorHandle:
        return ray.remote(Verifier).options(num_cpus=self.cfg.num_cpus).remote(self.cfg)

    def _restart(self) -> None:
        """A timed-out check may still be spinning in an abandoned thread: replace the whole actor."""
        ray.kill(self.actor)
        self.actor = self._start()
        self.restarts += 1

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        if not items:
            return []
        deadline = self.cfg.timeout_s * (1 + len(items) / 4) + 60
        try:
            verdicts = ray.get(self.actor.score.remote(items), timeout=deadline)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            verdicts = [Verdict(None, False, f"verifier call failed: {type(exc).__name__}") for _ in items]
        if any(v.flagged and "timed out" in (v.error or "") or "call failed" in (v.error or "") for v in verdicts):
            self._restart()
        return verdicts

    def shutdown(self) -> None:
        ray.kill(self.actor)

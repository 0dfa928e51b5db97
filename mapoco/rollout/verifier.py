"""Verifier actor: scores (question, answer) pairs in [0, 1] with rules (gold answer) or a learned model.

Calls are batched. A sample that raises or runs past ``timeout_s`` gets no score and an error string instead:
it is flagged, reported and excluded, while the rest of the batch goes on. Gold checks run in worker processes,
not threads: a pathological answer (``9^{9^{9^{9}}}``) sends sympy into C code that holds the GIL, so only
killing the process frees the verifier.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass

import ray

from mapoco.answers import extract_answer, is_correct
from mapoco.config import VerifierConfig
from mapoco.runtime.devices import visible_devices_env
from mapoco.runtime.logs import capture_output

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


class GoldChecker:
    """A pool of worker processes for gold checks. A check past its timeout gets the pool killed and rebuilt.

    Workers are forked (spawn/forkserver children would re-import Ray's worker ``__main__``), after the
    checkers are imported and warmed here, so a rebuild costs milliseconds. The children never touch Ray.
    """

    def __init__(self, workers: int, timeout_s: float):
        self.workers, self.timeout_s = workers, timeout_s
        self.restarts = 0
        self.context = mp.get_context("fork")
        _warm_up(0)
        self.pool = self._start()

    def _start(self) -> mp.pool.Pool:
        pool = self.context.Pool(self.workers)
        pool.map(_warm_up, range(self.workers))  # the first timed check must not pay for process start-up
        return pool

    def check(self, items: list[VerifyItem]) -> list[tuple[bool, str | None]]:
        results: dict[int, tuple[bool, str | None]] = {}
        pending = list(range(len(items)))
        while pending:  # each pass settles at least one item, so this ends
            running = {i: self.pool.apply_async(check_gold, (items[i],)) for i in pending}
            pending = []
            for i, job in running.items():
                if i in results:
                    continue
                try:
                    results[i] = (job.get(timeout=self.timeout_s), None)
                except mp.TimeoutError:
                    results[i] = (False, f"timed out after {self.timeout_s}s")
                    pending = self._salvage(running, results)
                    self.restart()
                    break
                except Exception as exc:
                    results[i] = (False, f"{type(exc).__name__}: {exc}")
        return [results[i] for i in range(len(items))]

    @staticmethod
    def _salvage(running: dict, results: dict) -> list[int]:
        """Keep the finished checks of a pool about to be killed; return the ones to run again."""
        again = []
        for i, job in running.items():
            if i in results:
                continue
            if not job.ready():
                again.append(i)
            elif job.successful():
                results[i] = (job.get(), None)
            else:
                again.append(i)  # its error is re-raised, and reported, on the next pass
        return again

    def restart(self) -> None:
        self.pool.terminate()
        self.pool = self._start()
        self.restarts += 1

    def close(self) -> None:
        self.pool.terminate()


def _warm_up(_: int) -> None:
    check_gold(VerifyItem("", "\\boxed{1}", "1"))


class Verifier:
    """The actor body: rule checks against the gold answer, and the learned model's score when configured."""

    def __init__(self, cfg: VerifierConfig):
        capture_output("verifier")
        self.cfg = cfg
        self.gold = GoldChecker(cfg.workers, cfg.timeout_s)
        self.model = None
        if cfg.kind == "learned":
            from mapoco.rollout.learned_verifier import LearnedVerifier

            self.model = LearnedVerifier.load(cfg.path)

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        checks = self.gold.check(items)
        learned = self._score_learned(items) if self.model is not None else None
        verdicts = []
        for i, (correct, error) in enumerate(checks):
            if learned is not None and error is None:
                score, error = learned[i]
            else:
                score = None if error else float(correct)
            verdicts.append(Verdict(score, bool(correct), error))
        return verdicts

    def restarts(self) -> int:
        return self.gold.restarts

    def _score_learned(self, items: list[VerifyItem]) -> list[tuple[float | None, str | None]]:
        scores: list[tuple[float | None, str | None]] = []
        for start in range(0, len(items), self.cfg.batch_size):
            batch = items[start : start + self.cfg.batch_size]
            try:
                scores += [(s, None) for s in self.model.score([(i.question, i.response) for i in batch])]
            except Exception as exc:  # a broken batch is reported, the next one still runs
                scores += [(None, f"{type(exc).__name__}: {exc}") for _ in batch]
        return scores


class VerifierClient:
    """Controller-side handle: one call per batch, bounded by a deadline proportional to the batch.

    Timed-out samples are handled inside the actor; the client replaces the actor only when a whole call fails
    (the actor died or missed the deadline), flagging that batch.
    """

    def __init__(self, cfg: VerifierConfig):
        self.cfg = cfg
        self.actor_restarts = 0
        self.actor = self._start()

    def _start(self) -> ray.actor.ActorHandle:
        return ray.remote(Verifier).options(num_cpus=self.cfg.num_cpus, runtime_env={
            "env_vars": visible_devices_env(0)}).remote(self.cfg)

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        if not items:
            return []
        deadline = self.cfg.timeout_s * (1 + len(items) / self.cfg.workers) + 60
        try:
            return ray.get(self.actor.score.remote(items), timeout=deadline)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as exc:
            ray.kill(self.actor)
            self.actor = self._start()
            self.actor_restarts += 1
            return [Verdict(None, False, f"verifier call failed: {type(exc).__name__}") for _ in items]

    def checker_restarts(self) -> int:
        """How many times a hung gold check got the worker pool killed (since the actor started)."""
        return ray.get(self.actor.restarts.remote())

    def shutdown(self) -> None:
        ray.kill(self.actor)

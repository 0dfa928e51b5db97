"""The team answering questions: a served request becomes a discussion (the last turn's majority vote) or a
Conductor workflow on the team's engines, seeded per request as in training and evaluation.

Discussions are batched turn by turn, not request by request: every step generates the next turn of every question
in discussion, and a question that arrives joins at the next step, whatever turn the others are at. Clients that
wait for their answers before sending again therefore never split into half-empty batches that take turns on the
engines (what batching whole discussions does: the requests that arrive while one batch runs form the next). A
conductor's rollouts, several rounds with workers in between, are batched whole: the questions waiting when the
previous rollout ends, one rollout per seed."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapoco.config import RunConfig
from mapoco.evaluation.metrics import team_answer, vote
from mapoco.rollout.verifier import Verdict, VerifyItem
from mapoco.serving.restore import push_checkpoint
from mapoco.tasks import Problem

TASK_KINDS = {"anli": "nli"}  # the answer format of a task (every other task answers a number)


class Listener:
    """A streaming client's side of one question: the batch's thread hands it each step as it completes (onto the
    client's event loop) and reads whether the client still waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index
        self.cancelled = threading.Event()

    def emit(self, event: dict[str, Any]) -> None:
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))


@dataclass(frozen=True)
class Question:
    id: str  # the sampling seeds' key (see the module docstring)
    text: str
    seed: int
    sampling: tuple[tuple[str, Any], ...] = ()  # SamplingConfig fields the client set, for every agent and turn
    listener: Listener | None = field(default=None, compare=False)  # a streaming client's

    def emit(self, event: dict[str, Any]) -> None:
        if self.listener is not None:
            self.listener.emit(event)

    @property
    def wanted(self) -> bool:
        return self.listener is None or not self.listener.cancelled.is_set()


def question_id(text: str) -> str:
    return "chat-" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class NullVerifier:
    """Served questions have no gold answer: nothing is scored (peers' scores are never shown)."""

    def score(self, items: list[VerifyItem]) -> list[Verdict]:
        return [Verdict(None, False, None) for _ in items]


def boxed(answer: str) -> str:
    return f"\\boxed{{{answer}}}"


def _usage(pairs: Sequence[tuple[list[int], list[int]]]) -> dict[str, int]:
    prompt, completion = sum(len(p) for p, _ in pairs), sum(len(c) for _, c in pairs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Pending:
    """A question on its way through the team: ``deliver`` gets its result (or the exception that stopped it)."""

    question: Question
    deliver: Callable[[dict[str, Any] | BaseException], None]
    index: int = -1  # in the discussion
    batch: int = 0  # the most questions it shared a step with
    left: threading.Event = field(default_factory=threading.Event)  # its client stopped waiting

    @property
    def cancelled(self) -> bool:
        return self.left.is_set() or not self.question.wanted


class ServedTeam:
    """The team's engines with the checkpoint's weights, answering questions: ``take`` new ones, ``advance`` while
    ``busy`` (blocking calls; ``serve_forever`` runs both from a queue, ``answer`` for a list).
    ``team``: engines already running to serve with (tests share them); by default it starts its own."""

    def __init__(self, cfg: RunConfig, checkpoint: Path, team: Any = None):
        from mapoco.rollout.discussion import Team

        self.cfg = cfg
        self.kind = TASK_KINDS.get(cfg.task.name, "math")
        self.owns_team = team is None
        self.team = team or Team.of_run(cfg, wait=False)  # the checkpoint's weights are read while the engines load
        self.runner = None
        self.discussion, self.active = None, {}
        self.dropped = 0  # questions left unfinished because their client went away
        try:
            push_checkpoint(self.team, cfg, checkpoint)
            self.team.wait_ready()  # frozen agents' engines, which got no weights
            if cfg.method == "conductor":
                from mapoco.conductor.rollout import ConductorRunner

                self.runner = ConductorRunner(self.team, cfg.conductor, NullVerifier())
        except BaseException:
            self.shutdown()
            raise

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def room(self) -> int:
        """How many more questions can join the discussion now (``serve.max_batch_size`` in all)."""
        return self.cfg.serve.max_batch_size - len(self.active)

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        """These questions together, to the end (blocking); a dropped one's result is ``{"dropped": True}``."""
        results: list[Any] = [None] * len(questions)

        def keep(i: int) -> Callable[[dict[str, Any] | BaseException], None]:
            return lambda result: results.__setitem__(i, result)

        self.take([Pending(q, keep(i)) for i, q in enumerate(questions)])
        while self.busy:
            self.advance()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def serve_forever(self, inbox: queue.Queue[Pending | None], wait_s: float) -> None:
        """Answer what comes into ``inbox`` until it holds None: an idle team waits ``wait_s`` after a first question
        for others to start with it; a busy one takes whatever has arrived before each step."""
        while True:
            if not self.busy:
                first = inbox.get()
                if first is None:
                    return
                new = [first, *_drain(inbox, self.cfg.serve.max_batch_size - 1, wait_s)]
            else:
                new = _drain(inbox, self.room, 0.0)
            if None in new:
                return
            try:
                self.take(new)
                self.advance()
            except Exception as exc:  # the engines restart themselves on the next call: the team stays up
                waiting = {id(p): p for p in [*new, *self.active.values()]}  # a conductor's new ones are not active
                self.discussion, self.active = None, {}
                for pending in waiting.values():
                    pending.deliver(exc)

    def take(self, new: Sequence[Pending]) -> None:
        """New questions: a conductor answers them at once (one rollout per seed), a discussion starts them with its
        next step."""
        if self.runner is not None:
            by_seed: dict[int, list[Pending]] = {}
            for pending in new:
                by_seed.setdefault(pending.question.seed, []).append(pending)
            for seed, group in by_seed.items():
                for pending, result in zip(group, self._conduct([p.question for p in group], seed)):
                    pending.deliver({**result, "batch": len(group)})
            return
        from mapoco.rollout.discussion import Discussion

        if self.discussion is None:  # a fresh one whenever the team was idle: nothing of earlier questions stays
            self.discussion = Discussion(self.team, self.cfg.turns, self.cfg.discussion, NullVerifier())
        for pending in new:
            q = pending.question
            pending.index = self.discussion.add(Problem(q.id, q.text, gold="", kind=self.kind), q.seed,
                                                dict(q.sampling))
            self.active[pending.index] = pending

    def advance(self) -> None:
        """One step: drop the questions whose client left, then the next turn of every other one; deliver the
        finished ones."""
        for index, pending in list(self.active.items()):
            if pending.cancelled:
                self._finish(pending, {"dropped": True, "batch": pending.batch})
                self.dropped += 1
        if not self.active:
            return
        names = [a.cfg.name for a in self.team.agents]
        questions = list(self.active)
        self.discussion.step(questions)
        records = self.discussion.result.records
        for q in questions:
            pending = self.active[q]
            pending.batch = max(pending.batch, len(questions))
            turn = self.discussion.next_turn[q] - 1
            for a in range(len(names)):
                pending.question.emit(turn_event(records[(q, a, turn)], names))
            if self.discussion.finished(q):
                result = discussion_answer(self.discussion.result, q, names)
                self._finish(pending, {**result, "batch": pending.batch})

    def _finish(self, pending: Pending, result: dict[str, Any]) -> None:
        del self.active[pending.index]
        self.discussion.forget(pending.index)
        if not self.active:
            self.discussion = None
        pending.deliver(result)

    def _conduct(self, questions: Sequence[Question], seed: int) -> list[dict[str, Any]]:
        from mapoco.conductor.rollout import transcript

        problems = [Problem(q.id, q.text, gold="", kind=self.kind) for q in questions]
        result = self.runner.rollout(problems, seed, verify=False, on_step=lambda i, event: questions[i].emit(event))
        out = []
        for problem, record in zip(problems, result.records):
            final = record.job.answer() if record.job else "[malformed workflow]"
            workflow = {k: v for k, v in transcript(problem, record).items() if k not in ("gold", "correct", "reward")}
            out.append({"content": boxed(record.answer) if record.answer is not None else final,
                        "answer": record.answer,
                        "usage": _usage([(t.prompt_ids, t.token_ids) for t in record.turns]),  # the conductor's
                        "transcript": {"workflow": workflow}})
        return out

    def engine_pids(self) -> list[int]:
        return [pid for engines in self.team.distinct_engines() for pid in engines.call_all("pid")]

    def unfinished_requests(self) -> int:
        return sum(n for engines in self.team.distinct_engines() for n in engines.call_all("unfinished_requests"))

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self.owns_team:
            self.team.shutdown()


def _drain(inbox: queue.Queue, most: int, wait_s: float) -> list[Any]:
    """Up to ``most`` items: those already in ``inbox``, and those that arrive within ``wait_s``."""
    out: list[Any] = []
    deadline = time.monotonic() + wait_s
    while len(out) < most:
        try:
            out.append(inbox.get(timeout=max(deadline - time.monotonic(), 0)) if wait_s else inbox.get_nowait())
        except queue.Empty:
            break
    return out


def turn_event(record: Any, names: Sequence[str]) -> dict[str, Any]:
    """A discussion's step as a streaming client gets it: one agent's answer at one turn."""
    return {"type": "turn", "turn": record.turn, "agent": record.agent, "name": names[record.agent],
            "text": record.text, "answer": record.answer, "finish_reason": record.finish_reason}


def discussion_answer(result: Any, q: int, names: Sequence[str]) -> dict[str, Any]:
    """Question ``q`` of a discussion: the last turn's majority vote, every answer of every turn, token counts."""
    turns = range(result.num_turns)
    agents = range(result.num_agents)
    final = [result.records[(q, a, result.num_turns - 1)] for a in agents]
    answers = [r.answer for r in final]
    answer, (_, votes) = team_answer(answers, final[0].question_id), vote(answers)
    transcript = [[{"agent": a, "name": names[a], "text": r.text, "answer": r.answer, "finish_reason": r.finish_reason}
                   for a, r in ((a, result.records[(q, a, t)]) for a in agents)] for t in turns]
    records = [result.records[(q, a, t)] for a in agents for t in turns]
    return {"content": boxed(answer) if answer is not None else final[0].text, "answer": answer, "votes": votes,
            "usage": _usage([(r.prompt_ids, r.token_ids) for r in records]), "transcript": {"discussion": transcript}}

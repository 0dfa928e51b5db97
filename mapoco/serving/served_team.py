"""The team answering questions: a served request becomes a discussion (the last turn's majority vote) or a
Conductor workflow on the team's engines, seeded per request as in training and evaluation."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Sequence
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


class ServedTeam:
    """The team's engines with the checkpoint's weights, answering batches of questions (blocking calls).
    ``team``: engines already running to serve with (tests share them); by default it starts its own."""

    def __init__(self, cfg: RunConfig, checkpoint: Path, team: Any = None):
        from mapoco.rollout.discussion import Team

        self.cfg = cfg
        self.kind = TASK_KINDS.get(cfg.task.name, "math")
        self.owns_team = team is None
        self.team = team or Team.of_run(cfg, wait=False)  # the checkpoint's weights are read while the engines load
        self.runner = None
        self.dropped = 0  # questions left unfinished because their streaming client went away
        try:
            push_checkpoint(self.team, cfg, checkpoint)
            self.team.wait_ready()  # frozen agents' engines, which got no weights
            if cfg.method == "conductor":
                from mapoco.conductor.rollout import ConductorRunner

                self.runner = ConductorRunner(self.team, cfg.conductor, NullVerifier())
        except BaseException:
            self.shutdown()
            raise

    def answer(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        """One result per question (``{"dropped": True}`` for a question whose client left before its end). A
        discussion holds every question, each with its own seed and sampling; conductor rollouts group them by
        seed."""
        if self.runner is None:
            out = self._discuss(questions)
        else:
            out = [{} for _ in questions]
            by_seed: dict[int, list[int]] = {}
            for i, question in enumerate(questions):
                by_seed.setdefault(question.seed, []).append(i)
            for seed, indices in by_seed.items():
                for i, answer in zip(indices, self._conduct([questions[i] for i in indices], seed)):
                    out[i] = answer
        return [{**answer, "batch": len(questions)} for answer in out]

    def _discuss(self, questions: Sequence[Question]) -> list[dict[str, Any]]:
        from mapoco.rollout.discussion import ClientRequests, run_discussion

        names = [a.cfg.name for a in self.team.agents]
        out = []
        size = self.cfg.discussion.batch_size
        for start in range(0, len(questions), size):
            part = questions[start : start + size]
            problems = [Problem(q.id, q.text, gold="", kind=self.kind) for q in part]
            requests = ClientRequests(
                [q.seed for q in part], [dict(q.sampling) for q in part],
                on_answer=lambda q, record: part[q].emit(turn_event(record, names)),
                wanted=lambda q: part[q].wanted)
            result = run_discussion(self.team, problems, self.cfg.turns, self.cfg.discussion, NullVerifier(), 0,
                                    requests)
            for q in range(len(part)):
                finished = (q, 0, self.cfg.turns - 1) in result.records
                self.dropped += not finished
                out.append(discussion_answer(result, q, names) if finished else {"dropped": True})
        return out

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

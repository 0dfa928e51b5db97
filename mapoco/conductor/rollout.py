"""The Conductor's rollout: one conductor LLM writes a workflow per question, a pool of frozen workers runs it.

For a batch of questions: draw each question's worker pool (all workers, or a random renumbered subset), ask the
conductor for a workflow, parse it, run every parsed workflow round by round (a round's steps from all questions
go to their workers together, every worker at once), verify the last step's answer and score the plan (0
malformed, 0.5 wrong, 1 right, less ``conductor.cost_weight`` times what its calls cost over
``conductor.cost_scale``). The conductor's exact prompt/token ids and logprobs are kept for GRPO.

Evaluation baselines run through the same executor: each worker alone (a one-step plan), majority vote over
their answers, and a random well-formed workflow.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mapoco.answers import extract_answer
from mapoco.conductor.workers import (
    HttpWorker,
    LocalWorker,
    Pending,
    Ready,
    Reply,
    Thread,
    Worker,
)
from mapoco.conductor.workflow import (
    Parsed,
    Plan,
    conductor_message,
    conductor_reward,
    flow_lists,
    parse_workflow,
    random_plan,
    replan_message,
    single_step,
    turn_rewards,
    waves,
    worker_thread,
)
from mapoco.config import ConductorConfig
from mapoco.evaluation.metrics import majority_credit
from mapoco.rollout.discussion import AgentRuntime, Team
from mapoco.rollout.engine import Generation, request_seed
from mapoco.rollout.verifier import VerifierClient, VerifyItem
from mapoco.tasks import Problem

# A served question's progress, as it happens: (question index, event) after each plan and each workflow step.
OnStep = Callable[[int, dict[str, Any]], None]


@dataclass
class Job:
    """One workflow to run: the question, the plan, and the question's pool (the plan's ids -> workers)."""

    problem: Problem
    plan: Plan
    pool: dict[int, int] | list[int]  # conductor id -> global worker index (a list: ids are its positions)
    seed: int
    responses: list[Reply | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.pool, dict):
            self.pool = dict(enumerate(self.pool))

    def answer(self) -> str:
        return self.responses[-1].text if self.responses and self.responses[-1] else ""

    def cost(self) -> float:
        return sum(r.cost for r in self.responses if r)


@dataclass
class ConductorTurn:
    """One conductor generation (the plan, or the re-plan), as the learner needs it."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    parsed: Parsed


@dataclass
class ConductorRecord:
    question_id: str
    pool: list[str]  # worker names in the order the conductor saw them
    ids: list[int]  # the id the conductor saw each by ("Model <id>"): its position, or its stable id
    turns: list[ConductorTurn]  # the plan, then the re-plan if any
    job: Job | None  # the workflow that produced the final answer (None: the first plan was malformed)
    answer: str | None
    correct: bool
    reward: float
    cost: float  # of every worker call made for the question (a re-planned workflow's too)
    first_correct: bool | None = None  # with a re-plan round: whether the first workflow's answer was right
    # What each turn earns in training (``workflow.turn_rewards``)
    turn_rewards: list[float] = field(default_factory=list)

    @property
    def malformed(self) -> bool:
        """No answer: the first plan did not parse (a re-plan that does not parse leaves the first one's)."""
        return self.turns[0].parsed.malformed

    def steps(self) -> int:
        return len(self.job.plan.steps) if self.job else 0


@dataclass
class ConductorResult:
    problems: list[Problem]
    records: list[ConductorRecord]
    seconds: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "verify": 0.0})


def standing_plan(turns: Sequence[ConductorTurn]) -> Parsed:
    """The plan whose answer stands: the last that parsed (a new workflow, or accepting), else the first."""
    return next((t.parsed for t in reversed(turns) if not t.parsed.malformed), turns[0].parsed)


class ConductorWorker:
    """The conductor as one of its own workers (recursion): it plans and runs a sub-workflow for the step's
    request, one level deeper; at the depth limit the sub-pool no longer contains it."""

    max_cost = 0.0  # its calls cost what the sub-workflow's do: not a price of its own
    description = ""

    def __init__(self, name: str):
        self.name = name
        self.runner: ConductorRunner | None = None  # set by the runner that owns it
        self.depth = 0  # of the workflow now calling it (0: the top-level one)

    def submit(self, threads: list[Thread], seeds: list[int]) -> Pending:
        assert self.runner is not None
        problems = [Problem(id=f"sub-{seed}", question=_thread_text(t), gold="") for t, seed in zip(threads, seeds)]
        self.depth += 1  # calls nest: the sub-workflow's own steps may call this worker again, one level deeper
        try:
            result = self.runner.rollout(problems, seeds[0] if seeds else 0, depth=self.depth, verify=False)
        finally:
            self.depth -= 1
        return Ready([Reply(r.job.answer() if r.job else "[malformed workflow]", cost=r.cost) for r in result.records])


def _thread_text(thread: Thread) -> str:
    """A sub-question for the recursive conductor: everything the step's worker would have seen, as text."""
    return "\n".join(f"{m['role']}: {m['content']}" if i else m["content"] for i, m in enumerate(thread))


class ConductorRunner:
    """Plans with the conductor (team agent 0) and runs the plans on the pool."""

    def __init__(self, team: Team, cfg: ConductorConfig, verifier: VerifierClient):
        self.conductor: AgentRuntime = team.agents[0]
        self.cfg, self.verifier = cfg, verifier
        self.workers: list[Worker] = [LocalWorker(a) for a in team.agents[1:]]
        self.workers += [HttpWorker(h) for h in cfg.http_workers]
        self.self_index: int | None = None
        if cfg.self_worker:
            me = ConductorWorker(self.conductor.cfg.name)
            me.runner = self
            self.self_index = len(self.workers)
            self.workers.append(me)
        self.cost_scale = cfg.cost_scale or max((w.max_cost for w in self.workers), default=0.0)

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.workers]

    # ------------------------------------------------------------------ pools and plans
    def pool(self, problem: Problem, seed: int, depth: int = 0) -> list[int]:
        """The question's workers, in the order it lists them: everyone, or a random subset in random order that
        holds no held-out pool whole (drawn again until it does not; ``conductor.heldout_pools`` is checked to leave
        such subsets). Every sample of a question draws the same pool, so its GRPO group compares workflows, not
        pools."""
        everyone = [i for i in range(len(self.workers)) if depth < self.cfg.max_depth or i != self.self_index]
        if not self.cfg.random_pools:
            return everyone
        rng = random.Random(request_seed(seed, problem.group_id, "pool"))  # a question's samples: one GRPO group
        heldout = [{self.names.index(name) for name in pool} for pool in self.cfg.heldout_pools]
        while True:
            drawn = rng.sample(everyone, rng.randint(min(self.cfg.min_pool, len(everyone)), len(everyone)))
            if not any(held <= set(drawn) for held in heldout):
                return drawn

    def ids(self, pool: Sequence[int]) -> list[int]:
        """What the conductor calls the pool's workers: their stable ids (``conductor.pool_ids=stable``: a worker's
        index in the team, in every pool), or their positions in this pool (``renumbered``)."""
        return list(pool) if self.cfg.pool_ids == "stable" else list(range(len(pool)))

    def named_pool(self, names: Sequence[str]) -> list[int]:
        """A pool given by worker names, numbered for the conductor in that order."""
        return [self.names.index(name) for name in names]

    def cards(self, pool: Sequence[int]) -> list[str]:
        return [self.workers[w].description for w in pool]

    def generate_plans(self, threads: list[Thread], seeds: list[int]) -> list[Generation]:
        return self.conductor.generate(threads, seeds)

    # ------------------------------------------------------------------ execution
    def execute(self, jobs: Sequence[Job], on_reply: Callable[[Job, int], None] | None = None) -> None:
        """Run every job's steps round by round; each round sends all its steps to their workers at once.
        ``on_reply(job, step)`` as each step's reply arrives."""
        rounds = [waves(job.plan) for job in jobs]
        for job in jobs:
            job.responses = [None] * len(job.plan.steps)
        for r in range(max((max(w) for w in rounds if w), default=-1) + 1):
            batches: dict[int, list[tuple[Job, int]]] = {}
            for job, job_rounds in zip(jobs, rounds):
                for i, step_round in enumerate(job_rounds):
                    if step_round == r:
                        batches.setdefault(job.pool[job.plan.steps[i].worker], []).append((job, i))
            pending: dict[int, Pending] = {}
            for worker, steps in batches.items():
                threads = [worker_thread(job.problem, job.plan, i, [x.text if x else None for x in job.responses])
                           for job, i in steps]
                seeds = [request_seed(job.seed, job.problem.id, "step", i) for job, i in steps]
                pending[worker] = self.workers[worker].submit(threads, seeds)
            for worker, steps in batches.items():
                for (job, i), reply in zip(steps, pending[worker].result()):
                    job.responses[i] = reply
                    if on_reply is not None:
                        on_reply(job, i)

    def verify(self, problems: Sequence[Problem], answers: Sequence[str]) -> list[bool]:
        items = [VerifyItem(p.question, a, p.gold, p.kind) for p, a in zip(problems, answers)]
        return [bool(v.correct) for v in self.verifier.score(items)] if items else []

    # ------------------------------------------------------------------ the rollout
    def rollout(self, problems: Sequence[Problem], seed: int, depth: int = 0, verify: bool = True,
                pool: Sequence[str] | None = None, on_step: OnStep | None = None) -> ConductorResult:
        """``pool``: every question asks these workers (by name, in this order); by default each draws its own.
        ``on_step``: called with each plan and each step's reply as they come (``mapoco serve`` streams them)."""
        result = ConductorResult(list(problems), [])
        start = time.perf_counter()
        pools = [self.named_pool(pool) for _ in problems] if pool else [self.pool(p, seed, depth) for p in problems]
        ids = [self.ids(workers) for workers in pools]
        threads = [[{"role": "user", "content": conductor_message(p.question, shown, self.cfg.examples,
                                                                  self.cards(workers))}]
                   for p, workers, shown in zip(problems, pools, ids)]
        turns = self._plan(threads, [request_seed(seed, p.id, "plan") for p in problems], ids)
        jobs = [Job(p, t.parsed.plan, dict(zip(shown, workers)), seed) if t.parsed.plan else None
                for p, t, workers, shown in zip(problems, turns, pools, ids)]
        progress = Progress(on_step, problems, self.names)
        progress.plans(range(len(problems)), turns, 1)
        self.execute([j for j in jobs if j], progress.reply)
        histories = [[t] for t in turns]
        conversations = [list(thread) for thread in threads]
        spent = [job.cost() if job else 0.0 for job in jobs]
        standing: list[list[float]] = [[] for _ in problems]  # what accepting would earn after each round
        first_correct: list[bool | None] = [None] * len(problems)
        for round_index in range(1, self.cfg.max_rounds):
            asked = [i for i, turns_so_far in enumerate(histories) if turns_so_far[-1].parsed.plan is not None]
            if not asked:
                break
            if verify:  # what a re-plan changes: the standing answers, scored before it
                correct = self._correct(problems, jobs)
                first_correct = correct if round_index == 1 else first_correct
                for i, ok in enumerate(correct):
                    standing[i].append(conductor_reward(standing_plan(histories[i]), ok, self.cost_penalty(spent[i])))
            for i, job in self._replan(problems, conversations, histories, jobs, asked, seed, round_index,
                                       progress).items():
                spent[i] += job.cost()
                jobs[i] = job
        result.seconds["generate"] = time.perf_counter() - start
        start = time.perf_counter()
        correct = self._correct(problems, jobs) if verify else [False] * len(problems)
        result.seconds["verify"] = time.perf_counter() - start
        for i, problem in enumerate(problems):
            job, ok, turns = jobs[i], correct[i], histories[i]
            reward = conductor_reward(standing_plan(turns), ok, self.cost_penalty(spent[i]))
            result.records.append(ConductorRecord(
                problem.id, [self.names[w] for w in pools[i]], ids[i], turns, job,
                extract_answer(job.answer(), problem.kind) if job else None, ok, reward, spent[i], first_correct[i],
                turn_rewards([*standing[i], reward], len(turns), self.cfg.replan_reward) if verify else []))
        return result

    def _correct(self, problems: Sequence[Problem], jobs: Sequence[Job | None]) -> list[bool]:
        """Whether each job's answer is right (no job: wrong)."""
        answered = [i for i, job in enumerate(jobs) if job]
        answers = [jobs[i].answer() for i in answered]
        verdicts = dict(zip(answered, self.verify([problems[i] for i in answered], answers)))
        return [verdicts.get(i, False) for i in range(len(problems))]

    def cost_penalty(self, cost: float) -> float:
        """What ``cost`` takes off the reward: ``cost_weight`` times the cost in units of ``cost_scale``."""
        return self.cfg.cost_weight * cost / self.cost_scale if self.cost_scale > 0 else 0.0

    def _plan(self, threads: list[Thread], seeds: list[int], ids: list[list[int]]) -> list[ConductorTurn]:
        generations = self.generate_plans(threads, seeds)
        return [ConductorTurn(g.prompt_ids, g.token_ids, g.logprobs, g.text,
                              parse_workflow(g.text, shown, self.cfg.max_steps))
                for g, shown in zip(generations, ids)]

    def _replan(self, problems: Sequence[Problem], conversations: list[Thread], histories: list[list[ConductorTurn]],
                jobs: list[Job | None], asked: list[int], seed: int, round_index: int, progress: Progress
                ) -> dict[int, Job]:
        """One more round for the questions ``asked``: the conductor sees its last workflow's answer and accepts it
        (three empty lists) or replaces the workflow, whose new job runs and is returned. A re-plan that does not
        parse changes nothing: the answer before it stands, as if accepted, and the question plans no more."""
        for i in asked:
            conversations[i] += [{"role": "assistant", "content": histories[i][-1].text},
                                 {"role": "user", "content": replan_message(jobs[i].answer())}]
        key = ("replan",) if round_index == 1 else ("replan", round_index)
        turns = self._plan([conversations[i] for i in asked], [request_seed(seed, problems[i].id, *key) for i in asked],
                           [list(jobs[i].pool) for i in asked])
        progress.plans(asked, turns, round_index + 1)
        rerun = {}
        for i, turn in zip(asked, turns):
            histories[i].append(turn)
            if turn.parsed.plan is not None:
                rerun[i] = Job(problems[i], turn.parsed.plan, jobs[i].pool, seed + round_index)
        self.execute(list(rerun.values()), progress.reply)
        return rerun

    # ------------------------------------------------------------------ evaluation baselines
    def baselines(self, problems: Sequence[Problem], seed: int, pool: Sequence[str] | None = None) -> dict[str, Any]:
        """Each worker alone on every question, majority vote over them, a random well-formed workflow, and each
        hand-written workflow of ``conductor.fixed_workflows``; on ``pool`` (names, numbered in order) if given,
        else on every worker."""
        everyone = self.named_pool(pool) if pool else [i for i in range(len(self.workers)) if i != self.self_index]
        alone = [[Job(p, single_step(k), everyone, seed) for p in problems] for k in range(len(everyone))]
        rng = random.Random(seed)
        randomized = [Job(p, random_plan(len(everyone), rng, self.cfg.max_steps), everyone, seed) for p in problems]
        plans = [parse_workflow(flow_lists(flow), len(everyone), self.cfg.max_steps).plan
                 for flow in self.cfg.fixed_workflows]
        fixed = [[Job(p, plan, everyone, seed) for p in problems] for plan in plans]
        self.execute([job for jobs in alone + fixed for job in jobs] + randomized)
        fixed_correct = [self.verify(problems, [j.answer() for j in jobs]) for jobs in fixed]
        correct = [self.verify(problems, [j.answer() for j in jobs]) for jobs in alone]
        answers = [[extract_answer(j.answer(), p.kind) for j, p in zip(jobs, problems)] for jobs in alone]
        vote = [majority_credit([a[q] for a in answers], [c[q] for c in correct]) for q in range(len(problems))]
        random_correct = self.verify(problems, [j.answer() for j in randomized])
        n = max(len(problems), 1)
        worker_cost = [sum(j.cost() for j in jobs) / n for jobs in alone]
        return {"workers": [self.names[i] for i in everyone],
                "worker_accuracy": [sum(c) / n for c in correct],
                "worker_cost": worker_cost,
                "majority_vote_accuracy": sum(vote) / n,
                "majority_vote_cost": sum(worker_cost),  # every worker answers every question
                "random_workflow_accuracy": sum(random_correct) / n,
                "random_workflow_cost": sum(j.cost() for j in randomized) / n,
                "fixed_workflows": [plan.lists() for plan in plans],
                "fixed_workflow_accuracy": [sum(c) / n for c in fixed_correct],
                "fixed_workflow_cost": [sum(j.cost() for j in jobs) / n for jobs in fixed]}

    def close(self) -> None:
        for worker in self.workers:
            if isinstance(worker, HttpWorker):
                worker.close()


class Progress:
    """A rollout's plans and step replies as ``on_step`` events, by question index (nothing without ``on_step``)."""

    def __init__(self, on_step: OnStep | None, problems: Sequence[Problem], names: Sequence[str]):
        self.on_step, self.names = on_step, names
        self.index = {id(p): i for i, p in enumerate(problems)}
        self.rounds: dict[int, int] = {}

    def plans(self, questions: Sequence[int], turns: Sequence[ConductorTurn], round_number: int) -> None:
        for i, turn in zip(questions, turns):
            self.rounds[i] = round_number
            if self.on_step is not None:
                self.on_step(i, {"type": "plan", "round": round_number, "text": turn.text,
                                 "accepts": turn.parsed.accepts, "error": turn.parsed.error})

    def reply(self, job: Job, step: int) -> None:
        if self.on_step is None:
            return
        i, reply = self.index[id(job.problem)], job.responses[step]
        self.on_step(i, {"type": "step", "round": self.rounds[i], "step": step,
                         "worker": self.names[job.pool[job.plan.steps[step].worker]],
                         "subtask": job.plan.steps[step].subtask, "text": reply.text, "error": reply.error})


def summarize_conductor(result: ConductorResult) -> dict[str, Any]:
    n = max(len(result.records), 1)
    steps = [r.steps() for r in result.records if r.job]
    return {
        "num_questions": len(result.records),
        "conductor_accuracy": sum(r.correct for r in result.records) / n,
        "malformed_rate": sum(r.malformed for r in result.records) / n,
        "mean_steps": sum(steps) / max(len(steps), 1),  # of the workflows that ran
        "mean_reward": sum(r.reward for r in result.records) / n,
        "mean_cost": sum(r.cost for r in result.records) / n,  # per question
        "worker_share": worker_shares(result.records),
        "gen_tokens": sum(len(t.token_ids) for r in result.records for t in r.turns),
        "prompt_tokens": sum(len(t.prompt_ids) for r in result.records for t in r.turns),
        **replan_summary(result.records),
    }


def worker_shares(records: Sequence[ConductorRecord]) -> dict[str, float]:
    """Of every step the standing workflows ran, the share each worker was asked, by name."""
    asked = Counter(r.pool[r.ids.index(step.worker)] for r in records if r.job for step in r.job.plan.steps)
    total = sum(asked.values())
    return {name: asked[name] / total for name in sorted(asked)}


def replan_summary(records: Sequence[ConductorRecord]) -> dict[str, float]:
    """What a re-plan round did (nothing without one): the first workflows' accuracy, how often the conductor
    accepted their answer or wrote a re-plan that does not parse, and the answers it turned from wrong to right and
    from right to wrong."""
    scored = [r for r in records if r.first_correct is not None]
    if not scored:
        return {}
    n, replanned = len(scored), [r for r in scored if len(r.turns) > 1]
    return {"first_plan_accuracy": sum(r.first_correct for r in scored) / n,
            "replan_accept_rate": sum(r.turns[1].parsed.accepts for r in replanned) / max(len(replanned), 1),
            "replan_malformed_rate": sum(r.turns[1].parsed.malformed for r in replanned) / max(len(replanned), 1),
            "replan_fixed_rate": sum(r.correct and not r.first_correct for r in scored) / n,
            "replan_broke_rate": sum(r.first_correct and not r.correct for r in scored) / n}


def transcript(problem: Problem, record: ConductorRecord) -> dict[str, Any]:
    """One question's workflow as transcripts.jsonl keeps it."""
    job = record.job
    steps = [] if job is None else [
        {"worker": record.pool[record.ids.index(s.worker)], "model_id": s.worker, "subtask": s.subtask,
         "access": s.access(), "response": r.text if r else None, "error": r.error if r else None,
         "cost": r.cost if r else 0.0}
        for s, r in zip(job.plan.steps, job.responses)]
    return {"id": problem.id, "question": problem.question, "gold": problem.gold, "pool": record.pool,
            "ids": record.ids,
            "conductor": [{"text": t.text, "error": t.parsed.error, "accepts": t.parsed.accepts} for t in record.turns],
            "steps": steps, "answer": record.answer, "correct": record.correct, "reward": record.reward,
            "cost": record.cost}

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
from collections.abc import Sequence
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
    Step,
    conductor_message,
    conductor_reward,
    parse_workflow,
    random_plan,
    replan_message,
    single_step,
    waves,
    worker_thread,
)
from mapoco.config import ConductorConfig
from mapoco.evaluation.metrics import majority_credit
from mapoco.rollout.discussion import AgentRuntime, Team
from mapoco.rollout.engine import Generation, request_seed
from mapoco.rollout.verifier import VerifierClient, VerifyItem
from mapoco.tasks import Problem


@dataclass
class Job:
    """One workflow to run: the question, the plan, and the question's pool (plan ids index into it)."""

    problem: Problem
    plan: Plan
    pool: list[int]  # global worker indices
    seed: int
    responses: list[Reply | None] = field(default_factory=list)

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
    pool: list[str]  # worker names in the order the conductor saw them (as Model 0..k-1)
    turns: list[ConductorTurn]  # the plan, then the re-plan if any
    job: Job | None  # the workflow that produced the final answer (None: the first plan was malformed)
    answer: str | None
    correct: bool
    reward: float
    cost: float  # of every worker call made for the question (a re-planned workflow's too)
    first_correct: bool | None = None  # with a re-plan round: whether the first workflow's answer was right
    # What each turn earns in training: the plan its first workflow's outcome, a re-plan the final one (0 if it
    # does not parse), so a re-plan that decides nothing adds no signal to the plan's and no noise
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
    """The plan whose answer stands: the re-plan's if it parsed (a new workflow, or accepting), else the first."""
    return turns[-1].parsed if not turns[-1].parsed.malformed else turns[0].parsed


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
        """The question's workers: everyone, or a random renumbered subset that holds no held-out pool whole
        (drawn again until it does not; ``conductor.heldout_pools`` is checked to leave such subsets). Every sample
        of a question draws the same pool, so its GRPO group compares workflows, not pools."""
        everyone = [i for i in range(len(self.workers)) if depth < self.cfg.max_depth or i != self.self_index]
        if not self.cfg.random_pools:
            return everyone
        rng = random.Random(request_seed(seed, problem.group_id, "pool"))  # a question's samples: one GRPO group
        heldout = [{self.names.index(name) for name in pool} for pool in self.cfg.heldout_pools]
        while True:
            drawn = rng.sample(everyone, rng.randint(min(self.cfg.min_pool, len(everyone)), len(everyone)))
            if not any(held <= set(drawn) for held in heldout):
                return drawn

    def named_pool(self, names: Sequence[str]) -> list[int]:
        """A pool given by worker names, numbered for the conductor in that order."""
        return [self.names.index(name) for name in names]

    def cards(self, pool: Sequence[int]) -> list[str]:
        return [self.workers[w].description for w in pool]

    def generate_plans(self, threads: list[Thread], seeds: list[int]) -> list[Generation]:
        return self.conductor.generate(threads, seeds)

    # ------------------------------------------------------------------ execution
    def execute(self, jobs: Sequence[Job]) -> None:
        """Run every job's steps round by round; each round sends all its steps to their workers at once."""
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

    def verify(self, problems: Sequence[Problem], answers: Sequence[str]) -> list[bool]:
        items = [VerifyItem(p.question, a, p.gold, p.kind) for p, a in zip(problems, answers)]
        return [bool(v.correct) for v in self.verifier.score(items)] if items else []

    # ------------------------------------------------------------------ the rollout
    def rollout(self, problems: Sequence[Problem], seed: int, depth: int = 0, verify: bool = True,
                pool: Sequence[str] | None = None) -> ConductorResult:
        """``pool``: every question asks these workers (by name, in this order); by default each draws its own."""
        result = ConductorResult(list(problems), [])
        start = time.perf_counter()
        pools = [self.named_pool(pool) for _ in problems] if pool else [self.pool(p, seed, depth) for p in problems]
        threads = [[{"role": "user", "content": conductor_message(p.question, len(workers), self.cfg.examples,
                                                                  self.cards(workers))}]
                   for p, workers in zip(problems, pools)]
        turns = self._plan(threads, [request_seed(seed, p.id, "plan") for p in problems], pools)
        jobs = [Job(p, t.parsed.plan, pool, seed) if t.parsed.plan else None
                for p, t, pool in zip(problems, turns, pools)]
        self.execute([j for j in jobs if j])
        histories = [[t] for t in turns]
        spent = first_cost = [job.cost() if job else 0.0 for job in jobs]
        first_correct: list[bool | None] = [None] * len(problems)
        if self.cfg.replan:
            if verify:  # what the re-plan round changed: the first workflows' answers, scored before it
                first_correct = self._correct(problems, jobs)
            replanned = self._replan(problems, threads, histories, jobs, seed)
            spent = [c + (new.cost() if new and new is not old else 0.0) for c, old, new in zip(spent, jobs, replanned)]
            jobs = replanned
        result.seconds["generate"] = time.perf_counter() - start
        start = time.perf_counter()
        correct = self._correct(problems, jobs) if verify else [False] * len(problems)
        result.seconds["verify"] = time.perf_counter() - start
        for i, problem in enumerate(problems):
            job, ok, turns = jobs[i], correct[i], histories[i]
            reward = conductor_reward(standing_plan(turns), ok, self.cost_penalty(spent[i]))
            turn_rewards = [reward]
            if len(turns) > 1:
                turn_rewards = [conductor_reward(turns[0].parsed, bool(first_correct[i]),
                                                 self.cost_penalty(first_cost[i])),
                                conductor_reward(turns[1].parsed, ok, self.cost_penalty(spent[i]))]
            result.records.append(ConductorRecord(
                problem.id, [self.names[w] for w in pools[i]], turns, job,
                extract_answer(job.answer(), problem.kind) if job else None, ok, reward, spent[i], first_correct[i],
                turn_rewards))
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

    def _plan(self, threads: list[Thread], seeds: list[int], pools: list[list[int]]) -> list[ConductorTurn]:
        generations = self.generate_plans(threads, seeds)
        return [ConductorTurn(g.prompt_ids, g.token_ids, g.logprobs, g.text,
                              parse_workflow(g.text, len(pool), self.cfg.max_steps))
                for g, pool in zip(generations, pools)]

    def _replan(self, problems: Sequence[Problem], threads: list[Thread], histories: list[list[ConductorTurn]],
                jobs: list[Job | None], seed: int) -> list[Job | None]:
        """One more round: the conductor sees its plan's answer and accepts it (three empty lists) or replaces
        the plan. A re-plan that does not parse changes nothing: the first workflow's answer stands (a conductor
        never taught the round, as the tiny ones, would otherwise lose every answer and every reward)."""
        asked = [i for i, job in enumerate(jobs) if job]
        follow_ups = [[*threads[i], {"role": "assistant", "content": histories[i][0].text},
                       {"role": "user", "content": replan_message(jobs[i].answer())}] for i in asked]
        turns = self._plan(follow_ups, [request_seed(seed, problems[i].id, "replan") for i in asked],
                           [jobs[i].pool for i in asked])
        new_jobs = list(jobs)
        rerun = []
        for i, turn in zip(asked, turns):
            histories[i].append(turn)
            if turn.parsed.plan is not None:
                new_jobs[i] = Job(problems[i], turn.parsed.plan, jobs[i].pool, seed + 1)
                rerun.append(new_jobs[i])
        self.execute(rerun)
        return new_jobs

    # ------------------------------------------------------------------ evaluation baselines
    def baselines(self, problems: Sequence[Problem], seed: int, pool: Sequence[str] | None = None) -> dict[str, Any]:
        """Each worker alone on every question, majority vote over them, a random well-formed workflow, and each
        hand-written workflow of ``conductor.fixed_workflows``; on ``pool`` (names, numbered in order) if given,
        else on every worker."""
        everyone = self.named_pool(pool) if pool else [i for i in range(len(self.workers)) if i != self.self_index]
        alone = [[Job(p, single_step(k), everyone, seed) for p in problems] for k in range(len(everyone))]
        rng = random.Random(seed)
        randomized = [Job(p, random_plan(len(everyone), rng, self.cfg.max_steps), everyone, seed) for p in problems]
        plans = [Plan(tuple(Step(k, task, list(access) == ["all"]) for k, task, access in
                            zip(flow.model_id, flow.subtasks, flow.access_list))) for flow in self.cfg.fixed_workflows]
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
        "gen_tokens": sum(len(t.token_ids) for r in result.records for t in r.turns),
        "prompt_tokens": sum(len(t.prompt_ids) for r in result.records for t in r.turns),
        **replan_summary(result.records),
    }


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
        {"worker": record.pool[s.worker], "model_id": s.worker, "subtask": s.subtask,
         "access": ["all"] if s.sees_all else [], "response": r.text if r else None, "error": r.error if r else None,
         "cost": r.cost if r else 0.0}
        for s, r in zip(job.plan.steps, job.responses)]
    return {"id": problem.id, "question": problem.question, "gold": problem.gold, "pool": record.pool,
            "conductor": [{"text": t.text, "error": t.parsed.error, "accepts": t.parsed.accepts} for t in record.turns],
            "steps": steps, "answer": record.answer, "correct": record.correct, "reward": record.reward,
            "cost": record.cost}

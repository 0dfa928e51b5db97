"""MAPoRL discussion rollout: A agents x T turns over a batch of questions.

Turn 1 is independent. At turn t every agent sees its visible peers' turn t-1 answers (and optionally their
verifier scores) and answers again in its own chat thread. Each turn submits every agent's requests at once, so
all questions and agents are in flight together. Every (question, agent, turn) keeps the exact prompt and
generated token ids and logprobs the engine produced: training consumes those, never re-tokenized text.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from mapoco.answers import extract_answer
from mapoco.config import (
    AgentConfig,
    DiscussionConfig,
    RunConfig,
    TeamConfig,
    lora_engine_config,
)
from mapoco.models.registry import node_source, resolve_model
from mapoco.rollout.engine import AgentEngines, Generation, request_seed
from mapoco.rollout.prompts import PeerAnswer, first_turn_message, later_turn_message
from mapoco.rollout.topology import visible_peers
from mapoco.rollout.verifier import VerifierClient, VerifyItem
from mapoco.runtime.actor_group import Call
from mapoco.runtime.placement import (
    READY_TIMEOUT_S,
    engine_bundles,
    learner_shares_engines,
    reserve,
)
from mapoco.tasks import Problem
from mapoco.weights.adapters import AdapterPayload, read_adapter


@dataclass
class AgentRuntime:
    index: int
    cfg: AgentConfig
    model_path: Path
    tokenizer: object
    engines: AgentEngines
    adapter: str | None = None  # on a shared LoRA engine: the adapter its requests carry (None: the base model)

    def load_adapter(self, adapter: AdapterPayload | ray.ObjectRef) -> None:
        """This agent's adapter onto its shared LoRA engine (under its name); its requests carry it from now on.
        Until then the agent plays the base model (``mapoco eval`` of an untrained LoRA team)."""
        self.engines.push_adapter(self.cfg.name, adapter)
        self.adapter = self.cfg.name

    def submit(self, threads: list[list[dict[str, str]]], seeds: list[int]) -> list[Call]:
        """This agent's answers to its chat threads, started (``engines.collect`` gathers them)."""
        return self.engines.submit([self.render(t) for t in threads], self.cfg.sampling, seeds,
                                   [self.adapter] * len(threads) if self.adapter else None)

    def generate(self, threads: list[list[dict[str, str]]], seeds: list[int]) -> list[Generation]:
        return self.engines.collect(self.submit(threads, seeds))

    def render(self, messages: list[dict[str, str]], max_new_tokens: int | None = None) -> list[int]:
        """Chat-template a thread into prompt ids, leaving room for ``max_new_tokens`` (default: the agent's); if it
        no longer fits the context, keep only the last message."""
        budget = self.cfg.engine.max_model_len - (max_new_tokens or self.cfg.sampling.max_new_tokens)
        for thread in (messages, messages[-1:]):
            text = self.tokenizer.apply_chat_template(thread, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) <= budget:
                return ids
        return ids[-budget:]


class Team:
    """Every agent's model, tokenizer and engines. Agents may differ in family, tokenizer and settings.

    ``colocate_learners`` (training): agents with ``learner.colocate`` reserve room for their learner ranks in
    their engines' bundles, and their engines can sleep while the learner updates. ``placement_timeout_s`` bounds
    the wait for a placement group, and for a dead replica's bundle to find a node again. ``wait=False`` returns
    once the engines are placed, still loading: the caller starts its other actors meanwhile, then ``wait_ready``.
    """

    def __init__(self, cfg: TeamConfig, seed: int, colocate_learners: bool = False,
                 placement_timeout_s: float = READY_TIMEOUT_S, wait: bool = True):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.agents = []
        lora_seats = cfg.lora_seats()
        try:
            for i, agent in enumerate(cfg.agents):
                host = self._engine_host(i)
                if host is not None:
                    first = self.agents[host]
                    self.agents.append(AgentRuntime(i, agent, first.model_path, first.tokenizer, first.engines))
                    continue
                path = resolve_model(agent.model)
                if i in lora_seats:
                    agent = replace(agent, engine=lora_engine_config(cfg))
                else:  # only the shared LoRA engine serves adapters (a top-level engine.max_loras set it for all)
                    agent = replace(agent, engine=replace(agent.engine, max_loras=0))
                colocated = learner_shares_engines(agent, training=colocate_learners)
                placement = reserve(engine_bundles(agent, colocated), f"team.agents[{i}].engine",
                                    placement_timeout_s)
                engines = AgentEngines(node_source(agent.model, path), agent.engine, seed + 1000 * i, placement,
                                       sleep_mode=colocated, restart_timeout_s=placement_timeout_s,
                                       what=f"team.agents[{i}].engine")
                self.agents.append(AgentRuntime(i, cfg.agents[i], path, AutoTokenizer.from_pretrained(path), engines))
            self._load_fixed_adapters()
            if wait:
                self.wait_ready()
        except BaseException:
            self.shutdown()  # engines already started must not outlive a team that failed to start
            raise

    def _engine_host(self, seat: int) -> int | None:
        """The earlier seat whose engines ``seat`` shares: the first, when one policy plays every seat; the first
        on the shared LoRA engine, for the others there. None: it gets engines of its own."""
        lora_seats = self.cfg.lora_seats()
        if self.cfg.shared_policy and seat > 0:
            return 0
        return lora_seats[0] if seat in lora_seats[1:] else None

    @classmethod
    def of_run(cls, cfg: RunConfig, colocate_learners: bool = False, wait: bool = True) -> Team:
        """The run's team: its agents and seed; placement waits are bounded by ``cluster.placement_timeout_s``."""
        return cls(cfg.team, cfg.seed, colocate_learners, cfg.cluster.placement_timeout_s, wait)

    def _load_fixed_adapters(self) -> None:
        """Frozen agents that play a fixed adapter get it once (trained ones get theirs at every weight sync)."""
        for agent in self.agents:
            if agent.cfg.adapter is not None:
                agent.load_adapter(read_adapter(Path(agent.cfg.adapter).expanduser()))

    def wait_ready(self) -> None:
        """Until every engine replica serves (an engine's start-up error raises here; the owner shuts down)."""
        for engines in self.distinct_engines():
            engines.wait_ready()

    def engine_owners(self) -> dict[int, AgentEngines]:
        """Each distinct set of engines under the first seat that uses it (seats sharing a policy share them)."""
        owners = {id(a.engines): a for a in reversed(self.agents)}  # reversed: the first seat wins
        return {a.index: a.engines for a in sorted(owners.values(), key=lambda a: a.index)}

    def engine_restarts(self) -> dict[int, int]:
        """Engine replica restarts so far, per agent that owns engines."""
        return {index: engines.restarts for index, engines in self.engine_owners().items()}

    def subset(self, agents: int) -> Team:
        """The first ``agents`` seats on these same engines (benchmarks grow a team without restarting engines).
        The view owns nothing: shut down the full team, not the view."""
        view = copy.copy(self)
        view.cfg = replace(self.cfg, agents=self.cfg.agents[:agents])
        view.agents = self.agents[:agents]
        return view

    def distinct_engines(self) -> list[AgentEngines]:
        return list({id(a.engines): a.engines for a in self.agents}.values())

    def __len__(self) -> int:
        return len(self.agents)

    def shutdown(self) -> None:
        for engines in self.distinct_engines():
            engines.shutdown()


@dataclass
class Record:
    """One answer: agent ``agent`` (0-based) at turn ``turn`` (1-based) on question ``question_id``."""

    question_id: str
    agent: int
    turn: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    answer: str | None
    correct: bool
    score: float | None  # None: the verifier flagged this sample; it is excluded from updates
    error: str | None = None


@dataclass
class DiscussionResult:
    problems: list[Problem]
    num_agents: int
    num_turns: int
    records: dict[tuple[int, int, int], Record] = field(default_factory=dict)  # (question idx, agent, turn 0-based)
    seconds: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "verify": 0.0})

    def grid(self, attr: str, dtype: object = object) -> np.ndarray:
        out = np.empty((len(self.problems), self.num_agents, self.num_turns), dtype=dtype)
        for (q, a, t), record in self.records.items():
            value = getattr(record, attr)
            out[q, a, t] = np.nan if value is None and dtype is float else value
        return out

    def flagged(self) -> list[Record]:
        return [r for r in self.records.values() if r.score is None]


def turn_message(result: DiscussionResult, q: int, agent: int, turn: int, cfg: DiscussionConfig) -> str:
    problem = result.problems[q]
    if turn == 0:
        return first_turn_message(problem)
    peers = []
    for j in visible_peers(agent, result.num_agents, cfg.topology):
        prev = result.records[(q, j, turn - 1)]
        peers.append(PeerAnswer(j, prev.text, prev.score if cfg.show_scores else None))
    return later_turn_message(problem, peers)


class Discussion:
    """Questions under discussion, each at its own turn. ``step`` generates the next turn of the questions given,
    every agent's requests for all of them in one batch per engine: the questions of a rollout batch in lockstep
    (``run_discussion``), or clients' questions that joined at different times (``mapoco serve``: a new question
    starts its first turn in the same batch as others' later turns). A question's answers depend only on its own
    seed, sampling and thread, never on what it shares a batch with."""

    def __init__(self, team: Team, turns: int, cfg: DiscussionConfig, verifier: VerifierClient):
        self.team, self.cfg, self.verifier = team, cfg, verifier
        self.result = DiscussionResult([], len(team), turns)
        self.threads: list[list[list[dict[str, str]]]] = []  # per question, per agent
        self.next_turn: list[int] = []
        self.seeds: list[int] = []
        self.sampling: list[Mapping[str, object]] = []  # per question: SamplingConfig fields for every agent

    def add(self, problem: Problem, seed: int, sampling: Mapping[str, object] | None = None) -> int:
        """A question joins (its first turn comes with the next step); returns its index."""
        self.result.problems.append(problem)
        self.threads.append([[] for _ in self.team.agents])
        self.next_turn.append(0)
        self.seeds.append(seed)
        self.sampling.append(sampling or {})
        return len(self.result.problems) - 1

    def finished(self, q: int) -> bool:
        return self.next_turn[q] == self.result.num_turns

    def step(self, questions: Sequence[int]) -> None:
        """The next turn of each of ``questions`` (none finished)."""
        start = time.perf_counter()
        turns = [self.next_turn[q] for q in questions]
        for q, turn in zip(questions, turns):
            for a in range(len(self.team)):
                self.threads[q][a].append({"role": "user", "content": turn_message(self.result, q, a, turn, self.cfg)})
        problems = self.result.problems
        generations = generate_turn(
            self.team, {a.index: [self.threads[q][a.index] for q in questions] for a in self.team.agents},
            {a.index: [request_seed(self.seeds[q], problems[q].id, a.index, turn) for q, turn in zip(questions, turns)]
             for a in self.team.agents},
            [self.sampling[q] for q in questions] if any(self.sampling[q] for q in questions) else None)
        self.result.seconds["generate"] += time.perf_counter() - start
        start = time.perf_counter()
        record_turn(self.result, self.threads, generations, self.verifier, list(zip(questions, turns)))
        self.result.seconds["verify"] += time.perf_counter() - start
        for q in questions:
            self.next_turn[q] += 1

    def forget(self, q: int) -> None:
        """Free a question's threads and records (a served one, answered or dropped); its index stays taken."""
        self.threads[q] = []
        for key in [(q, a, t) for a in range(len(self.team)) for t in range(self.next_turn[q])]:
            self.result.records.pop(key, None)


def run_discussion(
    team: Team,
    problems: Sequence[Problem],
    turns: int,
    cfg: DiscussionConfig,
    verifier: VerifierClient,
    seed: int,
) -> DiscussionResult:
    discussion = Discussion(team, turns, cfg, verifier)
    questions = [discussion.add(problem, seed) for problem in problems]
    for _ in range(turns):
        discussion.step(questions)
    return discussion.result


def generate_turn(team: Team, threads: dict[int, list[list[dict[str, str]]]], seeds: dict[int, list[int]],
                  sampling: Sequence[Mapping[str, object]] | None = None) -> dict[int, list[Generation]]:
    """Each agent answers its chat threads, one sampling seed per thread. Every agent's requests are submitted before
    any is collected, so all of a turn is in flight together; agents that share engines (one policy in every seat,
    the shared LoRA engine) send theirs as one batch, each request with its agent's sampling and adapter.
    ``sampling``: per thread index, SamplingConfig fields that override every agent's."""
    sharing: dict[int, list[AgentRuntime]] = {}
    for agent in team.agents:
        sharing.setdefault(id(agent.engines), []).append(agent)
    pending = []
    for agents in sharing.values():
        prompts, per_request, batch_seeds, adapters = [], [], [], []
        for a in agents:
            requested = ([replace(a.cfg.sampling, **s) for s in sampling] if sampling
                         else [a.cfg.sampling] * len(threads[a.index]))
            prompts += [a.render(t, each.max_new_tokens) for t, each in zip(threads[a.index], requested)]
            per_request += requested
            batch_seeds += seeds[a.index]
            adapters += [a.adapter] * len(threads[a.index])
        pending.append((agents, agents[0].engines.submit(prompts, per_request, batch_seeds, adapters)))
    out: dict[int, list[Generation]] = {}
    for agents, shards in pending:
        generations = agents[0].engines.collect(shards)
        for a in agents:
            count = len(threads[a.index])
            out[a.index], generations = generations[:count], generations[count:]
    return out


def record_turn(
    result: DiscussionResult,
    threads: list[list[list[dict[str, str]]]],
    generations: dict[int, list[Generation]],
    verifier: VerifierClient,
    questions: Sequence[tuple[int, int]],
) -> None:
    """The records of ``questions``, (question, turn) pairs: ``generations[a][i]`` answers ``questions[i]``."""
    keys = [(i, q, turn, a) for a in generations for i, (q, turn) in enumerate(questions)]
    items = [
        VerifyItem(result.problems[q].question, generations[a][i].text, result.problems[q].gold,
                   result.problems[q].kind)
        for i, q, _, a in keys
    ]
    for (i, q, turn, a), verdict in zip(keys, verifier.score(items)):
        gen, problem = generations[a][i], result.problems[q]
        result.records[(q, a, turn)] = Record(
            question_id=problem.id, agent=a, turn=turn + 1, prompt_ids=gen.prompt_ids, token_ids=gen.token_ids,
            logprobs=gen.logprobs, text=gen.text, finish_reason=gen.finish_reason,
            answer=extract_answer(gen.text, problem.kind), correct=verdict.correct, score=verdict.score,
            error=verdict.error,
        )
        threads[q][a].append({"role": "assistant", "content": gen.text})

"""A SmolLM2-135M agents as LoRA adapters on one shared engine (``team.lora_engine``), measured side by side:

* rollout_lora_vs_engine: mapoco's discussion on the shared engine (every agent's requests of a turn in one batch,
  each with its adapter) against a raw vLLM ``LLM(enable_lora=True)`` given exactly those requests (prompt ids,
  sampling, seeds, adapters) in one ``generate`` call. Target >= 0.95.
* rollout_lora_vs_separate: the same team and adapters in the mode without the shared engine: an engine per agent,
  each holding its agent's adapter merged into the weights (the same discussion seeds). Reported.
* sync_lora_vs_full: one LoRA learner's sync after an update: its adapter onto the shared engine (``AdapterSync``)
  against its merged full weights onto an engine of its own (``ObjectStoreSync``). Target >= 10.
* memory_lora: peak RSS of the shared engine against the A engines of the separate mode together.

The adapters are random (non-zero up-projections, so every agent answers differently), built once in the driver.
On vLLM's CPU backend the LoRA path itself is slow: one SmolLM2 adapter decoded at 0.45x the base model's tok/s
(40 against 88-98, 32 requests, side by side), so the sizes here are small and the whole run takes long.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import ray
import torch

from benchmarks.bench_rollout import requests_of, team_overrides
from benchmarks.common import Figure, Result, peak_rss_mib, side_by_side, timed
from mapoco.cli import compose
from mapoco.config import (
    AgentConfig,
    AlgorithmConfig,
    DiscussionConfig,
    LearnerConfig,
    SamplingConfig,
)
from mapoco.rollout.discussion import AgentRuntime, Team, run_discussion
from mapoco.rollout.engine import AgentEngines, engine_env
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.placement import engine_bundles, reserve
from mapoco.runtime.precision import engine_dtype
from mapoco.tasks import load_task
from mapoco.training.learner_group import LearnerGroup
from mapoco.weights.adapters import (
    AdapterPayload,
    AdapterSync,
    adapter_weights,
    with_lora,
)
from mapoco.weights.object_store import ObjectStoreSync
from mapoco.weights.payload import WeightPayload, engine_weights, pack

RANK = 8


def random_adapters(model_path: str, agents: int, dtype: str) -> list[tuple[AdapterPayload, WeightPayload]]:
    """Per agent: its adapter (for the shared engine) and its merged weights (for an engine of its own)."""
    from mapoco.models.registry import load_causal_lm

    policy = with_lora(load_causal_lm(model_path, torch.float32), LearnerConfig(lora_rank=RANK))
    out = []
    for agent in range(agents):
        generator = torch.Generator().manual_seed(agent)
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.data = torch.randn(param.shape, generator=generator) * 0.002
        config, state = adapter_weights(policy)
        out.append(((config, pack(state, getattr(torch, dtype))),
                    pack(engine_weights(policy, lora=True), getattr(torch, dtype))))
    return out


class RawLoraEngine:
    """The ceiling: a plain vLLM ``LLM`` with the same adapters, serving a list of requests in one call."""

    def __init__(self, model_path: str, dtype: str, max_model_len: int, adapters: dict[str, AdapterPayload]):
        import tempfile
        from pathlib import Path

        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from mapoco.weights.adapters import write_adapter

        self.llm = LLM(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=0, enforce_eager=True,
                       enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192),
                       enable_lora=True, max_loras=len(adapters), max_cpu_loras=len(adapters), max_lora_rank=RANK)
        root = Path(tempfile.mkdtemp(prefix="bench-lora-"))
        self.requests = {}
        for i, (name, (config, payload)) in enumerate(adapters.items()):
            write_adapter(root / name, config, payload)
            self.requests[name] = LoRARequest(name, i + 1, str(root / name))

    def generate(self, requests: list, names: list[str], sampling: SamplingConfig) -> int:
        from vllm import SamplingParams, TokensPrompt

        self.llm.reset_prefix_cache()  # cold, as every rollout after a sync
        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=r.seed) for r in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params,
                                    lora_request=[self.requests[names[r.agent]] for r in requests], use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def pid(self) -> int:
        import os

        return os.getpid()


def _discuss(team: Team, problems: list, turns: int, verifier: VerifierClient, seeds: range) -> tuple[list, list]:
    """tok/s of each seed's discussion, and its requests (for the raw engine to replay)."""
    run_discussion(team, problems[:2], 1, DiscussionConfig(), verifier, seed=-1)  # warm-up, untimed
    rates, requests = [], []
    for seed in seeds:
        for engines in team.distinct_engines():
            engines.call_all("reset_prefix_cache")
        result = run_discussion(team, problems, turns, DiscussionConfig(), verifier, seed)
        rates.append(sum(len(r.token_ids) for r in result.records.values()) / result.seconds["generate"])
        requests.append(requests_of(result, seed))
    return rates, requests


def _engine_rss(team: Team) -> float:
    return sum(peak_rss_mib(pid) for engines in team.distinct_engines()
               for pid in engines.call_all("pid"))


def run_rollout(agents: int = 4, questions: int = 4, turns: int = 2, max_new_tokens: int = 32,
                repeats: int = 2) -> list[Result]:
    overrides = [*team_overrides(agents, "smollm2", max_new_tokens), f"task.limit={questions}", f"turns={turns}",
                 f"learner.lora_rank={RANK}"]
    shared_cfg, separate_cfg = compose(*overrides, "team.lora_engine=true"), compose(*overrides)
    problems = load_task(shared_cfg.task).problems
    agent = shared_cfg.team.agents[0]
    dtype = engine_dtype(agent.engine)
    verifier = VerifierClient(shared_cfg.verifier)
    names = [a.name for a in shared_cfg.team.agents]
    try:
        team = Team(shared_cfg.team, shared_cfg.seed)
        adapters = random_adapters(str(team.agents[0].model_path), agents, dtype)
        for runtime, (adapter, _) in zip(team.agents, adapters):
            runtime.load_adapter(adapter)
        try:
            shared, discussions = _discuss(team, problems, turns, verifier, range(repeats))
            shared_rss, model_path = _engine_rss(team), str(team.agents[0].model_path)
        finally:
            team.shutdown()
        raw_actor = ray.remote(RawLoraEngine).options(
            num_cpus=agent.engine.num_cpus, runtime_env={"env_vars": engine_env(agent.engine)},
        ).remote(model_path, dtype, agent.engine.max_model_len, {n: a for n, (a, _) in zip(names, adapters)})
        try:
            ray.get(raw_actor.pid.remote())
            raw = []
            for requests in discussions:
                seconds, tokens = timed(lambda r=requests: ray.get(raw_actor.generate.remote(r, names, agent.sampling)))
                raw.append(tokens / seconds)
        finally:
            ray.kill(raw_actor)
        team = Team(separate_cfg.team, separate_cfg.seed)
        try:
            for runtime, (_, merged) in zip(team.agents, adapters):
                runtime.engines.push_weights(ray.put(merged))
            separate, _ = _discuss(team, problems, turns, verifier, range(repeats))
            separate_rss = _engine_rss(team)
        finally:
            team.shutdown()
    finally:
        verifier.shutdown()
    sizes = {"model": "smollm2", "agents": agents, "turns": turns, "questions": questions,
             "max_new_tokens": max_new_tokens, "lora_rank": RANK, "dtype": dtype}
    ours = Figure(f"mapoco discussion ({agents} adapters, one engine)", "tok/s", shared)
    print(f"rollout lora: shared {shared}, raw {raw}, separate {separate} tok/s", flush=True)
    return [
        Result("rollout_lora_vs_engine", ours, Figure("raw vLLM with the adapters, one batch", "tok/s", raw), sizes,
               target=0.95, ratios=[a / b for a, b in zip(shared, raw)]),
        Result("rollout_lora_vs_separate", ours, Figure(f"one engine per agent ({agents}, merged)", "tok/s", separate),
               sizes, ratios=[a / b for a, b in zip(shared, separate)]),
        Result("memory_lora", Figure("peak RSS, the shared engine", "MiB", [shared_rss]),
               Figure(f"peak RSS, {agents} engines together", "MiB", [separate_rss]), sizes,
               ratios=[separate_rss / shared_rss], higher_is_better=False),
    ]


def run_sync(repeats: int = 5) -> Result:
    """The same LoRA learner pushes to both: its adapter to a shared LoRA engine, its merged weights to a plain one."""
    from mapoco.models.registry import resolve_model

    path = str(resolve_model("smollm2"))
    learner = LearnerConfig(lora_rank=RANK)
    plain = compose("team=smollm2x2").team.agents[0].engine
    lora = dataclasses.replace(plain, max_loras=1, max_lora_rank=RANK)
    dtype = engine_dtype(plain)
    group = LearnerGroup(path, learner, AlgorithmConfig(), num_turns=1, seed=0, what="bench.lora.learner")
    shared, full = (AgentEngines(path, cfg, seed=0, placement=reserve(
        engine_bundles(AgentConfig(name=what, model="smollm2", engine=cfg), colocated=False), f"bench.{what}"))
        for cfg, what in ((lora, "lora_engine"), (plain, "full_engine")))
    try:
        group.wait_ready()
        shared.wait_ready()
        full.wait_ready()
        runtime = AgentRuntime(0, AgentConfig(name="smol", model="smollm2", engine=lora), resolve_model("smollm2"),
                               None, shared)
        adapter_sync, full_sync = AdapterSync(group, runtime, dtype), ObjectStoreSync(group, full, dtype)
        adapter_sync.push()  # warm-up: first loads pay one-off allocations
        full_sync.push()

        def seconds(sync) -> float:
            start = time.perf_counter()
            sync.push()
            return time.perf_counter() - start

        a, b, ratios = side_by_side(lambda: seconds(adapter_sync), lambda: seconds(full_sync), repeats,
                                    higher_is_better=False)
    finally:
        shared.shutdown()
        full.shutdown()
        group.shutdown()
    print(f"sync lora: adapter {statistics.median(a):.3f}s, full {statistics.median(b):.3f}s", flush=True)
    return Result("sync_lora_vs_full", Figure("adapter onto the shared engine (AdapterSync)", "s", a),
                  Figure("merged full weights onto its own engine (ObjectStoreSync)", "s", b),
                  sizes={"model": "smollm2", "lora_rank": RANK, "dtype": dtype}, target=10.0, ratios=ratios,
                  higher_is_better=False)

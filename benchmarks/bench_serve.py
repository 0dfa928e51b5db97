"""serve: `mapoco serve`'s throughput and latency with 1, 8 and 32 concurrent clients, against the team's ceiling;
serve_stream: the same at 32 clients with every reply streamed (``stream=true``, every chunk read).

The served app is the tiny team (2 x tiny-qwen, 3 turns, the default sampling) loaded from a checkpoint in the
learners' format (``model.safetensors`` of the policy and value head, written here from the base weights: speed does
not depend on training). Every client sends its requests one after another, each a distinct arithmetic question, over
HTTP to Ray Serve; the figures are requests per second over the whole level and the p50/p99 latency of its requests.

The baseline is the ceiling of the same engines and weights: ``run_discussion`` of 32 questions in one call, engine
time only, on a team started outside Serve once the served app is gone (on 2 cores, idle engines of one side slow
the other down). Every repeat measures both sides, one after the other, and the ratio is served requests/s at 32
clients over that repeat's questions/s (target 0.7x, streamed or not).

    python -m benchmarks.bench_serve              # or: python -m benchmarks.run --only serve
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Figure, Result

LEVELS = (1, 8, 32)
TARGET = 0.7
OVERRIDES = ["team=tiny2", "task=arithmetic", "turns=3"]
# A team of real (small) LLMs: two SmolLM2-135M-Instruct agents, 2 turns of at most 64 new tokens. Its steps cost
# generation, not bookkeeping, as a served team's do; 32 clients only (one request alone would take minutes).
SMOLLM2 = ["team=smollm2x2", "task=arithmetic", "turns=2", "team.agents.0.sampling.max_new_tokens=64",
           "team.agents.1.sampling.max_new_tokens=64"]


def write_checkpoint(run_dir: Path, overrides: list[str]) -> Path:
    """A run directory as `mapoco train` leaves it (.hydra/config.yaml, checkpoints/step_N/agent_i/model.safetensors,
    the COMPLETE marker and trainer state), with every trained agent's base weights."""
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from mapoco.cli import CONF_DIR
    from mapoco.cli import compose as compose_run
    from mapoco.models.registry import resolve_model
    from mapoco.training.checkpoint import COMPLETE, STATE, agent_dir, checkpoints_dir
    from mapoco.training.policy_model import PolicyWithValue

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        conf = compose("config", overrides=[*overrides, "command=train", f"output_dir={run_dir}"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(conf, run_dir / ".hydra" / "config.yaml")
    cfg = compose_run(*overrides)
    step = checkpoints_dir(run_dir) / "step_000001"
    for i, agent in enumerate(cfg.team.agents):
        if agent.trainable:
            model = PolicyWithValue(AutoModelForCausalLM.from_pretrained(resolve_model(agent.model)), cfg.turns)
            agent_dir(step, i).mkdir(parents=True)
            save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                      str(agent_dir(step, i) / "model.safetensors"))
    (step / STATE).write_text(json.dumps({"step": 1, "seed": cfg.seed, "data_position": 0}))
    (step / COMPLETE).write_text("")
    return run_dir


def _load(url: str, questions: list, clients: int, requests: int, stream: bool = False
          ) -> tuple[float, list[float]]:
    """``clients`` closed-loop clients, each sending its share of ``requests`` one after another; (wall seconds,
    latencies). The clients are coroutines on one event loop, on aiohttp's C parser (as a load generator runs them):
    the benchmark's clients share the 2 cores with the server they measure, where real clients would not, so they
    should cost it as little CPU as they can (32 client threads of blocking clients: 0.32x; coroutines on httpx, a
    pure-Python HTTP parser: 0.61x)."""
    import asyncio

    import aiohttp

    async def client(http: aiohttp.ClientSession, k: int) -> list[float]:
        latencies = []
        for i in range(k, requests, clients):
            problem = questions[i]
            body = {"messages": [{"role": "user", "content": problem.question}], "mapoco": {"id": problem.id},
                    "stream": stream}
            start = time.perf_counter()
            async with http.post(f"{url}/chat/completions", json=body) as reply:
                reply.raise_for_status()
                lines = [line.strip() async for line in reply.content if line.strip()]
            assert lines[-1] == b"data: [DONE]" if stream else lines, lines[-3:]
            latencies.append(time.perf_counter() - start)
        return latencies

    async def all_clients() -> list[float]:
        connector = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
            parts = await asyncio.gather(*(client(http, k) for k in range(clients)))
        return [x for part in parts for x in part]

    start = time.perf_counter()
    latencies = asyncio.run(all_clients())
    return time.perf_counter() - start, latencies


def run(levels: tuple[int, ...] = LEVELS, repeats: int = 4, batch: int = 32, overrides: list[str] = OVERRIDES,
        rounds: int = 4, name: str = "serve") -> list[Result]:
    """``rounds``: requests per client at the top level (at least 16 requests per level). ``repeats``: 4 for the tiny
    team, whose figures swing from run to run on a shared 2-core machine (a repeat's ratio ran from 0.35x to 0.77x
    in one day's runs)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        return _run(write_checkpoint(run_dir, overrides), levels, repeats, batch, rounds, name)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_smollm2() -> list[Result]:
    return run(levels=(32,), repeats=2, overrides=SMOLLM2, rounds=2, name="serve_smollm2")


def _run(run_dir: Path, levels: tuple[int, ...], repeats: int, batch: int, rounds: int, name: str) -> list[Result]:
    """Each repeat serves every level, then measures the direct call on a fresh team: the two sides of a ratio run
    a minute apart, not the length of the whole benchmark (this machine's speed drifts: the direct call ran at 77 to
    171 questions/s over one day's runs)."""
    import ray

    from mapoco.serving.restore import load_config
    from mapoco.tasks import load_task
    from mapoco.training.learner import free_port

    cfg, path = load_config(str(run_dir), {"port": free_port(), "max_batch_size": batch})
    sizes = {level: max(16, rounds * level) for level in levels}  # requests per level and repeat
    total = (sum(sizes.values()) + sizes[max(levels)] + 2 * batch + 1) * repeats
    # (Almost) every request a distinct question: up to 3 two-digit terms; one-digit pairs repeat after ~200.
    params = {**cfg.task.params, "max_digits": 2, "max_terms": 3}
    questions = iter(load_task(dataclasses.replace(cfg.task, limit=total, params=params)).problems)
    top = max(levels)
    runs = [(level, False) for level in levels] + [(top, True)]
    figures = {run: {"rps": [], "p50": [], "p99": []} for run in runs}
    ceiling = []
    for _ in range(repeats):
        _serve_levels(cfg, path, runs, sizes, questions, figures)
        ceiling.append(_direct(cfg, path, [next(questions) for _ in range(2 * batch)]))
    extra = {"levels": {f"{level}{'_streamed' if stream else ''}": {
        "requests_per_s": round(statistics.median(f["rps"]), 3), "p50_s": round(statistics.median(f["p50"]), 4),
        "p99_s": round(statistics.median(f["p99"]), 4), "requests": sizes[level]}
        for (level, stream), f in figures.items()}}
    sizes = {"team": cfg.team.name, "turns": cfg.turns, "max_new_tokens": cfg.team.agents[0].sampling.max_new_tokens,
             "max_batch_size": batch, "levels": list(levels), "ray_cluster_cpus": ray.cluster_resources().get("CPU")}
    baseline = Figure(f"run_discussion, one call of {batch} questions", "questions/s", ceiling)
    return [Result(key, Figure(f"served over HTTP, {top} concurrent clients{label}", "req/s", served), baseline,
                   sizes=sizes, target=TARGET, ratios=[a / b for a, b in zip(served, ceiling)], extra=extra)
            for key, label, served in ((name, "", figures[(top, False)]["rps"]),
                                       (f"{name}_stream", ", streamed", figures[(top, True)]["rps"]))]


def _serve_levels(cfg: Any, path: Path, runs: list[tuple[int, bool]], sizes: dict[int, int], questions: Iterator,
                  figures: dict[tuple[int, bool], dict[str, list[float]]]) -> None:
    """Start the served app, warm it up with one request, load it at every (clients, streamed) level, stop it."""
    from ray import serve

    from mapoco.serving.serve import start

    url = start(cfg, path)
    try:
        _load(url, [next(questions)], 1, 1)
        for level, stream in runs:
            wall, latencies = _load(url, [next(questions) for _ in range(sizes[level])], level, sizes[level], stream)
            figure = figures[(level, stream)]
            figure["rps"].append(sizes[level] / wall)
            figure["p50"].append(float(np.percentile(latencies, 50)))
            figure["p99"].append(float(np.percentile(latencies, 99)))
            print(f"serve: {level} clients{' streamed' if stream else ''}: {sizes[level] / wall:.2f} req/s, "
                  f"p50 {figure['p50'][-1]:.3f}s p99 {figure['p99'][-1]:.3f}s", flush=True)
    finally:
        serve.shutdown()  # the next start brings its own proxy and port; idle engines would slow the direct team


def _direct(cfg: Any, path: Path, questions: list) -> float:
    """Questions/s of one ``run_discussion`` of the second half of ``questions`` (the first half warms up), on a team
    with the same checkpoint pushed into it; engine time only."""
    from mapoco.rollout.discussion import Team, run_discussion
    from mapoco.serving.restore import push_checkpoint
    from mapoco.serving.served_team import NullVerifier

    team = Team(cfg.team, cfg.seed)
    try:
        refs = push_checkpoint(team, cfg, path)
        half = len(questions) // 2
        run_discussion(team, questions[:half], cfg.turns, cfg.discussion, NullVerifier(), cfg.seed)
        result = run_discussion(team, questions[half:], cfg.turns, cfg.discussion, NullVerifier(), cfg.seed)
        del refs
    finally:
        team.shutdown()
    rate = (len(questions) - half) / result.seconds["generate"]
    print(f"serve: run_discussion of {len(questions) - half} questions: {rate:.2f} questions/s", flush=True)
    return rate


def main() -> None:
    import os

    import ray

    ray.init(num_cpus=max(32, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    for result in run():
        print(result.to_json())


if __name__ == "__main__":
    main()

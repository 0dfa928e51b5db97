"""The Conductor's workers: anything that answers a batch of chat threads.

``LocalWorker`` serves them with an agent's vLLM engines (token ids in, text out); ``HttpWorker`` sends each to an
OpenAI-compatible ``/chat/completions`` endpoint (closed models, remote servers). Both start a batch with
``submit`` and return its replies with ``result``, so the workflow runner keeps every worker busy at once.
A worker that fails on a request (timeout, HTTP error, bad reply) answers it with an error reply; the workflow
goes on with that text as the step's response. Every reply carries what the call cost: the worker's price per call
plus its price per generated token (a failed call generated none).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from mapoco.config import HttpWorkerConfig, PriceConfig
from mapoco.rollout.discussion import AgentRuntime
from mapoco.rollout.engine import request_seed

Thread = list[dict[str, str]]
FAILED = "the worker failed (a seeded failure, team.agents.N.fail_rate)"


@dataclass
class Reply:
    text: str
    error: str | None = None  # why the worker failed; ``text`` then says so to later steps
    tokens: int = 0  # generated
    cost: float = 0.0


class Pending(Protocol):
    def result(self) -> list[Reply]: ...


class Worker(Protocol):
    name: str
    description: str  # its card in the conductor's prompt ("": none)
    max_cost: float  # of one call at the worker's token limit

    def submit(self, threads: list[Thread], seeds: list[int]) -> Pending: ...


@dataclass
class Ready:
    replies: list[Reply]

    def result(self) -> list[Reply]:
        return self.replies


@dataclass
class _Later:
    collect: Callable[[], list[Reply]]

    def result(self) -> list[Reply]:
        return self.collect()


class LocalWorker:
    """A frozen team agent: its chat template, sampling settings and engines."""

    def __init__(self, agent: AgentRuntime):
        self.agent, self.name, self.price = agent, agent.cfg.name, agent.cfg.price
        self.description, self.fail_rate = agent.cfg.description, agent.cfg.fail_rate
        self.max_cost = self.price.of(agent.cfg.sampling.max_new_tokens)

    def submit(self, threads: list[Thread], seeds: list[int]) -> Pending:
        """A call that ``fail_rate`` fails (drawn from its seed: the same call fails again, another may not) gets the
        error reply an unreachable worker would give, and costs a call."""
        failed = [random.Random(request_seed(seed, "fail")).random() < self.fail_rate for seed in seeds]
        asked = [i for i, fail in enumerate(failed) if not fail]
        if not asked:
            return Ready([_failed(self.price, FAILED) for _ in threads])
        shards = self.agent.submit([threads[i] for i in asked], [seeds[i] for i in asked])

        def collect() -> list[Reply]:
            replies = iter(_priced(self.price, g.text, len(g.token_ids)) for g in self.agent.engines.collect(shards))
            return [_failed(self.price, FAILED) if fail else next(replies) for fail in failed]
        return _Later(collect)


class HttpWorker:
    """An OpenAI-compatible chat-completions endpoint; up to ``concurrency`` requests in flight."""

    def __init__(self, cfg: HttpWorkerConfig):
        import httpx

        self.cfg, self.name, self.max_cost = cfg, cfg.name, cfg.price.of(cfg.max_tokens)
        self.description = cfg.description
        headers = {"Authorization": f"Bearer {os.environ[cfg.api_key_env]}"} if cfg.api_key_env else {}
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers, timeout=cfg.timeout_s,
                                   limits=httpx.Limits(max_connections=cfg.concurrency))
        self.pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix=f"http-{cfg.name}")

    def submit(self, threads: list[Thread], seeds: list[int]) -> Pending:
        futures: list[Future[Reply]] = [self.pool.submit(self._ask, t, s) for t, s in zip(threads, seeds, strict=True)]
        return _Later(lambda: [f.result() for f in futures])

    def _ask(self, thread: Thread, seed: int) -> Reply:
        import httpx

        body = {"model": self.cfg.model, "messages": thread, "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature, "seed": seed}
        try:
            response = self.client.post("/chat/completions", json=body)
            response.raise_for_status()
            reply = response.json()
            usage = reply.get("usage") or {}  # an endpoint without usage is charged per call only
            return _priced(self.cfg.price, reply["choices"][0]["message"]["content"] or "",
                           int(usage.get("completion_tokens") or 0))
        except httpx.TimeoutException:
            return self._failed(f"timed out after {self.cfg.timeout_s:g} s")
        except httpx.HTTPStatusError as exc:
            return self._failed(f"HTTP {exc.response.status_code}: {exc.response.text[:200]}")
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return self._failed(f"{type(exc).__name__}: {exc}"[:300])

    def _failed(self, why: str) -> Reply:
        return _failed(self.cfg.price, why)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


def _priced(price: PriceConfig, text: str, tokens: int) -> Reply:
    return Reply(text, tokens=tokens, cost=price.of(tokens))


def _failed(price: PriceConfig, why: str) -> Reply:
    """A failed call: later steps (and a re-plan) read why, and it costs what a call that generated nothing does."""
    return Reply(f"[worker error: {why}]", error=why, cost=price.of(0))

"""`mapoco serve checkpoint=DIR`: a trained team (or conductor) behind an OpenAI-compatible endpoint, on Ray Serve.

    POST <route_prefix>/v1/chat/completions   the last user message is the question; the answer is the team's
                                               (discussion: the last turn's majority vote; conductor: the workflow's);
                                               stream=true: every turn (workflow step) as it ends, then the answer
    GET  <route_prefix>/v1/models             the one model served

The run's configuration (``.hydra/config.yaml``) gives the team, turns, method and every engine and sampling setting;
each trained agent's weights come from the latest complete checkpoint (or the ``step_N`` folder given) and are pushed
into its engines the way training syncs them. One Serve replica owns one copy of the team's engines; concurrent
requests are collected by ``@serve.batch`` and discussed together, so they share engine batches.

Sampling is seeded per request as in training and evaluation: ``request_seed(seed, question id, agent, turn)``, with
``seed`` the request's ``seed`` (default: the run's) and the question id ``mapoco.id`` (default: a hash of the
question text). The same question with the same seed gets the same discussion whatever it is batched with; sending
an evaluation question's id and seed reproduces ``mapoco eval``'s transcript of it.
"""


from __future__ import annotations

import asyncio
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ray import serve

from mapoco.config import ConfigError, RunConfig, ServeConfig
from mapoco.runtime.devices import visible_devices_env
from mapoco.serving.openai_api import ChatApi, token_digest
from mapoco.serving.restore import check_checkpoint, load_config
from mapoco.serving.served_team import Pending, Question, ServedTeam
from mapoco.training import checkpoint as checkpoints

APP_NAME = "mapoco"


class TeamDeployment:
    """One Serve replica: the team's engines, answering from a thread of their own, and the HTTP handling."""

    def __init__(self, cfg: RunConfig, checkpoint: str, model_name: str, card: dict[str, Any], digest: str | None):
        self.served = ServedTeam(cfg, Path(checkpoint))
        self.inbox: queue.Queue[Pending | None] = queue.Queue()
        self.worker = threading.Thread(target=self.served.serve_forever,  # engine calls block
                                       args=(self.inbox, cfg.serve.batch_wait_timeout_s), daemon=True,
                                       name="mapoco-team")
        self.worker.start()
        self.api = chat_api(cfg, model_name, card, digest, self.answer)

    async def answer(self, question: Question) -> dict[str, Any]:
        """The question's result, once the team has answered it; a cancelled caller (its client left) drops it."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def deliver(result: dict[str, Any] | BaseException) -> None:
            loop.call_soon_threadsafe(_settle, done, result)

        pending = Pending(question, deliver)
        self.inbox.put(pending)
        try:
            return await done
        except asyncio.CancelledError:
            pending.left.set()
            raise

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse, StreamingResponse

        status, body, headers = await self.api.handle(request.method, request.url.path, request.headers,
                                                      await request.body())
        if isinstance(body, dict):
            return JSONResponse(body, status_code=status, headers=headers)
        return StreamingResponse(body, status_code=status, headers=headers, media_type="text/event-stream")

    def streams_left(self) -> dict[str, int]:
        """Streams whose client went away before the end, questions a running discussion dropped for that, and
        requests the engines still hold (tests check that a client leaving leaves nothing behind)."""
        return {"left": self.api.left, "dropped": self.served.dropped,
                "unfinished": self.served.unfinished_requests()}

    def engine_pids(self) -> list[int]:
        """Process ids of this replica's engines (tests kill one to check that the app recovers)."""
        return self.served.engine_pids()

    def __del__(self) -> None:
        inbox = getattr(self, "inbox", None)
        if inbox is not None:
            inbox.put(None)  # the worker thread ends
        served = getattr(self, "served", None)
        if served is not None:
            try:
                served.shutdown()
            except Exception:  # Ray may already be going down; the engines die with this replica anyway
                pass


def _settle(future: asyncio.Future, result: dict[str, Any] | BaseException) -> None:
    if future.done():  # its caller was cancelled
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def chat_api(cfg: RunConfig, name: str, card: dict[str, Any], digest: str | None,
             answer: Callable[[Question], Awaitable[dict[str, Any]]]) -> ChatApi:
    """The HTTP layer for this run: clients may set a discussion's sampling, up to its engines' context."""
    return ChatApi(cfg.serve, name, card, digest, cfg.seed, answer,
                   max_tokens=min(a.engine.max_model_len for a in cfg.team.agents) - 1,
                   sampling=cfg.method == "discussion")


def model_name(cfg: RunConfig, path: Path) -> str:
    return cfg.serve.model_name or path.parent.parent.name


def model_card(cfg: RunConfig, path: Path) -> dict[str, Any]:
    card: dict[str, Any] = {"method": cfg.method, "team": cfg.team.name,
                            "agents": [{"name": a.name, "model": a.model, "trainable": a.trainable}
                                       for a in cfg.team.agents],
                            "checkpoint": path.name, "step": checkpoints.read_state(path)["step"]}
    if cfg.method == "discussion":
        card["turns"] = cfg.turns
    return card


def build_app(cfg: RunConfig, path: Path) -> Any:
    """The Serve application for this run and checkpoint (``serve.run`` it)."""
    check_checkpoint(cfg, path)
    digest = token_digest(os.environ[cfg.serve.api_key_env]) if cfg.serve.api_key_env else None
    # HTTP workers of a conductor read their keys in the replica; the bearer token itself never leaves this process.
    env = {h.api_key_env: os.environ[h.api_key_env] for h in cfg.conductor.http_workers if h.api_key_env}
    options: dict[str, Any] = {"num_cpus": cfg.serve.num_cpus, "runtime_env": {
        "env_vars": {**env, **visible_devices_env(0)}}}  # the engines it starts hold the GPUs, if any
    deployment = serve.deployment(TeamDeployment, name="team").options(
        num_replicas=cfg.serve.replicas,
        max_ongoing_requests=2 * cfg.serve.max_batch_size,  # a full discussion, and as many waiting to join
        ray_actor_options=options,
    )
    return deployment.bind(cfg, str(path), model_name(cfg, path), model_card(cfg, path), digest)


def base_url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"


def start(cfg: RunConfig, path: Path) -> str:
    """Start Ray Serve (``serve.host``/``serve.port``) and deploy the app; returns its base URL (``.../v1``).
    Ray must be initialised; Serve's HTTP options are fixed by the first ``serve.start`` on a cluster."""
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg, path), name=APP_NAME, route_prefix=cfg.serve.route_prefix)
    return base_url(cfg.serve)


def connect_for_serving(cfg: RunConfig) -> bool:
    """Join the cluster (``cluster.address`` or $RAY_ADDRESS) or start a local instance sized for every replica's
    engines; returns whether a local instance was started."""
    from mapoco.runtime.cluster import (
        check_capacity,
        check_ready_to_start,
        required,
        start_or_join,
        team_engine_bundles,
    )
    from mapoco.runtime.placement import Bundles

    replicas = cfg.serve.replicas
    groups = {**team_engine_bundles(cfg), "serve.num_cpus": Bundles([{"CPU": cfg.serve.num_cpus}])}
    breakdown = "serve.replicas x (engines + serve.num_cpus)"
    local = start_or_join(cfg, required(groups, "CPU", replicas), "serving", breakdown)
    check_capacity(groups, {"CPU": ("serve.replicas", replicas), "GPU": ("serve.replicas", replicas)},
                   f"{replicas} replica(s) of the team", breakdown, copies=replicas)
    check_ready_to_start(cfg)
    return local


def serve_command(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """`mapoco serve checkpoint=DIR [key=value ...]`: serve until interrupted."""
    if not raw.get("checkpoint"):
        raise ConfigError("checkpoint", None, "mapoco serve needs checkpoint=DIR: a run directory or one of its "
                                              "checkpoints/step_N folders")
    cfg, path = load_config(raw["checkpoint"], raw.get("serve"), raw.get("cluster"), overrides)
    check_checkpoint(cfg, path)
    local = connect_for_serving(cfg)
    what = (f"conductor with {len(cfg.team.agents) - 1 + len(cfg.conductor.http_workers)} workers"
            if cfg.method == "conductor" else f"{len(cfg.team.agents)} agents x {cfg.turns} turns")
    print(f"starting {model_name(cfg, path)} ({what}) from {path} ...", flush=True)
    try:
        url = start(cfg, path)
    except Exception as exc:  # the replica could not start (its traceback is in the Serve logs above)
        print(f"error: the app did not start: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}",
              file=sys.stderr)
        _stop(local)
        sys.exit(1)
    if cfg.discussion.show_scores and cfg.method == "discussion":
        print("note: discussion.show_scores: served discussions show no verifier scores (questions have no gold "
              "answer)", flush=True)
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1") and not cfg.serve.api_key_env:
        print(f"warning: serving on {cfg.serve.host} without a token: set serve.api_key_env", flush=True)
    auth = f" (Authorization: Bearer ${cfg.serve.api_key_env})" if cfg.serve.api_key_env else ""
    print(f"serving {model_name(cfg, path)} at {url}\n  POST {url}/chat/completions{auth}\n  GET  {url}/models\n"
          "Ctrl-C stops.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `ray job stop`, kill, Kubernetes: stop as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        _stop(local)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop(local: bool) -> None:
    try:
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    except Exception as exc:  # shutting down anyway
        print(f"warning: could not stop the app cleanly: {exc}", file=sys.stderr)

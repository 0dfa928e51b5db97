"""`mapoco serve checkpoint=DIR`: a trained team (or conductor) behind an OpenAI-compatible endpoint, on Ray Serve.

    POST <route_prefix>/v1/chat/completions   the last user message is the question; the answer is the team's
                                               (discussion: the last turn's majority vote; conductor: the workflow's)
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
import hashlib
import hmac
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from mapoco.config import ConfigError, LearnerConfig, RunConfig, ServeConfig, from_dict
from mapoco.evaluation.metrics import team_answer, vote
from mapoco.rollout.verifier import Verdict, VerifyItem
from mapoco.runtime.devices import visible_devices_env
from mapoco.tasks import Problem
from mapoco.training import checkpoint as checkpoints

APP_NAME = "mapoco"
# Keys the serve command itself sets; everything else comes from the trained run's saved configuration.
SERVE_KEYS = ("serve", "cluster", "logger", "checkpoint", "command", "hydra", "output_dir")
CONFIG_GROUPS = ("task", "team", "verifier", "experiment")
TASK_KINDS = {"anli": "nli"}  # the answer format of a task (every other task answers a number)
MAX_ID_CHARS = 256


# ---------------------------------------------------------------- the run's configuration and checkpoint
def find_checkpoint(ref: str) -> tuple[Path, Path]:
    """``(checkpoint folder, run directory)`` for a run directory (its latest complete checkpoint) or a
    ``checkpoints/step_N`` folder."""
    path = Path(ref).expanduser().resolve()  # replicas may run in another working directory
    if not path.is_dir():
        raise ConfigError("checkpoint", ref, "no such directory: a run directory (with checkpoints/step_N) or one of "
                                             "its step_N folders")
    if path.name.startswith("step_") or (path / checkpoints.COMPLETE).exists() or (path / checkpoints.STATE).exists():
        if not checkpoints.is_complete(path):
            raise ConfigError("checkpoint", ref, f"incomplete checkpoint (no {checkpoints.COMPLETE} marker or "
                                                 f"{checkpoints.STATE}): give the run directory to serve its latest "
                                                 "complete checkpoint")
        return path, path.parent.parent
    found = checkpoints.complete_checkpoints(path)
    if not found:
        raise ConfigError("checkpoint", ref, f"no complete checkpoint under {checkpoints.checkpoints_dir(path)} "
                                             "(train with train.save_every > 0)")
    return found[-1], path


def load_config(ref: str, serve_cfg: Mapping[str, Any] | None = None, cluster: Mapping[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> tuple[RunConfig, Path]:
    """The trained run's configuration, as Hydra saved it in ``<run>/.hydra/config.yaml``, with the serve command's
    ``serve`` and ``cluster`` sections and its plain ``key=value`` overrides (``seed=1``, ``engine.replicas=2``);
    returns it validated, with the checkpoint folder to serve."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    found, run_dir = find_checkpoint(ref)
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError("checkpoint", ref, f"{saved} is missing: serve reads the run's configuration there (Hydra "
                                             "writes it for every `mapoco train` run)")
    setup_globals()  # Hydra's resolvers (${now:...}): the saved file keeps interpolations unresolved
    try:
        conf = OmegaConf.load(saved)
        conf.output_dir = str(run_dir)  # the training job's own, often an interpolation of its start time
        _apply_overrides(conf, overrides)
        raw = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError("checkpoint", ref, f"{saved}: {str(exc).splitlines()[0]}") from None
    raw.pop("hydra", None)
    raw.update(command="serve", checkpoint=str(found))
    if serve_cfg is not None:
        raw["serve"] = dict(serve_cfg)
    if cluster is not None:
        raw["cluster"] = dict(cluster)
    return from_dict(raw), found


def _apply_overrides(conf: Any, overrides: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        root = key.split(".")[0].lstrip("+~")
        if root in SERVE_KEYS:
            continue  # the serve command's own keys, already in its sections
        if root in CONFIG_GROUPS or override.is_delete() or override.is_sweep_override() or override.package:
            raise ConfigError(key, override.input_line, "serve takes the team, task and method from the checkpoint's "
                                                        "run; only plain key=value overrides apply (seed=1, turns=2, "
                                                        "engine.replicas=2)")
        OmegaConf.update(conf, key, override.value(), merge=False,
                         force_add=override.is_add() or override.is_force_add())


def check_checkpoint(cfg: RunConfig, path: Path) -> None:
    """Every trained policy's weights are there (checked before anything starts)."""
    lora_seats = cfg.team.lora_seats()
    for owner, seats in cfg.team.policy_seats().items():
        folder = checkpoints.agent_dir(path, seats[0])
        for weights in [folder / "model.safetensors"] + [folder / checkpoints.ADAPTER_DIR] * (owner in lora_seats):
            if not weights.exists():
                raise ConfigError("checkpoint", str(path), f"{weights} is missing: team.agents[{owner}] is trained "
                                                           "in this run's configuration, so its checkpoint holds it")


def engine_state(directory: Path, model_path: Path, learner: LearnerConfig) -> dict[str, Any]:
    """A learner checkpoint's policy weights under the engine's (HF) names, LoRA adapters merged, tied weights once:
    what the learner sends its engines after an update."""
    import torch
    from safetensors.torch import load_file

    from mapoco.models.registry import load_causal_lm
    from mapoco.runtime.precision import learner_dtype
    from mapoco.runtime.weights import engine_weights
    from mapoco.training.policy_model import with_lora

    saved = load_file(str(directory / "model.safetensors"))
    state = {k.removeprefix("policy."): v for k, v in saved.items() if k.startswith("policy.")}  # not the value head
    model = load_causal_lm(model_path, getattr(torch, learner_dtype(learner)))
    lora = learner.lora_rank > 0
    if lora:
        model = with_lora(model, learner)
    try:  # a LoRA checkpoint holds what trained; the base comes from the model folder
        missing, _ = model.load_state_dict(state, strict=not lora)
        if lora and any("lora_" in name for name in missing):
            raise RuntimeError(f"no adapter weights for {min(n for n in missing if 'lora_' in n)}")
    except RuntimeError as exc:
        raise ConfigError("checkpoint", str(directory), f"its weights do not fit {model_path} "
                                                        f"({str(exc).splitlines()[0]})") from None
    return engine_weights(model, lora=lora)


def push_checkpoint(team: Any, cfg: RunConfig, path: Path) -> None:
    """Put every trained policy's checkpointed weights into its engines (which keep them for any replica that
    restarts later)."""
    import ray
    import torch

    from mapoco.runtime.precision import engine_dtype
    from mapoco.runtime.weights import pack, read_adapter

    for owner, seats in cfg.team.policy_seats().items():
        runtime = team.agents[owner]
        if owner in cfg.team.lora_seats():  # the shared LoRA engine: only the adapter moves
            runtime.load_adapter(read_adapter(checkpoints.agent_dir(path, seats[0]) / checkpoints.ADAPTER_DIR))
            continue
        state = engine_state(checkpoints.agent_dir(path, seats[0]), runtime.model_path, cfg.team.agents[owner].learner)
        runtime.engines.push_weights(ray.put(pack(state, getattr(torch, engine_dtype(runtime.cfg.engine)))))


# ---------------------------------------------------------------- the team answering questions
@dataclass(frozen=True)
class Question:
    id: str  # the sampling seeds' key (see the module docstring)
    text: str
    seed: int


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
        """One result per question; questions with the same seed are answered in one rollout."""
        out: list[dict[str, Any]] = [{} for _ in questions]
        by_seed: dict[int, list[int]] = {}
        for i, question in enumerate(questions):
            by_seed.setdefault(question.seed, []).append(i)
        for seed, indices in by_seed.items():
            problems = [Problem(questions[i].id, questions[i].text, gold="", kind=self.kind) for i in indices]
            answers = self._conduct(problems, seed) if self.runner else self._discuss(problems, seed)
            for i, answer in zip(indices, answers):
                out[i] = {**answer, "batch": len(questions)}
        return out

    def _discuss(self, problems: list[Problem], seed: int) -> list[dict[str, Any]]:
        from mapoco.rollout.discussion import run_discussion

        names = [a.cfg.name for a in self.team.agents]
        out = []
        size = self.cfg.discussion.batch_size
        for start in range(0, len(problems), size):
            part = problems[start : start + size]
            result = run_discussion(self.team, part, self.cfg.turns, self.cfg.discussion, NullVerifier(), seed)
            out += [discussion_answer(result, q, names) for q in range(len(part))]
        return out

    def _conduct(self, problems: list[Problem], seed: int) -> list[dict[str, Any]]:
        from mapoco.conductor.rollout import transcript

        result = self.runner.rollout(problems, seed, verify=False)
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
        return [pid for engines in self.team.distinct_engines() for pid in engines.call_all(lambda a: a.pid.remote())]

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self.owns_team:
            self.team.shutdown()


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


# ---------------------------------------------------------------- HTTP semantics (no Ray Serve here: testable alone)
class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ChatApi:
    """OpenAI-compatible request handling: routing, bearer-token auth, validation, the chat.completion object.
    ``answer`` answers one question (in Serve: joins the replica's next batch); an exception from it is a 503."""

    def __init__(self, cfg: ServeConfig, model_name: str, card: dict[str, Any], digest: str | None, default_seed: int,
                 answer: Callable[[Question], Awaitable[dict[str, Any]]]):
        self.cfg, self.model_name, self.card, self.digest = cfg, model_name, card, digest
        self.default_seed, self.answer = default_seed, answer
        self.created = int(time.time())
        self.max_body = max(1 << 20, 8 * cfg.max_input_chars)  # room for a chat history around the question

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes
                     ) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            route = self._route(path)
            self._authorize(headers)
            if route == "models":
                if method != "GET":
                    raise ApiError(405, f"{method} {path}: use GET", "method_not_allowed", headers={"Allow": "GET"})
                return 200, self.models(), {}
            if method != "POST":
                raise ApiError(405, f"{method} {path}: use POST", "method_not_allowed", headers={"Allow": "POST"})
            question, transcript = self.parse(body)
            try:
                result = await self.answer(question)
            except Exception as exc:  # the engines restart themselves on the next call: the app stays up
                cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                print(f"mapoco serve: a batch failed ({cause})", file=sys.stderr, flush=True)
                raise ApiError(503, f"the team could not answer ({cause[:300]}); its engines restart by themselves: "
                                    "retry the request", "engine_unavailable", headers={"Retry-After": "1"}) from None
            return 200, self.completion(question, result, transcript), {}
        except ApiError as err:
            return err.status, err.body(), err.headers
        except Exception as exc:  # a bug, not the client's fault: still an OpenAI-style error body
            return 500, ApiError(500, f"internal error ({type(exc).__name__}: {exc})", "internal_error").body(), {}

    def _route(self, path: str) -> str:
        path = path.rstrip("/")
        if path.endswith("/v1/chat/completions"):
            return "chat"
        if path.endswith("/v1/models"):
            return "models"
        raise ApiError(404, f"no route {path or '/'}: POST .../v1/chat/completions or GET .../v1/models", "not_found")

    def _authorize(self, headers: Mapping[str, str]) -> None:
        if self.digest is None:
            return
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token_digest(token.strip()), self.digest):
            raise ApiError(401, "invalid bearer token", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def parse(self, body: bytes) -> tuple[Question, bool]:
        if len(body) > self.max_body:
            raise ApiError(413, f"request body of {len(body)} bytes; at most {self.max_body}", "request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object (an OpenAI chat completion request)", "invalid_json")
        model = data.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r} "
                                "(GET /v1/models)", "model_not_found", "model")
        if data.get("stream"):
            raise ApiError(400, "stream=true is not supported: the answer is the team's after the whole discussion",
                           "unsupported_parameter", "stream")
        if data.get("n", 1) not in (1, None):
            raise ApiError(400, "n must be 1: send one request per sample (seed chooses it)", "unsupported_parameter",
                           "n")
        text = self._question(data.get("messages"))
        seed = data.get("seed")
        if seed is None:
            seed = self.default_seed
        elif not isinstance(seed, int) or isinstance(seed, bool) or abs(seed) >= 2**63:
            raise ApiError(400, f"seed must be an integer, got {seed!r}", "invalid_value", "seed")
        extra = data.get("mapoco") or {}
        if not isinstance(extra, dict):
            raise ApiError(400, "mapoco must be an object: {\"transcript\": true, \"id\": \"...\"}", "invalid_value",
                           "mapoco")
        transcript = extra.get("transcript", False)
        if not isinstance(transcript, bool):
            raise ApiError(400, f"mapoco.transcript must be true or false, got {transcript!r}", "invalid_value",
                           "mapoco.transcript")
        qid = extra.get("id")
        if qid is None:
            qid = question_id(text)
        elif not isinstance(qid, str) or not qid or len(qid) > MAX_ID_CHARS:
            raise ApiError(400, f"mapoco.id must be a non-empty string of at most {MAX_ID_CHARS} characters",
                           "invalid_value", "mapoco.id")
        return Question(qid, text, seed), transcript

    def _question(self, messages: Any) -> str:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects",
                           "invalid_value", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string role", "invalid_value",
                               f"messages[{i}]")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ApiError(400, "messages holds no user message: the last user message is the question",
                           "invalid_value", "messages")
        i = users[-1]
        content = messages[i].get("content")
        if isinstance(content, list):  # content parts: the text ones, in order
            if not all(isinstance(p, dict) for p in content) or any(p.get("type") != "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_value",
                               f"messages[{i}].content")
            content = "\n".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "invalid_value", f"messages[{i}].content")
        text = content.strip()
        if not text:
            raise ApiError(400, f"messages[{i}].content is empty: the last user message is the question",
                           "invalid_value", f"messages[{i}].content")
        if len(text) > self.cfg.max_input_chars:
            raise ApiError(400, f"the question has {len(text)} characters; this server takes at most "
                                f"{self.cfg.max_input_chars} (serve.max_input_chars)", "context_length_exceeded",
                           f"messages[{i}].content")
        return text

    def completion(self, question: Question, result: dict[str, Any], transcript: bool) -> dict[str, Any]:
        extra = {"question_id": question.id, "seed": question.seed, "answer": result["answer"],
                 "batch": result.get("batch", 1)}
        if "votes" in result:
            extra["votes"] = result["votes"]
        if transcript:
            extra.update(result["transcript"])
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["content"]},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": result["usage"], "mapoco": extra}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "mapoco", "mapoco": self.card}]}


# ---------------------------------------------------------------- the Serve deployment
class TeamDeployment:
    """One Serve replica: the team's engines, the HTTP handling, and the batch that concurrent requests join."""

    def __init__(self, cfg: RunConfig, checkpoint: str, model_name: str, card: dict[str, Any], digest: str | None):
        self.served = ServedTeam(cfg, Path(checkpoint))
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mapoco-team")  # engine calls block
        self.answer_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self.answer_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self.api = ChatApi(cfg.serve, model_name, card, digest, cfg.seed, self.answer_batch)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)  # both set from serve.* in __init__
    async def answer_batch(self, questions: list[Question]) -> list[dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.served.answer, questions)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        status, body, headers = await self.api.handle(request.method, request.url.path, request.headers,
                                                      await request.body())
        return JSONResponse(body, status_code=status, headers=headers)

    def engine_pids(self) -> list[int]:
        """Process ids of this replica's engines (tests kill one to check that the app recovers)."""
        return self.served.engine_pids()

    def __del__(self) -> None:
        served = getattr(self, "served", None)
        if served is not None:
            try:
                served.shutdown()
            except Exception:  # Ray may already be going down; the engines die with this replica anyway
                pass


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
        max_ongoing_requests=2 * cfg.serve.max_batch_size,  # one batch runs while the next one fills
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


# ---------------------------------------------------------------- `mapoco serve`
def init_ray(cfg: RunConfig) -> bool:
    """Join the cluster (``cluster.address`` or $RAY_ADDRESS) or start a local instance sized for every replica's
    engines; returns whether a local instance was started."""
    from mapoco.runtime.cluster import (
        check_capacity,
        required,
        run_devices,
        start_or_join,
        team_engine_bundles,
    )
    from mapoco.config import check_models
    from mapoco.runtime.devices import check_install, this_install
    from mapoco.runtime.placement import Bundles

    replicas = cfg.serve.replicas
    groups = {**team_engine_bundles(cfg), "serve.num_cpus": Bundles([{"CPU": cfg.serve.num_cpus}])}
    breakdown = "serve.replicas x (engines + serve.num_cpus)"
    local = start_or_join(cfg, required(groups, "CPU", replicas), "serving", breakdown)
    check_capacity(groups, {"CPU": ("serve.replicas", replicas), "GPU": ("serve.replicas", replicas)},
                   f"{replicas} replica(s) of the team", breakdown, copies=replicas)
    check_install(run_devices(cfg), this_install())
    check_models(cfg)
    return local


def serve_command(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """`mapoco serve checkpoint=DIR [key=value ...]`: serve until interrupted."""
    if not raw.get("checkpoint"):
        raise ConfigError("checkpoint", None, "mapoco serve needs checkpoint=DIR: a run directory or one of its "
                                              "checkpoints/step_N folders")
    cfg, path = load_config(raw["checkpoint"], raw.get("serve"), raw.get("cluster"), overrides)
    check_checkpoint(cfg, path)
    local = init_ray(cfg)
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

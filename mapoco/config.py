"""Typed run configuration, built from the Hydra config and validated in one place before any actor starts.

Every error names the key, the value and what is allowed, e.g.
``turns=0: must be an integer >= 1 (number of discussion turns)``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mapoco.rewards import INCENTIVE_MODES, RewardConfig
from mapoco.tasks import TaskConfig, task_names

TOPOLOGIES = ("all_to_all", "ring", "star")
VERIFIER_KINDS = ("rule", "learned")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key = key


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32


@dataclass
class EngineConfig:
    replicas: int = 1
    dtype: str = "auto"  # auto: float32 on CPUs without native bf16, bf16 on GPUs
    max_model_len: int = 1024
    kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = 0.4
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class AgentConfig:
    name: str
    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class TeamConfig:
    name: str
    agents: list[AgentConfig]


@dataclass
class DiscussionConfig:
    topology: str = "all_to_all"
    show_scores: bool = False  # MAPoRL reward_feedback: peers' verifier scores appear in the prompt
    batch_size: int = 256  # questions per rollout batch


@dataclass
class VerifierConfig:
    kind: str = "rule"
    path: str | None = None  # learned verifier checkpoint (written by `mapoco train-verifier`)
    timeout_s: float = 30.0  # per sample
    batch_size: int = 64
    num_cpus: float = 0.5
    # `mapoco train-verifier` only:
    base: str | None = None  # backbone model (None: the first agent's model)
    epochs: int = 3
    lr: float = 3e-4
    held_out: float = 0.2  # share of questions kept out of training for the report


@dataclass
class ClusterConfig:
    address: str | None = None  # None: join $RAY_ADDRESS if set, else start a local Ray instance
    num_cpus: int | None = None  # logical CPUs of a local instance (None: what the actors ask for)
    dashboard_host: str = "127.0.0.1"


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "mapoco"
    group: str | None = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    task: TaskConfig
    team: TeamConfig
    command: str = "eval"
    seed: int = 0
    turns: int = 3
    output_dir: str = "outputs/run"
    discussion: DiscussionConfig = field(default_factory=DiscussionConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


# ---------------------------------------------------------------- dict -> dataclass with type checks
def _check_scalar(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            raise ConfigError(key, value, "must be a number, not NaN")
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ in (str, bool) and isinstance(value, typ):
        return value
    if typ is typing.Any:
        return value
    raise ConfigError(key, value, f"must be of type {typ.__name__}")


def _convert(key: str, value: Any, typ: Any) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0])
    if dataclasses.is_dataclass(typ):
        return build(typ, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "must be a list")
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a mapping")
        return dict(value)
    return _check_scalar(key, value, typ)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping; unknown or missing keys are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or cls.__name__, data, f"must be a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(key, data[unknown[0]], f"unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(key, data[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, None, "is required")
    return cls(**kwargs)


# ---------------------------------------------------------------- semantic checks
def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _validate_agent(i: int, agent: AgentConfig) -> None:
    key = f"team.agents[{i}]"
    engine, sampling = agent.engine, agent.sampling
    _require(engine.replicas >= 1, f"{key}.engine.replicas", engine.replicas, "must be >= 1")
    _require(engine.dtype in DTYPES, f"{key}.engine.dtype", engine.dtype, f"one of {DTYPES}")
    _require(engine.max_model_len >= 64, f"{key}.engine.max_model_len", engine.max_model_len, "must be >= 64")
    _require(engine.kv_cache_gib >= 1, f"{key}.engine.kv_cache_gib", engine.kv_cache_gib, "must be an integer >= 1")
    _require(engine.num_cpus >= 0, f"{key}.engine.num_cpus", engine.num_cpus, "must be >= 0")
    _require(engine.num_gpus >= 0, f"{key}.engine.num_gpus", engine.num_gpus, "must be >= 0")
    _require(engine.tensor_parallel_size >= 1, f"{key}.engine.tensor_parallel_size", engine.tensor_parallel_size,
             "must be >= 1")
    _require(0 < engine.gpu_memory_utilization <= 1, f"{key}.engine.gpu_memory_utilization",
             engine.gpu_memory_utilization, "must be in (0, 1]")
    _require(sampling.temperature >= 0, f"{key}.sampling.temperature", sampling.temperature, "must be >= 0")
    _require(0 < sampling.top_p <= 1, f"{key}.sampling.top_p", sampling.top_p, "must be in (0, 1]")
    _require(sampling.max_new_tokens >= 1, f"{key}.sampling.max_new_tokens", sampling.max_new_tokens, "must be >= 1")


def _validate_model(i: int, agent: AgentConfig) -> None:
    from mapoco.models import resolve_model

    try:
        resolve_model(agent.model)
    except FileNotFoundError as exc:
        raise ConfigError(f"team.agents[{i}].model", agent.model, str(exc)) from None


def validate(cfg: RunConfig) -> RunConfig:
    _require(cfg.turns >= 1, "turns", cfg.turns, "must be an integer >= 1 (number of discussion turns)")
    _require(len(cfg.team.agents) >= 1, "team.agents", cfg.team.agents, "needs at least one agent")
    for i, agent in enumerate(cfg.team.agents):
        _validate_agent(i, agent)
        _validate_model(i, agent)
    _require(cfg.task.name in task_names(), "task.name", cfg.task.name, f"one of {task_names()}")
    _require(cfg.task.limit is None or cfg.task.limit >= 1, "task.limit", cfg.task.limit, "must be >= 1 or null")
    _require(cfg.discussion.topology in TOPOLOGIES, "discussion.topology", cfg.discussion.topology,
             f"one of {TOPOLOGIES}")
    _require(cfg.discussion.batch_size >= 1, "discussion.batch_size", cfg.discussion.batch_size, "must be >= 1")
    _require(cfg.verifier.kind in VERIFIER_KINDS, "verifier.kind", cfg.verifier.kind, f"one of {VERIFIER_KINDS}")
    _require(cfg.command == "train-verifier" or cfg.verifier.kind != "learned" or bool(cfg.verifier.path),
             "verifier.path", cfg.verifier.path,
             "a learned verifier needs a checkpoint path (train one with `mapoco train-verifier`)")
    _require(cfg.verifier.timeout_s > 0, "verifier.timeout_s", cfg.verifier.timeout_s, "must be > 0")
    _require(cfg.verifier.batch_size >= 1, "verifier.batch_size", cfg.verifier.batch_size, "must be >= 1")
    _require(cfg.verifier.epochs >= 1, "verifier.epochs", cfg.verifier.epochs, "must be >= 1")
    _require(cfg.verifier.lr > 0, "verifier.lr", cfg.verifier.lr, "must be > 0")
    _require(0 < cfg.verifier.held_out < 1, "verifier.held_out", cfg.verifier.held_out, "must be in (0, 1)")
    _require(cfg.rewards.gamma >= 0, "rewards.gamma", cfg.rewards.gamma, "must be >= 0")
    _require(cfg.rewards.incentives in INCENTIVE_MODES, "rewards.incentives", cfg.rewards.incentives,
             f"one of {INCENTIVE_MODES}")
    for name in ("alpha0", "alpha1", "beta0", "beta1"):
        value = getattr(cfg.rewards, name)
        _require(value >= 0, f"rewards.{name}", value, "must be >= 0 (signs come from rewards.incentives)")
    _require(cfg.logger.wandb.mode in ("offline", "online", "disabled"), "logger.wandb.mode", cfg.logger.wandb.mode,
             "one of offline, online, disabled")
    return cfg


def _merge_agent_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level ``engine``/``sampling`` are defaults that each agent's own keys override."""
    engine, sampling = raw.pop("engine", {}) or {}, raw.pop("sampling", {}) or {}
    team = dict(raw.get("team") or {})
    agents = []
    for agent in team.get("agents") or []:
        agent = dict(agent)
        agent["engine"] = {**engine, **(agent.get("engine") or {})}
        agent["sampling"] = {**sampling, **(agent.get("sampling") or {})}
        agents.append(agent)
    team["agents"] = agents
    raw["team"] = team
    return raw


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Plain (resolved) config mapping -> validated RunConfig. ``hydra`` keys are ignored."""
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    return validate(build(RunConfig, _merge_agent_defaults(raw)))

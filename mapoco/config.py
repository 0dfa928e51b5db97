"""Typed run configuration, built from the Hydra config and validated in one place before any actor starts.

Every error names the key, the value and what is allowed, e.g.
``turns=0: must be an integer >= 1 (number of discussion turns)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mapoco.rollout.topology import TOPOLOGIES
from mapoco.tasks import (
    ANLI_ROUNDS,
    ARITHMETIC_DEFAULTS,
    ARITHMETIC_OPERATORS,
    TASK_PARAMS,
    TASK_SPLITS,
    TaskConfig,
    task_names,
)

COMMANDS = ("eval", "train", "train-verifier", "serve")  # `mapoco <command>` sets it
LOGPROB_BREACH_ACTIONS = ("stop", "warn")
METHODS = ("discussion", "conductor")
VERIFIER_KINDS = ("rule", "learned")
DTYPES = ("auto", "float32", "bfloat16", "float16")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks (a test compares the two)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies
WEIGHT_SYNCS = ("auto", "object_store", "collective")  # mapoco.training.weight_sync
MANAGED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE",
                         "VLLM_ENABLE_V1_MULTIPROCESSING"})  # the actors' environment mapoco sets (env may not)
GPU_MEMORY_CAP = 0.9  # of one GPU's memory, for everything mapoco puts on it (the rest: CUDA context, fragments)
WANDB_MODES = ("offline", "online", "disabled")
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # characters wandb refuses in a project name
MAX_SEED = 2**31 - 1  # engines seed numpy (< 2**32) with seed + 1000 x agent + replica
SEED_RANGE = f"an integer in 0..{MAX_SEED}"
# Kernel views, not storage: a directory there cannot hold a run (root may even pass os.access on them).
VIRTUAL_FILESYSTEMS = frozenset({"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                                 "securityfs", "configfs", "pstore", "bpf", "efivarfs", "mqueue", "hugetlbfs",
                                 "fusectl", "binfmt_misc"})


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(f"{key}={value!r}: {allowed}")
        self.key = key


INCENTIVE_MODES = ("paper", "reference_code", "none")


@dataclass(frozen=True)
class RewardConfig:
    gamma: float = 0.3
    incentives: str = "paper"
    alpha0: float = 0.0  # resist a wrong majority (keep a right answer)
    alpha1: float = 0.0  # be persuaded by right peers (wrong -> right)
    beta0: float = 0.0  # a wrong answer after which wrong peers become right
    beta1: float = 0.0  # persuade wrong peers with a right answer


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32


@dataclass
class EngineConfig:
    replicas: int = 1
    dtype: str = "auto"  # auto: bf16 on GPUs, float32 on every CPU (mapoco.runtime.precision)
    max_model_len: int = 1024
    kv_cache_gib: int = 1  # CPU only: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = 0.4  # GPU: the share of each of its GPUs' memory a replica takes (weights + KV)
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] | None = None  # custom Ray resources per replica: pin it to the nodes with them
    env: dict[str, str] | None = None  # extra environment of each replica (e.g. VLLM_LOGGING_LEVEL: DEBUG)
    placement: str = "PACK"  # how the replicas spread over nodes (PLACEMENT_STRATEGIES)
    # The shared adapter engine only (team.lora_engine):
    max_loras: int = 0  # adapters in one batch; 0: one per agent on the engine
    max_lora_rank: int = 0  # 0: the smallest rank vLLM offers that holds every adapter on the engine


@dataclass
class LearnerConfig:
    num_learners: int = 1  # DeepSpeed ranks in this agent's learner group
    zero_stage: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: int = 16
    dtype: str = "auto"  # auto: bf16 on GPUs, float32 on every CPU (mapoco.runtime.precision)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] | None = None  # custom Ray resources per rank: pin it to the nodes with them
    env: dict[str, str] | None = None  # extra environment of each rank (e.g. NCCL_DEBUG: INFO)
    placement: str = "PACK"  # how the ranks spread over nodes (PLACEMENT_STRATEGIES)
    colocate: bool = False  # rank k rides in engine replica k's bundle (its GPU, or CPUs); the engines sleep meanwhile


@dataclass
class PriceConfig:
    """What one call of a Conductor worker costs (method=conductor), in any unit: a price per call plus one per
    generated token."""

    per_call: float = 0.0
    per_token: float = 0.0

    def of(self, tokens: int) -> float:
        return self.per_call + self.per_token * tokens


@dataclass
class AgentConfig:
    name: str
    model: str
    trainable: bool = True  # false: a frozen partner (MAPoRL's single-agent-trained baseline)
    adapter: str | None = None  # a frozen agent on the shared LoRA engine: its fixed peft adapter (None: the base)
    price: PriceConfig = field(default_factory=PriceConfig)  # a Conductor worker's cost per call
    description: str = ""  # a Conductor worker's card, shown to the conductor with its number ("adds=Model 0")
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass
class TeamConfig:
    name: str
    agents: list[AgentConfig]
    shared_policy: bool = False  # one policy (engines + learner) plays every seat; agents must share a model
    # One engine serves every agent on the LoRA-trained agents' base model, each with its own adapter; agents on
    # other models keep their own engines.
    lora_engine: bool = False

    def lora_seats(self) -> list[int]:
        """The seats the shared LoRA engine serves: every agent on the base model of the first agent that trains
        LoRA (validation makes every LoRA-trained agent use that model). Empty without ``lora_engine``."""
        trained = [a.model for a in self.agents if a.trainable and a.learner.lora_rank > 0]
        if not self.lora_engine or not trained:
            return []
        return [i for i, a in enumerate(self.agents) if a.model == trained[0]]

    def policy_seats(self) -> dict[int, list[int]]:
        """Trained policies: owner seat (whose engines and learner config it uses) -> the seats it plays. A
        checkpoint keeps a policy under ``agent_<first seat>``."""
        seats_of: dict[int, list[int]] = {}
        for index, agent in enumerate(self.agents):
            if agent.trainable:
                seats_of.setdefault(0 if self.shared_policy else index, []).append(index)
        return seats_of


@dataclass
class AlgorithmConfig:
    estimator: str = "gae"  # gae (MAPoRL) | grpo | rloo | reinforce_pp
    samples_per_question: int = 2  # independent discussions per question (group baselines need >= 2)
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.01
    kl_estimator: str = "k1"  # k1 | k2 | k3
    kl_in_reward: bool = True  # false: KL is a loss term instead
    whiten_advantages: bool = True
    scale_by_std: bool = True  # grpo: divide by the group's std (false: Dr. GRPO, the mean only)
    ppo_epochs: int = 2
    mini_batches: int = 1  # optimizer steps per PPO epoch
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 20
    batch_questions: int = 16  # training questions per step (each discussed samples_per_question times)
    eval_every: int = 10  # 0: no evaluation during training
    eval_limit: int = 100  # held-out questions per evaluation
    save_every: int = 10  # 0: no checkpoints
    keep_checkpoints: int = 2
    resume: str | None = None  # auto: the last complete checkpoint of output_dir; or a checkpoint directory
    logprob_tolerance: float | None = None  # max |engine - learner| logprob that counts as in sync (None: by dtype)
    logprob_breach_steps: int = 3  # this many steps in a row above the tolerance ...
    on_logprob_breach: str = "stop"  # ... stop the run | warn (the progress line says so every step)
    weight_sync: str = "auto"  # WEIGHT_SYNCS: auto (collective where each member owns its GPUs, else object_store)
    sync_timeout_s: float = 120.0  # a collective push (broadcast + reload) that takes longer names what stalled
    concurrent_policies: bool = True  # every policy scores, updates and syncs at once (false: one after another)
    off_policy_steps: int = 0  # 1: the next step's rollout runs during this step's update (weights one update old)
    is_weight_cap: float = 2.0  # off-policy: truncated importance weights pi_learner / pi_engine are at most this


@dataclass
class DiscussionConfig:
    topology: str = "all_to_all"
    show_scores: bool = False  # MAPoRL reward_feedback: peers' verifier scores appear in the prompt
    batch_size: int = 256  # questions per rollout batch


@dataclass
class HttpWorkerConfig:
    """A conductor worker behind an OpenAI-compatible chat-completions endpoint (closed or remote models)."""

    name: str
    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = None  # environment variable holding the key (never the key itself)
    timeout_s: float = 60.0
    max_tokens: int = 256
    temperature: float = 0.0
    concurrency: int = 16  # requests in flight at once to this endpoint
    price: PriceConfig = field(default_factory=PriceConfig)
    description: str = ""  # its card, shown to the conductor with its number


@dataclass
class WorkflowConfig:
    """A hand-written workflow in the conductor's three lists (``mapoco.conductor.workflow``): an evaluation
    baseline that runs on the whole pool, numbered as the conductor sees it."""

    model_id: list[int] = field(default_factory=list)
    subtasks: list[str] = field(default_factory=list)
    access_list: list[list[str]] = field(default_factory=list)  # per step: ["all"] or []


@dataclass
class ConductorConfig:
    """``method=conductor``: team.agents[0] is the conductor (trained), team.agents[1:] its local workers."""

    http_workers: list[HttpWorkerConfig] = field(default_factory=list)
    max_steps: int = 5
    random_pools: bool = False  # each question draws a random subset of the pool (renumbered)
    min_pool: int = 1  # smallest random pool
    # Worker-name pools that random training pools never contain all of (a held-out pool composition)
    heldout_pools: list[list[str]] = field(default_factory=list)
    # eval: each of these pools too (worker names, in the order the conductor sees them), against its baselines
    eval_pools: list[list[str]] = field(default_factory=list)
    self_worker: bool = False  # the conductor is also a worker (recursion), up to max_depth
    max_depth: int = 1
    replan: bool = False  # one re-plan round after seeing the final answer
    examples: list[str] = field(default_factory=list)  # few-shot examples shown in the prompt
    baselines: bool = True  # eval: also each worker alone, majority vote, a random workflow
    fixed_workflows: list[WorkflowConfig] = field(default_factory=list)  # eval: hand-written workflows too
    # reward = correctness - cost_weight * (the workflow's cost / cost_scale); a malformed plan still earns 0
    cost_weight: float = 0.0
    cost_scale: float = 0.0  # the cost that counts as 1 (0: one call of the priciest worker at its token limit)


@dataclass
class VerifierConfig:
    kind: str = "rule"
    path: str | None = None  # learned verifier checkpoint (written by `mapoco train-verifier`)
    timeout_s: float = 30.0  # per sample
    workers: int = 2  # gold-check processes; a hung check costs one of them until the pool is rebuilt
    batch_size: int = 64
    num_cpus: float = 0.5
    # `mapoco train-verifier` only:
    base: str | None = None  # backbone model (None: the first agent's model)
    epochs: int = 3
    lr: float = 3e-4
    train_batch_size: int = 8
    held_out: float = 0.2  # share of questions kept out of training for the report


@dataclass
class ClusterConfig:
    address: str | None = None  # None: join $RAY_ADDRESS if set, else start a local Ray instance
    num_cpus: int | None = None  # logical CPUs of a local instance (None: what the actors ask for)
    dashboard_host: str = "127.0.0.1"
    placement_timeout_s: float = 120.0  # a group (or a restarted actor's bundle) not placed by then is an error
    gpu_memory_gib: float | None = None  # mapoco plan: each GPU's memory, where the nodes cannot say (no nvidia-smi)


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "mapoco"
    group: str | None = None  # a multirun defaults it to the sweep directory's name
    name: str | None = None  # default: the run directory's name (a multirun job: its overrides)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # false: engine, learner and verifier output goes to <output_dir>/logs/, the terminal shows progress and tables;
    # true: it streams to the terminal as well (Ray's log forwarding)
    show_logs: bool = False


@dataclass
class ServeConfig:
    """``mapoco serve checkpoint=DIR``: a trained team (or conductor) behind an OpenAI-compatible endpoint."""

    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: set api_key_env then
    port: int = 8000
    route_prefix: str = "/"  # endpoints: <route_prefix>/v1/chat/completions and <route_prefix>/v1/models
    model_name: str | None = None  # the "model" clients send (None: the run directory's name)
    replicas: int = 1  # Serve replicas, each with engines of its own (the team's engine.* settings)
    num_cpus: float = 0.0  # per Serve replica (it tokenizes and routes; its engines reserve their own bundles)
    max_batch_size: int = 32  # concurrent requests discussed together in one engine batch
    batch_wait_timeout_s: float = 0.05  # how long the first request of a batch waits for others to join
    api_key_env: str | None = None  # environment variable holding the bearer token clients must send (None: no auth)
    max_input_chars: int = 4000  # longer questions are refused with 400


@dataclass
class RunConfig:
    task: TaskConfig
    team: TeamConfig
    command: str = "eval"
    method: str = "discussion"  # discussion (MAPoRL co-training) | conductor
    seed: int = 0
    turns: int = 3
    output_dir: str = "outputs/run"
    checkpoint: str | None = None  # mapoco serve: a run directory (its latest complete checkpoint) or a step_N folder
    discussion: DiscussionConfig = field(default_factory=DiscussionConfig)
    conductor: ConductorConfig = field(default_factory=ConductorConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# ---------------------------------------------------------------- dict -> dataclass with type checks
def _check_scalar(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
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


def _require_name(key: str, value: str | None, allowed: str = "a non-empty name") -> None:
    """A name that is not blank (None passes: the optional keys' default)."""
    _require(value is None or bool(value.strip()), key, value, allowed)


def _require_host(key: str, host: str) -> None:
    _require(re.fullmatch(r"[^\s/]+", host) is not None, key, host,
             "an address to bind, e.g. 127.0.0.1 (0.0.0.0: every interface)")


def _require_env_name(key: str, value: str | None) -> None:
    _require(value is None or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) is not None, key, value,
             "the name of an environment variable (letters, digits and _), or null")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_run(cfg: RunConfig) -> None:
    _require(cfg.command in COMMANDS, "command", cfg.command, f"one of {COMMANDS} (set by `mapoco <command>`)")
    _require(cfg.method in METHODS, "method", cfg.method, f"one of {METHODS}")
    _require(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, SEED_RANGE)
    _require(cfg.turns >= 1, "turns", cfg.turns, "must be an integer >= 1 (number of discussion turns)")
    check_writable_dir("output_dir", cfg.output_dir)
    _require(cfg.checkpoint is None or Path(cfg.checkpoint).expanduser().is_dir(), "checkpoint", cfg.checkpoint,
             "no such directory: a run directory (with checkpoints/step_N) or one of its step_N folders, or null")
    _require(cfg.discussion.topology in TOPOLOGIES, "discussion.topology", cfg.discussion.topology,
             f"one of {TOPOLOGIES}")
    _require(cfg.discussion.batch_size >= 1, "discussion.batch_size", cfg.discussion.batch_size, "must be >= 1")


def _validate_task(task: TaskConfig) -> None:
    from mapoco.models.registry import HUB_ID

    _require(task.name in task_names(), "task.name", task.name, f"one of {task_names()}")
    splits = TASK_SPLITS[task.name]
    _require(task.split in splits, "task.split", task.split, f"a split of task {task.name}: one of {splits}")
    _require(task.limit is None or task.limit >= 1, "task.limit", task.limit, "must be >= 1 or null")
    for key, path in (("task.path", task.path), ("task.train_path", task.train_path)):
        _require(path is None or Path(path).expanduser().is_file(), key, path,
                 "no such file: a local json, jsonl, parquet or csv file, or null")
    _require(task.hub is None or HUB_ID.fullmatch(task.hub) is not None, "task.hub", task.hub,
             "a hub dataset id (org/name), or null for the task's own")
    _require_name("task.hub_config", task.hub_config, "a non-empty dataset config name, or null for the task's own")
    _require(0 <= task.seed <= MAX_SEED, "task.seed", task.seed, SEED_RANGE)
    allowed = TASK_PARAMS[task.name]
    for name, value in task.params.items():
        _require(name in allowed, f"task.params.{name}", value,
                 f"not a parameter of task {task.name}; allowed: {', '.join(allowed) or 'none'}")
    if task.name == "arithmetic":
        _validate_arithmetic({**ARITHMETIC_DEFAULTS, **task.params})
    anli_round = task.params.get("round", 1)
    _require(task.name != "anli" or anli_round in ANLI_ROUNDS, "task.params.round", anli_round,
             f"one of {ANLI_ROUNDS} (the ANLI round)")


def _validate_arithmetic(params: dict[str, Any]) -> None:
    """reasoning-gym's basic_arithmetic rules, checked here rather than when the first question is drawn."""
    for low, high in (("min_terms", "max_terms"), ("min_digits", "max_digits")):
        _require(_is_int(params[low]) and params[low] >= 1, f"task.params.{low}", params[low], "an integer >= 1")
        _require(_is_int(params[high]) and params[high] >= params[low], f"task.params.{high}", params[high],
                 f"an integer >= task.params.{low}={params[low]}")
    ops = params["operators"]
    _require(isinstance(ops, (list, tuple)) and bool(ops) and all(op in ARITHMETIC_OPERATORS for op in ops),
             "task.params.operators", ops, f"a non-empty list of {', '.join(ARITHMETIC_OPERATORS)}")
    for name in ("allow_parentheses", "allow_negation"):
        _require(isinstance(params[name], bool), f"task.params.{name}", params[name], "true or false")


def _validate_team(cfg: RunConfig) -> None:
    team = cfg.team
    _require_name("team.name", team.name)
    _require(len(team.agents) >= 1, "team.agents", team.agents, "needs at least one agent")
    for i, agent in enumerate(team.agents):
        _validate_agent(i, agent)
        _validate_model(i, agent)
    _require(cfg.command != "train" or any(a.trainable for a in team.agents), "team.agents[0].trainable", False,
             "mapoco train needs at least one trainable agent (mapoco eval runs frozen ones)")
    _validate_lora_engine(team)
    named = [(f"team.agents[{i}].name", a.name) for i, a in enumerate(team.agents)]
    if cfg.method == "conductor":
        named += [(f"conductor.http_workers[{i}].name", w.name) for i, w in enumerate(cfg.conductor.http_workers)]
    seen: dict[str, str] = {}
    for key, name in named:
        _require_name(key, name)
        _require(name not in seen, key, name, f"names must differ: {seen.get(name)} has it too")
        seen[name] = key


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
    _require(1 <= sampling.max_new_tokens < engine.max_model_len, f"{key}.sampling.max_new_tokens",
             sampling.max_new_tokens, f"must be in 1..{engine.max_model_len - 1}: the prompt and the answer share "
                                      f"engine.max_model_len={engine.max_model_len} tokens")
    learner = agent.learner
    _require(learner.num_learners >= 1, f"{key}.learner.num_learners", learner.num_learners, "must be >= 1")
    _require(learner.zero_stage in (0, 1, 2, 3), f"{key}.learner.zero_stage", learner.zero_stage, "one of 0, 1, 2, 3")
    _require(learner.lr > 0, f"{key}.learner.lr", learner.lr, "must be > 0")
    _require(learner.weight_decay >= 0, f"{key}.learner.weight_decay", learner.weight_decay, "must be >= 0")
    _require(learner.warmup_steps >= 0, f"{key}.learner.warmup_steps", learner.warmup_steps, "must be >= 0")
    _require(learner.micro_batch_size >= 1, f"{key}.learner.micro_batch_size", learner.micro_batch_size,
             "must be >= 1")
    _require(learner.max_grad_norm > 0, f"{key}.learner.max_grad_norm", learner.max_grad_norm, "must be > 0")
    _require(learner.lora_rank >= 0, f"{key}.learner.lora_rank", learner.lora_rank, "must be >= 0 (0: no LoRA)")
    _require(learner.lora_alpha >= 1, f"{key}.learner.lora_alpha", learner.lora_alpha,
             "must be >= 1 (LoRA scales its update by lora_alpha / lora_rank)")
    _require(learner.dtype in DTYPES, f"{key}.learner.dtype", learner.dtype, f"one of {DTYPES}")
    _require(learner.num_cpus >= 0, f"{key}.learner.num_cpus", learner.num_cpus, "must be >= 0")
    _require(learner.num_gpus >= 0, f"{key}.learner.num_gpus", learner.num_gpus, "must be >= 0")
    _validate_placement(key, agent)


def _validate_placement(key: str, agent: AgentConfig) -> None:
    """The GPU arithmetic of one agent's actors (see mapoco.runtime.placement), checked before anything starts."""
    engine, learner = agent.engine, agent.learner
    for part, cfg in (("engine", engine), ("learner", learner)):
        _require(cfg.num_cpus + cfg.num_gpus > 0, f"{key}.{part}.num_cpus", cfg.num_cpus,
                 f"with {part}.num_gpus=0 it must be > 0: every actor reserves some CPU or GPU")
        _require(cfg.placement in PLACEMENT_STRATEGIES, f"{key}.{part}.placement", cfg.placement,
                 f"one of {PLACEMENT_STRATEGIES}")
        for name, value in (cfg.env or {}).items():
            _require(isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)) is not None,
                     f"{key}.{part}.env.{name}", value, "a variable name and a string value ('1', not 1)")
            _require(name not in MANAGED_ENV, f"{key}.{part}.env.{name}", value,
                     "mapoco sets this one itself (from num_gpus, kv_cache_gib and how the actor runs)")
        for name, amount in (cfg.resources or {}).items():
            where = f"{key}.{part}.resources.{name}"
            _require(name not in ("CPU", "GPU", "memory"), where, amount,
                     f"a custom resource; set {part}.num_cpus / {part}.num_gpus for CPUs and GPUs")
            _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, where, amount,
                     "an amount > 0 of a resource the nodes offer (`ray start --resources='{\"NAME\": N}'`)")
    tp = engine.tensor_parallel_size
    _require(tp == 1 or engine.num_gpus == tp, f"{key}.engine.num_gpus", engine.num_gpus,
             f"tensor_parallel_size={tp} runs {tp} GPU workers in each engine replica: set it to {tp}")
    _require(learner.colocate or learner.num_learners == 1 or learner.num_gpus == 0 or learner.num_gpus >= 1,
             f"{key}.learner.num_gpus", learner.num_gpus,
             f"a fraction lets Ray put two of its {learner.num_learners} ranks on one GPU, and their NCCL group "
             "refuses that: give each rank a whole GPU (1), or use num_learners=1")
    if learner.colocate:
        _validate_colocation(key, agent)
    _validate_gpu_memory(key, agent)


def _validate_colocation(key: str, agent: AgentConfig) -> None:
    engine, learner, tp = agent.engine, agent.learner, agent.engine.tensor_parallel_size
    _require((engine.num_gpus > 0) == (learner.num_gpus > 0), f"{key}.learner.colocate", True,
             f"colocation puts both on one device: engine.num_gpus and learner.num_gpus both > 0 (one GPU) or both 0 "
             f"(CPUs), got {engine.num_gpus:g} and {learner.num_gpus:g}")
    _require(tp == 1, f"{key}.learner.colocate", True, f"needs engine.tensor_parallel_size=1 (got {tp})")
    _require(learner.num_learners == engine.replicas, f"{key}.learner.num_learners", learner.num_learners,
             f"colocated ranks pair with engine replicas one to one: set it to engine.replicas={engine.replicas}")
    _require(engine.num_gpus + learner.num_gpus <= 1, f"{key}.learner.num_gpus", learner.num_gpus,
             f"a shared GPU holds engine.num_gpus + learner.num_gpus = {engine.num_gpus + learner.num_gpus:g} > 1; "
             f"use fractions such as 0.5 and 0.5")


def _validate_collective(cfg: RunConfig) -> None:
    """A broadcast group joins learner rank 0 and the engine workers on one kind of device, each member on a device
    of its own where that is a GPU."""
    for i, agent in enumerate(cfg.team.agents):
        if not agent.trainable:
            continue
        learner, engine = agent.learner, agent.engine
        _require((learner.num_gpus > 0) == (engine.num_gpus > 0), "train.weight_sync", "collective",
                 f"team.agents[{i}]'s learner and engines must both be on GPUs (NCCL) or both on CPUs (gloo), got "
                 f"learner.num_gpus={learner.num_gpus:g} and engine.num_gpus={engine.num_gpus:g}; auto picks "
                 "object_store for such an agent")
        shared = gpu_sharing(learner, engine)
        _require(shared is None, "train.weight_sync", "collective",
                 f"team.agents[{i}]: {shared}, and NCCL refuses two members of its group on one GPU; auto moves "
                 "such an agent's weights through the object store")


def _validate_gpu_memory(key: str, agent: AgentConfig) -> None:
    """No GPU is asked for more than GPU_MEMORY_CAP of its memory. vLLM takes gpu_memory_utilization of a whole GPU
    whatever share of it Ray gave the replica: with a share s < 1, Ray may put 1/s such actors on one GPU, so each
    may take at most GPU_MEMORY_CAP x s; a colocated learner's share (learner.num_gpus) counts on its engine's GPU."""
    engine, learner = agent.engine, agent.learner
    if engine.num_gpus == 0:
        return
    share = min(engine.num_gpus / engine.tensor_parallel_size, 1.0)
    asked = engine.gpu_memory_utilization
    if learner.colocate:
        _require(asked + learner.num_gpus <= GPU_MEMORY_CAP, f"{key}.engine.gpu_memory_utilization", asked,
                 f"the colocated learner's share learner.num_gpus={learner.num_gpus:g} shares its GPU: together at "
                 f"most {GPU_MEMORY_CAP} of it, so at most {GPU_MEMORY_CAP - learner.num_gpus:.3g}")
        return
    cap = GPU_MEMORY_CAP * share
    _require(asked <= cap + 1e-9, f"{key}.engine.gpu_memory_utilization", asked,
             f"at most {cap:.3g}: " + (f"engine.num_gpus={engine.num_gpus:g} lets Ray put {1 / share:g} such actors "
                                        f"on one GPU, each taking this share of its whole memory, and a GPU holds at "
                                        f"most {GPU_MEMORY_CAP} x its memory; or give each replica more GPU"
                                        if share < 1 else f"a GPU holds at most {GPU_MEMORY_CAP} x its memory"))


def gpu_sharing(learner: LearnerConfig, engine: EngineConfig) -> str | None:
    """Why learner rank 0 and an engine worker of one agent could sit on one GPU (NCCL refuses two members of a
    group on one device), or None where each holds whole GPUs of its own."""
    if learner.num_gpus == 0 or engine.num_gpus == 0:
        return None
    if learner.colocate:
        return "learner.colocate puts rank k on engine replica k's GPU"
    per_worker = engine.num_gpus / engine.tensor_parallel_size
    if not float(learner.num_gpus).is_integer() or not float(per_worker).is_integer():
        return (f"fractions (learner.num_gpus={learner.num_gpus:g}, engine.num_gpus={engine.num_gpus:g}) let Ray "
                "put both on one GPU")
    return None


def _validate_training(cfg: RunConfig) -> None:
    from mapoco.training.algorithms import ESTIMATORS, KL_ESTIMATORS

    algo, train = cfg.algorithm, cfg.train
    _require(algo.estimator in ESTIMATORS, "algorithm.estimator", algo.estimator, f"one of {sorted(ESTIMATORS)}")
    _require(algo.samples_per_question >= 1, "algorithm.samples_per_question", algo.samples_per_question,
             "must be >= 1")
    _require(algo.estimator not in ("grpo", "rloo") or algo.samples_per_question >= 2,
             "algorithm.samples_per_question", algo.samples_per_question,
             f"{algo.estimator} baselines compare samples of the same question: use >= 2")
    for name in ("gamma", "lam"):
        _require(0 <= getattr(algo, name) <= 1, f"algorithm.{name}", getattr(algo, name), "must be in [0, 1]")
    for name in ("kl_coef", "vf_coef", "entropy_coef"):
        _require(getattr(algo, name) >= 0, f"algorithm.{name}", getattr(algo, name), "must be >= 0")
    _require(algo.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator", algo.kl_estimator,
             f"one of {', '.join(KL_ESTIMATORS)}")
    _require(algo.kl_in_reward or algo.kl_coef == 0 or algo.kl_estimator != "k1", "algorithm.kl_estimator",
             algo.kl_estimator, "k2 or k3 when algorithm.kl_in_reward=false: k1's gradient in the loss is zero in "
                                "expectation, so it would not pull towards the reference")
    _require(algo.ppo_epochs >= 1, "algorithm.ppo_epochs", algo.ppo_epochs, "must be >= 1")
    _require(algo.mini_batches >= 1, "algorithm.mini_batches", algo.mini_batches, "must be >= 1")
    _require(0 < algo.clip_eps < 1, "algorithm.clip_eps", algo.clip_eps,
             "must be in (0, 1): the ratio is clipped to [1 - clip_eps, 1 + clip_eps]")
    _require(algo.value_clip_eps > 0, "algorithm.value_clip_eps", algo.value_clip_eps, "must be > 0")
    _require(train.steps >= 1, "train.steps", train.steps, "must be >= 1")
    _require(train.batch_questions >= 1, "train.batch_questions", train.batch_questions, "must be >= 1")
    for name in ("eval_every", "save_every"):
        _require(getattr(train, name) >= 0, f"train.{name}", getattr(train, name), "must be >= 0 (0: never)")
    _require(train.eval_limit >= 1, "train.eval_limit", train.eval_limit, "must be >= 1")
    _require(train.keep_checkpoints >= 1, "train.keep_checkpoints", train.keep_checkpoints, "must be >= 1")
    _require(train.resume in (None, "auto") or Path(train.resume).is_dir(), "train.resume", train.resume,
             "no such checkpoint directory (use auto, or a step_<n> folder)")
    _require(train.weight_sync in WEIGHT_SYNCS, "train.weight_sync", train.weight_sync,
             f"one of {', '.join(WEIGHT_SYNCS)}")
    _require(train.sync_timeout_s > 0, "train.sync_timeout_s", train.sync_timeout_s, "seconds, > 0")
    if train.weight_sync == "collective":
        _validate_collective(cfg)
    _require(train.weight_sync != "collective" or not cfg.team.lora_engine, "train.weight_sync", train.weight_sync,
             "auto or object_store with team.lora_engine: adapters move through the object store")
    _require(train.logprob_tolerance is None or train.logprob_tolerance > 0, "train.logprob_tolerance",
             train.logprob_tolerance, "must be > 0, or null for the dtypes' own (mapoco.runtime.precision)")
    _require(train.logprob_breach_steps >= 1, "train.logprob_breach_steps", train.logprob_breach_steps,
             "an integer >= 1 (steps in a row above train.logprob_tolerance before acting)")
    _require(train.on_logprob_breach in LOGPROB_BREACH_ACTIONS, "train.on_logprob_breach", train.on_logprob_breach,
             f"one of {', '.join(LOGPROB_BREACH_ACTIONS)}")
    _require(train.off_policy_steps in (0, 1), "train.off_policy_steps", train.off_policy_steps,
             "0 (on-policy) or 1 (the next rollout overlaps this update; one rollout in flight already keeps the "
             "engines busy, so a deeper pipeline adds staleness, not speed)")
    _require(train.is_weight_cap >= 1, "train.is_weight_cap", train.is_weight_cap,
             "must be >= 1 (a cap below 1 would down-weight on-policy tokens too)")
    colocated = [i for i, a in enumerate(cfg.team.agents) if a.trainable and a.learner.colocate]
    _require(not train.off_policy_steps or not colocated, "train.off_policy_steps", train.off_policy_steps,
             f"0 with colocated learners (team.agents{colocated}.learner.colocate): their engines sleep while the "
             "learner updates, so no rollout can overlap the update")
    models = {a.model for a in cfg.team.agents}
    _require(not cfg.team.shared_policy or len(models) == 1, "team.shared_policy", True,
             f"one policy for every seat needs one model, got {sorted(models)}")
    seats = len(cfg.team.agents) if cfg.team.shared_policy else 1
    rows = train.batch_questions * algo.samples_per_question * cfg.turns * seats
    for i, agent in enumerate(cfg.team.agents):
        n = agent.learner.num_learners
        _require(rows % n == 0, f"team.agents[{i}].learner.num_learners", n,
                 f"must divide the {rows} answers per step (train.batch_questions x "
                 f"algorithm.samples_per_question x turns{' x agents' if seats > 1 else ''})")


def _resolve_model(key: str, ref: str, download: bool = False) -> Path | None:
    """The model's folder; None for a hub model not downloaded yet, which is checked once fetched
    (``check_models``, after the cluster is known to hold the run: nothing downloads for a run that cannot start)."""
    from mapoco.models.registry import resolve_model

    try:
        return resolve_model(ref, download)
    except FileNotFoundError as exc:
        raise ConfigError(key, ref, str(exc)) from None


def lora_engine_config(team: TeamConfig) -> EngineConfig:
    """The shared LoRA engine's settings (its first seat's), ``max_loras`` and ``max_lora_rank`` resolved: as set,
    or one slot per adapter and the smallest rank vLLM offers that holds every adapter on it."""
    seats = team.lora_seats()
    engine = team.agents[seats[0]].engine
    ranks = [_adapter_rank(team.agents[i]) for i in seats]
    return dataclasses.replace(
        engine, max_loras=engine.max_loras or sum(1 for r in ranks if r > 0),
        max_lora_rank=engine.max_lora_rank or min(r for r in VLLM_LORA_RANKS if r >= max(ranks)))


def _adapter_rank(agent: AgentConfig) -> int:
    """The rank an agent's adapter has on the LoRA engine (0: it plays the base model)."""
    if agent.trainable:
        return agent.learner.lora_rank
    if agent.adapter is None:
        return 0
    return int(json.loads((Path(agent.adapter).expanduser() / "adapter_config.json").read_text())["r"])


def _validate_lora_engine(team: TeamConfig) -> None:
    """One engine, one base model, an adapter per agent: everything that would make vLLM refuse it, named here."""
    for i, agent in enumerate(team.agents):
        key = f"team.agents[{i}]"
        _require(agent.engine.max_loras >= 0, f"{key}.engine.max_loras", agent.engine.max_loras,
                 "must be >= 0 (0: one slot per agent on the shared LoRA engine)")
        _require(agent.engine.max_lora_rank == 0 or agent.engine.max_lora_rank in VLLM_LORA_RANKS,
                 f"{key}.engine.max_lora_rank", agent.engine.max_lora_rank,
                 f"0 (from the adapters) or a rank vLLM offers: {', '.join(map(str, VLLM_LORA_RANKS))}")
    if not team.lora_engine:
        for i, agent in enumerate(team.agents):
            _require(agent.adapter is None, f"team.agents[{i}].adapter", agent.adapter,
                     "a fixed adapter is played on the shared LoRA engine: set team.lora_engine=true")
        return
    _require(not team.shared_policy, "team.lora_engine", True,
             "team.shared_policy=true already has one policy for every seat; pick one of the two")
    trained = [i for i, a in enumerate(team.agents) if a.trainable and a.learner.lora_rank > 0]
    _require(bool(trained), "team.lora_engine", True,
             "no trainable agent trains LoRA: set learner.lora_rank > 0 (for every agent) or "
             "team.agents.N.learner.lora_rank")
    base = team.agents[trained[0]].model
    for i in trained[1:]:
        _require(team.agents[i].model == base, f"team.agents[{i}].model", team.agents[i].model,
                 f"one LoRA engine serves one base model: team.agents[{trained[0]}] trains LoRA on {base}; give "
                 "every agent that trains LoRA that model")
    seats = team.lora_seats()
    first = team.agents[seats[0]]
    for i in seats:
        agent, key = team.agents[i], f"team.agents[{i}]"
        _require(not agent.trainable or agent.learner.lora_rank > 0, f"{key}.learner.lora_rank", 0,
                 f"must be > 0 on the shared LoRA engine ({base}): a trained agent there trains an adapter; or "
                 "give it another model, for an engine of its own")
        _require(not (agent.trainable and agent.adapter), f"{key}.adapter", agent.adapter,
                 "must be null for a trained agent: its adapter is the one its learner trains")
        _require(not agent.learner.colocate, f"{key}.learner.colocate", True,
                 "false on the shared LoRA engine: it serves every agent, it cannot sleep for one learner")
        _require(agent.engine == first.engine, f"{key}.engine", "differs",
                 f"agents on one LoRA engine share its settings: make them team.agents[{seats[0]}].engine's")
        if agent.adapter is not None:
            folder = Path(agent.adapter).expanduser()
            _require((folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file(),
                     f"{key}.adapter", agent.adapter,
                     "a peft adapter folder: adapter_config.json and adapter_model.safetensors")
        _require(_adapter_rank(agent) <= VLLM_LORA_RANKS[-1], f"{key}.learner.lora_rank", _adapter_rank(agent),
                 f"must be <= {VLLM_LORA_RANKS[-1]}, the largest adapter rank vLLM serves")
    for i, agent in enumerate(team.agents):
        _require(agent.adapter is None or i in seats, f"team.agents[{i}].adapter", agent.adapter,
                 f"a fixed adapter needs the shared LoRA engine's base model, {base}")
    rank = lora_engine_config(team).max_lora_rank
    for i in seats:
        _require(_adapter_rank(team.agents[i]) <= rank, f"team.agents[{seats[0]}].engine.max_lora_rank", rank,
                 f"must be >= {_adapter_rank(team.agents[i])}, team.agents[{i}]'s adapter rank")
    adapters = sum(1 for i in seats if _adapter_rank(team.agents[i]) > 0)
    _require(first.engine.max_loras == 0 or first.engine.max_loras >= adapters,
             f"team.agents[{seats[0]}].engine.max_loras", first.engine.max_loras,
             f"must be >= {adapters}, the adapters on the shared LoRA engine (0: exactly that many)")
    from mapoco.models.registry import lora_support, model_config

    try:
        architecture = (model_config(base).get("architectures") or ["unknown"])[0]
    except FileNotFoundError as exc:
        raise ConfigError(f"team.agents[{seats[0]}].model", base, str(exc)) from None
    _require(lora_support(architecture), f"team.agents[{seats[0]}].model", base,
             f"vLLM serves no LoRA adapters for its architecture {architecture}: train these agents with "
             "team.lora_engine=false (merged weights, an engine each)")


def _validate_model(i: int, agent: AgentConfig, download: bool = False) -> None:
    from mapoco.models.registry import has_chat_template

    key = f"team.agents[{i}].model"
    path = _resolve_model(key, agent.model, download)
    _require(path is None or has_chat_template(path), key, agent.model,
             "its tokenizer has no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'): "
             "agents talk in chat threads, so use an instruct model or add a template")


def check_models(cfg: RunConfig) -> None:
    """Every agent's model is here, fetched from the hub where it is a hub id, and can chat: the check validation
    leaves to the run's start for hub models not downloaded yet."""
    for i, agent in enumerate(cfg.team.agents):
        _validate_model(i, agent, download=True)
    if cfg.command == "train-verifier" and cfg.verifier.base is not None:
        _resolve_model("verifier.base", cfg.verifier.base, download=True)


def _validate_weights_folder(key: str, path: str) -> None:
    """A learned model a user points at exists and holds safetensors, not pickled weights."""
    from mapoco.models.registry import require_safetensors

    folder = Path(path).expanduser()
    _require(folder.is_dir(), key, path, "no such folder")
    try:
        require_safetensors(folder)
    except FileNotFoundError as exc:
        raise ConfigError(key, path, str(exc)) from None


def _validate_verifier(cfg: RunConfig) -> None:
    ver = cfg.verifier
    _require(ver.kind in VERIFIER_KINDS, "verifier.kind", ver.kind, f"one of {VERIFIER_KINDS}")
    _require(cfg.command == "train-verifier" or ver.kind != "learned" or bool(ver.path), "verifier.path", ver.path,
             "a learned verifier needs a checkpoint path (train one with `mapoco train-verifier`)")
    if cfg.command != "train-verifier" and ver.kind == "learned":
        _validate_weights_folder("verifier.path", ver.path)
    _require(ver.timeout_s > 0, "verifier.timeout_s", ver.timeout_s, "must be > 0")
    _require(ver.workers >= 1, "verifier.workers", ver.workers, "an integer >= 1")
    _require(ver.batch_size >= 1, "verifier.batch_size", ver.batch_size, "must be >= 1")
    _require(ver.num_cpus > 0, "verifier.num_cpus", ver.num_cpus, "must be > 0: the verifier actor reserves CPUs")
    _require_name("verifier.base", ver.base, "a model (name, folder or hub id), or null for the first agent's")
    if cfg.command == "train-verifier" and ver.base is not None:
        _resolve_model("verifier.base", ver.base)
    _require(ver.epochs >= 1, "verifier.epochs", ver.epochs, "must be >= 1")
    _require(ver.lr > 0, "verifier.lr", ver.lr, "must be > 0")
    _require(ver.train_batch_size >= 1, "verifier.train_batch_size", ver.train_batch_size, "an integer >= 1")
    _require(0 < ver.held_out < 1, "verifier.held_out", ver.held_out, "must be in (0, 1)")


def _validate_rewards(rewards: RewardConfig) -> None:
    _require(0 <= rewards.gamma <= 1, "rewards.gamma", rewards.gamma, "must be in [0, 1] (a discount factor)")
    _require(rewards.incentives in INCENTIVE_MODES, "rewards.incentives", rewards.incentives,
             f"one of {INCENTIVE_MODES}")
    for name in ("alpha0", "alpha1", "beta0", "beta1"):
        value = getattr(rewards, name)
        _require(value >= 0, f"rewards.{name}", value, "must be >= 0 (signs come from rewards.incentives)")


def validate(cfg: RunConfig) -> RunConfig:
    """Every key's meaning-based range, before Hydra, Ray or any actor starts; raises ConfigError naming the key."""
    _validate_run(cfg)
    _validate_task(cfg.task)
    _validate_team(cfg)
    _validate_verifier(cfg)
    _validate_rewards(cfg.rewards)
    _validate_training(cfg)
    _validate_conductor(cfg)
    _validate_serve(cfg)
    _validate_services(cfg)
    return cfg


def _validate_prices(cfg: RunConfig) -> None:
    priced = [(f"team.agents[{i}].price", a.price) for i, a in enumerate(cfg.team.agents)]
    priced += [(f"conductor.http_workers[{i}].price", h.price) for i, h in enumerate(cfg.conductor.http_workers)]
    for key, price in priced:
        for name in ("per_call", "per_token"):
            value = getattr(price, name)
            _require(math.isfinite(value) and value >= 0, f"{key}.{name}", value, "a price >= 0")


def _validate_cards(cfg: RunConfig) -> None:
    """A worker's card sits in the conductor's "Cards: adds=Model 0, Model 2; multiplies=Model 1" line: one line
    without the separators , ; ="""
    cards = [(f"team.agents[{i}].description", a.description) for i, a in enumerate(cfg.team.agents)]
    cards += [(f"conductor.http_workers[{i}].description", h.description)
              for i, h in enumerate(cfg.conductor.http_workers)]
    for key, card in cards:
        _require(not re.search(r"[\n,;=]", card) and card == card.strip(), key, card,
                 "a one-line card without , ; or = (e.g. adds), or empty")


def _validate_conductor(cfg: RunConfig) -> None:
    _validate_prices(cfg)
    _validate_cards(cfg)
    if cfg.method != "conductor":
        return
    con = cfg.conductor
    pool = len(cfg.team.agents) - 1 + len(con.http_workers) + int(con.self_worker)
    _require(pool >= 1, "team.agents", [a.name for a in cfg.team.agents],
             "the conductor needs workers: team.agents[1:] (local) or conductor.http_workers")
    _require(not cfg.team.shared_policy, "team.shared_policy", True, "must be false for method=conductor")
    _require(1 <= con.max_steps <= 5, "conductor.max_steps", con.max_steps, "an integer in 1..5")
    _require(1 <= con.min_pool <= pool, "conductor.min_pool", con.min_pool, f"an integer in 1..{pool} (the pool)")
    _require(con.max_depth >= 1, "conductor.max_depth", con.max_depth, "an integer >= 1")
    for i, example in enumerate(con.examples):
        _require_name(f"conductor.examples[{i}]", example, "a non-empty example workflow")
    _require(math.isfinite(con.cost_weight) and con.cost_weight >= 0, "conductor.cost_weight", con.cost_weight,
             "a number >= 0 (0: cost does not enter the reward)")
    _require(math.isfinite(con.cost_scale) and con.cost_scale >= 0, "conductor.cost_scale", con.cost_scale,
             "a cost > 0, or 0 for one call of the priciest worker at its token limit")
    workers = [a.price for a in cfg.team.agents[1:]] + [h.price for h in con.http_workers]
    _require(con.cost_weight == 0 or con.cost_scale > 0 or any(p.of(1) > 0 for p in workers),
             "conductor.cost_weight", con.cost_weight,
             "0 while every worker is free: give workers a price (team.agents.N.price.per_call or per_token)")
    for i, flow in enumerate(con.fixed_workflows):
        _validate_fixed_workflow(f"conductor.fixed_workflows[{i}]", flow, pool - int(con.self_worker))
    _validate_named_pools(cfg)
    for i, worker in enumerate(cfg.team.agents[1:], start=1):
        _require(not worker.trainable, f"team.agents[{i}].trainable", True,
                 "workers are frozen in method=conductor: set trainable: false")
    for i, http in enumerate(con.http_workers):
        key = f"conductor.http_workers[{i}]"
        _require(http.base_url.startswith(("http://", "https://")), f"{key}.base_url", http.base_url,
                 "an http(s) URL ending before /chat/completions, e.g. http://127.0.0.1:8000/v1")
        _require_name(f"{key}.model", http.model, "the endpoint's non-empty model name")
        _require(http.timeout_s > 0, f"{key}.timeout_s", http.timeout_s, "must be > 0")
        _require(http.max_tokens >= 1, f"{key}.max_tokens", http.max_tokens, "must be >= 1")
        _require(http.temperature >= 0, f"{key}.temperature", http.temperature, "must be >= 0")
        _require(http.concurrency >= 1, f"{key}.concurrency", http.concurrency, "must be >= 1")
        _require_env_name(f"{key}.api_key_env", http.api_key_env)
        _require(http.api_key_env is None or http.api_key_env in os.environ, f"{key}.api_key_env",
                 http.api_key_env, "names an environment variable that is not set: export it first")


def _validate_named_pools(cfg: RunConfig) -> None:
    """conductor.heldout_pools and eval_pools name known workers, once each; random pools can avoid the held-out
    ones; every eval pool is large enough for the hand-written workflows."""
    con = cfg.conductor
    names = [a.name for a in cfg.team.agents[1:]] + [h.name for h in con.http_workers]
    names += [cfg.team.agents[0].name] if con.self_worker else []
    for kind, pools in (("heldout_pools", con.heldout_pools), ("eval_pools", con.eval_pools)):
        for i, pool in enumerate(pools):
            key = f"conductor.{kind}[{i}]"
            _require(len(pool) >= 1 and len(set(pool)) == len(pool), key, pool,
                     "a non-empty list of worker names, each once")
            for j, name in enumerate(pool):
                _require(name in names, f"{key}[{j}]", name, f"a worker's name, one of {names}")
    if con.heldout_pools:
        _require(con.random_pools, "conductor.heldout_pools", con.heldout_pools,
                 "only with conductor.random_pools=true (a fixed pool holds every worker)")
        held = [set(pool) for pool in con.heldout_pools]
        _require(any(not any(h <= set(c) for h in held) for c in itertools.combinations(names, con.min_pool)),
                 "conductor.heldout_pools", con.heldout_pools,
                 f"pools of conductor.min_pool={con.min_pool} workers that hold none of them whole: hold out fewer "
                 "pools or lower min_pool")
    needed = max((max(flow.model_id) + 1 for flow in con.fixed_workflows if flow.model_id), default=1)
    for i, pool in enumerate(con.eval_pools):
        _require(len(pool) >= needed, f"conductor.eval_pools[{i}]", pool,
                 f"at least {needed} workers: conductor.fixed_workflows run on every eval pool")


def _validate_fixed_workflow(key: str, flow: WorkflowConfig, pool: int) -> None:
    steps = len(flow.model_id)
    _require(steps >= 1, f"{key}.model_id", flow.model_id, "a non-empty list: the worker of each step")
    for name, entries in (("subtasks", flow.subtasks), ("access_list", flow.access_list)):
        _require(len(entries) == steps, f"{key}.{name}", entries, f"one entry per step ({steps}, as model_id)")
    for j, worker in enumerate(flow.model_id):
        _require(_is_int(worker) and 0 <= worker < pool, f"{key}.model_id[{j}]", worker,
                 f"a worker id in 0..{pool - 1} (the pool, numbered as the conductor sees it)")
    for j, subtask in enumerate(flow.subtasks):
        _require(isinstance(subtask, str), f"{key}.subtasks[{j}]", subtask, "the step's request, a string")
    for j, access in enumerate(flow.access_list):
        _require(list(access) in ([], ["all"]), f"{key}.access_list[{j}]", access,
                 '["all"] (sees every earlier step) or [] (sees none)')


def _validate_serve(cfg: RunConfig) -> None:
    srv = cfg.serve
    _require_host("serve.host", srv.host)
    _require(1 <= srv.port <= 65535, "serve.port", srv.port, "a TCP port in 1..65535")
    _require(srv.route_prefix.startswith("/") and (srv.route_prefix == "/" or not srv.route_prefix.endswith("/"))
             and not any(c in srv.route_prefix for c in "{}?# "), "serve.route_prefix", srv.route_prefix,
             "a URL path starting with '/' and not ending with one, e.g. / or /mapoco")
    _require_name("serve.model_name", srv.model_name, "a non-empty name, or null for the run directory's name")
    _require(srv.replicas >= 1, "serve.replicas", srv.replicas, "must be >= 1")
    _require(srv.num_cpus >= 0, "serve.num_cpus", srv.num_cpus, "must be >= 0")
    _require(srv.max_batch_size >= 1, "serve.max_batch_size", srv.max_batch_size, "must be >= 1")
    _require(srv.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", srv.batch_wait_timeout_s, "seconds >= 0")
    _require(srv.max_input_chars >= 1, "serve.max_input_chars", srv.max_input_chars, "must be >= 1")
    _require_env_name("serve.api_key_env", srv.api_key_env)
    if cfg.command != "serve":
        return
    _require(cfg.checkpoint is not None, "checkpoint", cfg.checkpoint,
             "mapoco serve needs checkpoint=DIR: a run directory or one of its checkpoints/step_N folders")
    _require(srv.api_key_env is None or bool(os.environ.get(srv.api_key_env)), "serve.api_key_env",
             srv.api_key_env, "names an environment variable that is not set or empty: export the token first")


def _validate_services(cfg: RunConfig) -> None:
    cluster, wandb = cfg.cluster, cfg.logger.wandb
    _require(cluster.address is None or _is_ray_address(cluster.address), "cluster.address", cluster.address,
             "auto, local, HOST:PORT or ray://HOST:PORT, or null ($RAY_ADDRESS if set, else a local instance)")
    _require(cluster.num_cpus is None or cluster.num_cpus >= 1, "cluster.num_cpus", cluster.num_cpus,
             "must be >= 1, or null for what the actors ask for")
    _require_host("cluster.dashboard_host", cluster.dashboard_host)
    _require(cluster.placement_timeout_s > 0, "cluster.placement_timeout_s", cluster.placement_timeout_s,
             "seconds > 0")
    _require(cluster.gpu_memory_gib is None or cluster.gpu_memory_gib > 0, "cluster.gpu_memory_gib",
             cluster.gpu_memory_gib, "GiB > 0 (80 for an H100), or null: the nodes' nvidia-smi says")
    _require(wandb.mode in WANDB_MODES, "logger.wandb.mode", wandb.mode, f"one of {', '.join(WANDB_MODES)}")
    _require(bool(wandb.project.strip()) and len(wandb.project) <= 128
             and not any(c in wandb.project for c in WANDB_PROJECT_FORBIDDEN), "logger.wandb.project", wandb.project,
             f"a wandb project name: 1 to 128 characters, none of {WANDB_PROJECT_FORBIDDEN}")
    _require_name("logger.wandb.group", wandb.group, "a non-empty group name, or null")
    _require_name("logger.wandb.name", wandb.name, "a non-empty run name, or null")


def _is_ray_address(address: str) -> bool:
    if address in ("auto", "local"):
        return True
    try:
        parts = urlsplit(address if address.startswith("ray://") else f"ray://{address}")
        return bool(parts.hostname) and 1 <= (parts.port or 0) and not parts.path
    except ValueError:  # a port that is not a number in 0..65535
        return False


# ---------------------------------------------------------------- the output directory
def check_writable_dir(key: str, path: str | Path) -> None:
    """Fail fast, creating nothing, if ``path`` cannot become a writable directory: its nearest existing ancestor (or
    itself) must be a directory, writable, on a filesystem that is neither read-only nor virtual (/proc, /sys)."""
    out = Path(path).expanduser().absolute()
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    why = _unwritable_because(existing)
    _require(why is None, key, str(path), f"is not a writable directory ({why})")


def _unwritable_because(existing: Path) -> str | None:
    if not existing.is_dir():
        return f"{existing} is not a directory"
    fstype = _filesystem_type(existing.resolve())
    if fstype in VIRTUAL_FILESYSTEMS:
        return f"{existing} is on a virtual filesystem ({fstype})"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only filesystem"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem that holds ``path`` (absolute, resolved): its innermost mount in /proc/self/mounts
    (None where that cannot be read)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    found, depth = None, -1
    for line in mounts:
        point, fstype = line.split()[1:3]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)  # octal escapes: \040 is a space
        if path.is_relative_to(point) and len(point) >= depth:  # the later of two mounts on one point is on top
            found, depth = fstype, len(point)
    return found


AGENT_DEFAULT_GROUPS = ("engine", "sampling", "learner")


def _merge_agent_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level ``engine``/``sampling``/``learner`` are defaults that each agent's own keys override."""
    defaults = {group: raw.pop(group, {}) or {} for group in AGENT_DEFAULT_GROUPS}
    team = dict(raw.get("team") or {})
    agents = []
    for agent in team.get("agents") or []:
        agent = dict(agent)
        for group, values in defaults.items():
            agent[group] = {**values, **(agent.get(group) or {})}
        agents.append(agent)
    team["agents"] = agents
    raw["team"] = team
    return raw


def default_tree() -> dict[str, Any]:
    """Every key's default, taken from the dataclasses above (the one place defaults live), in the shape of the
    Hydra config: agent settings (engine, sampling, learner) at the top, where they apply to every agent. The team
    comes from its config group; conf/ holds only the choices (groups, experiments) and Hydra's own settings."""
    def default(f: dataclasses.Field) -> Any:
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    tree = {f.name: default(f) for f in dataclasses.fields(RunConfig) if f.name not in ("task", "team")}
    tree["task"] = dataclasses.asdict(TaskConfig())
    tree["team"] = {f.name: default(f) for f in dataclasses.fields(TeamConfig)  # its group adds name and agents
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    agent_fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    tree.update({group: default(agent_fields[group]) for group in AGENT_DEFAULT_GROUPS})
    return tree


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Plain (resolved) config mapping -> validated RunConfig. ``hydra`` keys are ignored."""
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    return validate(build(RunConfig, _merge_agent_defaults(raw)))

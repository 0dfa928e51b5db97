"""Typed run configuration, built from the Hydra config and validated in one place before any actor starts.

Every error names the key, the value and what is allowed, e.g.
``turns=0: must be an integer >= 1 (number of discussion turns)``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mapoco.rollout.topology import TOPOLOGIES
from mapoco.tasks import TaskConfig, task_names

METHODS = ("discussion", "conductor")
VERIFIER_KINDS = ("rule", "learned")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


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
    gpu_memory_utilization: float = 0.4
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] | None = None  # custom Ray resources per replica: pin it to the nodes with them
    placement: str = "PACK"  # how the replicas spread over nodes (PLACEMENT_STRATEGIES)


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
    placement: str = "PACK"  # how the ranks spread over nodes (PLACEMENT_STRATEGIES)
    colocate: bool = False  # GPU: rank k shares engine replica k's GPU; the engines sleep while it updates


@dataclass
class AgentConfig:
    name: str
    model: str
    trainable: bool = True  # false: a frozen partner (MAPoRL's single-agent-trained baseline)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)


@dataclass
class TeamConfig:
    name: str
    agents: list[AgentConfig]
    shared_policy: bool = False  # one policy (engines + learner) plays every seat; agents must share a model

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
    weight_sync: str = "auto"  # auto (nccl on GPU, else object_store) | object_store | nccl


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


@dataclass
class ConductorConfig:
    """``method=conductor``: team.agents[0] is the conductor (trained), team.agents[1:] its local workers."""

    http_workers: list[HttpWorkerConfig] = field(default_factory=list)
    max_steps: int = 5
    random_pools: bool = False  # each question draws a random subset of the pool (renumbered)
    min_pool: int = 1  # smallest random pool
    self_worker: bool = False  # the conductor is also a worker (recursion), up to max_depth
    max_depth: int = 1
    replan: bool = False  # one re-plan round after seeing the final answer
    examples: list[str] = field(default_factory=list)  # few-shot examples shown in the prompt
    baselines: bool = True  # eval: also each worker alone, majority vote, a random workflow


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
        for name, amount in (cfg.resources or {}).items():
            where = f"{key}.{part}.resources.{name}"
            _require(name not in ("CPU", "GPU", "memory"), where, amount,
                     f"a custom resource; set {part}.num_cpus / {part}.num_gpus for CPUs and GPUs")
            _require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, where, amount,
                     "an amount > 0 of a resource the nodes offer (`ray start --resources='{\"NAME\": N}'`)")
    tp = engine.tensor_parallel_size
    _require(tp == 1 or engine.num_gpus == tp, f"{key}.engine.num_gpus", engine.num_gpus,
             f"tensor_parallel_size={tp} runs {tp} GPU workers in each engine replica: set it to {tp}")
    if not learner.colocate:
        return
    _require(engine.num_gpus > 0 and learner.num_gpus > 0, f"{key}.learner.colocate", True,
             f"colocation shares GPUs: needs engine.num_gpus > 0 and learner.num_gpus > 0 (got "
             f"{engine.num_gpus:g} and {learner.num_gpus:g})")
    _require(tp == 1, f"{key}.learner.colocate", True, f"needs engine.tensor_parallel_size=1 (got {tp})")
    _require(learner.num_learners == engine.replicas, f"{key}.learner.num_learners", learner.num_learners,
             f"colocated ranks pair with engine replicas one to one: set it to engine.replicas={engine.replicas}")
    _require(engine.num_gpus + learner.num_gpus <= 1, f"{key}.learner.num_gpus", learner.num_gpus,
             f"a shared GPU holds engine.num_gpus + learner.num_gpus = {engine.num_gpus + learner.num_gpus:g} > 1; "
             f"use fractions such as 0.5 and 0.5")


def _validate_training(cfg: RunConfig) -> None:
    from mapoco.training.algorithms import ESTIMATORS

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
    _require(algo.kl_estimator in ("k1", "k2", "k3"), "algorithm.kl_estimator", algo.kl_estimator, "one of k1, k2, k3")
    _require(algo.kl_in_reward or algo.kl_coef == 0 or algo.kl_estimator != "k1", "algorithm.kl_estimator",
             algo.kl_estimator, "k2 or k3 when algorithm.kl_in_reward=false: k1's gradient in the loss is zero in "
                                "expectation, so it would not pull towards the reference")
    _require(algo.ppo_epochs >= 1, "algorithm.ppo_epochs", algo.ppo_epochs, "must be >= 1")
    _require(algo.mini_batches >= 1, "algorithm.mini_batches", algo.mini_batches, "must be >= 1")
    _require(algo.clip_eps > 0, "algorithm.clip_eps", algo.clip_eps, "must be > 0")
    _require(algo.value_clip_eps > 0, "algorithm.value_clip_eps", algo.value_clip_eps, "must be > 0")
    _require(train.steps >= 1, "train.steps", train.steps, "must be >= 1")
    _require(train.batch_questions >= 1, "train.batch_questions", train.batch_questions, "must be >= 1")
    for name in ("eval_every", "save_every"):
        _require(getattr(train, name) >= 0, f"train.{name}", getattr(train, name), "must be >= 0 (0: never)")
    _require(train.eval_limit >= 1, "train.eval_limit", train.eval_limit, "must be >= 1")
    _require(train.keep_checkpoints >= 1, "train.keep_checkpoints", train.keep_checkpoints, "must be >= 1")
    _require(train.weight_sync in ("auto", "object_store", "nccl"), "train.weight_sync", train.weight_sync,
             "one of auto, object_store, nccl")
    _require(train.weight_sync != "nccl" or all(a.learner.num_gpus > 0 and a.engine.num_gpus > 0
                                                 for a in cfg.team.agents if a.trainable),
             "train.weight_sync", train.weight_sync, "nccl needs GPU learners and engines (learner/engine.num_gpus)")
    _require(train.logprob_tolerance is None or train.logprob_tolerance > 0, "train.logprob_tolerance",
             train.logprob_tolerance, "must be > 0, or null for the dtypes' own (mapoco.runtime.precision)")
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


def _validate_model(i: int, agent: AgentConfig) -> None:
    from mapoco.models.registry import has_chat_template, resolve_model

    key = f"team.agents[{i}].model"
    try:
        path = resolve_model(agent.model)
    except FileNotFoundError as exc:
        raise ConfigError(key, agent.model, str(exc)) from None
    _require(has_chat_template(path), key, agent.model,
             "its tokenizer has no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'): "
             "agents talk in chat threads, so use an instruct model or add a template")


def _validate_weights_folder(key: str, path: str) -> None:
    """A learned model a user points at exists and holds safetensors, not pickled weights."""
    from mapoco.models.registry import require_safetensors

    folder = Path(path).expanduser()
    _require(folder.is_dir(), key, path, "no such folder")
    try:
        require_safetensors(folder)
    except FileNotFoundError as exc:
        raise ConfigError(key, path, str(exc)) from None


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
    if cfg.command != "train-verifier" and cfg.verifier.kind == "learned":
        _validate_weights_folder("verifier.path", cfg.verifier.path)
    _require(cfg.verifier.timeout_s > 0, "verifier.timeout_s", cfg.verifier.timeout_s, "must be > 0")
    _require(cfg.verifier.workers >= 1, "verifier.workers", cfg.verifier.workers, "an integer >= 1")
    _require(cfg.verifier.batch_size >= 1, "verifier.batch_size", cfg.verifier.batch_size, "must be >= 1")
    _require(cfg.verifier.train_batch_size >= 1, "verifier.train_batch_size", cfg.verifier.train_batch_size,
             "an integer >= 1")
    _require(cfg.verifier.epochs >= 1, "verifier.epochs", cfg.verifier.epochs, "must be >= 1")
    _require(cfg.verifier.lr > 0, "verifier.lr", cfg.verifier.lr, "must be > 0")
    _require(0 < cfg.verifier.held_out < 1, "verifier.held_out", cfg.verifier.held_out, "must be in (0, 1)")
    _require(cfg.rewards.gamma >= 0, "rewards.gamma", cfg.rewards.gamma, "must be >= 0")
    _require(cfg.rewards.incentives in INCENTIVE_MODES, "rewards.incentives", cfg.rewards.incentives,
             f"one of {INCENTIVE_MODES}")
    for name in ("alpha0", "alpha1", "beta0", "beta1"):
        value = getattr(cfg.rewards, name)
        _require(value >= 0, f"rewards.{name}", value, "must be >= 0 (signs come from rewards.incentives)")
    _require(cfg.cluster.placement_timeout_s > 0, "cluster.placement_timeout_s", cfg.cluster.placement_timeout_s,
             "seconds > 0")
    _validate_training(cfg)
    _validate_conductor(cfg)
    _validate_serve(cfg)
    _require(cfg.logger.wandb.mode in ("offline", "online", "disabled"), "logger.wandb.mode", cfg.logger.wandb.mode,
             "one of offline, online, disabled")
    return cfg


def _validate_conductor(cfg: RunConfig) -> None:
    _require(cfg.method in METHODS, "method", cfg.method, f"one of {METHODS}")
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
    for i, worker in enumerate(cfg.team.agents[1:], start=1):
        _require(not worker.trainable, f"team.agents[{i}].trainable", True,
                 "workers are frozen in method=conductor: set trainable: false")
    for i, http in enumerate(con.http_workers):
        key = f"conductor.http_workers[{i}]"
        _require(http.base_url.startswith(("http://", "https://")), f"{key}.base_url", http.base_url,
                 "an http(s) URL ending before /chat/completions, e.g. http://127.0.0.1:8000/v1")
        _require(http.timeout_s > 0, f"{key}.timeout_s", http.timeout_s, "must be > 0")
        _require(http.max_tokens >= 1, f"{key}.max_tokens", http.max_tokens, "must be >= 1")
        _require(http.concurrency >= 1, f"{key}.concurrency", http.concurrency, "must be >= 1")
        _require(http.api_key_env is None or http.api_key_env in os.environ, f"{key}.api_key_env",
                 http.api_key_env, "names an environment variable that is not set: export it first")


def _validate_serve(cfg: RunConfig) -> None:
    srv = cfg.serve
    _require(bool(srv.host.strip()), "serve.host", srv.host, "an address to bind, e.g. 127.0.0.1 (0.0.0.0: every "
                                                             "interface)")
    _require(1 <= srv.port <= 65535, "serve.port", srv.port, "a TCP port in 1..65535")
    _require(srv.route_prefix.startswith("/") and (srv.route_prefix == "/" or not srv.route_prefix.endswith("/"))
             and not any(c in srv.route_prefix for c in "{}?# "), "serve.route_prefix", srv.route_prefix,
             "a URL path starting with '/' and not ending with one, e.g. / or /mapoco")
    _require(srv.model_name is None or bool(srv.model_name.strip()), "serve.model_name", srv.model_name,
             "a non-empty name, or null for the run directory's name")
    _require(srv.replicas >= 1, "serve.replicas", srv.replicas, "must be >= 1")
    _require(srv.num_cpus >= 0, "serve.num_cpus", srv.num_cpus, "must be >= 0")
    _require(srv.max_batch_size >= 1, "serve.max_batch_size", srv.max_batch_size, "must be >= 1")
    _require(0 <= srv.batch_wait_timeout_s < math.inf, "serve.batch_wait_timeout_s", srv.batch_wait_timeout_s,
             "seconds >= 0")
    _require(srv.max_input_chars >= 1, "serve.max_input_chars", srv.max_input_chars, "must be >= 1")
    if cfg.command != "serve":
        return
    _require(cfg.checkpoint is not None, "checkpoint", cfg.checkpoint,
             "mapoco serve needs checkpoint=DIR: a run directory or one of its checkpoints/step_N folders")
    _require(srv.api_key_env is None or bool(os.environ.get(srv.api_key_env)), "serve.api_key_env",
             srv.api_key_env, "names an environment variable that is not set or empty: export the token first")


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


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Plain (resolved) config mapping -> validated RunConfig. ``hydra`` keys are ignored."""
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    return validate(build(RunConfig, _merge_agent_defaults(raw)))

"""Checks of the team: each agent's engine, sampling and learner keys, its GPU arithmetic, the shared
LoRA engine, and its model."""

from __future__ import annotations

import re
from pathlib import Path

from mapoco.config.checks import require, require_model, require_name
from mapoco.config.derived import adapter_rank, lora_engine_config
from mapoco.config.schema import (
    DTYPES,
    GPU_MEMORY_CAP,
    MANAGED_ENV,
    PLACEMENT_STRATEGIES,
    VLLM_LORA_RANKS,
    AgentConfig,
    ConfigError,
    RunConfig,
    TeamConfig,
)


def validate_team(cfg: RunConfig) -> None:
    team = cfg.team
    require_name("team.name", team.name)
    require(len(team.agents) >= 1, "team.agents", team.agents, "needs at least one agent")
    for i, agent in enumerate(team.agents):
        _validate_agent(i, agent)
        _validate_model(i, agent)
    require(cfg.command != "train" or any(a.trainable for a in team.agents), "team.agents[0].trainable", False,
            "mapoco train needs at least one trainable agent (mapoco eval runs frozen ones)")
    _validate_lora_engine(team)
    named = [(f"team.agents[{i}].name", a.name) for i, a in enumerate(team.agents)]
    if cfg.method == "conductor":
        named += [(f"conductor.http_workers[{i}].name", w.name) for i, w in enumerate(cfg.conductor.http_workers)]
    seen: dict[str, str] = {}
    for key, name in named:
        require_name(key, name)
        require(name not in seen, key, name, f"names must differ: {seen.get(name)} has it too")
        seen[name] = key


def _validate_agent(i: int, agent: AgentConfig) -> None:
    key = f"team.agents[{i}]"
    engine, sampling = agent.engine, agent.sampling
    require(engine.replicas >= 1, f"{key}.engine.replicas", engine.replicas, "must be >= 1")
    require(engine.dtype in DTYPES, f"{key}.engine.dtype", engine.dtype, f"one of {DTYPES}")
    require(engine.max_model_len >= 64, f"{key}.engine.max_model_len", engine.max_model_len, "must be >= 64")
    require(engine.kv_cache_gib >= 1, f"{key}.engine.kv_cache_gib", engine.kv_cache_gib, "must be an integer >= 1")
    require(engine.num_cpus >= 0, f"{key}.engine.num_cpus", engine.num_cpus, "must be >= 0")
    require(engine.num_gpus >= 0, f"{key}.engine.num_gpus", engine.num_gpus, "must be >= 0")
    require(engine.tensor_parallel_size >= 1, f"{key}.engine.tensor_parallel_size", engine.tensor_parallel_size,
            "must be >= 1")
    require(0 < engine.gpu_memory_utilization <= 1, f"{key}.engine.gpu_memory_utilization",
            engine.gpu_memory_utilization, "must be in (0, 1]")
    require(sampling.temperature >= 0, f"{key}.sampling.temperature", sampling.temperature, "must be >= 0")
    require(0 < sampling.top_p <= 1, f"{key}.sampling.top_p", sampling.top_p, "must be in (0, 1]")
    require(sampling.stop is None or all(isinstance(s, str) and s for s in sampling.stop), f"{key}.sampling.stop",
            sampling.stop, "must be a list of non-empty strings")
    require(1 <= sampling.max_new_tokens < engine.max_model_len, f"{key}.sampling.max_new_tokens",
            sampling.max_new_tokens, f"must be in 1..{engine.max_model_len - 1}: the prompt and the answer share "
                                     f"engine.max_model_len={engine.max_model_len} tokens")
    learner = agent.learner
    require(learner.num_learners >= 1, f"{key}.learner.num_learners", learner.num_learners, "must be >= 1")
    require(learner.zero_stage in (0, 1, 2, 3), f"{key}.learner.zero_stage", learner.zero_stage, "one of 0, 1, 2, 3")
    require(learner.lr > 0, f"{key}.learner.lr", learner.lr, "must be > 0")
    require(learner.weight_decay >= 0, f"{key}.learner.weight_decay", learner.weight_decay, "must be >= 0")
    require(learner.warmup_steps >= 0, f"{key}.learner.warmup_steps", learner.warmup_steps, "must be >= 0")
    require(learner.micro_batch_size >= 1, f"{key}.learner.micro_batch_size", learner.micro_batch_size,
            "must be >= 1")
    require(learner.max_grad_norm > 0, f"{key}.learner.max_grad_norm", learner.max_grad_norm, "must be > 0")
    require(learner.lora_rank >= 0, f"{key}.learner.lora_rank", learner.lora_rank, "must be >= 0 (0: no LoRA)")
    require(learner.lora_alpha >= 1, f"{key}.learner.lora_alpha", learner.lora_alpha,
            "must be >= 1 (LoRA scales its update by lora_alpha / lora_rank)")
    require(learner.dtype in DTYPES, f"{key}.learner.dtype", learner.dtype, f"one of {DTYPES}")
    require(learner.num_cpus >= 0, f"{key}.learner.num_cpus", learner.num_cpus, "must be >= 0")
    require(learner.num_gpus >= 0, f"{key}.learner.num_gpus", learner.num_gpus, "must be >= 0")
    _validate_placement(key, agent)


def _validate_placement(key: str, agent: AgentConfig) -> None:
    """The GPU arithmetic of one agent's actors (see mapoco.runtime.placement), checked before anything starts."""
    engine, learner = agent.engine, agent.learner
    for part, cfg in (("engine", engine), ("learner", learner)):
        require(cfg.num_cpus + cfg.num_gpus > 0, f"{key}.{part}.num_cpus", cfg.num_cpus,
                f"with {part}.num_gpus=0 it must be > 0: every actor reserves some CPU or GPU")
        require(cfg.placement in PLACEMENT_STRATEGIES, f"{key}.{part}.placement", cfg.placement,
                f"one of {PLACEMENT_STRATEGIES}")
        for name, value in (cfg.env or {}).items():
            require(isinstance(value, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(name)) is not None,
                    f"{key}.{part}.env.{name}", value, "a variable name and a string value ('1', not 1)")
            require(name not in MANAGED_ENV, f"{key}.{part}.env.{name}", value,
                    "mapoco sets this one itself (from num_gpus, kv_cache_gib and how the actor runs)")
        for name, amount in (cfg.resources or {}).items():
            where = f"{key}.{part}.resources.{name}"
            require(name not in ("CPU", "GPU", "memory"), where, amount,
                    f"a custom resource; set {part}.num_cpus / {part}.num_gpus for CPUs and GPUs")
            require(isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount > 0, where, amount,
                    "an amount > 0 of a resource the nodes offer (`ray start --resources='{\"NAME\": N}'`)")
    tp = engine.tensor_parallel_size
    require(tp == 1 or engine.num_gpus == tp, f"{key}.engine.num_gpus", engine.num_gpus,
            f"tensor_parallel_size={tp} runs {tp} GPU workers in each engine replica: set it to {tp}")
    require(learner.colocate or learner.num_learners == 1 or learner.num_gpus == 0 or learner.num_gpus >= 1,
            f"{key}.learner.num_gpus", learner.num_gpus,
            f"a fraction lets Ray put two of its {learner.num_learners} ranks on one GPU, and their NCCL group "
            "refuses that: give each rank a whole GPU (1), or use num_learners=1")
    if learner.colocate:
        _validate_colocation(key, agent)
    _validate_gpu_memory(key, agent)


def _validate_colocation(key: str, agent: AgentConfig) -> None:
    engine, learner, tp = agent.engine, agent.learner, agent.engine.tensor_parallel_size
    require((engine.num_gpus > 0) == (learner.num_gpus > 0), f"{key}.learner.colocate", True,
            f"colocation puts both on one device: engine.num_gpus and learner.num_gpus both > 0 (one GPU) or both 0 "
            f"(CPUs), got {engine.num_gpus:g} and {learner.num_gpus:g}")
    require(tp == 1, f"{key}.learner.colocate", True, f"needs engine.tensor_parallel_size=1 (got {tp})")
    require(learner.num_learners == engine.replicas, f"{key}.learner.num_learners", learner.num_learners,
            f"colocated ranks pair with engine replicas one to one: set it to engine.replicas={engine.replicas}")
    require(engine.num_gpus + learner.num_gpus <= 1, f"{key}.learner.num_gpus", learner.num_gpus,
            f"a shared GPU holds engine.num_gpus + learner.num_gpus = {engine.num_gpus + learner.num_gpus:g} > 1; "
            f"use fractions such as 0.5 and 0.5")


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
        require(asked + learner.num_gpus <= GPU_MEMORY_CAP, f"{key}.engine.gpu_memory_utilization", asked,
                f"the colocated learner's share learner.num_gpus={learner.num_gpus:g} shares its GPU: together at "
                f"most {GPU_MEMORY_CAP} of it, so at most {GPU_MEMORY_CAP - learner.num_gpus:.3g}")
        return
    cap = GPU_MEMORY_CAP * share
    require(asked <= cap + 1e-9, f"{key}.engine.gpu_memory_utilization", asked,
            f"at most {cap:.3g}: " + (f"engine.num_gpus={engine.num_gpus:g} lets Ray put {1 / share:g} such actors "
                                       f"on one GPU, each taking this share of its whole memory, and a GPU holds at "
                                       f"most {GPU_MEMORY_CAP} x its memory; or give each replica more GPU"
                                       if share < 1 else f"a GPU holds at most {GPU_MEMORY_CAP} x its memory"))


def _validate_lora_engine(team: TeamConfig) -> None:
    """One engine, one base model, an adapter per agent: everything that would make vLLM refuse it, named here."""
    for i, agent in enumerate(team.agents):
        key = f"team.agents[{i}]"
        require(agent.engine.max_loras >= 0, f"{key}.engine.max_loras", agent.engine.max_loras,
                "must be >= 0 (0: one slot per agent on the shared LoRA engine)")
        require(agent.engine.max_lora_rank == 0 or agent.engine.max_lora_rank in VLLM_LORA_RANKS,
                f"{key}.engine.max_lora_rank", agent.engine.max_lora_rank,
                f"0 (from the adapters) or a rank vLLM offers: {', '.join(map(str, VLLM_LORA_RANKS))}")
    if not team.lora_engine:
        for i, agent in enumerate(team.agents):
            require(agent.adapter is None, f"team.agents[{i}].adapter", agent.adapter,
                    "a fixed adapter is played on the shared LoRA engine: set team.lora_engine=true")
        return
    require(not team.shared_policy, "team.lora_engine", True,
            "team.shared_policy=true already has one policy for every seat; pick one of the two")
    trained = [i for i, a in enumerate(team.agents) if a.trainable and a.learner.lora_rank > 0]
    require(bool(trained), "team.lora_engine", True,
            "no trainable agent trains LoRA: set learner.lora_rank > 0 (for every agent) or "
            "team.agents.N.learner.lora_rank")
    base = team.agents[trained[0]].model
    for i in trained[1:]:
        require(team.agents[i].model == base, f"team.agents[{i}].model", team.agents[i].model,
                f"one LoRA engine serves one base model: team.agents[{trained[0]}] trains LoRA on {base}; give "
                "every agent that trains LoRA that model")
    seats = team.lora_seats()
    first = team.agents[seats[0]]
    for i in seats:
        agent, key = team.agents[i], f"team.agents[{i}]"
        require(not agent.trainable or agent.learner.lora_rank > 0, f"{key}.learner.lora_rank", 0,
                f"must be > 0 on the shared LoRA engine ({base}): a trained agent there trains an adapter; or "
                "give it another model, for an engine of its own")
        require(not (agent.trainable and agent.adapter), f"{key}.adapter", agent.adapter,
                "must be null for a trained agent: its adapter is the one its learner trains")
        require(not agent.learner.colocate, f"{key}.learner.colocate", True,
                "false on the shared LoRA engine: it serves every agent, it cannot sleep for one learner")
        require(agent.engine == first.engine, f"{key}.engine", "differs",
                f"agents on one LoRA engine share its settings: make them team.agents[{seats[0]}].engine's")
        if agent.adapter is not None:
            folder = Path(agent.adapter).expanduser()
            require((folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file(),
                    f"{key}.adapter", agent.adapter,
                    "a peft adapter folder: adapter_config.json and adapter_model.safetensors")
        require(adapter_rank(agent) <= VLLM_LORA_RANKS[-1], f"{key}.learner.lora_rank", adapter_rank(agent),
                f"must be <= {VLLM_LORA_RANKS[-1]}, the largest adapter rank vLLM serves")
    for i, agent in enumerate(team.agents):
        require(agent.adapter is None or i in seats, f"team.agents[{i}].adapter", agent.adapter,
                f"a fixed adapter needs the shared LoRA engine's base model, {base}")
    rank = lora_engine_config(team).max_lora_rank
    for i in seats:
        require(adapter_rank(team.agents[i]) <= rank, f"team.agents[{seats[0]}].engine.max_lora_rank", rank,
                f"must be >= {adapter_rank(team.agents[i])}, team.agents[{i}]'s adapter rank")
    adapters = sum(1 for i in seats if adapter_rank(team.agents[i]) > 0)
    require(first.engine.max_loras == 0 or first.engine.max_loras >= adapters,
            f"team.agents[{seats[0]}].engine.max_loras", first.engine.max_loras,
            f"must be >= {adapters}, the adapters on the shared LoRA engine (0: exactly that many)")
    from mapoco.models.registry import lora_support, model_config

    try:
        architecture = (model_config(base).get("architectures") or ["unknown"])[0]
    except FileNotFoundError as exc:
        raise ConfigError(f"team.agents[{seats[0]}].model", base, str(exc)) from None
    require(lora_support(architecture), f"team.agents[{seats[0]}].model", base,
            f"vLLM serves no LoRA adapters for its architecture {architecture}: train these agents with "
            "team.lora_engine=false (merged weights, an engine each)")


def _validate_model(i: int, agent: AgentConfig, download: bool = False) -> None:
    from mapoco.models.registry import has_chat_template

    key = f"team.agents[{i}].model"
    path = require_model(key, agent.model, download)
    require(path is None or has_chat_template(path), key, agent.model,
            "its tokenizer has no chat template (chat_template.jinja or tokenizer_config.json 'chat_template'): "
            "agents talk in chat threads, so use an instruct model or add a template")


def check_models(cfg: RunConfig) -> None:
    """Every agent's model is here, fetched from the hub where it is a hub id, and can chat: the check validation
    leaves to the run's start for hub models not downloaded yet."""
    for i, agent in enumerate(cfg.team.agents):
        _validate_model(i, agent, download=True)
    if cfg.command == "train-verifier" and cfg.verifier.base is not None:
        require_model("verifier.base", cfg.verifier.base, download=True)

"""What the runtime derives from a validated configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mapoco.config.schema import (
    VLLM_LORA_RANKS,
    AgentConfig,
    EngineConfig,
    LearnerConfig,
    TeamConfig,
)


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


def lora_engine_config(team: TeamConfig) -> EngineConfig:
    """The shared LoRA engine's settings (its first seat's), ``max_loras`` and ``max_lora_rank`` resolved: as set,
    or one slot per adapter and the smallest rank vLLM offers that holds every adapter on it."""
    seats = team.lora_seats()
    engine = team.agents[seats[0]].engine
    ranks = [adapter_rank(team.agents[i]) for i in seats]
    return dataclasses.replace(
        engine, max_loras=engine.max_loras or sum(1 for r in ranks if r > 0),
        max_lora_rank=engine.max_lora_rank or min(r for r in VLLM_LORA_RANKS if r >= max(ranks)))


def adapter_rank(agent: AgentConfig) -> int:
    """The rank an agent's adapter has on the LoRA engine (0: it plays the base model)."""
    if agent.trainable:
        return agent.learner.lora_rank
    if agent.adapter is None:
        return 0
    return int(json.loads((Path(agent.adapter).expanduser() / "adapter_config.json").read_text())["r"])


def changed(cfg: Any, changes: dict[str, Any]) -> Any:
    """A copy of the frozen ``cfg`` with the dotted keys set (``{"train.steps": 5}``), unvalidated: for a tool that
    varies one setting of a running trainer (benchmarks), not for a new run (compose one)."""
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        cfg = dataclasses.replace(cfg, **{head: changed(getattr(cfg, head), {rest: value}) if rest else value})
    return cfg

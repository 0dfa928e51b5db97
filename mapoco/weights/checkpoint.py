"""A checkpointed policy into its agent's engines, the way training syncs it: ``mapoco serve`` and ``mapoco eval``
of a trained run restore through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import ray
import torch

from mapoco.config import ConfigError, EngineConfig, LearnerConfig
from mapoco.models.registry import load_causal_lm
from mapoco.runtime.precision import engine_dtype, learner_dtype
from mapoco.weights.adapters import ADAPTER_DIR, read_adapter, with_lora
from mapoco.weights.payload import engine_weights, pack


class Agent(Protocol):
    """An agent's engines and what they serve (``mapoco.rollout.discussion.AgentRuntime``)."""

    model_path: Path
    engines: Any

    def load_adapter(self, adapter: Any) -> None: ...


def restore(agent: Agent, directory: Path, learner: LearnerConfig, engine: EngineConfig, on_lora_engine: bool) -> None:
    """Agent folder ``directory`` of a checkpoint into ``agent``'s engines (which keep it for any replica that
    restarts later); on the shared LoRA engine only the adapter moves."""
    if on_lora_engine:
        agent.load_adapter(read_adapter(directory / ADAPTER_DIR))
        return
    state = checkpoint_weights(directory, agent.model_path, learner)
    agent.engines.push_weights(ray.put(pack(state, getattr(torch, engine_dtype(engine)))))


def checkpoint_weights(directory: Path, model_path: Path, learner: LearnerConfig) -> dict[str, torch.Tensor]:
    """A learner checkpoint's policy weights under the engine's (HF) names, LoRA adapters merged, tied weights once:
    what the learner sends its engines after an update."""
    from safetensors.torch import load_file

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

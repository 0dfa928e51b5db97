"""The adapters transport, for agents on the shared LoRA engine: only an agent's adapter moves (peft's config and the
adapter tensors, through the object store), and the engine loads it as a peft folder in place of the one it had."""

from __future__ import annotations

import contextlib
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mapoco.config import LearnerConfig
from mapoco.weights.payload import WeightPayload, pack, unpack
from mapoco.weights.sync import Learners

AdapterPayload = tuple[dict[str, Any], WeightPayload]  # peft's adapter config, and the adapter's tensors
ADAPTER_DIR = "adapter"  # in a LoRA agent's checkpoint folder: adapter_config.json + adapter_model.safetensors


class AdapterTarget(Protocol):
    def load_adapter(self, adapter: Any) -> None: ...


class AdapterSync:
    def __init__(self, group: Learners, agent: AdapterTarget, dtype: str):
        self.group, self.agent, self.dtype = group, agent, dtype

    def updating(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # the shared LoRA engine serves every agent: it never sleeps for one

    def push(self) -> None:
        self.agent.load_adapter(self.group.adapter_ref(self.dtype))

    def shutdown(self) -> None:
        pass


def with_lora(policy: nn.Module, cfg: LearnerConfig) -> nn.Module:
    """The policy with LoRA adapters on every linear layer (the output head excepted), as the learner trains it."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(policy, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))


def adapter_weights(policy: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LoRA policy's adapter as a shared LoRA engine loads it: peft's adapter config (JSON-ready) and the
    adapter tensors alone, under the names peft saves them with (what vLLM's adapter loader reads)."""
    from peft import get_peft_model_state_dict

    config = {k: sorted(v) if isinstance(v, set) else v for k, v in policy.peft_config["default"].to_dict().items()}
    return config, {k: v.detach() for k, v in get_peft_model_state_dict(policy).items()}


def write_adapter(directory: Path, config: dict[str, Any], payload: WeightPayload) -> None:
    """Engine side: an adapter as the peft folder vLLM loads (``adapter_config.json``, ``adapter_model.safetensors``),
    written to a temporary name first so a load never reads half a file."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "adapter_model.safetensors.partial"
    save_file({k: v.clone() for k, v in unpack(payload).items()}, str(partial))
    (directory / "adapter_config.json").write_text(json.dumps(config, default=str))
    partial.replace(directory / "adapter_model.safetensors")


def read_adapter(folder: Path) -> AdapterPayload:
    """A peft adapter folder (a checkpoint's, or a fixed one a frozen agent plays) as an engine loads it."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    return json.loads((folder / "adapter_config.json").read_text()), pack(state, next(iter(state.values())).dtype)

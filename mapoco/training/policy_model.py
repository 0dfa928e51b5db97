"""The model a learner trains: the causal LM with its per-turn value head, wrapped in LoRA adapters where the
agent trains them, and DeepSpeed's settings for it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mapoco.config import LearnerConfig


class PolicyWithValue(nn.Module):
    """The causal LM plus a linear value head with one output per discussion turn (MAPoRL: V per agent and turn)."""

    def __init__(self, policy: nn.Module, num_turns: int):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, num_turns)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1].to(self.value_head.weight.dtype))


def deepspeed_config(cfg: LearnerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """DeepSpeed's settings for a learner group. Half precision keeps float32 master weights; fp16 also scales the
    loss dynamically (its small range underflows gradients otherwise), bf16 needs no scaling."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,  # micro-batches are accumulated by hand (see ``Learner.update``)
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16, "loss_scale": 0, "initial_scale_power": 16},  # 0: dynamic
        "steps_per_print": 10**9,
    }

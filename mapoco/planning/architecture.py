"""A model's size without its weights, for planning a run before anything downloads or starts.

The counts come from the real module tree: transformers builds the architecture from its config on the meta device
(nothing allocated), and LoRA adapters are added by the same peft call the learner makes. The config is the model's
own config.json (``mapoco.models.registry.model_config``: a built or local folder, the HF cache, or, for a hub model
not downloaded yet, its architecture fields from ``hub_architectures.yaml``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mapoco.config import LearnerConfig
from mapoco.models.registry import model_config


@dataclass(frozen=True)
class ModelShape:
    """What the memory plan needs to know of a model."""

    params: int  # distinct parameters (a tied output head counted once)
    largest_layer: int  # the most parameters one module holds itself: what ZeRO-3 gathers at once
    layers: int
    kv_heads: int
    head_dim: int
    lora_params: int = 0  # the adapters' parameters, when it was asked with a LoRA rank

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of every layer for one token: what a token of vLLM's KV cache holds."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def model_shape(ref: str, lora: LearnerConfig | None = None) -> ModelShape:
    """``ref``'s parameter counts from its module tree on the meta device; with ``lora`` (lora_rank > 0), the
    adapters the learner adds too."""
    return _shape(ref, lora.lora_rank if lora else 0, lora.lora_alpha if lora else 0)


@functools.cache
def _shape(ref: str, lora_rank: int, lora_alpha: int) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = model_config(ref)
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    adapters = 0
    if lora_rank > 0:
        from mapoco.weights.adapters import with_lora

        with torch.device("meta"):
            model = with_lora(model, LearnerConfig(lora_rank=lora_rank, lora_alpha=lora_alpha))
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(params, largest, config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                      head_dim, adapters)

"""The form weights travel in through Ray's object store, and a policy's tensors as its engines name them.

The CPU payload is one flat byte array per tensor plus its dtype and shape, a form Ray's object store holds without
pickling the data. The learner's one copy is Ray writing the arrays into shared memory; an engine reads them in
place (zero-copy numpy views), so the only work left on its side is vLLM's own reload. Serializing to safetensors
bytes instead cost a full extra copy on each side (profiled: 90% of the learner's sync time in
``safetensors.torch.save``, a third of the engine's in unpickling the bytes). Flat bytes, not typed arrays, because
numpy has no bfloat16.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

WeightPayload = dict[str, tuple[str, list[int], np.ndarray]]


def pack(state: dict[str, torch.Tensor], dtype: torch.dtype) -> WeightPayload:
    """CPU tensors in ``dtype`` as byte views (no copy when they already are)."""
    out: WeightPayload = {}
    for name, tensor in state.items():
        flat = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
        out[name] = (str(dtype).removeprefix("torch."), list(tensor.shape), flat.view(torch.uint8).numpy())
    return out


def unpack(payload: WeightPayload) -> dict[str, torch.Tensor]:
    """Tensors viewing the payload's buffers: read-only when they live in the object store, so callers copy out
    of them (vLLM's weight loaders do) and never write into them."""
    with warnings.catch_warnings():  # torch warns that the buffers are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        return {name: torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)
                for name, (dtype, shape, data) in payload.items()}


def engine_weights(policy: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """A policy's weights as its engines load them: HF names, LoRA adapters merged in, tied weights (lm_head =
    embeddings: one tensor under two names) sent once."""
    if lora:
        policy.merge_adapter()
        state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
                 for k, v in policy.state_dict().items() if "lora_" not in k}
        policy.unmerge_adapter()
    else:
        state = {k: v.detach() for k, v in policy.state_dict().items()}
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out

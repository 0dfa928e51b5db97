"""Weights in flight between a learner and its engines on the CPU path: one flat byte array per tensor plus its
dtype and shape, a form Ray's object store holds without pickling the data.

The learner's one copy is Ray writing the arrays into shared memory; an engine reads them in place (zero-copy numpy
views), so the only work left on its side is vLLM's own reload. Serializing to safetensors bytes instead cost a full
extra copy on each side (profiled: 90% of the learner's sync time in ``safetensors.torch.save``, a third of the
engine's in unpickling the bytes). Flat bytes, not typed arrays, because numpy has no bfloat16.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

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


def payload_bytes(payload: WeightPayload) -> int:
    return sum(data.nbytes for _, _, data in payload.values())

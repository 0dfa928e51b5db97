"""Nested training state (optimizer, scheduler, RNG, a rollout in flight) as safetensors + JSON: nothing is ever
unpickled.

Tensors go to a safetensors file keyed by their path in the structure; the structure itself (dicts, lists,
numbers, strings, mapoco's own dataclasses) goes to JSON with a placeholder where each tensor was.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DATACLASS = "__dataclass__"


def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        fields = [[f.name, _flatten(getattr(obj, f.name), f"{path}.{f.name}", tensors)] for f in dataclasses.fields(obj)]
        return {_DATACLASS: f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(obj, dict):
        # JSON keys are strings: keep int keys (torch optimizer state is keyed by param index) and tuple keys (a
        # rollout's records are keyed by (question, agent, turn)) as values.
        return {"__dict__": [[_flatten(k, path, {}), _flatten(v, f"{path}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path!r} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_unflatten(v, tensors) for v in obj[_TUPLE])
        if _DATACLASS in obj:
            return _dataclass(obj[_DATACLASS])(**{k: _unflatten(v, tensors) for k, v in obj["fields"]})
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def _dataclass(name: str) -> type:
    """Only mapoco's own dataclasses are rebuilt: a checkpoint names no other code to run."""
    module, _, qualname = name.partition(":")
    cls = getattr(importlib.import_module(module), qualname, None) if module.split(".")[0] == "mapoco" else None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"a checkpoint names {name!r}, which is not one of mapoco's dataclasses")
    return cls


def save_state(state: Any, path: Path) -> None:
    """Write ``path.safetensors`` and ``path.json``."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "s", tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(structure))


def load_state(path: Path) -> Any:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return _unflatten(json.loads(path.with_suffix(".json").read_text()), tensors)

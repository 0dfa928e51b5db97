"""The transport ``train.weight_sync`` picks for an agent."""

from __future__ import annotations

from mapoco.weights.collective import CollectiveSync
from mapoco.weights.object_store import ObjectStoreSync
from mapoco.weights.sync import Engines, Learners, WeightSync, sync_method


def make_sync(method: str, group: Learners, engines: Engines, dtype: str, timeout_s: float,
              name: str) -> WeightSync:
    """The transport ``train.weight_sync`` picks for an agent with engines of its own (``AdapterSync`` is the shared
    LoRA engine's)."""
    if sync_method(method, group.cfg, engines.cfg) == "collective":
        return CollectiveSync(group, engines, dtype, engines.cfg.tensor_parallel_size, timeout_s, name)
    return ObjectStoreSync(group, engines, dtype)

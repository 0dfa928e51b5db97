"""Weight sync: an agent's weights from its learner into its engines, timed from the controller (gather on the
learner, transfer, load into the engine, prefix-cache reset).

- ``sync_vs_copy``: the object-store path (``train.weight_sync=object_store``, ``auto``'s choice on CPU) in GB/s,
  against an in-process copy of the same tensors (the memory-bandwidth ceiling of moving those bytes once).
- ``sync_collective_vs_object_store``: the broadcast group (``train.weight_sync=collective``: gloo here, NCCL on
  GPUs, through the same code) against the object store, the same learner and engines, push for push, in seconds.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Figure, Result, peak_rss_mib, side_by_side
from mapoco.config import AgentConfig, AlgorithmConfig, EngineConfig, LearnerConfig
from mapoco.models.registry import resolve_model
from mapoco.rollout.engine import AgentEngines
from mapoco.runtime.placement import engine_bundles, reserve
from mapoco.runtime.precision import engine_dtype
from mapoco.training.learner_group import LearnerGroup
from mapoco.weights.collective import CollectiveSync
from mapoco.weights.object_store import ObjectStoreSync


def start_engines(path: str, cfg: EngineConfig, name: str) -> AgentEngines:
    """``cfg.replicas`` engine replicas of the model at ``path``, in a placement group of their own, ready."""
    bundles = engine_bundles(AgentConfig(name=name, model=path, engine=cfg), colocated=False)
    engines = AgentEngines(path, cfg, seed=0, placement=reserve(bundles, f"bench.{name}"))
    engines.wait_ready()
    return engines


class Pair:
    """A learner group of one rank and ``replicas`` engine replicas of ``model``, started for a benchmark."""

    def __init__(self, model: str, replicas: int = 1):
        path = str(resolve_model(model))
        self.engine_cfg = EngineConfig(max_model_len=1024, replicas=replicas)
        self.dtype = engine_dtype(self.engine_cfg)
        self.group = LearnerGroup(path, LearnerConfig(), AlgorithmConfig(), num_turns=1, seed=0,
                                  what=f"bench.{model}")
        self.engines = start_engines(path, self.engine_cfg, model)
        self.group.wait_ready()

    def peak_rss(self, model: str) -> dict[str, float]:
        return {f"engine {model}": peak_rss_mib(self.engines.call_all("pid")[0]),
                f"learner {model} (sync only)": peak_rss_mib(self.group.call_all("pid")[0])}

    def shutdown(self) -> None:
        self.engines.shutdown()
        self.group.shutdown()


def timed_push(sync) -> float:
    start = time.perf_counter()
    sync.push()
    return time.perf_counter() - start


def run(model: str, repeats: int = 5) -> Result:
    pair = Pair(model)
    try:
        sync = ObjectStoreSync(pair.group, pair.engines, pair.dtype)
        tensors = {k: v.clone() for k, v in pair.group.weights(pair.dtype).items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        targets = {k: torch.empty_like(v) for k, v in tensors.items()}
        sync.push()  # warm-up: the first reload pays one-off allocations

        def copy() -> float:
            start = time.perf_counter()
            for name, tensor in tensors.items():
                targets[name].copy_(tensor)
            return size / 1e9 / (time.perf_counter() - start)

        a, b, ratios = side_by_side(lambda: size / 1e9 / timed_push(sync), copy, repeats)
        memory = pair.peak_rss(model)
    finally:
        pair.shutdown()
    seconds = [size / 1e9 / gbps for gbps in a]
    return Result(
        "sync_vs_copy",
        Figure("weight sync (object store)", "GB/s", a),
        Figure("in-process tensor copy", "GB/s", b),
        sizes={"model": model, "bytes": size, "tensors": len(tensors), "dtype": pair.dtype},
        target=0.5, ratios=ratios,
        extra={"sync_seconds": {"median": round(sorted(seconds)[len(seconds) // 2], 4),
                                "spread": [round(min(seconds), 4), round(max(seconds), 4)]},
               "peak_rss_mib": memory},
    )


def run_collective(model: str, replicas: int = 2, repeats: int = 5) -> Result:
    """Both paths on one learner and ``replicas`` engines: the broadcast sends the bytes once per replica over the
    group's sockets; the object store writes them once and every replica reads them in place."""
    pair = Pair(model, replicas)
    try:
        collective = CollectiveSync(pair.group, pair.engines, pair.dtype, 1, timeout_s=300, name=f"bench.{model}")
        store = ObjectStoreSync(pair.group, pair.engines, pair.dtype)
        collective.push(), store.push()  # warm-up: the first reload pays one-off allocations
        a, b, ratios = side_by_side(lambda: timed_push(collective), lambda: timed_push(store), repeats,
                                    higher_is_better=False)
        size = sum(t.numel() * t.element_size() for t in pair.group.weights(pair.dtype).values())
    finally:
        pair.shutdown()
    return Result(
        "sync_collective_vs_object_store",
        Figure("weight sync (collective: gloo broadcast group)", "s", a),
        Figure("weight sync (object store)", "s", b),
        sizes={"model": model, "bytes": size, "engine_replicas": replicas, "dtype": pair.dtype},
        target=1.0, ratios=ratios, higher_is_better=False,
    )

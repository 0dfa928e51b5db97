"""sync_vs_copy: seconds and GB/s to push an agent's weights from its learner into its engine, versus an
in-process copy of the same tensors (the memory-bandwidth ceiling of moving those bytes once).

The sync is mapoco's real path for this machine (``train.weight_sync=auto``: through Ray's object store on CPU, an
NCCL broadcast on GPU), timed from the controller: gather on the learner, transfer, load into the engine, prefix-cache
reset. The copy is ``dst.copy_(src)`` over the same tensors in the engine's dtype.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import Figure, Result, peak_rss_mib, side_by_side
from mapoco.config import AlgorithmConfig, EngineConfig, LearnerConfig
from mapoco.models.registry import resolve_model
from mapoco.rollout.engine import AgentEngines
from mapoco.runtime.placement import engine_bundles, reserve
from mapoco.runtime.precision import engine_dtype
from mapoco.training.learner import LearnerGroup
from mapoco.training.weight_sync import make_sync


def _agent_engines(path: str, cfg: EngineConfig, model: str) -> AgentEngines:
    from mapoco.config import AgentConfig

    bundles = engine_bundles(AgentConfig(name=model, model=model, engine=cfg), colocated=False)
    engines = AgentEngines(path, cfg, seed=0, placement=reserve(bundles, f"bench.{model}.engine"))
    engines.wait_ready()
    return engines


def run(model: str, repeats: int = 5) -> Result:
    path = str(resolve_model(model))
    engine_cfg = EngineConfig(max_model_len=1024)
    dtype = engine_dtype(engine_cfg)
    group = LearnerGroup(path, LearnerConfig(), AlgorithmConfig(), num_turns=1, seed=0, what=f"bench.{model}")
    engines = _agent_engines(path, engine_cfg, model)
    try:
        sync = make_sync("auto", group, engines, dtype, engine_cfg.tensor_parallel_size, engine_cfg.num_gpus > 0)
        tensors = {k: v.clone() for k, v in group.weights(dtype).items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        targets = {k: torch.empty_like(v) for k, v in tensors.items()}
        sync.push()  # warm-up: the first reload pays one-off allocations

        def push() -> float:
            start = time.perf_counter()
            sync.push()
            return size / 1e9 / (time.perf_counter() - start)

        def copy() -> float:
            start = time.perf_counter()
            for name, tensor in tensors.items():
                targets[name].copy_(tensor)
            return size / 1e9 / (time.perf_counter() - start)

        a, b, ratios = side_by_side(push, copy, repeats)
        memory = {f"engine {model}": peak_rss_mib(engines.call_all(lambda e: e.pid.remote())[0]),
                  f"learner {model} (sync only)": peak_rss_mib(group.call_all("pid")[0])}
    finally:
        engines.shutdown()
        group.shutdown()
    seconds = [size / 1e9 / gbps for gbps in a]
    return Result(
        "sync_vs_copy",
        Figure(f"weight sync ({type(sync).__name__})", "GB/s", a),
        Figure("in-process tensor copy", "GB/s", b),
        sizes={"model": model, "bytes": size, "tensors": len(tensors), "dtype": dtype},
        target=0.5, ratios=ratios,
        extra={"sync_seconds": {"median": round(sorted(seconds)[len(seconds) // 2], 4),
                                "spread": [round(min(seconds), 4), round(max(seconds), 4)]},
               "peak_rss_mib": memory},
    )

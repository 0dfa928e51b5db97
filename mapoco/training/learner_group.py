"""A learner group: every rank of one agent's learner (placed, started, called and gathered together), and the
pool that keeps idle groups for the next run of a test session or a sweep."""

from __future__ import annotations

from typing import Any

import ray
import torch

from mapoco.config import AlgorithmConfig, LearnerConfig
from mapoco.runtime.actor_group import ActorGroup, Call
from mapoco.runtime.devices import visible_devices_env
from mapoco.runtime.placement import (
    READY_TIMEOUT_S,
    Placement,
    learner_bundles,
    reserve,
)
from mapoco.training.batch import (
    PER_RANK_STATS,
    Rollout,
    RolloutStats,
    TokenTargets,
    combine_stats,
)
from mapoco.training.learner import Learner
from mapoco.weights.payload import unpack


class LearnerGroup(ActorGroup):
    """All ranks of one agent's learner group; calls fan out to every rank and are gathered.

    Rank r runs in bundle r of ``placement``: the group's own (reserved here) or, when colocated, its engines'.
    """

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgorithmConfig, num_turns: int, seed: int,
                 what: str, placement: Placement | None = None, placement_timeout_s: float = READY_TIMEOUT_S):
        self.model_path, self.cfg, self._settings = model_path, cfg, (algo, num_turns, seed)
        owned = placement is None
        super().__init__(what, cfg.num_learners, placement or reserve(learner_bundles(cfg), what, placement_timeout_s),
                         owns_placement=owned)
        # The group meets on rank 0's node, wherever the driver runs: every rank gets rank 0's address (Ray resolves
        # the reference first), so the groups of all agents start at once.
        master = self.actors[0].rendezvous_address.remote()
        self._ready = [actor.setup.remote(master) for actor in self.actors]

    def start(self, index: int) -> ray.actor.ActorHandle:
        cfg = self.cfg
        return ray.remote(Learner).options(
            num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, scheduling_strategy=self.placement.strategy(index),
            runtime_env={"env_vars": {**(cfg.env or {}), "DS_ACCELERATOR": "cuda" if cfg.num_gpus else "cpu",
                                      **visible_devices_env(cfg.num_gpus)}},
        ).remote(index, cfg.num_learners, self.model_path, cfg, *self._settings, self.what)

    def wait_ready(self) -> None:
        """Until every rank has joined the group and built its model (a rank's error raises here)."""
        self.results([Call(r, None, ref) for r, ref in enumerate(self._ready)])

    def rollout_stats(self, rows: list[Rollout]) -> RolloutStats:
        """Each rank computes its shard's stats; the shards' tensors are put back in row order."""
        parts = self.shard(rows)
        shards = self.results(self.send([lambda a, part=part: a.rollout_stats.remote(part) for part in parts]))
        out = RolloutStats.zeros(rows)
        for part, shard in zip(self.slices(len(rows)), shards):
            for field in RolloutStats.FIELDS:
                stats = getattr(shard, field)
                getattr(out, field)[part, : stats.size(1)] = stats
        return out

    def update(self, rows: list[Rollout], targets: TokenTargets, normalizer: float,
               step: int = 0) -> dict[str, float]:
        """``targets`` go into the object store once; every rank reads its rows of them there."""
        targets_ref = ray.put(targets)
        index = list(range(len(rows)))
        results = self.results(self.send([
            lambda a, part=part: a.update.remote(rows[part], targets_ref, index[part], normalizer, step)
            for part in self.slices(len(rows))]))
        combined = combine_stats({k: [r[k] for r in results] for k in results[0] if k not in PER_RANK_STATS},
                                 [r["tokens"] for r in results])
        combined["grad_norm"] = results[0]["grad_norm"]  # after the all-reduce: the same on every rank
        combined["peak_memory_gib"] = max(r["peak_memory_gib"] for r in results)  # the fullest rank's
        return {k: v for k, v in combined.items() if k != "tokens"}

    def weights_ref(self, dtype: str) -> ray.ObjectRef:
        """Rank 0's weights, left in the object store: engines read them straight from there, not through the
        controller (measured: a SmolLM2 sync 3.5 s -> 2.5 s on CPU)."""
        return self._rank0_ref("weights", dtype)  # every rank: ZeRO-3 gathers collectively

    def weights(self, dtype: str) -> dict[str, torch.Tensor]:
        return unpack(ray.get(self.weights_ref(dtype)))

    def adapter_ref(self, dtype: str) -> ray.ObjectRef:
        """Rank 0's adapter, left in the object store as ``weights_ref`` leaves the weights."""
        return self._rank0_ref("adapter", dtype)

    def _rank0_ref(self, method: str, *args: Any) -> ray.ObjectRef:
        calls = self.send([lambda a: getattr(a, method).remote(*args)] * len(self.actors))
        self.results(calls[1:])
        return calls[0].ref

    def reset(self, cfg: LearnerConfig, algo: AlgorithmConfig, num_turns: int, seed: int) -> None:
        """Every rank starts over with these settings (``Learner.reset``); ``wait_ready`` waits for it."""
        self.cfg, self._settings = cfg, (algo, num_turns, seed)
        self._ready = [a.reset.remote(cfg, algo, num_turns, seed) for a in self.actors]


class LearnerPool:
    """Learner groups that outlive the runs they serve, within one driver (a test session): a run that asks for a
    group of a model and shape the pool holds gets one back, rebuilt from the model's files with the run's settings
    (``LearnerGroup.reset``: seconds, against a new group's process start-up, imports and rendezvous). A group goes
    back to the pool when its run closes; one with a dead rank is shut down instead."""

    def __init__(self, per_shape: int = 3, one_shape_per_model: bool = False) -> None:
        self.free: dict[tuple, list[LearnerGroup]] = {}
        self.per_shape = per_shape  # idle groups kept per shape: an idle group's processes keep their memory
        # A run that asks a model in a new shape first frees the idle groups of that model in other shapes: a
        # sweep's cluster is sized for one job (a sweep that comes back to an earlier shape starts it again).
        self.one_shape_per_model = one_shape_per_model

    @staticmethod
    def key(model_path: str, cfg: LearnerConfig) -> tuple:
        """What a reset cannot change: the model, the ranks and what each rank holds and where."""
        return (model_path, cfg.num_learners, cfg.num_cpus, cfg.num_gpus, cfg.placement,
                tuple(sorted((cfg.resources or {}).items())), tuple(sorted((cfg.env or {}).items())))

    def take(self, model_path: str, cfg: LearnerConfig, algo: AlgorithmConfig, num_turns: int, seed: int,
             what: str, placement_timeout_s: float = READY_TIMEOUT_S) -> LearnerGroup:
        free = self.free.get(self.key(model_path, cfg))
        if not free:
            if self.one_shape_per_model:
                self.free_other_shapes(model_path)
            return LearnerGroup(model_path, cfg, algo, num_turns, seed, what, placement_timeout_s=placement_timeout_s)
        group = free.pop()
        group.reset(cfg, algo, num_turns, seed)
        return group

    def free_other_shapes(self, model_path: str) -> None:
        """Shut down the idle groups of ``model_path`` (a run is about to start one in a shape the pool lacks)."""
        for key in [k for k in self.free if k[0] == model_path]:
            for group in self.free.pop(key):
                group.shutdown()

    def give_back(self, group: LearnerGroup) -> None:
        """Kept for the next run that asks for its shape; shut down if a rank died or the pool holds enough."""
        free = self.free.setdefault(self.key(group.model_path, group.cfg), [])
        if len(free) < self.per_shape and group.alive():
            free.append(group)
        else:
            group.shutdown()

    def shutdown(self) -> None:
        for group in (g for free in self.free.values() for g in free):
            group.shutdown()
        self.free.clear()

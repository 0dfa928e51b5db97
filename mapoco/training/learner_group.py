"""A learner group: every rank of one agent's learner (placed, started, called and gathered together), and the
pool that keeps idle groups for the next run of a test session or a sweep."""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from mapoco.config import AlgorithmConfig, LearnerConfig
from mapoco.runtime.devices import visible_devices_env
from mapoco.runtime.placement import (
    READY_TIMEOUT_S,
    Placement,
    learner_bundles,
    reserve,
)
from mapoco.runtime.weights import (
    unpack,
)
from mapoco.training.batch import PER_RANK_STATS, Rollout, RolloutStats, TokenTargets, combine_stats
from mapoco.training.learner import Learner


class LearnerGroup:
    """All ranks of one agent's learner group; calls fan out to every rank and are gathered.

    Rank r runs in bundle r of ``placement``: the group's own (reserved here) or, when colocated, its engines'.
    """

    def __init__(self, model_path: str, cfg: LearnerConfig, algo: AlgorithmConfig, num_turns: int, seed: int,
                 what: str, placement: Placement | None = None, placement_timeout_s: float = READY_TIMEOUT_S):
        self.model_path, self.cfg = model_path, cfg
        self.owned_placement = None if placement else reserve(learner_bundles(cfg), what, placement_timeout_s)
        placement = placement or self.owned_placement
        self.actors = [
            ray.remote(Learner).options(
                num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, scheduling_strategy=placement.strategy(r),
                runtime_env={"env_vars": {**(cfg.env or {}), "DS_ACCELERATOR": "cuda" if cfg.num_gpus else "cpu",
                                          **visible_devices_env(cfg.num_gpus)}},
            ).remote(r, cfg.num_learners, model_path, cfg, algo, num_turns, seed, what)
            for r in range(cfg.num_learners)
        ]
        # The group meets on rank 0's node, wherever the driver runs: every rank gets rank 0's address (Ray resolves
        # the reference first), so the groups of all agents start at once.
        master = self.actors[0].rendezvous_address.remote()
        self._ready = [actor.setup.remote(master) for actor in self.actors]

    def wait_ready(self) -> None:
        """Until every rank has joined the group and built its model (a rank's error raises here)."""
        gather(self._ready)

    def shard(self, items: list[Any]) -> list[list[Any]]:
        n = len(self.actors)
        return [items[r::n] for r in range(n)]

    def rollout_stats(self, rows: list[Rollout]) -> RolloutStats:
        """Each rank computes its shard's stats; the shards' tensors are put back in row order."""
        shards = gather([a.rollout_stats.remote(s) for a, s in zip(self.actors, self.shard(rows))])
        out = RolloutStats.zeros(rows)
        for index, shard in zip(self.shard(list(range(len(rows)))), shards):
            for field in RolloutStats.FIELDS:
                part = getattr(shard, field)
                getattr(out, field)[index, : part.size(1)] = part
        return out

    def update(self, rows: list[Rollout], targets: TokenTargets, normalizer: float,
               step: int = 0) -> dict[str, float]:
        """``targets`` go into the object store once; every rank reads its rows of them there."""
        targets_ref = ray.put(targets)
        refs = [actor.update.remote([rows[i] for i in idx], targets_ref, idx, normalizer, step)
                for actor, idx in zip(self.actors, self.shard(list(range(len(rows)))))]
        results = gather(refs)
        combined = combine_stats({k: [r[k] for r in results] for k in results[0] if k not in PER_RANK_STATS},
                                 [r["tokens"] for r in results])
        combined["grad_norm"] = results[0]["grad_norm"]  # after the all-reduce: the same on every rank
        combined["peak_memory_gib"] = max(r["peak_memory_gib"] for r in results)  # the fullest rank's
        return {k: v for k, v in combined.items() if k != "tokens"}

    def weights_ref(self, dtype: str) -> ray.ObjectRef:
        """Rank 0's weights, left in the object store: engines read them straight from there, not through the
        controller (measured: a SmolLM2 sync 3.5 s -> 2.5 s on CPU)."""
        refs = [a.weights.remote(dtype) for a in self.actors]  # every rank: ZeRO-3 gathers collectively
        gather(refs[1:])
        return refs[0]

    def weights(self, dtype: str) -> dict[str, torch.Tensor]:
        return unpack(ray.get(self.weights_ref(dtype)))

    def adapter_ref(self, dtype: str) -> ray.ObjectRef:
        """Rank 0's adapter, left in the object store as ``weights_ref`` leaves the weights."""
        refs = [a.adapter.remote(dtype) for a in self.actors]
        gather(refs[1:])
        return refs[0]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        return gather([getattr(a, method).remote(*args) for a in self.actors])

    def reset(self, cfg: LearnerConfig, algo: AlgorithmConfig, num_turns: int, seed: int) -> None:
        """Every rank starts over with these settings (``Learner.reset``); ``wait_ready`` waits for it."""
        self.cfg = cfg
        self._ready = [a.reset.remote(cfg, algo, num_turns, seed) for a in self.actors]

    def alive(self) -> bool:
        try:
            self.call_all("where")
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            return False
        return True

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.owned_placement is not None:
            self.owned_placement.remove()


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


# A rank's collective fails at once when a peer dies (gloo: "Connection reset by peer"), before Ray declares the peer
# dead (within its health-check window: 15 s by default, a node's loss up to 30 s).
PEER_DEATH_WAIT_S = 60.0


def gather(refs: list[ray.ObjectRef]) -> list[Any]:
    """``ray.get(refs)``, but the first rank to fail raises at once: its peers may be stuck in a collective waiting
    for it (gloo's own timeout is 30 minutes), and ``ray.get`` in order would wait on them first. A rank that failed
    because a peer died raises the peer's death, the fault a run resumes from, not the broken collective."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done)
        except ray.exceptions.RayTaskError:
            _raise_a_peers_death(pending)
            raise
    return ray.get(refs)


def _raise_a_peers_death(pending: list[ray.ObjectRef]) -> None:
    """Raises the death of the rank behind one of ``pending`` if Ray declares one within PEER_DEATH_WAIT_S."""
    deadline = time.monotonic() + PEER_DEATH_WAIT_S
    while pending and (left := deadline - time.monotonic()) > 0:
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                raise
            except ray.exceptions.RayTaskError:
                pass

"""Placement: every agent's engines, and its learners, get bundles of a placement group of their own.

A group is reserved whole before its actors start, so one agent's actors never wait on resources another agent's
actors took half of, and a run that cannot fit fails with the numbers instead of hanging. With
``learner.colocate`` (GPU) an agent's learner rank k shares engine replica k's bundle: its GPU holds both, and the
engine sleeps (weights offloaded, KV cache freed) while the learner updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mapoco.config import AgentConfig, ConfigError, LearnerConfig

READY_TIMEOUT_S = 120.0


def learner_shares_engines(agent: AgentConfig, training: bool) -> bool:
    """Whether the agent's learner ranks ride in its engines' bundles: a trained agent with ``learner.colocate``."""
    return training and agent.trainable and agent.learner.colocate


def engine_bundle(agent: AgentConfig, colocated: bool) -> dict[str, float]:
    """One engine replica (all its tensor-parallel GPUs); a colocated learner rank's share rides along."""
    cpus, gpus = agent.engine.num_cpus, agent.engine.num_gpus
    if colocated:
        cpus += agent.learner.num_cpus
        gpus = 1.0  # the GPU that engine and learner share (colocation needs tensor_parallel_size 1)
    return _nonzero({"CPU": cpus, "GPU": gpus})


def learner_bundle(cfg: LearnerConfig) -> dict[str, float]:
    return _nonzero({"CPU": cfg.num_cpus, "GPU": cfg.num_gpus})


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in bundle.items() if v > 0}


@dataclass
class Placement:
    """A reserved placement group; actor ``i`` of its owner runs in bundle ``i``."""

    group: PlacementGroup

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    def remove(self) -> None:
        remove_placement_group(self.group)


def reserve(bundles: list[dict[str, float]], what: str, timeout_s: float = READY_TIMEOUT_S) -> Placement:
    """Reserve ``bundles`` on as few nodes as possible (PACK); an unplaceable group is an error naming them."""
    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ConfigError(what, bundles, f"could not be placed within {timeout_s:g}s: the cluster has "
                                         f"{_describe(ray.available_resources())} free") from None
    return Placement(group)


def check_bundles_fit(named_bundles: dict[str, list[dict[str, float]]]) -> None:
    """Every bundle must fit on one node (a 2-GPU engine replica cannot span two 1-GPU nodes)."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for what, bundles in named_bundles.items():
        for bundle in bundles:
            if not any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in nodes):
                largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
                raise ConfigError(what, bundle, f"needs one node with that much; the largest node has "
                                                f"{_describe(largest)}")


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in ("CPU", "GPU"))

"""Placement: every agent's engines, and its learners, get bundles of a placement group of their own.

A group is reserved whole before its actors start, so one agent's actors never wait on resources another agent's
actors took half of, and a run that cannot fit fails with the numbers instead of hanging. A group's strategy
(``engine.placement``, ``learner.placement``: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD) says how its bundles spread
over nodes, and custom resources (``engine.resources``, ``learner.resources``) pin them to the nodes that offer
them. With ``learner.colocate`` an agent's learner rank k shares engine replica k's bundle (its GPU holds both, or
on CPUs its cores), and the engine sleeps while the learner updates (on a GPU: weights offloaded, KV cache freed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mapoco.config import AgentConfig, ConfigError, LearnerConfig

READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Bundles:
    """One group of actors' bundles (actor i in bundle i) and how Ray may spread them over nodes."""

    bundles: list[dict[str, float]]
    strategy: str = "PACK"


def learner_shares_engines(agent: AgentConfig, training: bool) -> bool:
    """Whether the agent's learner ranks ride in its engines' bundles: a trained agent with ``learner.colocate``."""
    return training and agent.trainable and agent.learner.colocate


def engine_bundles(agent: AgentConfig, colocated: bool) -> Bundles:
    """One bundle per engine replica (all its tensor-parallel GPUs); a colocated learner rank's share rides along."""
    cpus, gpus, custom = agent.engine.num_cpus, agent.engine.num_gpus, dict(agent.engine.resources or {})
    if colocated:
        cpus += agent.learner.num_cpus
        gpus = 1.0 if gpus else 0.0  # the GPU that engine and learner share (tensor_parallel_size 1), or CPUs only
        theirs = agent.learner.resources or {}
        custom = {k: custom.get(k, 0.0) + theirs.get(k, 0.0) for k in sorted({*custom, *theirs})}
    return Bundles([_nonzero({"CPU": cpus, "GPU": gpus, **custom})] * agent.engine.replicas, agent.engine.placement)


def learner_bundles(cfg: LearnerConfig) -> Bundles:
    """One bundle per rank of a learner group that has bundles of its own (not colocated)."""
    bundle = _nonzero({"CPU": cfg.num_cpus, "GPU": cfg.num_gpus, **(cfg.resources or {})})
    return Bundles([bundle] * cfg.num_learners, cfg.placement)


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in bundle.items() if v > 0}


def node_of_actor(bundle: int) -> dict[str, Any]:
    """Where the calling actor runs: its Ray node (id and IP address), its placement group and the bundle it was
    placed in (actor i of a group in bundle i), and the GPU ids Ray gave it."""
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "placement_group": context.get_placement_group_id(), "bundle": bundle,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


@dataclass
class Placement:
    """A reserved placement group; actor ``i`` of its owner runs in bundle ``i``."""

    group: PlacementGroup

    def strategy(self, bundle: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)

    def bundle_node(self, bundle: int) -> str | None:
        """The live node that holds ``bundle``; None while none does (its node was lost and Ray has not placed it
        elsewhere yet, or cannot)."""
        table = placement_group_table(self.group)
        node = table["bundles_to_node_id"].get(bundle)
        if table["state"] != "CREATED" or not node:
            return None
        return node if any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()) else None

    def remove(self) -> None:
        remove_placement_group(self.group)


def reserve(group: Bundles, what: str, timeout_s: float = READY_TIMEOUT_S) -> Placement:
    """Reserve ``group``'s bundles with its strategy; an unplaceable group is an error naming them."""
    reserved = placement_group(group.bundles, strategy=group.strategy)
    try:
        ray.get(reserved.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(reserved)
        raise ConfigError(what, group.bundles, f"could not be placed ({group.strategy}) within {timeout_s:g}s: the "
                                               f"cluster has {_describe(ray.available_resources())} free") from None
    return Placement(reserved)


def check_bundles_fit(groups: dict[str, Bundles]) -> None:
    """Every bundle fits on one node (a 2-GPU engine replica cannot span two 1-GPU nodes); a STRICT_SPREAD group
    finds a node for each bundle, a STRICT_PACK group one node for all of them."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for what, group in groups.items():
        for bundle in group.bundles:
            if not any(_holds(node, bundle) for node in nodes):
                largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
                raise ConfigError(what, bundle, f"needs one node with that much; the largest node has "
                                                f"{_describe(largest, bundle)}")
        if group.strategy == "STRICT_SPREAD":
            able = sum(any(_holds(node, b) for b in group.bundles) for node in nodes)
            if able < len(group.bundles):
                raise ConfigError(what, group.bundles, f"STRICT_SPREAD puts each of its {len(group.bundles)} bundles "
                                                       f"on a node of its own; {able} of the cluster's {len(nodes)} "
                                                       f"nodes can hold one")
        if group.strategy == "STRICT_PACK":
            total = {k: sum(b.get(k, 0.0) for b in group.bundles) for b in group.bundles for k in b}
            if not any(_holds(node, total) for node in nodes):
                raise ConfigError(what, group.bundles, f"STRICT_PACK puts all its bundles on one node: "
                                                       f"{_describe(total, total)} in all, and no node has that much")


def _holds(node: dict[str, float], bundle: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in bundle.items())


def _describe(resources: dict[str, float], asked: dict[str, float] | None = None) -> str:
    """CPU, GPU and any custom resource ``asked`` names, as "2 CPU, 0 GPU, 1 node_a"."""
    keys = ["CPU", "GPU", *sorted(k for k in asked or {} if k not in ("CPU", "GPU"))]
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in keys)

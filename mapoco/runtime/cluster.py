"""Connecting to Ray: join an existing cluster (``ray job submit`` sets RAY_ADDRESS) or start a local instance.

Every placement bundle the run will reserve is listed first, so a run that cannot fit (in total, or because one
bundle is larger than any node) fails with the numbers before any actor starts.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from typing import Any

import ray

from mapoco.config import (
    AgentConfig,
    ConfigError,
    RunConfig,
    check_models,
    lora_engine_config,
)
from mapoco.runtime.devices import check_install, this_install
from mapoco.runtime.logs import actor_env
from mapoco.runtime.placement import (
    Bundles,
    check_bundles_fit,
    engine_bundles,
    learner_bundles,
    learner_shares_engines,
)


def learning_agents(cfg: RunConfig) -> list[tuple[int, AgentConfig]]:
    if cfg.command != "train":
        return []
    return [(owner, cfg.team.agents[owner]) for owner in cfg.team.policy_seats()]


def engine_hosts(cfg: RunConfig) -> list[tuple[int, AgentConfig]]:
    """The seats that start engines of their own, each with the settings its engines run with: one seat when one
    policy plays every seat, and the first of the shared LoRA engine's seats for all of them."""
    team, lora_seats = cfg.team, cfg.team.lora_seats()
    if team.shared_policy:
        return [(0, team.agents[0])]
    return [(i, replace(a, engine=lora_engine_config(team)) if i in lora_seats else a)
            for i, a in enumerate(team.agents) if i not in lora_seats[1:]]


def team_engine_bundles(cfg: RunConfig) -> dict[str, Bundles]:
    """Every agent's engine bundles, keyed by the agent whose config sizes them (a colocated learner rank's share
    rides along when training)."""
    training = cfg.command == "train"
    return {f"team.agents[{i}].engine": engine_bundles(agent, learner_shares_engines(agent, training))
            for i, agent in engine_hosts(cfg)}


def run_bundles(cfg: RunConfig) -> dict[str, Bundles]:
    """Placement bundles per group of actors, keyed by the config key that sizes them."""
    groups = team_engine_bundles(cfg)
    for i, agent in learning_agents(cfg):
        if not learner_shares_engines(agent, training=True):
            groups[f"team.agents[{i}].learner"] = learner_bundles(agent.learner)
    groups["verifier"] = Bundles([{"CPU": cfg.verifier.num_cpus}])
    return groups


def required(groups: dict[str, Bundles], resource: str, copies: int = 1) -> float:
    return copies * sum(b.get(resource, 0.0) for group in groups.values() for b in group.bundles)


def start_or_join(cfg: RunConfig, need_cpus: float, who: str, breakdown: str) -> bool:
    """Join ``cluster.address`` (or $RAY_ADDRESS), or start a local instance with at least ``need_cpus`` logical
    CPUs; returns whether a local instance was started. Errors say ``who`` needs the CPUs, and for what."""
    if ray.is_initialized():
        return False
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **_output_options(cfg))
        return False
    if cfg.cluster.num_cpus is not None and cfg.cluster.num_cpus < need_cpus:
        raise ConfigError("cluster.num_cpus", cfg.cluster.num_cpus, f"{who} need {need_cpus:g} CPUs ({breakdown})")
    # address="local": a new instance of its own, never one a test or an earlier run left behind on this machine.
    ray.init(address="local", num_cpus=cfg.cluster.num_cpus or max(math.ceil(need_cpus), os.cpu_count() or 1),
             include_dashboard=False, dashboard_host=cfg.cluster.dashboard_host, **_output_options(cfg))
    return True


def _output_options(cfg: RunConfig) -> dict[str, Any]:
    """Actors write their output to the run's logs/ (``mapoco.runtime.logs``); the driver forwards it to the
    terminal, and Ray says more than warnings, only with ``logger.show_logs``."""
    show = cfg.logger.show_logs
    return {"log_to_driver": show, "logging_level": logging.INFO if show else logging.WARNING,
            "runtime_env": {"env_vars": actor_env(cfg.output_dir, show)}}


def check_capacity(groups: dict[str, Bundles], keys: dict[str, tuple[str, Any]], who: str, breakdown: str,
                   copies: int = 1) -> None:
    """The cluster holds ``copies`` of ``groups``: in total per resource (a shortfall names ``keys[resource]``: the
    config key and its value), each bundle on one node and each group's strategy satisfiable."""
    have = ray.cluster_resources()
    for resource, (key, value) in keys.items():
        need = required(groups, resource, copies)
        if have.get(resource, 0) < need:
            raise ConfigError(key, value, f"{who} need {need:g} {resource}s in all ({breakdown}); the cluster has "
                                          f"{have.get(resource, 0):g}")
    check_bundles_fit(groups)


def run_devices(cfg: RunConfig) -> list[tuple[str, str, float]]:
    """(config key, part, num_gpus) of every engine and learner group the run starts."""
    parts = [(f"team.agents[{i}].engine.num_gpus", "engine", a.engine.num_gpus) for i, a in engine_hosts(cfg)]
    return parts + [(f"team.agents[{i}].learner.num_gpus", "learner", a.learner.num_gpus)
                    for i, a in learning_agents(cfg)]


BREAKDOWN = "engines x tensor parallel x replicas + learners + verifier"


def check_cluster(cfg: RunConfig) -> None:
    """The connected cluster can hold every bundle the run's actors will reserve."""
    groups = run_bundles(cfg)
    need_cpus, need_gpus = required(groups, "CPU"), required(groups, "GPU")
    check_capacity(groups, {"CPU": ("engine.num_cpus", need_cpus), "GPU": ("engine.num_gpus", need_gpus)},
                   "the run's actors", BREAKDOWN)


def check_local_gpus(cfg: RunConfig) -> None:
    """A run that will start a local Ray instance (no cluster.address, no $RAY_ADDRESS) has this machine's GPUs, as
    Ray counts them: too few is an error before the run loads data or starts Ray."""
    if ray.is_initialized() or cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        return
    need = required(run_bundles(cfg), "GPU")
    if need == 0:
        return
    from ray._private.accelerators import get_accelerator_manager_for_resource

    have = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    if have < need:
        raise ConfigError("engine.num_gpus", need, f"the run's actors need {need:g} GPUs in all ({BREAKDOWN}); the "
                                                   f"cluster has {have}: no cluster.address or RAY_ADDRESS is set, so "
                                                   "it would be a local Ray instance on this machine")


def connect(cfg: RunConfig) -> None:
    """Start or join Ray, then check that the cluster can hold every bundle the run's actors will reserve."""
    check_local_gpus(cfg)
    start_or_join(cfg, required(run_bundles(cfg), "CPU"), "the run's actors", BREAKDOWN)
    check_cluster(cfg)


def init_ray(cfg: RunConfig) -> None:
    """Connect, then ``check_ready_to_start``."""
    connect(cfg)
    check_ready_to_start(cfg)


def check_ready_to_start(cfg: RunConfig) -> None:
    """Once the cluster is known to hold the run (train, eval, serve): this install runs every actor on its device,
    and every model is here (hub models are fetched now, so nothing downloads for a run that cannot start)."""
    check_install(run_devices(cfg), this_install())
    check_models(cfg)

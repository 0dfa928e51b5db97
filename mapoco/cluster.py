"""Connecting to Ray: join an existing cluster (``ray job submit`` sets RAY_ADDRESS) or start a local instance.

The resources every actor will ask for are added up first, so a run that cannot fit fails before any actor starts.
"""

from __future__ import annotations

import os

import ray

from mapoco.config import ConfigError, RunConfig


def _learning_agents(cfg: RunConfig) -> list:
    if cfg.command != "train":
        return []
    trained = [a for a in cfg.team.agents if a.trainable]
    return trained[:1] if cfg.team.shared_policy else trained


def _engine_agents(cfg: RunConfig) -> list:
    return cfg.team.agents[:1] if cfg.team.shared_policy else cfg.team.agents


def required_cpus(cfg: RunConfig) -> float:
    engines = sum(a.engine.num_cpus * a.engine.replicas for a in _engine_agents(cfg))
    learners = sum(a.learner.num_cpus * a.learner.num_learners for a in _learning_agents(cfg))
    return engines + learners + cfg.verifier.num_cpus


def required_gpus(cfg: RunConfig) -> float:
    engines = sum(a.engine.num_gpus * a.engine.replicas for a in _engine_agents(cfg))
    return engines + sum(a.learner.num_gpus * a.learner.num_learners for a in _learning_agents(cfg))


def init_ray(cfg: RunConfig) -> None:
    """Start or join Ray, then check that the cluster has the CPUs and GPUs the run's actors ask for."""
    need_cpus, need_gpus = required_cpus(cfg), required_gpus(cfg)
    if not ray.is_initialized():
        address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            if cfg.cluster.num_cpus is not None and cfg.cluster.num_cpus < need_cpus:
                raise ConfigError("cluster.num_cpus", cfg.cluster.num_cpus,
                                  f"the run's actors need {need_cpus:g} CPUs (engines x replicas + verifier)")
            ray.init(
                num_cpus=cfg.cluster.num_cpus or max(int(need_cpus + 0.999), os.cpu_count() or 1),
                include_dashboard=False,
                dashboard_host=cfg.cluster.dashboard_host,
                log_to_driver=True,
            )
    have = ray.cluster_resources()
    if have.get("CPU", 0) < need_cpus:
        raise ConfigError("engine.num_cpus", need_cpus, f"the cluster has only {have.get('CPU', 0):g} CPUs")
    if have.get("GPU", 0) < need_gpus:
        raise ConfigError("engine.num_gpus", need_gpus, f"the cluster has only {have.get('GPU', 0):g} GPUs")

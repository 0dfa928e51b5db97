"""Validation in one place, before Hydra, Ray or any actor starts: every key's meaning-based range, by area
(the run, the task, the team, training, the Conductor, serving, the services)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mapoco.config.checks import (
    check_writable_dir,
    is_int,
    is_ray_address,
    require,
    require_env_name,
    require_host,
    require_name,
)
from mapoco.config.schema import (
    COMMANDS,
    MAX_SEED,
    METHODS,
    SEED_RANGE,
    TOPOLOGIES,
    WANDB_MODES,
    WANDB_PROJECT_FORBIDDEN,
    RunConfig,
)
from mapoco.config.validate_conductor import validate_conductor
from mapoco.config.validate_team import validate_team
from mapoco.config.validate_training import (
    validate_rewards,
    validate_training,
    validate_verifier,
)
from mapoco.tasks import (
    ANLI_ROUNDS,
    ARITHMETIC_DEFAULTS,
    ARITHMETIC_OPERATORS,
    NUMBER_KINDS,
    TASK_PARAMS,
    TASK_SPLITS,
    TaskConfig,
    task_names,
)


def validate(cfg: RunConfig) -> RunConfig:
    """Every key's meaning-based range, before Hydra, Ray or any actor starts; raises ConfigError naming the key."""
    _validate_run(cfg)
    _validate_task(cfg.task)
    _validate_eval_tasks(cfg)
    validate_team(cfg)
    validate_verifier(cfg)
    validate_rewards(cfg.rewards)
    validate_training(cfg)
    validate_conductor(cfg)
    _validate_serve(cfg)
    _validate_services(cfg)
    return cfg


def _validate_run(cfg: RunConfig) -> None:
    require(cfg.command in COMMANDS, "command", cfg.command, f"one of {COMMANDS} (set by `mapoco <command>`)")
    require(cfg.method in METHODS, "method", cfg.method, f"one of {METHODS}")
    require(0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, SEED_RANGE)
    require(cfg.turns >= 1, "turns", cfg.turns, "must be an integer >= 1 (number of discussion turns)")
    check_writable_dir("output_dir", cfg.output_dir)
    require(cfg.checkpoint is None or Path(cfg.checkpoint).expanduser().is_dir(), "checkpoint", cfg.checkpoint,
            "no such directory: a run directory (with checkpoints/step_N) or one of its step_N folders, or null")
    require(cfg.discussion.topology in TOPOLOGIES, "discussion.topology", cfg.discussion.topology,
            f"one of {TOPOLOGIES}")
    require(cfg.discussion.batch_size >= 1, "discussion.batch_size", cfg.discussion.batch_size, "must be >= 1")


def _validate_task(task: TaskConfig, key: str = "task") -> None:
    """One task's keys, named under ``key`` (``task``, or ``train.eval_tasks.NAME``)."""
    from mapoco.models.registry import HUB_ID

    require(task.name in task_names(), f"{key}.name", task.name, f"one of {task_names()}")
    splits = TASK_SPLITS[task.name]
    require(task.split in splits, f"{key}.split", task.split, f"a split of task {task.name}: one of {splits}")
    require(task.limit is None or task.limit >= 1, f"{key}.limit", task.limit, "must be >= 1 or null")
    for name, path in (("path", task.path), ("train_path", task.train_path)):
        require(path is None or Path(path).expanduser().is_file(), f"{key}.{name}", path,
                "no such file: a local json, jsonl, parquet or csv file, or null")
    require(task.hub is None or HUB_ID.fullmatch(task.hub) is not None, f"{key}.hub", task.hub,
            "a hub dataset id (org/name), or null for the task's own")
    require_name(f"{key}.hub_config", task.hub_config, "a non-empty dataset config name, or null for the task's own")
    require(0 <= task.seed <= MAX_SEED, f"{key}.seed", task.seed, SEED_RANGE)
    allowed = TASK_PARAMS[task.name]
    for name, value in task.params.items():
        require(name in allowed, f"{key}.params.{name}", value,
                f"not a parameter of task {task.name}; allowed: {', '.join(allowed) or 'none'}")
    if task.name == "arithmetic":
        _validate_arithmetic({**ARITHMETIC_DEFAULTS, **task.params}, key)
    anli_round = task.params.get("round", 1)
    require(task.name != "anli" or anli_round in ANLI_ROUNDS, f"{key}.params.round", anli_round,
            f"one of {ANLI_ROUNDS} (the ANLI round)")
    kinds = task.params.get("kinds", NUMBER_KINDS)
    require(task.name != "numbers" or (isinstance(kinds, (list, tuple)) and bool(kinds)
                                       and all(kind in NUMBER_KINDS for kind in kinds)),
            f"{key}.params.kinds", kinds, f"a non-empty list of {', '.join(NUMBER_KINDS)}")


def _validate_eval_tasks(cfg: RunConfig) -> None:
    """Held-out domains evaluated beside the task: a discussion's (a conductor names its held-out pools instead)."""
    for name, task in cfg.train.eval_tasks.items():
        key = f"train.eval_tasks.{name}"
        require_name(key, name, "a name for the evaluation (its wandb keys are eval/NAME/...)")
        require(cfg.method == "discussion", key, task.name,
                "held-out tasks are evaluated for method=discussion; a conductor evaluates held-out pools "
                "(conductor.eval_pools)")
        _validate_task(task, key)


def _validate_arithmetic(params: dict[str, Any], key: str) -> None:
    """reasoning-gym's basic_arithmetic rules, checked here rather than when the first question is drawn."""
    for low, high in (("min_terms", "max_terms"), ("min_digits", "max_digits")):
        require(is_int(params[low]) and params[low] >= 1, f"{key}.params.{low}", params[low], "an integer >= 1")
        require(is_int(params[high]) and params[high] >= params[low], f"{key}.params.{high}", params[high],
                f"an integer >= {key}.params.{low}={params[low]}")
    ops = params["operators"]
    require(isinstance(ops, (list, tuple)) and bool(ops) and all(op in ARITHMETIC_OPERATORS for op in ops),
            f"{key}.params.operators", ops, f"a non-empty list of {', '.join(ARITHMETIC_OPERATORS)}")
    for name in ("allow_parentheses", "allow_negation"):
        require(isinstance(params[name], bool), f"{key}.params.{name}", params[name], "true or false")


def _validate_serve(cfg: RunConfig) -> None:
    srv = cfg.serve
    require_host("serve.host", srv.host)
    require(1 <= srv.port <= 65535, "serve.port", srv.port, "a TCP port in 1..65535")
    require(srv.route_prefix.startswith("/") and (srv.route_prefix == "/" or not srv.route_prefix.endswith("/"))
            and not any(c in srv.route_prefix for c in "{}?# "), "serve.route_prefix", srv.route_prefix,
            "a URL path starting with '/' and not ending with one, e.g. / or /mapoco")
    require_name("serve.model_name", srv.model_name, "a non-empty name, or null for the run directory's name")
    require(srv.replicas >= 1, "serve.replicas", srv.replicas, "must be >= 1")
    require(srv.num_cpus >= 0, "serve.num_cpus", srv.num_cpus, "must be >= 0")
    require(srv.max_batch_size >= 1, "serve.max_batch_size", srv.max_batch_size, "must be >= 1")
    require(srv.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", srv.batch_wait_timeout_s, "seconds >= 0")
    require(srv.max_input_chars >= 1, "serve.max_input_chars", srv.max_input_chars, "must be >= 1")
    require_env_name("serve.api_key_env", srv.api_key_env)
    if cfg.command != "serve":
        return
    require(cfg.checkpoint is not None, "checkpoint", cfg.checkpoint,
            "mapoco serve needs checkpoint=DIR: a run directory or one of its checkpoints/step_N folders")
    require(srv.api_key_env is None or bool(os.environ.get(srv.api_key_env)), "serve.api_key_env",
            srv.api_key_env, "names an environment variable that is not set or empty: export the token first")


def _validate_services(cfg: RunConfig) -> None:
    cluster, wandb = cfg.cluster, cfg.logger.wandb
    require(cluster.address is None or is_ray_address(cluster.address), "cluster.address", cluster.address,
            "auto, local, HOST:PORT or ray://HOST:PORT, or null ($RAY_ADDRESS if set, else a local instance)")
    require(cluster.num_cpus is None or cluster.num_cpus >= 1, "cluster.num_cpus", cluster.num_cpus,
            "must be >= 1, or null for what the actors ask for")
    require_host("cluster.dashboard_host", cluster.dashboard_host)
    require(cluster.placement_timeout_s > 0, "cluster.placement_timeout_s", cluster.placement_timeout_s,
            "seconds > 0")
    require(cluster.gpu_memory_gib is None or cluster.gpu_memory_gib > 0, "cluster.gpu_memory_gib",
            cluster.gpu_memory_gib, "GiB > 0 (80 for an H100), or null: the nodes' nvidia-smi says")
    require(wandb.mode in WANDB_MODES, "logger.wandb.mode", wandb.mode, f"one of {', '.join(WANDB_MODES)}")
    require(bool(wandb.project.strip()) and len(wandb.project) <= 128
            and not any(c in wandb.project for c in WANDB_PROJECT_FORBIDDEN), "logger.wandb.project", wandb.project,
            f"a wandb project name: 1 to 128 characters, none of {WANDB_PROJECT_FORBIDDEN}")
    require_name("logger.wandb.group", wandb.group, "a non-empty group name, or null")
    require_name("logger.wandb.name", wandb.name, "a non-empty run name, or null")

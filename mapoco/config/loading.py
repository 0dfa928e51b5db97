"""A plain (resolved) Hydra mapping -> the typed RunConfig, type-checked key by key, then validated; and the
tree of every default that conf/config.yaml starts from."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from mapoco.config.schema import AgentConfig, ConfigError, RunConfig, TeamConfig
from mapoco.config.validate import validate
from mapoco.tasks import TaskConfig


def _check_scalar(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ in (str, bool) and isinstance(value, typ):
        return value
    if typ is typing.Any:
        return value
    raise ConfigError(key, value, f"must be of type {typ.__name__}")


def _convert(key: str, value: Any, typ: Any) -> Any:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, value, inner[0])
    if dataclasses.is_dataclass(typ):
        return build(typ, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "must be a list")
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a mapping")
        if dataclasses.is_dataclass(args[1]):  # e.g. train.eval_tasks: name -> TaskConfig
            return {k: build(args[1], v, f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    return _check_scalar(key, value, typ)


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping; unknown or missing keys are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(prefix or cls.__name__, data, f"must be a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(key, data[unknown[0]], f"unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(key, data[name], hints[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(key, None, "is required")
    return cls(**kwargs)


AGENT_DEFAULT_GROUPS = ("engine", "sampling", "learner")


def _merge_agent_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Top-level ``engine``/``sampling``/``learner`` are defaults that each agent's own keys override."""
    defaults = {group: raw.pop(group, {}) or {} for group in AGENT_DEFAULT_GROUPS}
    team = dict(raw.get("team") or {})
    agents = []
    for agent in team.get("agents") or []:
        agent = dict(agent)
        for group, values in defaults.items():
            agent[group] = {**values, **(agent.get(group) or {})}
        agents.append(agent)
    team["agents"] = agents
    raw["team"] = team
    return raw


def default_tree() -> dict[str, Any]:
    """Every key's default, taken from the dataclasses above (the one place defaults live), in the shape of the
    Hydra config: agent settings (engine, sampling, learner) at the top, where they apply to every agent. The team
    comes from its config group; conf/ holds only the choices (groups, experiments) and Hydra's own settings."""
    def default(f: dataclasses.Field) -> Any:
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value

    tree = {f.name: default(f) for f in dataclasses.fields(RunConfig) if f.name not in ("task", "team")}
    tree["task"] = dataclasses.asdict(TaskConfig())
    tree["team"] = {f.name: default(f) for f in dataclasses.fields(TeamConfig)  # its group adds name and agents
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    agent_fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    tree.update({group: default(agent_fields[group]) for group in AGENT_DEFAULT_GROUPS})
    return tree


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Plain (resolved) config mapping -> validated RunConfig. ``hydra`` keys are ignored."""
    raw = {k: v for k, v in raw.items() if k != "hydra"}
    return validate(build(RunConfig, _merge_agent_defaults(raw)))

"""A trained run to serve: its saved configuration (``.hydra/config.yaml``) with the serve command's keys on top,
its latest complete checkpoint (or the ``step_N`` folder given), and each trained agent's weights pushed into its
engines the way training syncs them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mapoco.config import ConfigError, RunConfig, from_dict
from mapoco.training import checkpoint as checkpoints
from mapoco.weights.adapters import ADAPTER_DIR
from mapoco.weights.checkpoint import restore

# Keys the serve command itself sets; everything else comes from the trained run's saved configuration.
SERVE_KEYS = ("serve", "cluster", "logger", "checkpoint", "command", "hydra", "output_dir")
CONFIG_GROUPS = ("task", "team", "verifier", "experiment")


def load_config(ref: str, serve_cfg: Mapping[str, Any] | None = None, cluster: Mapping[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> tuple[RunConfig, Path]:
    """The trained run's configuration, as Hydra saved it in ``<run>/.hydra/config.yaml``, with the serve command's
    ``serve`` and ``cluster`` sections and its plain ``key=value`` overrides (``seed=1``, ``engine.replicas=2``);
    returns it validated, with the checkpoint folder to serve."""
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    found, run_dir = checkpoints.find(ref, "checkpoint")
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError("checkpoint", ref, f"{saved} is missing: serve reads the run's configuration there (Hydra "
                                             "writes it for every `mapoco train` run)")
    setup_globals()  # Hydra's resolvers (${now:...}): the saved file keeps interpolations unresolved
    try:
        conf = OmegaConf.load(saved)
        conf.output_dir = str(run_dir)  # the training job's own, often an interpolation of its start time
        _apply_overrides(conf, overrides)
        raw = OmegaConf.to_container(conf, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError("checkpoint", ref, f"{saved}: {str(exc).splitlines()[0]}") from None
    raw.pop("hydra", None)
    raw.update(command="serve", checkpoint=str(found))
    if serve_cfg is not None:
        raw["serve"] = dict(serve_cfg)
    if cluster is not None:
        raw["cluster"] = dict(cluster)
    return from_dict(raw), found


def _apply_overrides(conf: Any, overrides: Sequence[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        root = key.split(".")[0].lstrip("+~")
        if root in SERVE_KEYS:
            continue  # the serve command's own keys, already in its sections
        if root in CONFIG_GROUPS or override.is_delete() or override.is_sweep_override() or override.package:
            raise ConfigError(key, override.input_line, "serve takes the team, task and method from the checkpoint's "
                                                        "run; only plain key=value overrides apply (seed=1, turns=2, "
                                                        "engine.replicas=2)")
        OmegaConf.update(conf, key, override.value(), merge=False,
                         force_add=override.is_add() or override.is_force_add())


def check_checkpoint(cfg: RunConfig, path: Path) -> None:
    """Every trained policy's weights are there (checked before anything starts)."""
    lora_seats = cfg.team.lora_seats()
    for owner, seats in cfg.team.policy_seats().items():
        folder = checkpoints.agent_dir(path, seats[0])
        for weights in [folder / "model.safetensors"] + [folder / ADAPTER_DIR] * (owner in lora_seats):
            if not weights.exists():
                raise ConfigError("checkpoint", str(path), f"{weights} is missing: team.agents[{owner}] is trained "
                                                           "in this run's configuration, so its checkpoint holds it")


def push_checkpoint(team: Any, cfg: RunConfig, path: Path) -> None:
    """Put every trained policy's checkpointed weights into its engines."""
    for owner, seats in cfg.team.policy_seats().items():
        agent = cfg.team.agents[owner]
        restore(team.agents[owner], checkpoints.agent_dir(path, seats[0]), agent.learner, agent.engine,
                on_lora_engine=owner in cfg.team.lora_seats())

"""`mapoco <command> [hydra overrides]`.

Commands: eval, train, train-verifier (Hydra configs under conf/; `-m` sweeps), serve (a trained run behind an
OpenAI-compatible endpoint), plan (where a training run's actors would land on the cluster and what each GPU would
hold, without starting them), build-models (tiny models and SmolLM2 into the cache), sweep-summary (final per-turn
accuracy per configuration of a sweep).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mapoco.config import COMMANDS as HYDRA_COMMANDS

if TYPE_CHECKING:
    from mapoco.config import RunConfig

# Inside an installed wheel, the package's conf/; in a source tree (an editable install), the top-level conf/.
_HERE = Path(__file__).resolve().parent
CONF_DIR = next(path for path in (_HERE / "conf", _HERE.parent / "conf") if path.is_dir())


def _register_defaults() -> None:
    """conf/config.yaml's first default: every key's default, built from the dataclasses (mapoco.config)."""
    from hydra.core.config_store import ConfigStore

    from mapoco.config import default_tree

    ConfigStore.instance().store(name="mapoco_defaults", node=default_tree())


_register_defaults()  # before any Hydra call of this process, by whoever imports the CLI (tests and notebooks too)
USAGE = (
    "usage: mapoco {eval,train,train-verifier,serve,plan,build-models,sweep-summary} [key=value ...]\n"
    "  mapoco train team=tiny2 train.steps=20 output_dir=outputs/train\n"
    "  mapoco train -m rewards.alpha1=0,1,2 seed=0,1 hydra.sweep.dir=outputs/sweep\n"
    "  mapoco sweep-summary outputs/sweep\n"
    "  mapoco eval team=tiny2 task=arithmetic task.limit=100 turns=3 output_dir=outputs/eval\n"
    "  mapoco train +experiment=conductor          # method=conductor: team.agents[0] orchestrates the rest\n"
    "  mapoco train-verifier team=tiny2 output_dir=outputs/verifier\n"
    "  mapoco serve checkpoint=outputs/demo serve.port=8000   # OpenAI-compatible /v1/chat/completions\n"
    "  mapoco plan [--json] +experiment=maporl_gsm8k cluster.address=auto   # placement and memory per GPU\n"
    "  mapoco build-models [tiny-qwen tiny-llama tiny-add tiny-mul tiny-conductor smollm2]"
)


def compose(*overrides: str) -> RunConfig:
    """The validated RunConfig that `mapoco` builds from these overrides (tests, benchmarks and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from mapoco.config import from_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=["output_dir=unused", *overrides])
    return from_dict(OmegaConf.to_container(cfg, resolve=True))


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mapoco.config import ConfigError, from_dict
    from mapoco.tasks import TaskDataError
    from mapoco.training.checkpoint import CheckpointError
    from mapoco.training.sync_guard import EnginesOutOfSync
    from mapoco.training.trainer import TrainingInterrupted

    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
        if raw.get("command") == "serve":  # the team and settings come from the checkpoint's run, not from conf/
            from mapoco.serving.serve import serve_command

            serve_command(raw, list(HydraConfig.get().overrides.task))
            return
        out = Path(HydraConfig.get().runtime.output_dir)
        _dispatch(from_dict(_name_sweep_job(raw, out)), out)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TaskDataError as exc:  # raised while loading data, before any actor starts
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (TrainingInterrupted, CheckpointError, EnginesOutOfSync) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def _name_sweep_job(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    """A multirun job (its own directory under hydra.sweep.dir) is one wandb run, named by its overrides, in a
    group named after the sweep directory, so a sweep's runs sit together in wandb. Set before validation: the
    config is frozen from then on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return raw
    wandb = raw.setdefault("logger", {}).setdefault("wandb", {})
    wandb["group"] = wandb.get("group") or Path(hydra_cfg.sweep.dir).name
    wandb["name"] = wandb.get("name") or hydra_cfg.job.override_dirname or out.name
    return raw


def _dispatch(run_cfg: RunConfig, out: Path) -> None:
    from mapoco.runtime.precision import cpu_flags, describe

    conductor = run_cfg.method == "conductor"
    if run_cfg.command in ("eval", "train"):
        print("\n".join(describe(run_cfg.team.agents, run_cfg.command == "train", run_cfg.train.logprob_tolerance,
                                 cpu_flags())), flush=True)
    if run_cfg.command == "eval":
        from mapoco.conductor.evaluate import evaluate_conductor
        from mapoco.evaluation.evaluate import evaluate

        (evaluate_conductor if conductor else evaluate)(run_cfg, out)
    elif run_cfg.command == "train":
        from mapoco.conductor.method import ConductorMethod
        from mapoco.training.discussion_method import DiscussionMethod
        from mapoco.training.trainer import train

        train(run_cfg, out, ConductorMethod if conductor else DiscussionMethod, _sweep_actors())
    elif run_cfg.command == "train-verifier":
        from mapoco.training.verifier_training import train_verifier

        train_verifier(run_cfg, out)


def _sweep_actors() -> Any:
    """A multirun's jobs run one after another in this process and share their actors where they can
    (``SweepActors``); a single run starts and stops its own."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return _process_sweep() if HydraConfig.get().mode == RunMode.MULTIRUN else None


@functools.cache
def _process_sweep() -> Any:
    from mapoco.training.sweep_actors import SweepActors

    return SweepActors()


def _hydra_main(command: str, overrides: list[str]) -> None:
    import hydra

    _check_before_hydra([*overrides, f"command={command}"])
    sys.argv = [f"mapoco {command}", *overrides, f"command={command}"]
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(_run)()


def _check_before_hydra(overrides: list[str]) -> None:
    """Hydra creates the run directory before mapoco's code runs, so the whole config is validated first: a bad
    value is a one-line config error and leaves nothing behind, an unusable directory included. (A sweep's jobs
    are validated each in turn, in their own directories, which are Hydra's to make.)"""
    if "-m" in overrides or "--multirun" in overrides:
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from mapoco.config import ConfigError, from_dict
    from mapoco.runtime.run_folder import check_output_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        check_output_dir(Path(cfg.hydra.run.dir))
        if cfg.command != "serve":  # serve's settings come from the checkpoint's run, checked when it loads it
            from_dict(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                             resolve=True))
    except HydraException:
        return  # a bad override: Hydra itself reports it, with the options
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)


def _plan(args: list[str]) -> None:
    """`mapoco plan [--json] [key=value ...]`: the plan of `mapoco train` with these overrides; exit 1 where it
    does not fit, 2 on a config error."""
    from hydra.errors import HydraException

    from mapoco.config import ConfigError
    from mapoco.planning.plan import plan_command

    as_json = "--json" in args
    try:
        fits = plan_command(compose(*[a for a in args if a != "--json"], "command=train"), as_json)
    except HydraException as exc:
        print(f"override error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if fits else 1)


def _sweep_summary(args: list[str]) -> None:
    from mapoco.evaluation.sweep import NoRunsError, sweep_summary

    if len(args) != 1:
        print("usage: mapoco sweep-summary DIR", file=sys.stderr)
        sys.exit(2)
    try:
        sweep_summary(Path(args[0]))
    except NoRunsError as exc:
        print(f"sweep-summary: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "build-models":
        from mapoco.testbed.build import build_models

        build_models(rest or None)
    elif command == "sweep-summary":
        _sweep_summary(rest)
    elif command == "plan":
        _plan(rest)
    elif command in HYDRA_COMMANDS:
        _hydra_main(command, rest)
    else:
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)

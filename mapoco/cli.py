"""`mapoco <command> [hydra overrides]`.

Commands: eval, train, train-verifier (Hydra configs under conf/), build-models (tiny models and SmolLM2 into the cache).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mapoco.config import RunConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
HYDRA_COMMANDS = ("eval", "train", "train-verifier")
USAGE = (
    "usage: mapoco {eval,train,train-verifier,build-models} [key=value ...]\n"
    "  mapoco train team=tiny2 train.steps=20 output_dir=outputs/train\n"
    "  mapoco eval team=tiny2 task=arithmetic task.limit=100 turns=3 output_dir=outputs/eval\n"
    "  mapoco train-verifier team=tiny2 output_dir=outputs/verifier\n"
    "  mapoco build-models [tiny-qwen tiny-llama smollm2]"
)


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from mapoco.config import ConfigError, from_dict
    from mapoco.tasks import TaskDataError

    try:
        run_cfg = from_dict(OmegaConf.to_container(cfg, resolve=True))
        _dispatch(run_cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except TaskDataError as exc:  # raised while loading data, before any actor starts
        print(f"data error: {exc}", file=sys.stderr)
        sys.exit(2)


def _dispatch(run_cfg: RunConfig, out: Path) -> None:
    if run_cfg.command == "eval":
        from mapoco.evaluate import evaluate

        evaluate(run_cfg, out)
    elif run_cfg.command == "train":
        from mapoco.trainer import train

        train(run_cfg, out)
    elif run_cfg.command == "train-verifier":
        from mapoco.learned_verifier import train_verifier

        train_verifier(run_cfg, out)


def _hydra_main(command: str, overrides: list[str]) -> None:
    import hydra

    sys.argv = [f"mapoco {command}", *overrides, f"command={command}"]
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")(_run)()


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "build-models":
        from mapoco.models import build_models

        build_models(rest or None)
    elif command in HYDRA_COMMANDS:
        _hydra_main(command, rest)
    else:
        print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
        sys.exit(2)

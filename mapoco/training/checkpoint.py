"""Checkpoints: ``<output_dir>/checkpoints/step_<n>/`` with one folder per trained agent and the controller state.
A LoRA agent's folder holds what trains (adapter, value head) and its adapter as a peft folder, ``adapter/``.

A checkpoint is written into ``step_<n>.tmp`` and renamed into place only after its ``COMPLETE`` marker is written,
so a job killed mid-write leaves a ``.tmp`` folder that is never resumed from (and is removed by the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mapoco.config import ConfigError
from mapoco.weights.adapters import ADAPTER_DIR  # noqa: F401  (a checkpoint's layout names it)

COMPLETE = "COMPLETE"

STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / STATE).is_file()


def complete_checkpoints(out: Path) -> list[Path]:
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str | None, out: Path) -> Path | None:
    """The checkpoint to resume from, checked before any actor starts. ``auto`` with none yet starts fresh."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError("train.resume", resume, "no such checkpoint directory (use auto, or a step_<n> folder)")
    if not is_complete(path):
        raise ConfigError("train.resume", resume, f"incomplete or corrupted checkpoint (no {COMPLETE} marker or "
                                                  f"{STATE}); resume from an earlier step_<n> folder or use auto")
    try:
        read_state(path)
    except (json.JSONDecodeError, KeyError) as exc:
        raise ConfigError("train.resume", resume, f"corrupted {STATE}: {exc}") from None
    return path


def find(ref: str, key: str) -> tuple[Path, Path]:
    """``(checkpoint folder, run directory)`` for a run directory (its latest complete checkpoint) or a
    ``checkpoints/step_N`` folder, given as config key ``key`` (``checkpoint`` to serve, ``train.init_from``)."""
    path = Path(ref).expanduser().resolve()  # replicas may run in another working directory
    if not path.is_dir():
        raise ConfigError(key, ref, "no such directory: a run directory (with checkpoints/step_N) or one of its "
                                    "step_N folders")
    if path.name.startswith("step_") or (path / COMPLETE).exists() or (path / STATE).exists():
        if not is_complete(path):
            raise ConfigError(key, ref, f"incomplete checkpoint (no {COMPLETE} marker or {STATE}): give the run "
                                        "directory for its latest complete checkpoint")
        return path, path.parent.parent
    found = complete_checkpoints(path)
    if not found:
        raise ConfigError(key, ref, f"no complete checkpoint under {checkpoints_dir(path)} (train with "
                                    "train.save_every > 0)")
    return found[-1], path


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the partial folder is gone and earlier checkpoints are untouched."""


def write(out: Path, step: int, state: dict[str, Any], keep: int, write_parts: Callable[[Path], None]) -> Path:
    """Write a whole checkpoint: ``write_parts(folder)`` fills the temporary folder (every agent's files), then
    the state and marker make it complete. Any failure (disk full, unwritable folder, an actor that raised)
    removes the partial folder and raises CheckpointError naming the cause and the checkpoint still intact."""
    tmp = None
    try:
        tmp = begin(out, step)
        write_parts(tmp)
        return commit(tmp, state, keep)
    except Exception as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        intact = complete_checkpoints(out)
        raise CheckpointError(
            f"could not write the step {step} checkpoint under {checkpoints_dir(out)} ({_cause(exc)}); "
            f"the last complete checkpoint is {intact[-1] if intact else 'none'} and is intact"
        ) from exc


def _cause(exc: BaseException) -> str:
    """The innermost error: an actor's OSError arrives wrapped in Ray's task error."""
    while getattr(exc, "cause", None) is not None or exc.__cause__ is not None:
        exc = getattr(exc, "cause", None) or exc.__cause__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def begin(out: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (an earlier interrupted attempt is discarded)."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"step_{step:06d}.tmp"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, state: dict[str, Any], keep: int) -> Path:
    """Write the controller state and the marker, fsync, rename into place, then prune old checkpoints."""
    (tmp / STATE).write_text(json.dumps(state, indent=2))
    (tmp / COMPLETE).write_text("")
    _fsync_tree(tmp)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    state = json.loads((path / STATE).read_text())
    state["step"]  # a state without a step is corrupted
    return state


def agent_dir(checkpoint: Path, agent: int) -> Path:
    return checkpoint / f"agent_{agent}"


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())

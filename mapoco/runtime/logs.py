"""Where actor output goes: ``<output_dir>/logs/<actor>.log`` on the actor's node, so the terminal shows only the
run's progress, tables and outputs; ``logger.show_logs=true`` streams the same lines to the terminal too.

The run sets two environment variables in its Ray runtime environment (``actor_env``); every actor process calls
``capture_output`` first thing, before vLLM, DeepSpeed or torch print anything. File descriptors 1 and 2 are
redirected, not ``sys.stdout``: C++ logs and the processes an actor starts (vLLM's engine core) are captured too.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

LOG_DIR_ENV = "MAPOCO_LOG_DIR"
SHOW_LOGS_ENV = "MAPOCO_SHOW_LOGS"


def log_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "logs"


def actor_env(output_dir: str | Path, show_logs: bool) -> dict[str, str]:
    """The env vars that make the run's actors write their output under ``output_dir``."""
    return {LOG_DIR_ENV: str(log_dir(Path(output_dir).resolve())), SHOW_LOGS_ENV: "1" if show_logs else "0"}


def log_name(what: str) -> str:
    """A file name from the config key that sizes an actor group: ``team.agents[1].engine`` -> ``agent1-engine``."""
    return re.sub(r"team\.agents\[(\d+)\]\.", r"agent\1-", what)


def capture_output(name: str) -> Path | None:
    """Send this process's stdout and stderr to ``<log dir>/<log_name(name)>.log`` (appending: a restarted actor
    adds to its predecessor's file), and, with show_logs, on to where they went before. Nothing happens outside a run that set
    the log directory (e.g. the test suite's shared Ray instance)."""
    directory = os.environ.get(LOG_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', log_name(name))}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if os.environ.get(SHOW_LOGS_ENV) == "1":
        _tee(log)
    else:
        os.dup2(log, 1)
        os.dup2(log, 2)
    os.close(log)
    return path


def _tee(log: int) -> None:
    """fds 1 and 2 into a pipe; a daemon thread copies it to the log file and to the original stdout."""
    read, write = os.pipe()
    terminal, copy = os.dup(1), os.dup(log)
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        while chunk := os.read(read, 1 << 16):
            os.write(copy, chunk)
            os.write(terminal, chunk)

    threading.Thread(target=pump, name="mapoco-log-tee", daemon=True).start()

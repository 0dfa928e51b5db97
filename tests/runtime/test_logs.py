"""Actor output into the run's logs/: Python prints, raw fd writes and child processes, with and without the
terminal copy (``logger.show_logs``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mapoco.runtime.logs import LOG_DIR_ENV, SHOW_LOGS_ENV, actor_env, log_name

ACTOR = """
import os, subprocess, sys, time
from mapoco.runtime.logs import capture_output
print("before capture")
path = capture_output("team.agents[1].engine-replica0")
print("python print")
os.write(2, b"raw stderr\\n")
subprocess.run(["echo", "child process"], check=True)
sys.stdout.flush()
time.sleep(0.2)  # the tee thread copies what is in the pipe
print(path, file=open(os.devnull, "w"))
"""


def run_actor(tmp_path, show: bool) -> tuple[str, str]:
    env = {**os.environ, **actor_env(tmp_path / "run", show)}
    proc = subprocess.run([sys.executable, "-c", ACTOR], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "run" / "logs" / "agent1-engine-replica0.log").read_text()
    return proc.stdout + proc.stderr, log


@pytest.mark.parametrize("show", [False, True])
def test_actor_output_lands_in_its_log_file(tmp_path, show):
    terminal, log = run_actor(tmp_path, show)
    for line in ("python print", "raw stderr", "child process"):
        assert line in log
        assert (line in terminal) == show
    assert "before capture" in terminal and "before capture" not in log


def test_a_restarted_actor_appends_and_nothing_happens_outside_a_run(tmp_path):
    run_actor(tmp_path, show=False)
    _, log = run_actor(tmp_path, show=False)
    assert log.count("python print") == 2
    env = {k: v for k, v in os.environ.items() if k not in (LOG_DIR_ENV, SHOW_LOGS_ENV)}
    proc = subprocess.run([sys.executable, "-c", ACTOR], capture_output=True, text=True, env=env, timeout=60)
    assert "python print" in proc.stdout and "child process" in proc.stdout


def test_log_names_follow_the_config_keys():
    assert log_name("team.agents[1].engine") == "agent1-engine"
    assert log_name("team.agents[12].learner") == "agent12-learner"
    assert log_name("verifier") == "verifier"
    assert actor_env("out", True)[LOG_DIR_ENV].endswith(os.path.join("out", "logs"))

"""`ray job submit` the way users launch: a real Ray head on 127.0.0.1, the project as working_dir, our runtime_env.

The head is this test's own (its own temp dir and ports); it is stopped at the end whatever happens.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def run(cmd: list[str], **kwargs) -> str:
    """Run a CLI command; on failure the assertion carries its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tiny_models):
    """A head node started with the `ray` CLI; yields the job-server address."""
    from mapoco.models import cache_dir

    temp_dir = Path("/tmp") / f"ray-job-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a length limit
    # Every port this head opens is its own: defaults (the dashboard agent's 52365, the client server's 10001)
    # would collide with the suite's other Ray instance and leave the job server without an agent.
    ports = {flag: free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                            "metrics-export-port", "ray-client-server-port")}
    # Jobs inherit the head's environment: the venv's `mapoco` on PATH, the already built tiny models.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MAPOCO_CACHE": str(cache_dir()),
           "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}  # token auth, as Ray 2.60 heads default to
    # --block keeps `ray start` in the foreground as the parent of this head's processes: stopping it (and its
    # process group) stops exactly this head. `ray stop` would kill every Ray instance on the machine.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         *[f"--{flag}={port}" for flag, port in ports.items()], "--dashboard-host=127.0.0.1", "--num-cpus=4",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        wait_for_job_server(address, env, head)
        yield address, env
    finally:
        stop_group(head)
        stray = leftover_pids(temp_dir)  # processes of this head (their arguments name its temp dir)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not stray, f"head processes outlived `ray start --block`: {stray}"


def leftover_pids(temp_dir: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def wait_for_job_server(address: str, env: dict[str, str], head: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        probe = subprocess.run([str(BIN / "ray"), "job", "list", f"--address={address}"], env=env,
                               capture_output=True, timeout=60)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"no job server at {address} after {timeout_s}s")


def stop_group(head: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(wait_s)
            time.sleep(2)  # let the group's other processes go too
        except subprocess.TimeoutExpired:
            continue


def submit_and_wait(address: str, env: dict[str, str], entrypoint: list[str], timeout_s: float = 480) -> str:
    """Submit from the project root, poll until the job ends, return its logs (asserting it SUCCEEDED)."""
    job_id = f"mapoco-test-{uuid.uuid4().hex[:8]}"
    ray = str(BIN / "ray")
    submit = [ray, "job", "submit", f"--address={address}", f"--submission-id={job_id}", "--working-dir=.",
              "--runtime-env=cluster/runtime_env.yaml", "--no-wait", "--", *entrypoint]
    for _ in range(30):  # a busy machine may bring the head's job agent up after its job server
        proc = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(4)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    deadline, status = time.time() + timeout_s, ""
    while time.time() < deadline:
        status = run([ray, "job", "status", f"--address={address}", job_id], env=env, timeout=60).lower()
        if any(f"job '{job_id}' {end}" in status for end in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = run([ray, "job", "logs", f"--address={address}", job_id], env=env, timeout=60)
    assert f"job '{job_id}' succeeded" in status, f"{status}\n{logs[-4000:]}"
    return logs


def test_eval_and_train_jobs_succeed(ray_head, tmp_path):
    address, env = ray_head
    eval_dir, train_dir = tmp_path / "eval", tmp_path / "train"
    logs = submit_and_wait(address, env, [
        "mapoco", "eval", "team=tiny2", "task.limit=8", "turns=2", f"output_dir={eval_dir}"])
    assert "team (vote)" in logs  # the per-turn table reached the job logs
    assert len(json.loads((eval_dir / "summary.json").read_text())["turn_accuracy"]) == 2

    logs = submit_and_wait(address, env, [
        "mapoco", "train", "team=tiny1", "turns=1", "train.steps=1", "train.batch_questions=4",
        "train.eval_limit=8", "train.save_every=1", "logger.wandb.mode=disabled", f"output_dir={train_dir}"])
    assert "step 1/1" in logs
    assert (train_dir / "checkpoints" / "step_000001" / "COMPLETE").exists()
    assert json.loads((train_dir / "summary.json").read_text())["steps"] == 1

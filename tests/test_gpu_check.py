"""cluster/gpu_check.py (`make gpu-check`): on this CPU machine it runs nothing; its verdicts, from run outputs written
by hand, pass and fail where they should."""

import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.gpu  # a GPU path's logic, run on CPU


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "cluster" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cluster" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "no GPU on this machine" in proc.stdout and "nothing was run" in proc.stdout
    assert "| check |" not in proc.stdout


def _steps(out, gaps, tolerance=0.5):
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({"train/agent_0/logprob_max_diff": g, "train/agent_0/logprob_tolerance": tolerance}) + "\n"
        for g in gaps) + json.dumps({"eval/turn_1/acc": 0.5}) + "\n")
    return out


def test_sync_passes_only_when_every_step_is_within_tolerance(tmp_path):
    ok, seen = gpu_check.in_sync(_steps(tmp_path / "ok", [0.02, 0.1, 0.3]))
    assert ok and "0.02, 0.1, 0.3" in seen and "tolerance 0.5" in seen
    ok, _ = gpu_check.in_sync(_steps(tmp_path / "drift", [0.02, 0.9, 0.3]))
    assert not ok
    assert gpu_check.in_sync(_steps(tmp_path / "none", [])) == (False, "no training step logged")


@pytest.mark.parametrize("before, after, ok", [(0.45, 0.70, True), (0.45, 0.60, False)])
def test_learning_needs_a_rise_of_a_fifth(tmp_path, before, after, ok):
    (tmp_path / "summary.json").write_text(json.dumps({"conductor_accuracy_before": before,
                                                       "conductor_accuracy": after}))
    assert gpu_check.learnt(tmp_path)[0] is ok


def test_a_broadcast_group_and_tensor_parallel_need_two_gpus_the_rest_one():
    """A collective group with learner and engine on one GPU is what NCCL refuses: it needs a GPU each."""
    assert {c.name: c.gpus for c in gpu_check.CHECKS} == {"engine": 1, "sync": 1, "colocate": 1, "collective": 2,
                                                          "tensor_parallel": 2, "learns": 1}


def _sync_config():
    from mapoco.cli import compose

    check = next(c for c in gpu_check.CHECKS if c.name == "sync")
    return compose(*check.command[1:], f"command={check.command[0]}")


def _run_folder(out, cfg, kv_tokens: int, peak_gib: float):
    """What the sync check's run writes that matches_plan reads: its config, placement.json, metrics."""
    import dataclasses

    from omegaconf import OmegaConf

    (out / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(dataclasses.asdict(cfg)), out / ".hydra" / "config.yaml")
    (out / "placement.json").write_text(json.dumps({"team.agents[0].engine": [{"kv_cache_tokens": kv_tokens}]}))
    (out / "metrics.jsonl").write_text(json.dumps({"train/agent_0/peak_memory_gib": peak_gib}) + "\n")
    return out


def test_the_memory_verdict_holds_the_run_to_the_plans_ceiling_and_floor(tmp_path, tiny_models):
    """On an 80 GiB GPU the plan gives the sync run's engine 0.4 of it (a KV-cache ceiling in tokens) and its
    learner a floor: a run inside both passes; more KV cache than the ceiling, far less, or a learner peak under
    the floor each fail."""
    from mapoco.planning.plan import engine_memory, learner_load

    cfg = _sync_config()
    _, _, ceiling = engine_memory(cfg.team.agents[0], 80)
    floor = learner_load(cfg.team.agents[0], 1, "learner").gib
    ok, seen = gpu_check.matches_plan(_run_folder(tmp_path / "ok", cfg, int(0.9 * ceiling), 2 * floor), 80)
    assert ok and f"(plan: at most {ceiling:,})" in seen, seen
    for name, kv, peak in (("over", ceiling + 16, 2 * floor), ("under", ceiling // 3, 2 * floor),
                           ("floor", int(0.9 * ceiling), floor / 2)):
        assert not gpu_check.matches_plan(_run_folder(tmp_path / name, cfg, kv, peak), 80)[0], name

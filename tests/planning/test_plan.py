"""`mapoco plan`'s arithmetic and the paper-scale settings on a machine without GPUs. The placement itself (real
placement groups on clusters that advertise GPUs) is tested in test_multinode.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

from mapoco.planning.architecture import model_shape
from mapoco.planning.plan import GIB, Seat, gpu_loads

pytestmark = pytest.mark.gpu  # a GPU path's logic, run on CPU


BIN = Path(sys.executable).parent

# The parameter counts their model cards give (safetensors metadata), against the counts of the module trees
# transformers builds from hub_architectures.yaml: a wrong field in a record changes them.
PUBLISHED = {"microsoft/Phi-3-mini-128k-instruct": 3_821_079_552, "Qwen/Qwen2.5-3B-Instruct": 3_085_938_688,
             "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "meta-llama/Meta-Llama-3-8B-Instruct": 8_030_261_248}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_hub_records_build_the_published_models(model):
    assert model_shape(model).params == PUBLISHED[model]


def test_lora_counts_the_adapters_the_learner_adds(tiny_models):
    """peft's own count on the real model, against the meta-device count."""
    import torch

    from mapoco.models.registry import load_causal_lm
    from mapoco.weights.adapters import with_lora

    cfg = compose_config("learner.lora_rank=4").team.agents[0]
    real = with_lora(load_causal_lm(tiny_models[cfg.model], torch.float32), cfg.learner)
    assert model_shape(cfg.model, cfg.learner).lora_params == sum(p.numel() for p in real.parameters()
                                                                   if p.requires_grad) > 0


def _seats(cfg, groups: dict[str, list[tuple[str, ...]]]) -> dict[str, list[Seat]]:
    return {group: [Seat(group, i, "10.0.0.1", "node-1", ids, 80.0) for i, ids in enumerate(gpus)]
            for group, gpus in groups.items()}


def test_a_full_fine_tune_of_an_8b_model_on_one_gpu_does_not_fit_and_zero3_over_4_does():
    """DeepSpeed's estimate for 8B parameters: ZeRO-2 on one rank needs 20 bytes a parameter (149.6 GiB) beside the
    reference's 2: over one 80 GiB GPU, named; ZeRO-3 over 4 ranks fits on each of theirs."""
    base = ["team=tiny1", "team.agents.0.model=meta-llama/Meta-Llama-3-8B-Instruct", "engine.num_gpus=1",
            "learner.num_gpus=1", "engine.gpu_memory_utilization=0.85"]
    cfg = compose_config(*base, "command=train")
    gpus, problems = gpu_loads(cfg, _seats(cfg, {"team.agents[0].engine": [("0",)], "team.agents[0].learner": [("1",)],
                                                 "verifier": [()]}))
    learner = next(g for g in gpus if g.gpu_id == "1")
    assert learner.fits is False and learner.used_gib == pytest.approx((20 + 2) * 8_030_261_248 / GIB, rel=0.01)
    assert problems == [f"GPU 1 of 10.0.0.1: {learner.used_gib:.1f} GiB of 80 (at most 0.9 x its memory): "
                        "team.agents[0].learner rank 0"]

    cfg = compose_config(*base, "learner.num_learners=4", "learner.zero_stage=3", "command=train")
    gpus, problems = gpu_loads(cfg, _seats(cfg, {"team.agents[0].engine": [("0",)], "verifier": [()],
                                                 "team.agents[0].learner": [("1",), ("2",), ("3",), ("4",)]}))
    assert not problems and len(gpus) == 5 and all(g.fits for g in gpus)


def test_an_engine_whose_kv_cache_cannot_hold_one_sequence_is_a_problem_naming_the_key():
    """Llama-3-8B's weights take 15 GiB: 0.2 of an 80 GiB GPU leaves 1 GiB of KV cache, 8.5k tokens at 128 KiB
    each, fewer than max_model_len=16384 (vLLM refuses to start)."""
    cfg = compose_config("team=tiny1", "team.agents.0.model=meta-llama/Meta-Llama-3-8B-Instruct", "engine.num_gpus=1",
                         "engine.gpu_memory_utilization=0.2", "engine.max_model_len=16384", "command=eval")
    (gpu,), problems = gpu_loads(cfg, _seats(cfg, {"team.agents[0].engine": [("0",)], "verifier": [()]}))
    assert gpu.fits and re.search(r"weights 15.0 GiB \(bfloat16\), KV cache <= 1.0 GiB = 8,5\d\d tokens$",
                                  gpu.loads[0].detail), gpu.loads[0].detail
    assert len(problems) == 1 and "fewer than engine.max_model_len=16384" in problems[0]


def test_the_paper_setting_on_a_machine_without_gpus_says_what_it_needs_before_anything_starts(tmp_path):
    """`mapoco train +experiment=maporl_gsm8k` and `mapoco plan +experiment=maporl_gsm8k` here, with no cluster to
    join: a one-line config error naming the GPUs the run needs and the cluster's 0, before data, models or Ray
    (nothing is downloaded for a run that cannot start)."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    earlier = set(Path("/tmp/ray").glob("session_*"))  # a pid reused from an earlier session must not count
    commands = [["train", "+experiment=maporl_gsm8k", f"output_dir={tmp_path / 'run'}"],
                ["plan", "+experiment=maporl_gsm8k"]]
    procs = [subprocess.Popen([str(BIN / "mapoco"), *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for command in commands]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, out[-2000:] + err[-2000:]
        assert "Traceback" not in err
        error = err.strip().splitlines()[-1]
        assert error.startswith("config error: engine.num_gpus=8.0: the run's actors need 8 GPUs in all"), error
        assert "the cluster has 0" in error
        assert not set(Path("/tmp/ray").glob(f"session_*_{proc.pid}")) - earlier  # it started no Ray instance

"""Learner groups on the same batch: data parallelism and another CPU's kernels must not change the update, and the
learning rate must scale it (one model, one ZeRO stage, one batch, so nothing else differs)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import OTHER_KERNELS

from mapoco.config import AlgorithmConfig, LearnerConfig
from mapoco.training.batch import Rollout, TokenTargets, combine_stats
from mapoco.training.learner_group import LearnerGroup, LearnerPool

ROWS = [Rollout(prompt_ids=[3 + i, 10, 11, 12 + i], response_ids=[20 + i, 21, 22 + 2 * i, 5][: 2 + i % 3], turn=i % 2)
        for i in range(6)]
# 2 PPO epochs: the second epoch's ratio differs from 1, so clipping and the loss see the first step's weights.
ALGO = AlgorithmConfig(estimator="grpo", ppo_epochs=2, mini_batches=1, kl_in_reward=True, entropy_coef=0.0)


def learner_config(ranks: int, lr: float) -> LearnerConfig:
    return LearnerConfig(num_learners=ranks, zero_stage=2, lr=lr, micro_batch_size=2)


def updated(group: LearnerGroup) -> tuple[dict, dict, dict]:
    """Weights before and after one update on ROWS, and the update's statistics."""
    group.wait_ready()
    before = group.weights("float32")
    stats = group.rollout_stats(ROWS)
    lengths = torch.tensor([len(r.response_ids) for r in ROWS])
    mask = (torch.arange(stats.logprobs.size(1)) < lengths[:, None]).float()
    sign = torch.tensor([(-1.0) ** i for i in range(len(ROWS))])[:, None]
    advantages = sign * (1 + 0.25 * torch.arange(stats.logprobs.size(1))) * mask
    targets = TokenTargets(stats.logprobs, stats.ref_logprobs, advantages)
    tokens = sum(len(r.response_ids) for r in ROWS)
    metrics = group.update(ROWS, targets, float(tokens))
    return before, group.weights("float32"), metrics


@pytest.fixture(scope="module")
def updates(ray_session, tiny_models):
    """The groups the tests compare, on one model, each updated on ROWS: one rank and two ranks, started at once (a
    start is mostly imports and loading); then the one-rank group, back in a pool, taken again at twice the
    learning rate (reset: the model reloaded, a new optimizer)."""
    path = str(tiny_models["tiny-qwen"])
    pool = LearnerPool()
    one_rank = pool.take(path, learner_config(1, 1e-4), ALGO, 2, 0, "test.learner[1 rank]")
    two_ranks = LearnerGroup(path, learner_config(2, 1e-4), ALGO, 2, 0, "test.learner[2 ranks]")
    other_kernels = LearnerGroup(path, replace(learner_config(1, 1e-4), env=OTHER_KERNELS), ALGO, 2, 0,
                                 "test.learner[1 rank, other kernels]")
    try:
        out = {"one_rank": updated(one_rank), "two_ranks": updated(two_ranks),
               "other_kernels": updated(other_kernels)}
        pids = one_rank.call_all("pid")
        pool.give_back(one_rank)
        double_lr = pool.take(path, learner_config(1, 2e-4), ALGO, 2, 0, "test.learner[1 rank, 2x lr]")
        out["double_lr"] = updated(double_lr)
        out["double_lr_reused"] = double_lr is one_rank and double_lr.call_all("pid") == pids
        out["double_lr_describe"] = double_lr.call_all("describe")
        sweep = LearnerPool(per_shape=1, one_shape_per_model=True)  # a multirun's pool, holding both shapes
        for group in (double_lr, two_ranks):
            sweep.give_back(group)
        sweep.free_other_shapes(path)  # what a job asking this model in a third shape does first
        out["sweep_freed"] = (sweep.free, double_lr.alive(), two_ranks.alive())
        return out
    finally:
        pool.shutdown()
        two_ranks.shutdown()
        other_kernels.shutdown()


def _moved(before: dict, after: dict) -> dict:
    return {k: (after[k] - before[k]).abs() for k in before}


@pytest.mark.kernels
@pytest.mark.slow
def test_two_ranks_give_the_same_update_as_one(updates):
    """Two ranks split the rows; the loss normalised by the whole batch's tokens times the world size, then
    DeepSpeed's gradient average, must be the one-rank gradient. AdamW's first step hides a gradient's scale, so
    the gradient norm and the loss are compared too: a wrong normaliser would halve or double them."""
    (before, after, metrics), (before2, after2, metrics2) = updates["one_rank"], updates["two_ranks"]
    assert all(float((before[k] - before2[k]).abs().max()) == 0.0 for k in before)  # the same start
    moved = max(float(m.max()) for m in _moved(before, after).values())
    assert moved > 5e-5, "the update did not move the weights"
    # Float sums in another order, through AdamW's m / sqrt(v), leave ~1% of the update (measured 2.2e-6 of
    # 2e-4); ranks that stepped on their own rows' gradient alone would differ by the update itself.
    gap = max(float((after[k] - after2[k]).abs().max()) for k in after)
    assert gap < 0.03 * moved, f"2 ranks moved the weights {gap:.2e} away from 1 rank (the update: {moved:.2e})"
    assert metrics2["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-4)
    # The reported loss is the whole batch's, not a mean over micro-batches (3 on one rank, 2 + 1 on two)
    for key in ("policy_loss", "loss", "clip_frac"):
        assert metrics2[key] == pytest.approx(metrics[key], rel=1e-3, abs=1e-7), key


@pytest.mark.kernels
@pytest.mark.slow
def test_other_kernels_give_the_same_update_to_rounding(updates):
    """PyTorch's non-vectorized kernels (another CPU's summation order) on one rank: the same start, and an update
    that differs from this CPU's by rounding carried through AdamW, as two ranks' does; the gradient norm to 1e-4."""
    (before, after, metrics), (before2, after2, metrics2) = updates["one_rank"], updates["other_kernels"]
    assert all(torch.equal(before[k], before2[k]) for k in before)
    moved = max(float(m.max()) for m in _moved(before, after).values())
    gap = max(float((after[k] - after2[k]).abs().max()) for k in after)
    assert gap < 0.03 * moved, f"other kernels moved the weights {gap:.2e} away (the update: {moved:.2e})"
    assert metrics2["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-4)


@pytest.mark.kernels
@pytest.mark.slow
def test_learning_rate_scales_the_update(updates):
    """AdamW's step is about lr * sign(gradient): twice the rate, twice the distance, weight by weight. The faster
    group is the slower one reset: it starts from the base weights again, with a fresh optimizer (moments left
    from the first update would change the step's size and direction)."""
    (before, after, _), (before3, after3, _) = updates["one_rank"], updates["double_lr"]
    assert updates["double_lr_reused"], "the pool started a new group instead of resetting the one it held"
    assert [d["lr"] for d in updates["double_lr_describe"]] == pytest.approx([2e-4])
    assert all(torch.equal(before[k], before3[k]) for k in before)  # reloaded from the model's files
    slow, fast = _moved(before, after), _moved(before3, after3)
    ratios = [float(fast[k].mean() / slow[k].mean()) for k in slow if float(slow[k].mean()) > 1e-6]
    assert ratios and 1.8 < np.median(ratios) < 2.2


def test_losses_add_up_and_means_weigh_by_tokens():
    """Two parts of one batch of 4 tokens: losses are shares of its sum, a mean weighs 3 tokens against 1."""
    combined = combine_stats({"loss": [0.25, 0.5], "policy_loss": [-0.1, 0.3], "clip_frac": [0.0, 1.0],
                              "entropy": [2.0, 6.0]}, tokens=[3.0, 1.0])
    assert combined == pytest.approx({"loss": 0.75, "policy_loss": 0.2, "clip_frac": 0.25, "entropy": 3.0,
                                      "tokens": 4.0})


def test_init_distributed_compiles_nothing_and_the_group_reduces(tmp_path):
    """DeepSpeed's shared-memory op would compile C++ (about a minute on 2 cores) into TORCH_EXTENSIONS_DIR; the
    learners' group must start without it and still sum across its ranks through torch.distributed."""
    script = """
import os, torch, torch.distributed as dist
from mapoco.training.learner import free_port, init_distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
init_distributed("gloo")
value = torch.tensor([2.5])
dist.all_reduce(value)
print("sum", value.item(), dist.get_backend())
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sum 2.5 gloo" in run.stdout
    assert not (tmp_path / "extensions").exists(), "an op was compiled"


@pytest.mark.slow
def test_a_sweeps_pool_frees_a_models_idle_groups_before_another_shape_starts(updates):
    """A multirun's pool (the cluster is sized for one job): the idle groups of a model, of both shapes it held, are
    shut down before a job starts that model in a third shape."""
    assert updates["sweep_freed"] == ({}, False, False)

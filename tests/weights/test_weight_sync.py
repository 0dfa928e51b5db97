"""The GPU paths' logic on CPU, with real engines and learners, in one run: colocation (learner ranks in their
engines' bundles, the engines asleep while they update) and the collective weight sync (the broadcast group NCCL
runs on GPUs, here over gloo through the same code), through lost and stalled replicas and a resume.

On a GPU these two do not meet (a broadcast group cannot hold two members on one GPU, so colocated agents use the
object store there); on CPUs they can, and one team then exercises both."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import ray
from conftest import compose_config
from test_train import assert_engines_match_learner

from mapoco.training.trainer import Trainer
from mapoco.weights.collective import CollectiveSync

pytestmark = [pytest.mark.slow, pytest.mark.gpu]  # a GPU path's logic, run on CPU

TIMEOUT_S = 10
# Agent 0 (Qwen2, tied output head) trains on 2 ZeRO-3 ranks, each in the bundle of one of its 2 engine replicas;
# its broadcast group is learner rank 0 and both replicas. Its Llama partner stays frozen on an engine of its own.
RUN = ["team=tiny_hetero", "turns=2", "train.batch_questions=4", "algorithm.samples_per_question=2",
       "train.eval_every=0", "train.eval_limit=4", "logger.wandb.mode=disabled", "learner.lr=1e-3",
       "+team.agents.1.trainable=false", "+team.agents.0.engine.replicas=2", "+team.agents.0.learner.num_learners=2",
       "+team.agents.0.learner.zero_stage=3", "+team.agents.0.learner.colocate=true", "train.weight_sync=collective",
       f"train.sync_timeout_s={TIMEOUT_S}", "train.steps=4", "train.save_every=2"]


@pytest.fixture(scope="module")
def colocated_team(ray_session, tiny_models):
    from mapoco.rollout.discussion import Team

    team = Team.of_run(compose_config(*RUN), colocate_learners=True, wait=False)
    yield team
    team.shutdown()


def _pid(engines, replica: int) -> int:
    return ray.get(engines.actors[replica].pid.remote())


def _bundles(trainer: Trainer) -> tuple[list, list]:
    """(placement group, bundle) of agent 0's learner ranks and of its engine replicas."""
    ranks = trainer.policies[0].group.call_all("describe")
    replicas = trainer.team.agents[0].engines.call_all("describe")
    return [(r["placement_group"], r["bundle"]) for r in ranks], [(e["placement_group"], e["bundle"]) for e in replicas]


@contextlib.contextmanager
def _step_order(trainer: Trainer) -> Iterator[list]:
    """Inside the block, sleep, update, wake_up and push are recorded as the trainer makes them, with whether the
    engines were asleep at each call."""
    policy, engines = trainer.policies[0], trainer.team.agents[0].engines
    calls: list[tuple] = []

    def spy(owner, name):
        real = getattr(owner, name)

        def call(*args, **kwargs):
            calls.append((name, engines.call_all("is_sleeping")))
            return real(*args, **kwargs)
        setattr(owner, name, call)

    spied = ((engines, "sleep"), (engines, "wake_up"), (policy.group, "update"), (policy.sync, "push"))
    for owner, name in spied:
        spy(owner, name)
    try:
        yield calls
    finally:
        for owner, name in spied:
            delattr(owner, name)  # the class's method again


def test_colocated_ranks_update_asleep_and_the_broadcast_group_survives_lost_and_stalled_replicas(colocated_team,
                                                                                                   tmp_path):
    """Rank k runs in replica k's bundle; each step the engines sleep through the update, wake, then get the weights.
    Every step's engines sample what the learner holds (the float32 gap): through a replica killed mid-run (restarted
    in its bundle, the group rebuilt around it), a push in which one replica stalls and another dies (both named,
    restarted at once, the push done again within the timeout), and a run resumed from the step-2 checkpoint."""
    engines = colocated_team.agents[0].engines
    trainer = Trainer(compose_config(*RUN, f"output_dir={tmp_path}"), tmp_path, team=colocated_team)
    metrics = []
    try:
        sync = trainer.policies[0].sync
        assert isinstance(sync, CollectiveSync) and sync.rebuilds == 0
        ranks, replicas = _bundles(trainer)
        assert ranks == replicas == [(replicas[0][0], 0), (replicas[0][0], 1)]
        with _step_order(trainer) as calls:
            metrics.append(trainer.train_step())
        trainer.step += 1
        assert calls == [("sleep", [False, False]), ("update", [True, True]), ("wake_up", [True, True]),
                         ("push", [False, False])]

        os.kill(_pid(engines, 1), signal.SIGKILL)  # crashes between steps: step 2's rollout restarts it, the group
        time.sleep(1)                              # is rebuilt around the new one
        metrics.append(trainer.train_step())
        trainer.step += 1
        assert sync.rebuilds == 1 and engines.restarts == 1 and _bundles(trainer)[1] == replicas
        trainer.save()

        stalled, dying = _pid(engines, 0), _pid(engines, 1)
        for pid in (stalled, dying):
            os.kill(pid, signal.SIGSTOP)  # neither finishes the broadcast ...
        threading.Timer(1.0, os.kill, args=(dying, signal.SIGKILL)).start()  # ... and one dies inside it
        start = time.perf_counter()
        trainer.sync_weights()
        seconds = time.perf_counter() - start
        assert sync.rebuilds == 2 and engines.restarts == 3
        assert _pid(engines, 0) != stalled and _pid(engines, 1) != dying
        assert TIMEOUT_S <= seconds < TIMEOUT_S + 120, seconds  # the timeout and one round of restarts, not forever
        metrics.append(trainer.train_step())
    finally:
        trainer.close()
    for step in metrics:
        assert_engines_match_learner(step, "agent_0")
    assert metrics[1]["faults/agent_0/engine_restarts"] == 1

    resumed = Trainer(compose_config(*RUN, "train.resume=auto", f"output_dir={tmp_path}"), tmp_path,
                      team=colocated_team)
    try:
        assert resumed.step == 2 and isinstance(resumed.policies[0].sync, CollectiveSync)
        assert _bundles(resumed)[0] == replicas
        assert_engines_match_learner(resumed.train_step(), "agent_0")
    finally:
        resumed.close()

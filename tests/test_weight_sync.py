"""The GPU paths' logic on CPU, with real engines and learners: the collective weight sync (the broadcast group NCCL
runs on GPUs, here over gloo through the same code) and colocation (learner ranks in their engines' bundles, the
engines asleep while they update)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
from conftest import compose_config
from test_train import assert_engines_match_learner

from mapoco.training.trainer import Trainer
from mapoco.training.weight_sync import CollectiveSync, ObjectStoreSync

pytestmark = pytest.mark.slow

SMALL = ["turns=2", "train.batch_questions=4", "algorithm.samples_per_question=2", "train.eval_every=0",
         "train.eval_limit=4", "logger.wandb.mode=disabled", "learner.lr=1e-3"]
# Agent 0 (Qwen2, tied output head) trains on 2 ZeRO-3 ranks and samples on 2 replicas: its group is learner rank 0
# and both replicas. Its Llama partner stays frozen on one replica.
COLLECTIVE = ["team=tiny_hetero", *SMALL, "+team.agents.1.trainable=false", "+team.agents.0.engine.replicas=2",
              "+team.agents.0.learner.num_learners=2", "+team.agents.0.learner.zero_stage=3",
              "train.weight_sync=collective", "train.sync_timeout_s=10"]


@pytest.fixture(scope="module")
def collective_team(ray_session, tiny_models):
    from mapoco.rollout.discussion import Team

    team = Team.of_run(compose_config(*COLLECTIVE), wait=False)
    yield team
    team.shutdown()


def _pid(engines, replica: int) -> int:
    return ray.get(engines.actors[replica].pid.remote())


def test_collective_sync_survives_lost_and_stalled_replicas_and_resumes(collective_team, tmp_path):
    """Every step's engines sample exactly what the learner holds (the float32 gap), through a replica killed
    mid-rollout (restarted, the group rebuilt around it), one that stalls during a push (named, killed and
    restarted within train.sync_timeout_s) and one killed during a push; then a run resumed from the step-2
    checkpoint joins a new group with the same engines and stays in sync."""
    cfg = compose_config(*COLLECTIVE, "train.steps=4", "train.save_every=2", f"output_dir={tmp_path}")
    engines = collective_team.agents[0].engines
    trainer = Trainer(cfg, tmp_path, team=collective_team)
    metrics = []
    try:
        sync = trainer.policies[0].sync
        assert isinstance(sync, CollectiveSync) and sync.rebuilds == 0
        metrics.append(trainer.train_step())  # step 1: the group as built
        trainer.step += 1

        killer = threading.Timer(0.3, ray.kill, args=(engines.actors[1],))  # lands during step 2's rollout
        killer.start()
        metrics.append(trainer.train_step())
        killer.join()
        trainer.step += 1
        assert sync.rebuilds == 1 and engines.restarts == 1
        trainer.save()

        stalled = _pid(engines, 0)
        os.kill(stalled, signal.SIGSTOP)  # a member that never finishes the broadcast
        start = time.perf_counter()
        trainer.sync_weights()
        stall_s = time.perf_counter() - start
        assert _pid(engines, 0) != stalled and sync.rebuilds == 2 and engines.restarts == 2
        assert 10 <= stall_s < 10 + 120, stall_s  # the timeout, then a restart; never forever

        dying = _pid(engines, 1)
        os.kill(dying, signal.SIGSTOP)
        threading.Timer(2.0, os.kill, args=(dying, signal.SIGKILL)).start()  # dies inside the push
        trainer.sync_weights()
        assert _pid(engines, 1) != dying and sync.rebuilds == 3 and engines.restarts == 3
        metrics.append(trainer.train_step())
    finally:
        trainer.close()
    for step in metrics:
        assert_engines_match_learner(step, "agent_0")
    assert metrics[1]["faults/agent_0/engine_restarts"] == 1

    resumed = Trainer(compose_config(*COLLECTIVE, "train.steps=4", "train.resume=auto", f"output_dir={tmp_path}"),
                      tmp_path, team=collective_team)
    try:
        assert resumed.step == 2 and isinstance(resumed.policies[0].sync, CollectiveSync)
        assert_engines_match_learner(resumed.train_step(), "agent_0")
    finally:
        resumed.close()


def test_colocated_ranks_ride_in_their_engines_bundles_and_update_while_they_sleep(ray_session, tiny_models,
                                                                                    tmp_path):
    """Learner rank k runs in engine replica k's bundle of the engines' placement group; each step the engines
    pause (asleep while the learner updates), wake, and only then get the new weights, through the object store."""
    cfg = compose_config("team=tiny1", *SMALL, "train.steps=1", "train.save_every=0", "engine.replicas=2",
                         "learner.num_learners=2", "learner.colocate=true")
    trainer = Trainer(cfg, tmp_path)
    calls: list[tuple] = []
    try:
        policy, engines = trainer.policies[0], trainer.team.agents[0].engines
        ranks = policy.group.call_all("describe")
        replicas = engines.call_all(lambda actor: actor.describe.remote())
        assert [(r["placement_group"], r["bundle"]) for r in ranks] == \
            [(e["placement_group"], e["bundle"]) for e in replicas] == [(replicas[0]["placement_group"], k)
                                                                       for k in range(2)]
        assert isinstance(policy.sync, ObjectStoreSync)

        def spy(owner, name):
            real = getattr(owner, name)

            def call(*args, **kwargs):
                asleep = engines.call_all(lambda actor: actor.is_sleeping.remote())
                calls.append((name, asleep))
                return real(*args, **kwargs)
            setattr(owner, name, call)

        for owner, name in ((engines, "sleep"), (engines, "wake_up"), (policy.group, "update"),
                            (policy.sync, "push")):
            spy(owner, name)
        assert_engines_match_learner(trainer.train_step(), "agent_0")
    finally:
        trainer.close()
    assert calls == [("sleep", [False, False]), ("update", [True, True]), ("wake_up", [True, True]),
                     ("push", [False, False])]

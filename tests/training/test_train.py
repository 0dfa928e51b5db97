"""Co-training with real vLLM engines, DeepSpeed learners (ZeRO-2, gloo) and Ray."""

import threading

import numpy as np
import pytest
import ray
import torch
from conftest import compose_config, kernels_twin, watch_updates
from ray.util.placement_group import placement_group_table

from mapoco.evaluation.report import plotted
from mapoco.runtime.precision import LOGPROB_TOLERANCE
from mapoco.training.trainer import Trainer, TrainingInterrupted

pytestmark = pytest.mark.slow

# Every CPU runs engines and learners in float32 under dtype=auto (mapoco.runtime.precision), AVX2 or native bf16 alike,
# so the engine-vs-learner gap is checked against float32's tolerance.
FLOAT32_GAP = LOGPROB_TOLERANCE["float32"]


def assert_engines_match_learner(metrics: dict[str, float], name: str) -> None:
    assert metrics[f"train/{name}/logprob_tolerance"] == FLOAT32_GAP  # the run checks the float32 tolerance too
    assert metrics[f"train/{name}/logprob_max_diff"] < FLOAT32_GAP

SMALL = ["turns=2", "train.batch_questions=4", "algorithm.samples_per_question=2", "train.eval_every=0",
         "train.eval_limit=8", "logger.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def hetero_training(hetero_team, tmp_path_factory):
    """Two steps on the heterogeneous team, each agent with its own learning rate."""
    cfg = compose_config("team=tiny_hetero", *SMALL, "train.steps=2", "train.save_every=0",
                         "+team.agents.0.learner.lr=2e-5", "+team.agents.0.learner.num_learners=2",
                         "+team.agents.1.learner.lr=7e-5", "+team.agents.1.learner.zero_stage=3")
    trainer = Trainer(cfg, tmp_path_factory.mktemp("hetero"), team=hetero_team)  # its own shapes: not pooled
    before = {p.name: p.group.weights("float32") for p in trainer.policies}
    qwen_policy, llama_policy = trainer.policies
    with watch_updates(qwen_policy.group, kernels_twin(trainer, qwen_policy)) as qwen, \
            watch_updates(llama_policy.group, kernels_twin(trainer, llama_policy)) as llama:
        metrics = [trainer.train_step()]
        trainer.step += 1
        metrics.append(trainer.train_step())
    after = {p.name: p.group.weights("float32") for p in trainer.policies}
    yield trainer, metrics, before, after, {"agent_0": qwen, "agent_1": llama}
    trainer.close()


def test_every_agent_trains_and_its_settings_reach_its_learners(hetero_training):
    trainer, metrics, before, after, _ = hetero_training
    assert [p.name for p in trainer.policies] == ["agent_0", "agent_1"]
    qwen, llama = (p.group.call_all("describe") for p in trainer.policies)
    assert [(d["rank"], d["world_size"], d["zero_stage"], d["model_type"]) for d in qwen] == [
        (0, 2, 2, "qwen2"), (1, 2, 2, "qwen2")]
    assert [(d["world_size"], d["zero_stage"], d["model_type"]) for d in llama] == [(1, 3, "llama")]
    assert [d["lr"] for d in qwen + llama] == pytest.approx([2e-5, 2e-5, 7e-5])
    for policy, ranks in zip(trainer.policies, (2, 1)):  # each learner group in a placement group of its own
        table = placement_group_table(policy.group.placement.group)
        assert table["state"] == "CREATED" and list(table["bundles"].values()) == [{"CPU": 1.0}] * ranks
    for name in ("agent_0", "agent_1"):
        for key in ("policy_loss", "value_loss", "loss", "kl", "reward", "entropy", "grad_norm", "clip_frac",
                    "vf_clip_frac"):
            assert np.isfinite(metrics[-1][f"train/{name}/{key}"])
        assert 0.2 < metrics[-1][f"train/{name}/peak_memory_gib"] < 24  # a rank's resident peak, on this machine
        moved = max(float((after[name][k] - before[name][k]).abs().max()) for k in before[name])
        assert moved > 0, f"{name} weights did not change"
    timing = {key: metrics[-1][f"timing/{key}"] for key in ("rollout", "verify", "advantages", "update", "sync")}
    # The step's sequential phases add up to at most the step; update (every policy's scoring, advantages and
    # update, together) holds the slowest policy's advantages and each policy's own update time.
    assert min(timing.values()) > 0 and metrics[-1]["timing/step"] >= sum(timing.values()) - timing["advantages"]
    assert timing["advantages"] < timing["update"]
    assert all(0 < metrics[-1][f"train/{name}/update_s"] < timing["update"] for name in ("agent_0", "agent_1"))


def test_kl_is_zero_at_step_zero_and_engines_match_learners(hetero_training):
    trainer, metrics, _, _, _ = hetero_training
    for name in ("agent_0", "agent_1"):
        assert abs(metrics[0][f"train/{name}/kl"]) < 1e-6  # policy == reference before the first update
        for step_metrics in metrics:  # the second step samples from weights synced after the first update
            assert_engines_match_learner(step_metrics, name)


@pytest.mark.kernels
def test_every_update_follows_its_advantages(hetero_training):
    """Each agent's two updates (2 ranks on ZeRO-2, 1 rank on ZeRO-3, GAE advantages with a value head) make its
    positive-advantage tokens likelier than its negative ones, on the tokens its engines sampled; so do the same
    updates made on PyTorch's non-vectorized kernels (another CPU's summation order), and the two agree."""
    directions = hetero_training[4]
    for name, updates in directions.items():
        assert len(updates) == 2
        for step, direction in enumerate(updates):
            direction.assert_follows_advantages(f"{name}, step {step}")


def _tokens(result):
    return {k: r.token_ids for k, r in result.records.items()}


def test_resume_reproduces_the_uninterrupted_run(hetero_team, learner_pool, tmp_path):
    """Checkpoint after step 1; a new trainer with resume=auto draws the same step-2 batch, samples the same
    tokens, and its step-2 update lands on the same weights as the uninterrupted run."""
    cfg = compose_config("team=tiny_hetero", *SMALL, "train.steps=2", "train.save_every=1")
    first = Trainer(cfg, tmp_path, team=hetero_team, learners=learner_pool)
    first.train_step()
    first.step = 1
    first.save()
    after_one, step_one = _weights(first), [p.group.call_all("describe")[0] for p in first.policies]
    expected = first.rollout(first.batch(1), 1)
    first.train_step()
    uninterrupted = {p.name: p.group.weights("float32") for p in first.policies}
    ray.kill(first.policies[1].group.actors[0])  # a learner dies: the run stops and says how to resume
    with pytest.raises(TrainingInterrupted, match="step_000001: run the same command with train.resume=auto"):
        first.fit()
    first.close()

    resumed = Trainer(compose_config("team=tiny_hetero", *SMALL, "train.steps=2", "train.resume=auto"), tmp_path,
                      team=hetero_team, learners=learner_pool)
    try:
        assert resumed.step == 1
        assert [p.id for p in resumed.batch(1)] == [p.id for p in first.batch(1)]
        assert _tokens(resumed.rollout(resumed.batch(1), 1)) == _tokens(expected)
        resumed.train_step()
        for policy in resumed.policies:
            got = policy.group.weights("float32")
            for key, tensor in uninterrupted[policy.name].items():
                # float32 learners on every CPU (mapoco.runtime.precision): the resumed update repeats the same arithmetic
                assert float((got[key] - tensor).abs().max()) < 1e-6, key
    finally:
        resumed.close()

    # train.init_from: a new phase from the step-1 checkpoint: its weights, but its own step 0, data order and
    # optimizer (the schedule starts over), and engines that serve what the learners loaded
    phase = Trainer(compose_config("team=tiny_hetero", *SMALL, "train.steps=2", f"train.init_from={tmp_path}"),
                    tmp_path / "phase", team=hetero_team, learners=learner_pool)
    try:
        assert phase.step == 0 and [p.id for p in phase.batch(0)] == [p.id for p in first.batch(0)]
        for name, weights in _weights(phase).items():
            assert all(torch.equal(weights[k], after_one[name][k]) for k in weights), name
        described = [p.group.call_all("describe")[0] for p in phase.policies]
        assert all(d["scheduler_steps"] > 0 for d in step_one)
        assert [d["scheduler_steps"] for d in described] == [0, 0]
        metrics = phase.train_step()
        for name in ("agent_0", "agent_1"):
            assert_engines_match_learner(metrics, name)
    finally:
        phase.close()


def _weights(trainer):
    return {p.name: p.group.weights("float32") for p in trainer.policies}


def test_an_overlapped_run_stays_within_its_staleness_bound_and_resumes_exactly(hetero_team, learner_pool, tmp_path):
    """train.off_policy_steps=1: step k+1's rollout runs during step k's update, with the weights step k started
    from. Step 0 samples on-policy (importance weights exactly 1, the sync checked as usual); later steps are one
    update stale (reweighted, capped). A checkpoint keeps the rollout already sampled, so the resumed run trains on
    the same tokens and lands on the uninterrupted run's weights."""
    overrides = [*SMALL, "train.steps=3", "train.off_policy_steps=1", "train.save_every=0"]
    first = Trainer(compose_config("team=tiny_hetero", *overrides), tmp_path, team=hetero_team, learners=learner_pool)
    try:
        metrics = []
        for step in range(3):
            first.step = step
            if step == 2:
                first.save()
                pending = _tokens(first.pending.result)
            metrics.append(first.train_step())
        assert first.pending is None  # the last step samples nothing ahead
        uninterrupted = _weights(first)
    finally:
        first.close()
    assert [m["rollout/staleness"] for m in metrics] == [0, 1, 1]
    assert ["timing/rollout_wait" in m for m in metrics] == [True, True, False]
    for name in ("agent_0", "agent_1"):
        assert metrics[0][f"train/{name}/is_weight_mean"] == 1.0 and metrics[0][f"train/{name}/is_weight_capped"] == 0
        assert_engines_match_learner(metrics[0], name)
        for later in metrics[1:]:  # the gap to a stale sample is the policy's own change; the engines re-score
            assert later[f"train/{name}/policy_lag_max_diff"] > 0
            assert_engines_match_learner(later, name)  # a few of its rows with the weights both hold now
            assert later["timing/probe"] > 0
            # reweighted (a weight of exactly 1 on average means no correction ran), and truncated at the cap
            assert later[f"train/{name}/is_weight_mean"] != 1.0 and later[f"train/{name}/is_weight_mean"] <= 2.0
            assert 0 <= later[f"train/{name}/is_weight_capped"] < 1
            assert np.isfinite(later[f"train/{name}/policy_loss"])

    resumed = Trainer(compose_config("team=tiny_hetero", *overrides, "train.resume=auto"), tmp_path,
                      team=hetero_team, learners=learner_pool)
    try:
        assert (resumed.step, resumed.pending.version) == (2, 1)
        assert _tokens(resumed.pending.result) == pending
        assert resumed.train_step()["rollout/staleness"] == 1
        for name, weights in _weights(resumed).items():
            assert max(float((weights[k] - uninterrupted[name][k]).abs().max()) for k in weights) < 1e-6, name
    finally:
        resumed.close()


def test_an_engine_killed_mid_rollout_is_restarted_and_training_goes_on(hetero_team, learner_pool, tmp_path):
    """The dead replica is restarted in its bundle, gets the learner's weights back, and serves its requests
    again; the run's metrics count the restart. Only agent 1 trains: its partner's learners would add nothing."""
    cfg = compose_config("team=tiny_hetero", *SMALL, "train.steps=2", "train.save_every=0",
                         "+team.agents.0.trainable=false")
    trainer = Trainer(cfg, tmp_path, team=hetero_team, learners=learner_pool)
    engines = hetero_team.agents[1].engines
    victim, restarts_before = engines.actors[0], engines.restarts
    old_pid = ray.get(victim.pid.remote())
    try:
        killer = threading.Timer(0.3, ray.kill, args=(victim,))  # lands during step 1's rollout or update
        killer.start()
        trainer.train_step()
        killer.join()
        trainer.step += 1
        second = trainer.train_step()
    finally:
        trainer.close()
    assert engines.restarts == restarts_before + 1
    assert second["faults/agent_1/engine_restarts"] == restarts_before + 1 and second["faults/engine_restarts"] >= 1
    assert ray.get(engines.actors[0].pid.remote()) != old_pid
    assert np.isfinite(second["train/agent_1/policy_loss"])
    # The restarted engine samples with the trained weights, not the base model it loaded at start.
    assert_engines_match_learner(second, "agent_1")


def _greedy(agent, prompts):
    from mapoco.config import SamplingConfig

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    return [g.token_ids for g in agent.engines.generate(prompts, greedy, [0] * len(prompts))]


def _one_step(team, learners, out, *overrides):
    """Weights of every policy after one step from the base weights, on step 0's batch and seeds."""
    cfg = compose_config("team=tiny_hetero", *SMALL, "train.save_every=0", *overrides)
    trainer = Trainer(cfg, out, team=team, learners=learners)
    try:
        trainer.train_step()
        return {p.name: p.group.weights("float32") for p in trainer.policies}
    finally:
        trainer.close()


def test_concurrent_policies_update_as_the_sequential_loop_does(hetero_team, learner_pool, tmp_path):
    """Each policy's scoring, update and sync run in a thread of their own: its groups and engines are its own,
    so the updated weights are the one-after-another loop's, bit for bit."""
    together = _one_step(hetero_team, learner_pool, tmp_path / "together", "train.concurrent_policies=true")
    in_turn = _one_step(hetero_team, learner_pool, tmp_path / "in_turn", "train.concurrent_policies=false")
    for name in ("agent_0", "agent_1"):
        assert together[name].keys() == in_turn[name].keys()
        assert all(torch.equal(together[name][k], in_turn[name][k]) for k in together[name]), name


@pytest.mark.parametrize("off_policy_steps", [0, 1])
def test_engines_out_of_sync_stop_the_run_with_the_message(hetero_team, learner_pool, tmp_path, off_policy_steps):
    """Agent 0's engines get other weights than its learners hold after step 1: step 2's gap breaches the
    tolerance and the run stops naming the agent, the gap and the setting that decides it. Overlapped, step 2's
    batch was sampled before the wrong push: the engines' re-scoring of its rows catches it."""
    from mapoco.training.sync_guard import EnginesOutOfSync
    from mapoco.weights.payload import pack

    cfg = compose_config("team=tiny_hetero", *SMALL, "train.steps=3", "train.save_every=0", "train.eval_limit=4",
                         "train.logprob_breach_steps=1", f"train.off_policy_steps={off_policy_steps}",
                         "+team.agents.1.trainable=false")  # only agent 0's sync is under test
    trainer = Trainer(cfg, tmp_path, team=hetero_team, learners=learner_pool)
    policy, engines = trainer.policies[0], hetero_team.agents[0].engines
    base = policy.group.weights("float32")
    generator = torch.Generator().manual_seed(0)
    wrong = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    policy.sync.push = lambda: engines.push_weights(pack(wrong, torch.float32))
    try:
        with pytest.raises(EnginesOutOfSync) as stopped:
            trainer.fit()
        assert trainer.step == 2, "stopped after the first step whose gap breached"
    finally:
        trainer.close()
        engines.push_weights(pack(base, torch.float32))  # the session's team serves the base weights again
    message = str(stopped.value)
    assert message.startswith("agent_0: engine-vs-learner logprob gap") and "train.logprob_tolerance 0.01" in message
    assert "no checkpoint was written yet" in message


def test_lora_agent_trains_against_a_frozen_partner(hetero_team, learner_pool, tmp_path):
    """MAPoRL's baseline: one agent trained (here with LoRA adapters), its partner frozen."""
    cfg = compose_config("team=tiny_hetero", *SMALL, "train.steps=2", "+team.agents.0.learner.lora_rank=4",
                         "+team.agents.0.learner.lr=1e-3", "+team.agents.1.trainable=false")
    trainer = Trainer(cfg, tmp_path, team=hetero_team, learners=learner_pool)
    frozen = hetero_team.agents[1]
    prompts = [frozen.render([{"role": "user", "content": f"Calculate {i} + 7."}]) for i in range(4)]
    try:
        assert [p.name for p in trainer.policies] == ["agent_0"]
        partner_before = _greedy(frozen, prompts)
        base = trainer.policies[0].group.weights("float32")
        first = trainer.train_step()
        trainer.step += 1
        second = trainer.train_step()
        merged = trainer.policies[0].group.weights("float32")
        assert max(float((merged[k] - base[k]).abs().max()) for k in base) > 0  # adapters merged into the weights
        assert set(merged) == set(base)  # engine (HF) names, no lora_ keys
        assert_engines_match_learner(second, "agent_0")  # the merged weights reached the engine
        assert "train/agent_1/policy_loss" not in first
        assert _greedy(frozen, prompts) == partner_before
    finally:
        trainer.close()


def test_train_cli_multirun_sweep(tmp_path):
    """`mapoco train -m` end to end in its own Ray instance: two jobs of a homogeneous team in one process, each
    with its own directory, checkpoint, metrics and wandb run in one group; then `mapoco sweep-summary`. One policy
    plays both seats (team.shared_policy): the sweep's mechanics, at half the actors. The second job takes over the
    first one's engines and learner group, and its first sync resets them: before training it scores what the first
    job scored."""
    import csv
    import json
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "mapoco", "train", "-m", "rewards.alpha1=0,1", f"hydra.sweep.dir={sweep}",
         "team=tiny2", "team.shared_policy=true", *[a for a in SMALL if "wandb" not in a], "train.steps=1",
         "train.save_every=1", "train.eval_limit=4"],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((sweep / job / "wandb_run.json").read_text()) for job in ("0", "1")]
    assert {r["group"] for r in runs} == {"sweep"} and {r["mode"] for r in runs} == {"offline"}
    assert "rewards.alpha1=0" in runs[0]["name"] and "rewards.alpha1=1" in runs[1]["name"]
    for job in ("0", "1"):
        out = sweep / job
        summary = json.loads((out / "summary.json").read_text())
        assert len(summary["before"]["turn_accuracy"]) == 2 and len(summary["after"]["turn_accuracy"]) == 2
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        keys = set().union(*rows)
        for key in ("train/agent_0/policy_loss", "train/agent_0/kl", "eval/turn_2/acc", "eval/agent_1/turn_1/acc",
                    "timing/sync", "perf/tokens_per_s", "train/agent_0/logprob_max_diff"):
            assert key in keys
        assert (out / "checkpoints" / "step_000001" / "COMPLETE").exists()
        assert plotted(out / "before_after.png") == {
            "before training": [[1.0, 2.0], pytest.approx(summary["before"]["turn_accuracy"])],
            "after training": [[1.0, 2.0], pytest.approx(summary["after"]["turn_accuracy"])]}
        assert list((out / "wandb").glob(f"offline-run-*-{runs[int(job)]['id']}"))  # its own offline wandb run
    where = [json.loads((sweep / job / "placement.json").read_text()) for job in ("0", "1")]
    for group in ("team.agents[0].engine", "team.agents[0].learner"):
        assert [r["placement_group"] for r in where[0][group]] == [r["placement_group"] for r in where[1][group]]
    before = [json.loads((sweep / job / "summary.json").read_text())["before"] for job in ("0", "1")]
    for summary in before:
        summary.pop("mean_reward")  # the swept reward (alpha1) may differ; every answer must not
    assert before[0] == before[1]

    proc = subprocess.run([sys.executable, "-m", "mapoco", "sweep-summary", str(sweep)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rewards.alpha1=0" in proc.stdout and "rewards.alpha1=1" in proc.stdout
    with (sweep / "sweep_summary.csv").open() as f:
        assert [r["config"] for r in csv.DictReader(f)] == ["rewards.alpha1=0", "rewards.alpha1=1"]


def test_a_held_out_domain_is_evaluated_beside_the_task(hetero_team, rule_verifier, tmp_path):
    """train.eval_tasks: every evaluation also discusses the held-out domain's questions, exactly as a run whose task
    is that domain would (the same questions, seeds and figures), and logs them under eval/NAME/."""
    from mapoco.tasks import TaskConfig, load_task
    from mapoco.training.discussion_method import DiscussionMethod

    overrides = ["team=tiny_hetero", *SMALL, "train.eval_limit=4"]
    cfg = compose_config(*overrides, "+train.eval_tasks={numbers: {name: numbers}}")
    method = DiscussionMethod(cfg, tmp_path, hetero_team, rule_verifier, load_task(cfg.task).problems[:4])
    summary = method.evaluate("before")
    numbers = compose_config(*overrides, "task=numbers")
    alone = DiscussionMethod(numbers, tmp_path, hetero_team, rule_verifier, load_task(numbers.task).problems[:4])
    assert [p.question for p in method.eval_domains["numbers"]] == [
        p.question for p in load_task(TaskConfig(name="numbers", limit=4)).problems]
    domain = summary["domains"]["numbers"]
    assert domain == alone.evaluate("before") and len(domain["turn_accuracy"]) == 2
    metrics = method.eval_metrics(summary)
    assert metrics["eval/numbers/turn_2/acc"] == domain["turn_accuracy"][1]
    assert metrics["eval/numbers/agent_1/turn_1/acc"] == domain["agent_turn_accuracy"][1][0]
    assert metrics["eval/turn_1/acc"] == summary["turn_accuracy"][0]

"""Agents as LoRA adapters on one shared vLLM engine (team.lora_engine): what the config refuses before anything
starts, and real engines and DeepSpeed learners on CPU. Three tiny-qwen agents train adapters and a fourth plays a
fixed one, so the engine holds four adapters; a training step sends every agent's requests in one batch."""

from __future__ import annotations

import contextlib
import json
import typing

import numpy as np
import pytest
import ray
import torch
from conftest import compose_config, kernels_twin, watch_updates

from mapoco.config import VLLM_LORA_RANKS, ConfigError, SamplingConfig
from mapoco.runtime.precision import LOGPROB_TOLERANCE
from mapoco.training.batch import Rollout

FLOAT32_GAP = LOGPROB_TOLERANCE["float32"]  # float32 engines and learners on every CPU (dtype auto)
STEPS = 4
LORA = ["team=tiny4", "team.lora_engine=true", "learner.lora_rank=8", "learner.lr=3e-3", "turns=2",
        "train.batch_questions=4", "algorithm.samples_per_question=2", "train.eval_every=0", "train.eval_limit=8",
        "logger.wandb.mode=disabled", f"train.steps={STEPS}", "train.save_every=2", "+team.agents.3.trainable=false"]


def lora_config(*overrides: str):
    return compose_config("team=tiny2", "team.lora_engine=true", "learner.lora_rank=8", *overrides)


# ---------------------------------------------------------------- refused before anything starts
def test_vllm_offers_the_ranks_the_config_allows():
    from vllm.config.lora import MaxLoRARanks

    assert typing.get_args(MaxLoRARanks) == VLLM_LORA_RANKS


@pytest.mark.parametrize(("overrides", "key", "says"), [
    (("team=tiny_hetero",), "team.agents[1].model", "one LoRA engine serves one base model"),
    (("+team.agents.1.learner.lora_rank=0",), "team.agents[1].learner.lora_rank", "trains an adapter"),
    (("learner.lora_rank=0",), "team.lora_engine", "no trainable agent trains LoRA"),
    (("learner.lora_rank=32", "engine.max_lora_rank=16"), "team.agents[0].engine.max_lora_rank", "must be >= 32"),
    (("engine.max_loras=1",), "team.agents[0].engine.max_loras", "must be >= 2"),
    (("team.shared_policy=true",), "team.lora_engine", "pick one of the two"),
    (("learner.colocate=true", "engine.num_gpus=0.5", "learner.num_gpus=0.5"), "team.agents[0].learner.colocate",
     "cannot sleep for one learner"),
    (("+team.agents.1.engine.replicas=2",), "team.agents[1].engine", "share its settings"),
    (("+team.agents.1.trainable=false", "+team.agents.1.adapter=/no/such/adapter"), "team.agents[1].adapter",
     "a peft adapter folder"),
    (("train.weight_sync=collective", "engine.num_gpus=1", "learner.num_gpus=1"), "train.weight_sync",
     "adapters move through the object store"),
])
def test_a_lora_engine_config_that_cannot_work_is_refused_naming_the_key(overrides, key, says):
    with pytest.raises(ConfigError, match=says) as error:
        lora_config(*overrides)
    assert error.value.key == key


def test_a_family_vllm_serves_no_adapters_for_is_refused(tmp_path, tiny_models):
    """A model folder that passes every other check (safetensors, a chat template) but whose architecture vLLM
    has no LoRA support for."""
    import shutil

    folder = tmp_path / "gpt2-like"
    shutil.copytree(tiny_models["tiny-qwen"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="vLLM serves no LoRA adapters for its architecture GPT2LMHeadModel") as error:
        lora_config(f"team.agents.0.model={folder}", f"team.agents.1.model={folder}")
    assert error.value.key == "team.agents[0].model"


# ---------------------------------------------------------------- real engines and learners
@pytest.fixture(scope="module")
def fixed_adapter(tiny_models, tmp_path_factory):
    """A peft adapter with random (non-zero) up-projections: a frozen agent plays it, unlike the base model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["tiny-qwen"], dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("fixed-adapter")
    model.save_pretrained(folder)
    return folder


class LoraRun(typing.NamedTuple):
    trainer: object
    metrics: list[dict[str, float]]
    out: object
    step3: object  # the rollout of step 3 (after the step-2 checkpoint), for the resume test
    directions: list[list]  # per trained agent, per step: what its update did to its sampled tokens' logprobs


@pytest.fixture(scope="module")
def lora_run(learner_pool, tiny_models, fixed_adapter, tmp_path_factory):
    """Four steps on one shared engine; the team outlives the trainer, whose learner groups the resume test's
    trainer takes over from the session's pool."""
    from mapoco.rollout.discussion import Team
    from mapoco.training.trainer import Trainer

    out = tmp_path_factory.mktemp("lora-run")
    cfg = compose_config(*LORA, f"+team.agents.3.adapter={fixed_adapter}")
    team = Team.of_run(cfg, colocate_learners=True, wait=False)
    trainer = Trainer(cfg, out, team=team, learners=learner_pool)
    metrics, step3 = [], None
    try:
        with contextlib.ExitStack() as watching:
            # One twin (its adapter's updates on the other kernels) stands for all: each is the same LoRA update.
            directions = [watching.enter_context(watch_updates(p.group, kernels_twin(trainer, p) if i == 0 else None))
                          for i, p in enumerate(trainer.policies)]
            for step in range(STEPS):
                if step == 2:
                    step3 = trainer.rollout(trainer.batch(2), 2)
                metrics.append(trainer.train_step())
                trainer.step += 1
                if trainer.step == 2:
                    trainer.save()
        yield LoraRun(trainer, metrics, out, step3, directions)
    finally:
        trainer.close()
        team.shutdown()


@pytest.mark.slow
def test_one_engine_holds_every_adapter_and_each_agent_samples_with_its_own(lora_run):
    """One engine for four agents; each trained agent's engine logprobs are its own learner's (within the float32
    tolerance), and clearly not another agent's or the base model's, so every request carried its adapter."""
    team, trainer = lora_run.trainer.team, lora_run.trainer
    assert len(team.distinct_engines()) == 1
    described = ray.get(team.agents[0].engines.actors[0].describe.remote())
    assert described["adapters"] == ["qwen_a", "qwen_b", "qwen_c", "qwen_d"]
    assert [p.seats for p in trainer.policies] == [[0], [1], [2]]
    for metrics in lora_run.metrics:
        for agent in range(3):
            assert metrics[f"train/agent_{agent}/logprob_max_diff"] < FLOAT32_GAP

    rows = [r for r in lora_run.step3.records.values()][:6]
    pairs = [(r.prompt_ids, r.token_ids) for r in rows]
    engines = team.agents[0].engines
    on_engine = {name: np.concatenate(engines.logprobs(pairs, name)[0])
                 for name in ["qwen_a", "qwen_b", "qwen_c", "qwen_d", None]}
    for policy, name in zip(trainer.policies, ["qwen_a", "qwen_b", "qwen_c"]):
        stats = policy.group.rollout_stats([Rollout(p, t, 0) for p, t in pairs])
        learner = np.concatenate([stats.logprobs[i, : len(t)].numpy() for i, (_, t) in enumerate(pairs)])
        own = np.abs(on_engine[name] - learner).max()
        assert own < FLOAT32_GAP, name
        others = [np.abs(on_engine[other] - learner).max() for other in on_engine if other != name]
        assert min(others) > 10 * max(own, 1e-5), (name, own, others)


@pytest.mark.slow
def test_a_batch_that_mixes_adapters_samples_what_each_agent_samples_alone(lora_run):
    """The turn's one batch (every agent's requests, each with its adapter and sampling) gives each agent the
    tokens it gets when its requests go alone."""
    from mapoco.rollout.discussion import generate_turn

    team = lora_run.trainer.team
    threads = {a.index: [[{"role": "user", "content": f"Calculate {a.index} + {q}."}] for q in range(3)]
               for a in team.agents}
    seeds = {a.index: [100 * a.index + q for q in range(3)] for a in team.agents}
    together = generate_turn(team, threads, seeds)
    for agent in team.agents:
        alone = agent.generate(threads[agent.index], seeds[agent.index])
        assert [g.token_ids for g in together[agent.index]] == [g.token_ids for g in alone], agent.cfg.name
    texts = {agent.index: [g.token_ids for g in together[agent.index]] for agent in team.agents}
    assert len({json.dumps(t) for t in texts.values()}) > 1  # the adapters answer differently


@pytest.mark.slow
@pytest.mark.kernels
def test_lora_agents_on_one_engine_learn(lora_run):
    """Every update of every adapter on the shared engine moves its agent's policy the way its advantages point, on
    the tokens the engine sampled, on this CPU's kernels and (the first agent's) on PyTorch's non-vectorized ones
    alike. (Accuracy after four updates on 32 questions is noise that other float32 kernels reorder: it fell on an
    AVX-512 machine.)"""
    for agent, updates in enumerate(lora_run.directions):
        assert len(updates) == STEPS
        for step, direction in enumerate(updates):
            direction.assert_follows_advantages(f"agent {agent}, step {step}")


@pytest.mark.slow
def test_checkpoints_hold_adapters_and_resume_reproduces_the_next_batch(lora_run, learner_pool, tiny_models):
    """The step-2 checkpoint keeps each trained agent's adapter (a peft folder) and what trains, not the base;
    a trainer resumed from it on the same engine samples step 3's exact tokens; serving loads the same adapters."""
    import shutil

    from safetensors.torch import load_file

    from mapoco.training import checkpoint
    from mapoco.training.trainer import Trainer

    step2 = checkpoint.complete_checkpoints(lora_run.out)[0]
    assert step2.name == "step_000002"
    for agent in range(3):
        folder = checkpoint.agent_dir(step2, agent)
        saved = load_file(str(folder / "model.safetensors"))
        assert saved and all("lora_" in k or k.startswith("value_head") for k in saved), sorted(saved)[:4]
        assert (folder / checkpoint.ADAPTER_DIR / "adapter_model.safetensors").is_file()
        assert json.loads((folder / checkpoint.ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 8
    base_bytes = (tiny_models["tiny-qwen"] / "model.safetensors").stat().st_size
    assert (checkpoint.agent_dir(step2, 0) / "model.safetensors").stat().st_size < base_bytes / 5

    resumed_dir = lora_run.out.parent / "lora-resumed"
    shutil.copytree(lora_run.out / "checkpoints" / "step_000002", resumed_dir / "checkpoints" / "step_000002")
    cfg = compose_config(*LORA, f"+team.agents.3.adapter={lora_run.trainer.cfg.team.agents[3].adapter}",
                         "train.resume=auto")
    team = lora_run.trainer.team
    lora_run.trainer.close()  # its learner groups go back to the pool: the resumed trainer's, reset from the files
    resumed = Trainer(cfg, resumed_dir, team=team, learners=learner_pool)
    try:
        assert resumed.step == 2
        again = resumed.rollout(resumed.batch(2), 2)
        assert {k: r.token_ids for k, r in again.records.items()} == \
               {k: r.token_ids for k, r in lora_run.step3.records.items()}
    finally:
        resumed.close()

    # `mapoco serve`'s loading: the checkpoint's peft folders onto the engine give what the resumed learners sent.
    from mapoco.serving.restore import check_checkpoint, push_checkpoint

    rows = [(r.prompt_ids, r.token_ids) for r in list(lora_run.step3.records.values())[:4]]
    engines = team.agents[0].engines
    sent = {name: engines.logprobs(rows, name) for name in ("qwen_a", "qwen_b", "qwen_c")}
    ray.get(engines.actors[0].reset_prefix_cache.remote())
    check_checkpoint(cfg, step2)
    push_checkpoint(team, cfg, step2)
    for name, scores in sent.items():
        assert engines.logprobs(rows, name) == scores, name
    shutil.rmtree(checkpoint.agent_dir(resumed_dir / "checkpoints" / "step_000002", 1) / checkpoint.ADAPTER_DIR)
    with pytest.raises(ConfigError, match="adapter is missing"):
        check_checkpoint(cfg, resumed_dir / "checkpoints" / "step_000002")


@pytest.mark.slow
def test_a_killed_shared_engine_restarts_with_every_agents_adapter(lora_run):
    """The one engine dies: its restart loads all four adapters back, and each agent answers as before."""
    team = lora_run.trainer.team
    engines = team.agents[0].engines
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    prompts = [team.agents[0].render([{"role": "user", "content": f"Calculate {q} + 4."}]) for q in range(2)]
    names = ["qwen_a", "qwen_b", "qwen_c", "qwen_d", None]

    def answers():
        return {n: [g.token_ids for g in engines.generate(prompts, greedy, [0, 0], [n, n])] for n in names}

    before, restarts = answers(), engines.restarts
    ray.kill(engines.actors[0])
    after = answers()
    assert engines.restarts == restarts + 1
    assert ray.get(engines.actors[0].describe.remote())["adapters"] == ["qwen_a", "qwen_b", "qwen_c", "qwen_d"]
    assert after == before

"""Checks of training: the algorithm, the loop, the weight sync, the verifier and the rewards."""

from __future__ import annotations

from pathlib import Path

from mapoco.config.checks import (
    require,
    require_model,
    require_name,
    require_weights_folder,
)
from mapoco.config.derived import gpu_sharing
from mapoco.config.schema import (
    ESTIMATORS,
    INCENTIVE_MODES,
    KL_ESTIMATORS,
    LOGPROB_BREACH_ACTIONS,
    VERIFIER_KINDS,
    WEIGHT_SYNCS,
    RewardConfig,
    RunConfig,
)


def validate_training(cfg: RunConfig) -> None:
    algo, train = cfg.algorithm, cfg.train
    require(algo.estimator in ESTIMATORS, "algorithm.estimator", algo.estimator, f"one of {', '.join(ESTIMATORS)}")
    require(algo.samples_per_question >= 1, "algorithm.samples_per_question", algo.samples_per_question,
            "must be >= 1")
    require(algo.estimator not in ("grpo", "rloo") or algo.samples_per_question >= 2,
            "algorithm.samples_per_question", algo.samples_per_question,
            f"{algo.estimator} baselines compare samples of the same question: use >= 2")
    for name in ("gamma", "lam"):
        require(0 <= getattr(algo, name) <= 1, f"algorithm.{name}", getattr(algo, name), "must be in [0, 1]")
    for name in ("kl_coef", "vf_coef", "entropy_coef"):
        require(getattr(algo, name) >= 0, f"algorithm.{name}", getattr(algo, name), "must be >= 0")
    require(algo.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator", algo.kl_estimator,
            f"one of {', '.join(KL_ESTIMATORS)}")
    require(algo.kl_in_reward or algo.kl_coef == 0 or algo.kl_estimator != "k1", "algorithm.kl_estimator",
            algo.kl_estimator, "k2 or k3 when algorithm.kl_in_reward=false: k1's gradient in the loss is zero in "
                               "expectation, so it would not pull towards the reference")
    require(algo.ppo_epochs >= 1, "algorithm.ppo_epochs", algo.ppo_epochs, "must be >= 1")
    require(algo.mini_batches >= 1, "algorithm.mini_batches", algo.mini_batches, "must be >= 1")
    require(0 < algo.clip_eps < 1, "algorithm.clip_eps", algo.clip_eps,
            "must be in (0, 1): the ratio is clipped to [1 - clip_eps, 1 + clip_eps]")
    require(algo.value_clip_eps > 0, "algorithm.value_clip_eps", algo.value_clip_eps, "must be > 0")
    require(train.steps >= 1, "train.steps", train.steps, "must be >= 1")
    require(train.batch_questions >= 1, "train.batch_questions", train.batch_questions, "must be >= 1")
    for name in ("eval_every", "save_every"):
        require(getattr(train, name) >= 0, f"train.{name}", getattr(train, name), "must be >= 0 (0: never)")
    require(train.eval_limit >= 1, "train.eval_limit", train.eval_limit, "must be >= 1")
    require(train.keep_checkpoints >= 1, "train.keep_checkpoints", train.keep_checkpoints, "must be >= 1")
    require(train.resume in (None, "auto") or Path(train.resume).is_dir(), "train.resume", train.resume,
            "no such checkpoint directory (use auto, or a step_<n> folder)")
    require(train.init_from is None or Path(train.init_from).expanduser().is_dir(), "train.init_from", train.init_from,
            "no such directory: a trained run's directory (its latest complete checkpoint) or one of its step_N "
            "folders")
    require(train.weight_sync in WEIGHT_SYNCS, "train.weight_sync", train.weight_sync,
            f"one of {', '.join(WEIGHT_SYNCS)}")
    require(train.sync_timeout_s > 0, "train.sync_timeout_s", train.sync_timeout_s, "seconds, > 0")
    if train.weight_sync == "collective":
        _validate_collective(cfg)
    require(train.weight_sync != "collective" or not cfg.team.lora_engine, "train.weight_sync", train.weight_sync,
            "auto or object_store with team.lora_engine: adapters move through the object store")
    require(train.logprob_tolerance is None or train.logprob_tolerance > 0, "train.logprob_tolerance",
            train.logprob_tolerance, "must be > 0, or null for the dtypes' own (mapoco.runtime.precision)")
    require(train.logprob_breach_steps >= 1, "train.logprob_breach_steps", train.logprob_breach_steps,
            "an integer >= 1 (steps in a row above train.logprob_tolerance before acting)")
    require(train.on_logprob_breach in LOGPROB_BREACH_ACTIONS, "train.on_logprob_breach", train.on_logprob_breach,
            f"one of {', '.join(LOGPROB_BREACH_ACTIONS)}")
    require(train.off_policy_steps in (0, 1), "train.off_policy_steps", train.off_policy_steps,
            "0 (on-policy) or 1 (the next rollout overlaps this update; one rollout in flight already keeps the "
            "engines busy, so a deeper pipeline adds staleness, not speed)")
    require(train.is_weight_cap >= 1, "train.is_weight_cap", train.is_weight_cap,
            "must be >= 1 (a cap below 1 would down-weight on-policy tokens too)")
    colocated = [i for i, a in enumerate(cfg.team.agents) if a.trainable and a.learner.colocate]
    require(not train.off_policy_steps or not colocated, "train.off_policy_steps", train.off_policy_steps,
            f"0 with colocated learners (team.agents{colocated}.learner.colocate): their engines sleep while the "
            "learner updates, so no rollout can overlap the update")
    models = {a.model for a in cfg.team.agents}
    require(not cfg.team.shared_policy or len(models) == 1, "team.shared_policy", True,
            f"one policy for every seat needs one model, got {sorted(models)}")
    seats = len(cfg.team.agents) if cfg.team.shared_policy else 1
    rows = train.batch_questions * algo.samples_per_question * cfg.turns * seats
    for i, agent in enumerate(cfg.team.agents):
        n = agent.learner.num_learners
        require(rows % n == 0, f"team.agents[{i}].learner.num_learners", n,
                f"must divide the {rows} answers per step (train.batch_questions x "
                f"algorithm.samples_per_question x turns{' x agents' if seats > 1 else ''})")


def _validate_collective(cfg: RunConfig) -> None:
    """A broadcast group joins learner rank 0 and the engine workers on one kind of device, each member on a device
    of its own where that is a GPU."""
    for i, agent in enumerate(cfg.team.agents):
        if not agent.trainable:
            continue
        learner, engine = agent.learner, agent.engine
        require((learner.num_gpus > 0) == (engine.num_gpus > 0), "train.weight_sync", "collective",
                f"team.agents[{i}]'s learner and engines must both be on GPUs (NCCL) or both on CPUs (gloo), got "
                f"learner.num_gpus={learner.num_gpus:g} and engine.num_gpus={engine.num_gpus:g}; auto picks "
                "object_store for such an agent")
        shared = gpu_sharing(learner, engine)
        require(shared is None, "train.weight_sync", "collective",
                f"team.agents[{i}]: {shared}, and NCCL refuses two members of its group on one GPU; auto moves "
                "such an agent's weights through the object store")


def validate_verifier(cfg: RunConfig) -> None:
    ver = cfg.verifier
    require(ver.kind in VERIFIER_KINDS, "verifier.kind", ver.kind, f"one of {VERIFIER_KINDS}")
    require(cfg.command == "train-verifier" or ver.kind != "learned" or bool(ver.path), "verifier.path", ver.path,
            "a learned verifier needs a checkpoint path (train one with `mapoco train-verifier`)")
    if cfg.command != "train-verifier" and ver.kind == "learned":
        require_weights_folder("verifier.path", ver.path)
    require(ver.timeout_s > 0, "verifier.timeout_s", ver.timeout_s, "must be > 0")
    require(ver.workers >= 1, "verifier.workers", ver.workers, "an integer >= 1")
    require(ver.batch_size >= 1, "verifier.batch_size", ver.batch_size, "must be >= 1")
    require(ver.num_cpus > 0, "verifier.num_cpus", ver.num_cpus, "must be > 0: the verifier actor reserves CPUs")
    require_name("verifier.base", ver.base, "a model (name, folder or hub id), or null for the first agent's")
    if cfg.command == "train-verifier" and ver.base is not None:
        require_model("verifier.base", ver.base)
    require(ver.epochs >= 1, "verifier.epochs", ver.epochs, "must be >= 1")
    require(ver.lr > 0, "verifier.lr", ver.lr, "must be > 0")
    require(ver.train_batch_size >= 1, "verifier.train_batch_size", ver.train_batch_size, "an integer >= 1")
    require(0 < ver.held_out < 1, "verifier.held_out", ver.held_out, "must be in (0, 1)")


def validate_rewards(rewards: RewardConfig) -> None:
    require(0 <= rewards.gamma <= 1, "rewards.gamma", rewards.gamma, "must be in [0, 1] (a discount factor)")
    require(rewards.incentives in INCENTIVE_MODES, "rewards.incentives", rewards.incentives,
            f"one of {INCENTIVE_MODES}")
    for name in ("alpha0", "alpha1", "beta0", "beta1"):
        value = getattr(rewards, name)
        require(value >= 0, f"rewards.{name}", value, "must be >= 0 (signs come from rewards.incentives)")

"""`mapoco train`: the controller of multi-agent PPO co-training, one loop for every method (``method.Method``:
MAPoRL's discussion, or the Conductor). One step, top to bottom:

rollout (the method's, verifier inside) -> rewards -> each policy's batch -> advantages -> update -> weight sync ->
eval / checkpoint.

Each trained policy has its own learner group and pushes its weights to its own engines. With
``team.shared_policy`` one policy plays every seat; untrainable agents stay frozen partners. The policies learn
at once (``train.concurrent_policies``): each one's scoring, update and sync run in a driver thread of its own, so a
step's learning costs the slowest agent, not the sum of them.

With ``train.off_policy_steps=1`` the next step's rollout runs while this step updates: the engines sample with the
weights of one update ago, the loss corrects for it with truncated importance weights (``train.is_weight_cap``),
and the weights reach the engines once that rollout has ended, never mid-request.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray

from mapoco.config import ConfigError, RunConfig
from mapoco.models.registry import node_source
from mapoco.rollout.discussion import Team
from mapoco.rollout.engine import ReplicaLost, request_seed
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.cluster import check_local_gpus, init_ray
from mapoco.runtime.precision import agent_precision
from mapoco.runtime.run_folder import prepare_output_dir, write_json
from mapoco.tasks import Problem, load_task
from mapoco.training import checkpoint
from mapoco.training.algorithms import (
    kl_penalty,
    masked_mean,
    truncated_is_weights,
)
from mapoco.training.batch import AgentBatch, stack
from mapoco.training.discussion_method import DiscussionMethod
from mapoco.training.learner_group import LearnerGroup, LearnerPool
from mapoco.training.method import MethodClass, RolloutResult
from mapoco.training.policy import Policy
from mapoco.training.state_io import load_state, save_state
from mapoco.training.sweep_actors import SweepActors
from mapoco.training.sync_guard import Probe, SyncGuard, gap_over_tolerance, probe
from mapoco.training.tracking import Tracker
from mapoco.training.update import advantages_of, token_targets
from mapoco.weights.adapters import AdapterSync
from mapoco.weights.factory import make_sync
from mapoco.weights.sync import SyncFailed


class TrainingInterrupted(RuntimeError):
    """A learner actor died: the run stops, and ``train.resume=auto`` continues from the last checkpoint."""


PENDING_ROLLOUT = "pending_rollout"  # in a checkpoint: the next step's rollout, sampled off-policy

# What stops a run with the resume message: a dead actor (a learner rank, or a replica that died again), weights
# lost with the node that held them, a replica that found no node to restart on, a weight sync that kept failing.
FAULTS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ReplicaLost, SyncFailed)


@dataclass
class Sampled:
    """A finished rollout and the weights its engines sampled with: ``version`` updates in."""

    result: RolloutResult  # the method's: a DiscussionResult, or the Conductor's ConductorResult
    version: int


def training_pool(cfg: RunConfig) -> list[Problem]:
    """Training questions (the task's train split) in a fixed, seeded order.

    Dataset splits (GSM8K, ANLI) are disjoint from the test split. Generated arithmetic draws its splits from
    different seeds over the same space: with one-digit operands that space is small (~200 problems), so
    evaluation measures how well the task is learnt rather than generalisation to unseen questions.
    """
    size = cfg.train.steps * cfg.train.batch_questions
    task = dataclasses.replace(cfg.task, limit=size if cfg.task.name == "arithmetic" else None)
    pool = load_task(task, split="train").problems
    order = np.random.default_rng(cfg.seed).permutation(len(pool))
    return [pool[i] for i in order]


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, team: Team | None = None, learners: LearnerPool | None = None,
                 sweep: SweepActors | None = None, method: MethodClass = DiscussionMethod):
        """``method``: what the loop trains (MAPoRL's discussion, or the Conductor's ``ConductorMethod``).
        ``team``: already running engines to train (tests share them); by default the trainer starts its own.
        ``learners``: a pool to take learner groups from and give them back to at ``close`` (tests share one).
        ``sweep``: a multirun's actors, taken over where this run's are made the same way."""
        self.cfg, self.out, self.learners = cfg, out, learners or (sweep.learners if sweep else None)
        # Everything that can be wrong with the inputs fails here, before any actor starts.
        self.resume_from = checkpoint.resolve_resume(cfg.train.resume, out)
        self.init_from = None if self.resume_from or not cfg.train.init_from else self._phase_start(cfg)
        prepare_output_dir(out)
        check_local_gpus(cfg)  # seconds, where the data may take minutes to fetch
        self.eval_problems = load_task(dataclasses.replace(cfg.task, limit=cfg.train.eval_limit)).problems
        self.pool = training_pool(cfg)
        init_ray(cfg)
        self.owns_team, self.closed = team is None and sweep is None, False
        # Engines, verifier and learners load at once (an engine's vLLM start-up is the longest); all are up after.
        self.team = team or (sweep.team_for(cfg) if sweep else Team.of_run(cfg, colocate_learners=True, wait=False))
        self.verifier = VerifierClient(cfg.verifier)
        self.method = method(cfg, out, self.team, self.verifier, self.eval_problems)
        self.policies = self._start_learners()
        self.step = 0
        self.pending: Sampled | None = None  # off-policy: the next step's rollout, sampled during this step's update
        self.sync_guard = SyncGuard(cfg.train)
        self.write_placement()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif self.init_from is not None:
            self._initialize(self.init_from)
        else:
            self.sync_weights()  # engines serve exactly the learners' weights from the first rollout on
        self.tracker = Tracker(cfg, out, resumed_at=self.step if self.resume_from is not None else None)

    def _start_learners(self) -> list[Policy]:
        """A learner group per trained policy, settings from this run's config (the engines may be shared). The
        groups load while the team's engines do; a start-up that fails takes down what this trainer started."""
        seats_of = self.cfg.team.policy_seats()
        groups: dict[int, LearnerGroup] = {}
        try:
            for owner in seats_of:
                groups[owner] = self._start_group(owner)
            self.team.wait_ready()
            for group in groups.values():
                group.wait_ready()
        except BaseException:
            for group in groups.values():
                group.shutdown()
            self.method.close()
            if self.owns_team:
                self.team.shutdown()
            self.verifier.shutdown()
            raise
        policies = []
        for owner, group in groups.items():
            agent = self.team.agents[owner]
            precision = agent_precision(self.cfg.team.agents[owner], self.cfg.train.logprob_tolerance)
            if owner in self.cfg.team.lora_seats():  # only its adapter moves, onto the shared LoRA engine
                sync = AdapterSync(group, agent, precision.engine)
            else:
                sync = make_sync(self.cfg.train.weight_sync, group, agent.engines, precision.engine,
                                 self.cfg.train.sync_timeout_s, f"agent_{owner}")
            policies.append(Policy(seats_of[owner], group, sync, precision))
        return policies

    def learner_args(self, owner: int) -> tuple:
        """What the learner group of the policy ``owner`` plays is built from: model, settings, algorithm, value
        heads, seed and the config key it is named by."""
        model = node_source(self.cfg.team.agents[owner].model, self.team.agents[owner].model_path)
        return (model, self.cfg.team.agents[owner].learner, self.cfg.algorithm,
                self.method.value_turns(), self.cfg.seed + owner, f"team.agents[{owner}].learner")

    def _start_group(self, owner: int) -> LearnerGroup:
        engines = self.team.agents[owner].engines
        args = self.learner_args(owner)
        if engines.sleep_mode:  # colocated: the ranks live in the engines' bundles
            return LearnerGroup(*args, placement=engines.placement)
        if self.learners is not None:
            return self.learners.take(*args, placement_timeout_s=self.cfg.cluster.placement_timeout_s)
        return LearnerGroup(*args, placement_timeout_s=self.cfg.cluster.placement_timeout_s)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps``. A dead learner, or an engine replica that cannot restart (its node lost and no
        other can hold it), stops the run with the message that says how to resume."""
        try:
            return self._fit()
        except FAULTS as exc:
            raise TrainingInterrupted(self._interruption(exc)) from exc
        except checkpoint.CheckpointError as exc:  # a learner lost mid-save: the partial folder is already gone
            if isinstance(exc.__cause__, FAULTS):
                raise TrainingInterrupted(self._interruption(exc.__cause__)) from exc
            raise

    def _fit(self) -> dict[str, Any]:
        before = self.evaluate("before") if self.step == 0 else None
        if before is not None:
            self.tracker.log(self.method.eval_metrics(before), 0)
        while self.step < self.cfg.train.steps:
            metrics = self.train_step()
            self.step += 1
            if metrics.get("faults/engine_restarts"):  # a replica moved: say where it runs now
                self.write_placement()
            if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
                metrics.update(self.method.eval_metrics(self.evaluate(f"step_{self.step}")))
            self.tracker.log(metrics, self.step)
            print(self._progress(metrics), flush=True)
            self.sync_guard.check(self.policies, metrics, self.step, self._last_checkpoint())
            if self.cfg.train.save_every and (self.step % self.cfg.train.save_every == 0
                                              or self.step == self.cfg.train.steps):
                self.save()
        after = self.evaluate("after")
        self.tracker.log(self.method.eval_metrics(after), self.step)
        return self._write_summary(before, after)

    def train_step(self) -> dict[str, float]:
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        sampled, self.pending = self.pending or self.sample(self.step), None
        result, staleness = sampled.result, self.step - sampled.version
        timings["rollout"], timings["verify"] = result.seconds["generate"], result.seconds["verify"]
        rewards = self.method.rewards(result)
        batches = self.agent_batches(result, rewards)
        probes: dict[str, Probe | None] = {}
        if staleness:  # before the next rollout takes the engines
            start = time.perf_counter()
            probes = dict(zip([p.name for p in self.policies], self.for_each_policy(
                lambda policy: probe(self.team.agents[policy.seats[0]], batches[policy.name]))))
            timings["probe"] = time.perf_counter() - start
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout") as ahead:
            upcoming = ahead.submit(self.sample, self.step + 1) if self._samples_ahead() else None
            start = time.perf_counter()
            learned = self.for_each_policy(lambda policy: self.learn(policy, batches[policy.name], staleness,
                                                                     probes.get(policy.name)))
            timings["update"] = time.perf_counter() - start  # scoring, advantages and update of every policy
            if upcoming is not None:  # weights move only between rollouts: wait for the one in flight
                start = time.perf_counter()
                self.pending = upcoming.result()
                timings["rollout_wait"] = time.perf_counter() - start
        timings["advantages"] = max((m.pop("advantages_s", 0.0) for m in learned), default=0.0)
        metrics = {k: v for m in learned for k, v in m.items()}
        start = time.perf_counter()
        self.sync_weights()
        timings["sync"] = time.perf_counter() - start
        timings["step"] = time.perf_counter() - step_start
        metrics.update({f"timing/{k}": v for k, v in timings.items()})
        metrics["rollout/staleness"] = float(staleness)
        metrics.update(self._rollout_metrics(result, rewards))
        self.tracker.table(*self.method.samples(result, self.step), self.step + 1)
        return metrics

    def _samples_ahead(self) -> bool:
        """Off-policy: the next step's rollout starts now, with the engines' current weights."""
        return self.cfg.train.off_policy_steps > 0 and self.step + 1 < self.cfg.train.steps

    def sample(self, step: int) -> Sampled:
        # Every sampling starts at the top of a step, when the engines hold that step's weights (synced at the end of
        # the one before, or on restore): ``self.step`` updates in, read before the rollout.
        version = self.step
        return Sampled(self.rollout(self.batch(step), step), version)

    def batch(self, step: int) -> list[Problem]:
        """The questions of ``step``: a pure function of the step (the data position), so a resumed run draws
        exactly the batch the uninterrupted run would have."""
        n = self.cfg.train.batch_questions
        return [self.pool[(step * n + i) % len(self.pool)] for i in range(n)]

    def rollout(self, problems: list[Problem], step: int) -> RolloutResult:
        return self.method.rollout(problems, self.step_seed(step))

    def step_seed(self, step: int) -> int:
        return request_seed(self.cfg.seed, "step", step)

    def agent_batches(self, result: RolloutResult, rewards: np.ndarray) -> dict[str, AgentBatch]:
        return self.method.batches(result, rewards, {policy.name: policy.seats for policy in self.policies})

    def for_each_policy(self, work) -> list:
        """``work(policy)`` for every policy: together, each in a thread of its own (the groups run on their own
        actors; the driver only waits), or one after another with ``train.concurrent_policies=false``. The first
        error, in policy order, is raised once every policy's work has ended."""
        if not self.cfg.train.concurrent_policies or len(self.policies) == 1:
            return [work(policy) for policy in self.policies]
        with ThreadPoolExecutor(max_workers=len(self.policies), thread_name_prefix="policy") as pool:
            futures = [pool.submit(work, policy) for policy in self.policies]
        return [future.result() for future in futures]

    def learn(self, policy: Policy, batch: AgentBatch, staleness: int = 0,
              probe: Probe | None = None) -> dict[str, float]:
        with policy.sync.updating():  # colocated engines sleep through it
            return self.update_policy(policy, batch, staleness, probe)

    def update_policy(self, policy: Policy, batch: AgentBatch, staleness: int = 0,
                      probe: Probe | None = None) -> dict[str, float]:
        """Score, advantages and update on ``batch``, sampled ``staleness`` updates ago. A stale batch's tokens are
        reweighted towards the learner's current policy (truncated importance sampling); its gap to the sampling
        logprobs is then the policy's own change (``policy_lag_max_diff``), and the sync is checked on ``probe``."""
        prefix = f"train/{policy.name}"
        if not batch.rows:
            return {f"{prefix}/skipped_update": 1.0}
        start = time.perf_counter()
        stats = policy.group.rollout_stats(batch.rows)
        advantages, returns, mask = advantages_of(batch, stats, self.cfg.algorithm)
        advantages_s = time.perf_counter() - start
        start = time.perf_counter()
        behaviour = stack(batch.engine_logprobs, mask.size(1))
        targets = token_targets(stats, advantages, returns)
        if staleness:
            targets.is_weights = truncated_is_weights(stats.logprobs, behaviour, mask, self.cfg.train.is_weight_cap)
        update = policy.group.update(batch.rows, targets, normalizer=float(mask.sum()), step=self.step)
        kl = masked_mean(kl_penalty(stats.logprobs, stats.ref_logprobs, self.cfg.algorithm.kl_estimator), mask)
        lag = float(((stats.logprobs - behaviour).abs() * mask).max())  # sampling engines vs learner, sampled tokens
        metrics = {f"{prefix}/{k}": v for k, v in update.items()}
        if not staleness:  # engines and learners held the same weights: the gap is the sync's
            metrics[f"{prefix}/logprob_max_diff"] = lag
        else:
            metrics[f"{prefix}/policy_lag_max_diff"] = lag
            if probe is not None:
                metrics[f"{prefix}/logprob_max_diff"] = probe.gap(stats.logprobs, mask)
        metrics.update({
            f"{prefix}/reward": float(np.mean(batch.rewards)),
            f"{prefix}/kl": float(kl),
            f"{prefix}/logprob_tolerance": policy.precision.logprob_tolerance,
            f"{prefix}/lr": policy.group.call_all("learning_rate")[0],
            f"{prefix}/update_s": time.perf_counter() - start,
            "advantages_s": advantages_s,
        })
        if self.cfg.train.off_policy_steps:
            weights = mask if targets.is_weights is None else targets.is_weights  # on-policy tokens weigh 1
            metrics.update({f"{prefix}/is_weight_mean": float(masked_mean(weights, mask)),
                            f"{prefix}/is_weight_capped": float(masked_mean(
                                (weights >= self.cfg.train.is_weight_cap).float(), mask))})
        return metrics

    def sync_weights(self) -> None:
        """Every policy's new weights reach its own engines before the next rollout (all policies at once)."""
        self.for_each_policy(lambda policy: policy.sync.push())

    def write_placement(self) -> None:
        """placement.json: the node (id, IP) of every engine replica and learner rank, and where each learner group
        met; rewritten when an engine replica restarts elsewhere."""
        where: dict[str, list[dict[str, Any]]] = {}
        for index, engines in self.team.engine_owners().items():
            where[f"team.agents[{index}].engine"] = engines.call_all("where")
        for policy in self.policies:
            where[f"team.agents[{policy.seats[0]}].learner"] = policy.group.call_all("where")
        write_json(self.out / "placement.json", where)

    # ------------------------------------------------------------------ evaluation, logging, checkpoints
    def evaluate(self, label: str) -> dict[str, Any]:
        return self.method.evaluate(label)

    def _interruption(self, exc: BaseException) -> str:
        what = str(exc) if isinstance(exc, ReplicaLost) else f"an actor died ({type(exc).__name__})"
        return f"{what} at step {self.step + 1}; {self._last_checkpoint()}: run the same command with " \
               "train.resume=auto to continue from it"

    def _last_checkpoint(self) -> str:
        found = checkpoint.complete_checkpoints(self.out)
        return f"the last complete checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def _progress(self, metrics: dict[str, float]) -> str:
        """One line per step, readable in `ray job logs`: the method's figures, the step's time, and any policy
        whose engines and learners drift apart."""
        drifting = "".join(f"  {p.name}: engine-vs-learner logprob gap {gap:.3g} > {p.precision.logprob_tolerance:g}"
                           f" ({p.precision.engine} engines, {p.precision.learner} learners)"
                           for p in self.policies if (gap := gap_over_tolerance(p, metrics)) is not None)
        figures = self.method.progress(metrics, [p.name for p in self.policies])
        return f"step {self.step}/{self.cfg.train.steps}  {figures}  {metrics['timing/step']:.1f}s{drifting}"

    def _rollout_metrics(self, result: RolloutResult, rewards: np.ndarray) -> dict[str, float]:
        """The method's figures of the rollout, and the faults the run has come through so far."""
        restarts = self.team.engine_restarts()
        return {**self.method.rollout_metrics(result, rewards),
                "faults/verifier_restarts": self.verifier.actor_restarts,
                **{f"faults/agent_{i}/engine_restarts": n for i, n in restarts.items()},
                "faults/engine_restarts": sum(restarts.values())}

    def _write_summary(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
        summary = self.method.summary(before, after, self.step)
        write_json(self.out / "summary.json", summary)
        return summary

    def save(self) -> Path:
        """Every policy's learner state, the controller's position and, off-policy, the rollout already sampled
        for the next step (its weights are gone after this step's sync, so a resumed run could not redraw it)."""
        def write_parts(folder: Path) -> None:
            for policy in self.policies:
                directory = checkpoint.agent_dir(folder, policy.seats[0])
                directory.mkdir()
                policy.group.call_all("save_checkpoint", str(directory))
            if self.pending is not None:
                save_state(self.pending, folder / PENDING_ROLLOUT)

        state = {"step": self.step, "seed": self.cfg.seed,
                 "data_position": self.step * self.cfg.train.batch_questions}
        return checkpoint.write(self.out, self.step, state, self.cfg.train.keep_checkpoints, write_parts)

    @staticmethod
    def _phase_start(cfg: RunConfig) -> Path:
        """``train.init_from``'s checkpoint, which must hold every policy this run trains (checked before any actor
        starts; that its weights fit the run's models is the learners' load)."""
        path, _ = checkpoint.find(cfg.train.init_from, "train.init_from")
        for seats in cfg.team.policy_seats().values():
            if not (folder := checkpoint.agent_dir(path, seats[0])).is_dir():
                raise ConfigError("train.init_from", cfg.train.init_from, f"{path} holds no weights for "
                                  f"team.agents[{seats[0]}] (no {folder.name}/): its run trained a different team")
        return path

    def _initialize(self, path: Path) -> None:
        """A new phase: every policy starts from ``path``'s weights, with a fresh optimizer at step 0."""
        for policy in self.policies:
            policy.group.call_all("load_checkpoint", str(checkpoint.agent_dir(path, policy.seats[0])), True)
        self.sync_weights()
        print(f"initialized from {path}")

    def _restore(self, path: Path) -> None:
        state = checkpoint.read_state(path)
        for policy in self.policies:
            policy.group.call_all("load_checkpoint", str(checkpoint.agent_dir(path, policy.seats[0])))
        self.sync_weights()
        self.step = int(state["step"])
        if (path / PENDING_ROLLOUT).with_suffix(".json").exists():
            self.pending = load_state(path / PENDING_ROLLOUT)
        print(f"resumed from {path} at step {self.step}")

    def close(self) -> None:
        """Releases the learners (to the pool, if any), the owned team and the verifier; once."""
        if self.closed:
            return
        self.closed = True
        self.method.close()
        self.tracker.finish()
        for policy in self.policies:
            policy.sync.shutdown()
            if self.learners is not None and policy.group.owns_placement:
                self.learners.give_back(policy.group)
            else:
                policy.group.shutdown()
        if self.owns_team:
            self.team.shutdown()
        self.verifier.shutdown()


def train(cfg: RunConfig, out: Path, method: MethodClass = DiscussionMethod,
          sweep: SweepActors | None = None) -> dict[str, Any]:
    """Fit ``method`` and always release the actors (a multirun's to ``sweep``)."""
    trainer = Trainer(cfg, out, sweep=sweep, method=method)
    try:
        return trainer.fit()
    finally:
        trainer.close()

"""`mapoco train`: the controller of multi-agent PPO co-training. One step, top to bottom:

rollout (discussions, verifier inside) -> MAPoRL rewards -> advantages -> update -> weight sync -> eval / checkpoint.

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
import torch

from mapoco.config import RunConfig
from mapoco.evaluation.evaluate import discuss_in_batches
from mapoco.evaluation.report import (
    plot_turns,
    prepare_output_dir,
    summarize,
    turn_table,
    write_json,
)
from mapoco.models.registry import node_source
from mapoco.rollout.discussion import DiscussionResult, Team, run_discussion
from mapoco.rollout.engine import ReplicaLost, request_seed
from mapoco.rollout.rewards import team_rewards
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.cluster import check_local_gpus, init_ray
from mapoco.runtime.precision import AgentPrecision, agent_precision
from mapoco.tasks import Problem, load_task
from mapoco.training import checkpoint
from mapoco.training.algorithms import (
    AdvantageBatch,
    AdvantageConfig,
    compute_advantages,
    kl_penalty,
    masked_mean,
    truncated_is_weights,
)
from mapoco.training.batch import Rollout, RolloutStats
from mapoco.training.learner_group import LearnerGroup, LearnerPool
from mapoco.training.state_io import load_state, save_state
from mapoco.training.tracking import Tracker
from mapoco.training.weight_sync import AdapterSync, SyncFailed, WeightSync, make_sync


class TrainingInterrupted(RuntimeError):
    """A learner actor died: the run stops, and ``train.resume=auto`` continues from the last checkpoint."""


class EnginesOutOfSync(RuntimeError):
    """An agent's engines sampled with other weights than its learners hold, ``train.logprob_breach_steps`` steps
    in a row: its updates would be off-policy by an unknown amount."""


PENDING_ROLLOUT = "pending_rollout"  # in a checkpoint: the next step's rollout, sampled off-policy
PROBE_ROWS = 4  # rows of a stale batch its engines score again to check the sync

# What stops a run with the resume message: a dead actor (a learner rank, or a replica that died again), weights
# lost with the node that held them, a replica that found no node to restart on, a weight sync that kept failing.
FAULTS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ReplicaLost, SyncFailed)


@dataclass
class Policy:
    """One trained policy: the seats it plays, its learner group and the channel to its own engines."""

    seats: list[int]
    group: LearnerGroup
    sync: WeightSync
    precision: AgentPrecision  # its engines' and learners' dtypes, and the logprob gap they allow

    @property
    def name(self) -> str:
        return f"agent_{self.seats[0]}"


@dataclass
class Sampled:
    """A finished rollout and the weights its engines sampled with: ``version`` updates in."""

    result: Any  # a DiscussionResult, or the Conductor's ConductorResult
    version: int


@dataclass
class Probe:
    """Rows ``index`` of a stale batch as every engine replica of its policy scores them now."""

    index: list[int]
    replicas: list[list[list[float]]]  # per replica, per row: the response tokens' logprobs

    def gap(self, learner_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
        """The largest engine-vs-learner logprob gap on these rows, over every replica."""
        learner, rows = learner_logprobs[self.index], mask[self.index]
        return max(float(((learner - stack(scores, rows.size(1))).abs() * rows).max()) for scores in self.replicas)


@dataclass
class AgentBatch:
    rows: list[Rollout]
    keys: list[tuple[str, int, int]]  # (question id, seat, turn): group baselines are keyed by ids, not positions
    rewards: list[float]
    engine_logprobs: list[list[float]]


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


def with_samples(problems: list[Problem], samples: int) -> list[Problem]:
    """Each question ``samples`` times, ids ``<id>#<s>``: group baselines key on the part before '#'."""
    return [dataclasses.replace(p, id=f"{p.id}#{s}") for p in problems for s in range(samples)]


def stack(lists: list[list[float]], width: int) -> torch.Tensor:
    """Per-row token lists (the engines' sampling logprobs) as one zero-padded ``[rows, width]`` tensor."""
    out = torch.zeros((len(lists), width), dtype=torch.float32)
    for i, values in enumerate(lists):
        out[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


class SweepActors:
    """The engines and learner groups of a multirun's jobs, kept in this process from one job to the next. A job
    whose engines would be made the same way (``engines_key``) takes over the last job's; its learner groups come
    from a pool, rebuilt from the model's files with the job's settings. Every job's first weight sync puts its own
    learners' weights into the engines and each request carries its own seed, so a job samples what it would on
    fresh engines: only the start-ups (vLLM's above all) are saved."""

    def __init__(self) -> None:
        self.team: Team | None = None
        self.key: str | None = None
        self.learners = LearnerPool(per_shape=1, one_shape_per_model=True)

    def team_for(self, cfg: RunConfig) -> Team:
        key = engines_key(cfg)
        if self.team is not None and key != self.key:
            self.team.shutdown()
            self.team = None
        if self.team is None:
            self.team, self.key = Team.of_run(cfg, colocate_learners=True, wait=False), key
        return self.team


def engines_key(cfg: RunConfig) -> str:
    """What a run's engines are made of: runs with the same key can share them (the seed is not part of it)."""
    team = cfg.team
    return repr((team.shared_policy, team.lora_engine, cfg.cluster.placement_timeout_s,
                 [(a.model, a.trainable, a.adapter, a.engine, a.learner.lora_rank, a.learner.colocate,
                   a.learner.num_cpus, a.learner.num_gpus, a.learner.resources) for a in team.agents]))


class Trainer:
    def __init__(self, cfg: RunConfig, out: Path, team: Team | None = None, learners: LearnerPool | None = None,
                 sweep: SweepActors | None = None):
        """``team``: already running engines to train (tests share them); by default the trainer starts its own.
        ``learners``: a pool to take learner groups from and give them back to at ``close`` (tests share one).
        ``sweep``: a multirun's actors, taken over where this run's are made the same way."""
        self.cfg, self.out, self.learners = cfg, out, learners or (sweep.learners if sweep else None)
        # Everything that can be wrong with the inputs fails here, before any actor starts.
        self.resume_from = checkpoint.resolve_resume(cfg.train.resume, out)
        prepare_output_dir(out)
        check_local_gpus(cfg)  # seconds, where the data may take minutes to fetch
        self.eval_problems = load_task(dataclasses.replace(cfg.task, limit=cfg.train.eval_limit)).problems
        self.pool = training_pool(cfg)
        init_ray(cfg)
        self.owns_team, self.closed = team is None and sweep is None, False
        # Engines, verifier and learners load at once (an engine's vLLM start-up is the longest); all are up after.
        self.team = team or (sweep.team_for(cfg) if sweep else Team.of_run(cfg, colocate_learners=True, wait=False))
        self.verifier = VerifierClient(cfg.verifier)
        self.policies = self._start_learners()
        self.step = 0
        self.pending: Sampled | None = None  # off-policy: the next step's rollout, sampled during this step's update
        self.breaches: dict[str, int] = {}  # per policy: consecutive steps above its logprob tolerance
        self.write_placement()
        if self.resume_from is not None:
            self._restore(self.resume_from)
        else:
            self.sync_weights()  # engines serve exactly the learners' weights from the first rollout on
        self.tracker = Tracker(cfg, out, resumed=self.resume_from is not None)

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
                self.value_turns(), self.cfg.seed + owner, f"team.agents[{owner}].learner")

    def _start_group(self, owner: int) -> LearnerGroup:
        engines = self.team.agents[owner].engines
        args = self.learner_args(owner)
        if engines.sleep_mode:  # colocated: the ranks live in the engines' bundles
            return LearnerGroup(*args, placement=engines.placement)
        if self.learners is not None:
            return self.learners.take(*args, placement_timeout_s=self.cfg.cluster.placement_timeout_s)
        return LearnerGroup(*args, placement_timeout_s=self.cfg.cluster.placement_timeout_s)

    def value_turns(self) -> int:
        """Outputs of the learner's value head: one per discussion turn."""
        return self.cfg.turns

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
            self.tracker.log(self._eval_metrics(before), 0)
        while self.step < self.cfg.train.steps:
            metrics = self.train_step()
            self.step += 1
            if metrics.get("faults/engine_restarts"):  # a replica moved: say where it runs now
                self.write_placement()
            if self.cfg.train.eval_every and self.step % self.cfg.train.eval_every == 0:
                metrics.update(self._eval_metrics(self.evaluate(f"step_{self.step}")))
            self.tracker.log(metrics, self.step)
            print(self._progress(metrics), flush=True)
            self._check_sync(metrics)
            if self.cfg.train.save_every and (self.step % self.cfg.train.save_every == 0
                                              or self.step == self.cfg.train.steps):
                self.save()
        after = self.evaluate("after")
        self.tracker.log(self._eval_metrics(after), self.step)
        return self._write_summary(before, after)

    def train_step(self) -> dict[str, float]:
        timings: dict[str, float] = {}
        step_start = time.perf_counter()
        sampled, self.pending = self.pending or self.sample(self.step), None
        result, staleness = sampled.result, self.step - sampled.version
        timings["rollout"], timings["verify"] = result.seconds["generate"], result.seconds["verify"]
        rewards = self.rollout_rewards(result)
        batches = self.agent_batches(result, rewards)
        probes: dict[str, Probe | None] = {}
        if staleness:  # before the next rollout takes the engines
            start = time.perf_counter()
            probes = dict(zip([p.name for p in self.policies],
                              self.for_each_policy(lambda policy: self.probe(policy, batches[policy.name]))))
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
        self._log_samples(result)
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

    def rollout(self, problems: list[Problem], step: int) -> DiscussionResult:
        samples = with_samples(problems, self.cfg.algorithm.samples_per_question)
        return run_discussion(self.team, samples, self.cfg.turns, self.cfg.discussion, self.verifier,
                              self.step_seed(step))

    def step_seed(self, step: int) -> int:
        return request_seed(self.cfg.seed, "step", step)

    def rollout_rewards(self, result: DiscussionResult) -> np.ndarray:
        """MAPoRL's reward of every answer, ``[question, agent, turn]``: computed once, read by the update and the
        step's metrics."""
        return team_rewards(result, self.cfg.rewards, self.cfg.discussion.topology)

    def agent_batches(self, result: DiscussionResult, rewards: np.ndarray) -> dict[str, AgentBatch]:
        """Per policy: its rows (flagged samples excluded) with their ``team_rewards``, keyed by (question, seat,
        turn)."""
        batches = {}
        for policy in self.policies:
            batch = AgentBatch([], [], [], [])
            for (q, a, t), record in sorted(result.records.items()):
                if a not in policy.seats or record.score is None or not record.token_ids:
                    continue
                batch.rows.append(Rollout(record.prompt_ids, record.token_ids, t))
                batch.keys.append((record.question_id.rsplit("#", 1)[0], a, t))
                batch.rewards.append(float(rewards[q, a, t]))
                batch.engine_logprobs.append(record.logprobs)
            batches[policy.name] = batch
        return batches

    def for_each_policy(self, work) -> list:
        """``work(policy)`` for every policy: together, each in a thread of its own (the groups run on their own
        actors; the driver only waits), or one after another with ``train.concurrent_policies=false``. The first
        error, in policy order, is raised once every policy's work has ended."""
        if not self.cfg.train.concurrent_policies or len(self.policies) == 1:
            return [work(policy) for policy in self.policies]
        with ThreadPoolExecutor(max_workers=len(self.policies), thread_name_prefix="policy") as pool:
            futures = [pool.submit(work, policy) for policy in self.policies]
        return [future.result() for future in futures]

    def probe(self, policy: Policy, batch: AgentBatch) -> Probe | None:
        """A stale batch: its engines score its first rows with the weights they and the learners hold now, so the
        sync is still checked when the samples are older."""
        agent = self.team.agents[policy.seats[0]]
        fits = [i for i, row in enumerate(batch.rows)  # room for the one token the scoring request generates
                if len(row.prompt_ids) + len(row.response_ids) < agent.cfg.engine.max_model_len]
        index = fits[:PROBE_ROWS]
        if not index:
            return None
        return Probe(index, agent.engines.score([(batch.rows[i].prompt_ids, batch.rows[i].response_ids)
                                                 for i in index], agent.adapter))

    def learn(self, policy: Policy, batch: AgentBatch, staleness: int = 0,
              probe: Probe | None = None) -> dict[str, float]:
        engines = self.team.agents[policy.seats[0]].engines
        if engines.sleep_mode:  # colocated: the learner gets the GPU while its engines sleep
            engines.sleep()
        try:
            return self.update_policy(policy, batch, staleness, probe)
        finally:
            if engines.sleep_mode:
                engines.wake_up()

    def update_policy(self, policy: Policy, batch: AgentBatch, staleness: int = 0,
                      probe: Probe | None = None) -> dict[str, float]:
        """Score, advantages and update on ``batch``, sampled ``staleness`` updates ago. A stale batch's tokens are
        reweighted towards the learner's current policy (truncated importance sampling); its gap to the sampling
        logprobs is then the policy's own change (``policy_lag_max_diff``), and the sync is checked on ``probe``."""
        prefix = f"train/{policy.name}"
        if not batch.rows:
            return {f"{prefix}/skipped_update": 1.0}
        start = time.perf_counter()
        stats = policy.group.score(batch.rows)
        advantages, returns, mask = self.advantages(batch, stats)
        advantages_s = time.perf_counter() - start
        start = time.perf_counter()
        behaviour = stack(batch.engine_logprobs, mask.size(1))
        payload = self._update_payload(stats, advantages, returns)
        if staleness:
            payload["is_weights"] = truncated_is_weights(stats.logprobs, behaviour, mask, self.cfg.train.is_weight_cap)
        update = policy.group.update(batch.rows, payload, normalizer=float(mask.sum()), step=self.step)
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
            weights = payload.get("is_weights", mask)  # on-policy tokens weigh exactly 1
            metrics.update({f"{prefix}/is_weight_mean": float(masked_mean(weights, mask)),
                            f"{prefix}/is_weight_capped": float(masked_mean(
                                (weights >= self.cfg.train.is_weight_cap).float(), mask))})
        return metrics

    def advantages(self, batch: AgentBatch, stats: RolloutStats):
        lengths = torch.tensor([len(r.response_ids) for r in batch.rows])
        mask = (torch.arange(stats.logprobs.size(1)) < lengths[:, None]).float()
        algo = self.cfg.algorithm
        acfg = AdvantageConfig(estimator=algo.estimator, gamma=algo.gamma, lam=algo.lam, kl_coef=algo.kl_coef,
                               kl_estimator=algo.kl_estimator, kl_in_reward=algo.kl_in_reward,
                               whiten_advantages=algo.whiten_advantages, scale_by_std=algo.scale_by_std)
        adv_batch = AdvantageBatch(keys=batch.keys, seq_rewards=torch.tensor(batch.rewards), mask=mask,
                                   logprobs=stats.logprobs, ref_logprobs=stats.ref_logprobs,
                                   values=stats.values if algo.estimator == "gae" else None)
        advantages, returns = compute_advantages(adv_batch, acfg)
        return advantages, returns, mask

    @staticmethod
    def _update_payload(stats: RolloutStats, advantages: torch.Tensor,
                        returns: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What the learners read per token, as ``[rows, length]`` tensors (zero past each row's end)."""
        payload = {"old_logprobs": stats.logprobs, "ref_logprobs": stats.ref_logprobs, "advantages": advantages}
        if returns is not None:
            payload.update(returns=returns, old_values=stats.values)
        return payload

    def sync_weights(self) -> None:
        """Every policy's new weights reach its own engines before the next rollout (all policies at once)."""
        self.for_each_policy(lambda policy: policy.sync.push())

    @staticmethod
    def _gap_over_tolerance(policy: Policy, metrics: dict[str, float]) -> float | None:
        """The step's engine-vs-learner logprob gap of ``policy`` when it exceeds the tolerance, else None."""
        gap = metrics.get(f"train/{policy.name}/logprob_max_diff")
        return gap if gap is not None and gap > policy.precision.logprob_tolerance else None

    def _check_sync(self, metrics: dict[str, float]) -> None:
        """``train.logprob_tolerance`` enforced: a policy whose engines and learners disagree beyond it for
        ``train.logprob_breach_steps`` steps in a row stops the run (``train.on_logprob_breach=stop``) or is
        reported on every such step (``warn``, on the progress line)."""
        for policy in self.policies:
            gap = self._gap_over_tolerance(policy, metrics)
            self.breaches[policy.name] = self.breaches.get(policy.name, 0) + 1 if gap is not None else 0
            if self.breaches[policy.name] >= self.cfg.train.logprob_breach_steps \
                    and self.cfg.train.on_logprob_breach == "stop":
                raise EnginesOutOfSync(
                    f"{policy.name}: engine-vs-learner logprob gap {gap:.3g} > train.logprob_tolerance "
                    f"{policy.precision.logprob_tolerance:g} for {self.breaches[policy.name]} step(s) in a row "
                    f"(step {self.step}): its engines sample with other weights than its learners hold, so its "
                    f"updates are off-policy by an unknown amount; {self._last_checkpoint()}. Check the weight sync "
                    "(train.weight_sync) and the dtypes; train.on_logprob_breach=warn keeps going")

    def write_placement(self) -> None:
        """placement.json: the node (id, IP) of every engine replica and learner rank, and where each learner group
        met; rewritten when an engine replica restarts elsewhere."""
        where: dict[str, list[dict[str, Any]]] = {}
        for index, engines in self.team.engine_owners().items():
            where[f"team.agents[{index}].engine"] = engines.call_all(lambda actor: actor.where.remote())
        for policy in self.policies:
            where[f"team.agents[{policy.seats[0]}].learner"] = policy.group.call_all("where")
        write_json(self.out / "placement.json", where)

    # ------------------------------------------------------------------ evaluation, logging, checkpoints
    def evaluate(self, label: str) -> dict[str, Any]:
        result = discuss_in_batches(self.team, self.eval_problems, self.cfg, self.verifier, desc=f"eval {label}")
        summary = summarize(result, self.rollout_rewards(result))
        print(turn_table(summary, f"{label}: {self.cfg.team.name} on {len(self.eval_problems)} held-out questions"),
              flush=True)
        return summary

    def _interruption(self, exc: BaseException) -> str:
        what = str(exc) if isinstance(exc, ReplicaLost) else f"an actor died ({type(exc).__name__})"
        return f"{what} at step {self.step + 1}; {self._last_checkpoint()}: run the same command with " \
               "train.resume=auto to continue from it"

    def _last_checkpoint(self) -> str:
        found = checkpoint.complete_checkpoints(self.out)
        return f"the last complete checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def _progress(self, metrics: dict[str, float]) -> str:
        """One line per step, readable in `ray job logs`: rollout accuracy per turn, reward and KL per agent."""
        turns = " ".join(f"{metrics[f'rollout/turn_{t + 1}/acc']:.2f}" for t in range(self.cfg.turns))
        agents = " | ".join(f"{p.name}: reward {metrics[f'train/{p.name}/reward']:.3f} "
                            f"kl {metrics[f'train/{p.name}/kl']:.4f}"
                            for p in self.policies if f"train/{p.name}/reward" in metrics)
        drifting = "".join(f"  {p.name}: engine-vs-learner logprob gap {gap:.3g} > {p.precision.logprob_tolerance:g}"
                           f" ({p.precision.engine} engines, {p.precision.learner} learners)"
                           for p in self.policies if (gap := self._gap_over_tolerance(p, metrics)) is not None)
        return (f"step {self.step}/{self.cfg.train.steps}  rollout acc per turn [{turns}]  {agents}  "
                f"{metrics['timing/step']:.1f}s{drifting}")

    @staticmethod
    def _eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
        metrics = {f"eval/turn_{t + 1}/acc": acc for t, acc in enumerate(summary["turn_accuracy"])}
        for i, per_turn in enumerate(summary["agent_turn_accuracy"]):
            metrics.update({f"eval/agent_{i}/turn_{t + 1}/acc": acc for t, acc in enumerate(per_turn)})
        return metrics

    def _rollout_metrics(self, result: DiscussionResult, rewards: np.ndarray) -> dict[str, float]:
        summary = summarize(result, rewards)
        seconds = max(result.seconds["generate"], 1e-9)
        metrics = {f"rollout/turn_{t + 1}/acc": acc for t, acc in enumerate(summary["turn_accuracy"])}
        metrics.update({
            "perf/gen_tokens": summary["gen_tokens"],
            "perf/prompt_tokens": summary["prompt_tokens"],
            "perf/tokens_per_s": summary["gen_tokens"] / seconds,
            "rollout/flagged": summary["flagged"],
            "faults/verifier_restarts": self.verifier.actor_restarts,
        })
        restarts = self.team.engine_restarts()
        metrics.update({f"faults/agent_{i}/engine_restarts": n for i, n in restarts.items()})
        metrics["faults/engine_restarts"] = sum(restarts.values())
        return metrics

    def _log_samples(self, result: DiscussionResult, questions: int = 2) -> None:
        rows = [
            [self.step, result.problems[q].question, result.problems[q].gold, a + 1, t + 1, r.text, r.correct, r.score]
            for (q, a, t), r in sorted(result.records.items())
            if q < questions
        ]
        self.tracker.table("samples/discussions", ["step", "question", "gold", "agent", "turn", "answer", "correct",
                                                   "score"], rows, self.step + 1)

    def _write_summary(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
        summary = {"steps": self.step, "before": before, "after": after}
        if before is not None:
            summary["collaboration_gain_after"] = after["turn_accuracy"][-1] - after["turn_accuracy"][0]
            summary["last_turn_gain"] = after["turn_accuracy"][-1] - before["turn_accuracy"][-1]
            plot_turns(self.out / "before_after.png",
                       {"before training": before["turn_accuracy"], "after training": after["turn_accuracy"]},
                       f"{self.cfg.team.name}: team accuracy per turn")
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
        self.tracker.finish()
        for policy in self.policies:
            policy.sync.close()
            if self.learners is not None and policy.group.owned_placement is not None:
                self.learners.give_back(policy.group)
            else:
                policy.group.shutdown()
        if self.owns_team:
            self.team.shutdown()
        self.verifier.shutdown()


def train(cfg: RunConfig, out: Path, trainer_cls: type[Trainer] = Trainer,
          sweep: SweepActors | None = None) -> dict[str, Any]:
    """Fit and always release the actors (a multirun's to ``sweep``); ``trainer_cls`` picks the method (the
    Conductor's is a subclass)."""
    trainer = trainer_cls(cfg, out, sweep=sweep)
    try:
        return trainer.fit()
    finally:
        trainer.close()

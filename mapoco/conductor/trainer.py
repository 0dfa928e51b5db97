"""`mapoco train method=conductor` and `mapoco eval method=conductor`.

The conductor is one more trained agent: the co-training loop (learner group, weight sync, checkpoints, wandb,
resume) runs unchanged, with the conductor's rollout and GRPO batches in place of the discussion's. The workers
(team.agents[1:], HTTP endpoints) stay frozen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mapoco.conductor.rollout import (
    ConductorResult,
    ConductorRunner,
    summarize_conductor,
    transcript,
)
from mapoco.config import RunConfig
from mapoco.evaluation.report import prepare_output_dir, write_json
from mapoco.rollout.discussion import Team
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.cluster import check_local_gpus, init_ray
from mapoco.tasks import Problem, load_task
from mapoco.training.batch import Rollout
from mapoco.training.trainer import AgentBatch, Trainer, with_samples


class ConductorTrainer(Trainer):
    def __init__(self, cfg: RunConfig, out: Path, team: Team | None = None, **shared: Any):
        super().__init__(cfg, out, team, **shared)
        self.runner = ConductorRunner(self.team, cfg.conductor, self.verifier)
        self.baselines: dict[str, Any] = {}
        self.pool_baselines: dict[int, dict[str, Any]] = {}  # per conductor.eval_pools entry

    def value_turns(self) -> int:
        return 1 + int(self.cfg.conductor.replan)  # the plan, and the re-plan

    def rollout(self, problems: list[Problem], step: int) -> ConductorResult:
        return self.runner.rollout(with_samples(problems, self.cfg.algorithm.samples_per_question),
                                   self.step_seed(step))

    def rollout_rewards(self, result: ConductorResult) -> np.ndarray:
        """Each workflow's reward (set in the rollout: parsed, and its answer right), one per question."""
        return np.array([record.reward for record in result.records])

    def agent_batches(self, result: ConductorResult, rewards: np.ndarray) -> dict[str, AgentBatch]:
        """Every conductor generation with its reward, grouped by question and turn: a plan alone earns its
        workflow's reward; with a re-plan round each turn earns its own (``ConductorRecord.turn_rewards``)."""
        batch = AgentBatch([], [], [], [])
        for record, reward in zip(result.records, rewards):
            for turn, generation in enumerate(record.turns):
                if not generation.token_ids:
                    continue
                batch.rows.append(Rollout(generation.prompt_ids, generation.token_ids, turn))
                batch.keys.append((record.question_id.rsplit("#", 1)[0], 0, turn))
                batch.rewards.append(float(reward if len(record.turns) == 1 else record.turn_rewards[turn]))
                batch.engine_logprobs.append(generation.logprobs)
        return {self.policies[0].name: batch}

    def evaluate(self, label: str) -> dict[str, Any]:
        result = self.runner.rollout(self.eval_problems, self.cfg.seed)
        summary = summarize_conductor(result)
        if not self.baselines and self.cfg.conductor.baselines:  # frozen workers: measured once
            self.baselines = self.runner.baselines(self.eval_problems, self.cfg.seed)
        print(conductor_table({**summary, **self.baselines}, f"{label}: conductor on {len(self.eval_problems)} "
                                                              "held-out questions"), flush=True)
        write_transcripts(self.out / f"transcripts_{label}.jsonl", result)
        pools = [self.pool_evaluation(label, i, pool) for i, pool in enumerate(self.cfg.conductor.eval_pools)]
        return {**summary, "eval_pools": pools} if pools else summary

    def pool_evaluation(self, label: str, index: int, pool: list[str]) -> dict[str, Any]:
        """The conductor on every eval question with one named pool, beside that pool's baselines."""
        if index not in self.pool_baselines and self.cfg.conductor.baselines:
            self.pool_baselines[index] = self.runner.baselines(self.eval_problems, self.cfg.seed, pool)
        return evaluate_pool(self.runner, self.eval_problems, self.cfg.seed, pool,
                             self.out / f"transcripts_{label}_pool_{index}.jsonl", self.pool_baselines.get(index, {}))

    @staticmethod
    def _eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
        metrics = {f"eval/conductor/{k}": summary[k] for k in ("conductor_accuracy", "malformed_rate", "mean_steps",
                                                               "mean_cost")}
        metrics.update({f"eval/conductor/pool_{i}/conductor_accuracy": pool["conductor_accuracy"]
                        for i, pool in enumerate(summary.get("eval_pools", []))})
        return metrics

    def _rollout_metrics(self, result: ConductorResult, rewards: np.ndarray) -> dict[str, float]:
        summary = summarize_conductor(result)
        metrics = {f"rollout/{k}": summary[k] for k in ("conductor_accuracy", "malformed_rate", "mean_steps",
                                                         "mean_reward", "mean_cost")}
        metrics.update({"perf/gen_tokens": summary["gen_tokens"], "perf/prompt_tokens": summary["prompt_tokens"],
                        "faults/verifier_restarts": self.verifier.actor_restarts,
                        "faults/engine_restarts": sum(self.team.engine_restarts().values())})
        return metrics

    def _progress(self, metrics: dict[str, float]) -> str:
        name = self.policies[0].name
        return (f"step {self.step}/{self.cfg.train.steps}  rollout acc {metrics['rollout/conductor_accuracy']:.2f}  "
                f"malformed {metrics['rollout/malformed_rate']:.2f}  steps {metrics['rollout/mean_steps']:.2f}  "
                f"reward {metrics[f'train/{name}/reward']:.3f}  {metrics['timing/step']:.1f}s")

    def _log_samples(self, result: ConductorResult, questions: int = 4) -> None:
        rows = [[self.step, p.question, p.gold, r.turns[0].text, r.answer, r.correct, r.reward]
                for p, r in list(zip(result.problems, result.records))[:questions]]
        self.tracker.table("samples/workflows", ["step", "question", "gold", "workflow", "answer", "correct",
                                                 "reward"], rows, self.step + 1)

    def _write_summary(self, before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
        summary = {"steps": self.step, **after, **self.baselines,
                   "conductor_accuracy_before": before["conductor_accuracy"] if before else None,
                   "before": before, "after": after}
        write_json(self.out / "summary.json", summary)
        print(conductor_table(summary, f"after {self.step} steps"), flush=True)
        return summary

    def close(self) -> None:
        self.runner.close()
        super().close()


def conductor_table(summary: dict[str, Any], title: str) -> str:
    """Accuracy and mean cost per question of the conductor and of every baseline the summary holds."""
    rows = [("conductor", summary["conductor_accuracy"], summary["mean_cost"])]
    rows += [(f"worker {name} alone", acc, cost) for name, acc, cost in zip(
        summary.get("workers", []), summary.get("worker_accuracy", []), summary.get("worker_cost", []))]
    for key, label in (("majority_vote", "majority vote of the workers"), ("random_workflow", "random workflow")):
        if f"{key}_accuracy" in summary:
            rows.append((label, summary[f"{key}_accuracy"], summary[f"{key}_cost"]))
    rows += [(f"fixed workflow {i}", acc, cost) for i, (acc, cost) in enumerate(zip(
        summary.get("fixed_workflow_accuracy", []), summary.get("fixed_workflow_cost", [])))]
    width = max(len(r[0]) for r in rows)
    lines = [title, f"  {'':<{width}}  accuracy  cost/question",
             *(f"  {label:<{width}}  {acc:8.3f}  {cost:13.3f}" for label, acc, cost in rows),
             f"  malformed plans {summary['malformed_rate']:.3f}, mean steps {summary['mean_steps']:.2f}"]
    return "\n".join(lines)


def evaluate_pool(runner: ConductorRunner, problems: list[Problem], seed: int, pool: list[str], transcripts: Path,
                  baselines: dict[str, Any]) -> dict[str, Any]:
    """The conductor on ``problems`` with the named ``pool`` (numbered in its order): its summary beside the pool's
    ``baselines``, printed, and its transcripts written."""
    result = runner.rollout(problems, seed, pool=pool)
    entry = {"pool": list(pool), **summarize_conductor(result), **baselines}
    print(conductor_table(entry, f"conductor on {len(problems)} questions with the pool {pool}"), flush=True)
    write_transcripts(transcripts, result)
    return entry


def write_transcripts(path: Path, result: ConductorResult) -> None:
    with path.open("w") as f:
        for problem, record in zip(result.problems, result.records):
            f.write(json.dumps(transcript(problem, record)) + "\n")


def evaluate_conductor(cfg: RunConfig, out: Path, team: Team | None = None) -> dict[str, Any]:
    """``team``: already running engines (tests share them); by default the evaluation starts its own."""
    check_local_gpus(cfg)
    problems = load_task(cfg.task).problems  # before any actor: a bad dataset or output directory fails fast
    prepare_output_dir(out)
    init_ray(cfg)
    running, verifier = team or Team.of_run(cfg, wait=False), VerifierClient(cfg.verifier)  # all load at once
    runner = ConductorRunner(running, cfg.conductor, verifier)
    try:
        running.wait_ready()
        result = runner.rollout(problems, cfg.seed)
        baselines = runner.baselines(problems, cfg.seed) if cfg.conductor.baselines else {}
        pools = [evaluate_pool(runner, problems, cfg.seed, pool, out / f"transcripts_pool_{i}.jsonl",
                               runner.baselines(problems, cfg.seed, pool) if cfg.conductor.baselines else {})
                 for i, pool in enumerate(cfg.conductor.eval_pools)]
    finally:
        runner.close()
        if team is None:
            running.shutdown()
        verifier.shutdown()
    summary = {**summarize_conductor(result), **baselines, **({"eval_pools": pools} if pools else {})}
    write_json(out / "summary.json", summary)
    write_transcripts(out / "transcripts.jsonl", result)
    print(conductor_table(summary, f"conductor on {len(problems)} {cfg.task.name} questions"))
    print(f"wrote {out}/summary.json, transcripts.jsonl")
    return summary

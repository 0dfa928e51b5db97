"""`mapoco train method=conductor`: the Conductor as a co-training method.

The conductor is one more trained agent: the trainer's loop (learner group, weight sync, checkpoints, wandb,
resume) runs unchanged, with the conductor's rollout and GRPO batches in place of the discussion's. The workers
(team.agents[1:], HTTP endpoints) stay frozen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mapoco.conductor.evaluate import conductor_table, evaluate_pool, write_transcripts
from mapoco.conductor.rollout import (
    ConductorResult,
    ConductorRunner,
    summarize_conductor,
)
from mapoco.config import RunConfig
from mapoco.rollout.discussion import Team
from mapoco.rollout.verifier import VerifierClient
from mapoco.tasks import Problem
from mapoco.training.batch import AgentBatch, Rollout, with_samples

SUMMARY_KEYS = ("conductor_accuracy", "malformed_rate", "mean_steps", "mean_cost")


class ConductorMethod:
    def __init__(self, cfg: RunConfig, out: Path, team: Team, verifier: VerifierClient,
                 eval_problems: list[Problem]) -> None:
        self.cfg, self.out, self.eval_problems = cfg, out, eval_problems
        self.runner = ConductorRunner(team, cfg.conductor, verifier)
        self.baselines: dict[str, Any] = {}  # frozen workers: measured once
        self.pool_baselines: dict[int, dict[str, Any]] = {}  # per conductor.eval_pools entry

    def value_turns(self) -> int:
        return self.cfg.conductor.max_rounds  # the plan, and each re-plan

    def rollout(self, problems: list[Problem], seed: int) -> ConductorResult:
        return self.runner.rollout(with_samples(problems, self.cfg.algorithm.samples_per_question), seed)

    def rewards(self, result: ConductorResult) -> np.ndarray:
        """Each workflow's reward (set in the rollout: parsed, and its answer right), one per sample."""
        return np.array([record.reward for record in result.records])

    def batches(self, result: ConductorResult, rewards: np.ndarray,
                policies: dict[str, list[int]]) -> dict[str, AgentBatch]:
        """Every conductor generation with what it earns (``ConductorRecord.turn_rewards``: a plan alone its
        workflow's reward), grouped by question and turn, or by question alone for the discounted re-plan reward."""
        (name,) = policies  # only the conductor learns
        one_group = self.cfg.conductor.replan_reward == "discounted"
        batch = AgentBatch([], [], [], [])
        for problem, record in zip(result.problems, result.records):
            for turn, generation in enumerate(record.turns):
                if not generation.token_ids:
                    continue
                batch.rows.append(Rollout(generation.prompt_ids, generation.token_ids, turn))
                batch.keys.append((problem.group_id, 0, 0 if one_group else turn))
                batch.rewards.append(float(record.turn_rewards[turn]))
                batch.engine_logprobs.append(generation.logprobs)
        return {name: batch}

    def evaluate(self, label: str) -> dict[str, Any]:
        result = self.runner.rollout(self.eval_problems, self.cfg.seed)
        summary = summarize_conductor(result)
        if not self.baselines and self.cfg.conductor.baselines:
            self.baselines = self.runner.baselines(self.eval_problems, self.cfg.seed)
        print(conductor_table({**summary, **self.baselines}, f"{label}: conductor on {len(self.eval_problems)} "
                                                              "held-out questions"), flush=True)
        write_transcripts(self.out / f"transcripts_{label}.jsonl", result)
        pools = [self._pool_evaluation(label, i, pool) for i, pool in enumerate(self.cfg.conductor.eval_pools)]
        return {**summary, "eval_pools": pools} if pools else summary

    def _pool_evaluation(self, label: str, index: int, pool: list[str]) -> dict[str, Any]:
        """The conductor on every eval question with one named pool, beside that pool's baselines."""
        if index not in self.pool_baselines and self.cfg.conductor.baselines:
            self.pool_baselines[index] = self.runner.baselines(self.eval_problems, self.cfg.seed, pool)
        return evaluate_pool(self.runner, self.eval_problems, self.cfg.seed, pool,
                             self.out / f"transcripts_{label}_pool_{index}.jsonl", self.pool_baselines.get(index, {}))

    def eval_metrics(self, summary: dict[str, Any]) -> dict[str, float]:
        metrics = {f"eval/conductor/{key}": summary[key] for key in SUMMARY_KEYS}
        metrics.update({f"eval/conductor/worker_share/{name}": share
                        for name, share in summary["worker_share"].items()})
        metrics.update({f"eval/conductor/pool_{i}/conductor_accuracy": pool["conductor_accuracy"]
                        for i, pool in enumerate(summary.get("eval_pools", []))})
        return metrics

    def rollout_metrics(self, result: ConductorResult, rewards: np.ndarray) -> dict[str, float]:
        summary = summarize_conductor(result)
        return {**{f"rollout/{key}": summary[key] for key in (*SUMMARY_KEYS, "mean_reward")},
                **{f"rollout/worker_share/{name}": share for name, share in summary["worker_share"].items()},
                "perf/gen_tokens": summary["gen_tokens"], "perf/prompt_tokens": summary["prompt_tokens"]}

    def progress(self, metrics: dict[str, float], policies: list[str]) -> str:
        return (f"rollout acc {metrics['rollout/conductor_accuracy']:.2f}  "
                f"malformed {metrics['rollout/malformed_rate']:.2f}  steps {metrics['rollout/mean_steps']:.2f}  "
                f"reward {metrics[f'train/{policies[0]}/reward']:.3f}")

    def samples(self, result: ConductorResult, step: int, questions: int = 4) -> tuple[str, list[str], list]:
        rows = [[step, p.question, p.gold, r.turns[0].text, r.answer, r.correct, r.reward]
                for p, r in list(zip(result.problems, result.records))[:questions]]
        return "samples/workflows", ["step", "question", "gold", "workflow", "answer", "correct", "reward"], rows

    def summary(self, before: dict[str, Any] | None, after: dict[str, Any], steps: int) -> dict[str, Any]:
        summary = {"steps": steps, **after, **self.baselines,
                   "conductor_accuracy_before": before["conductor_accuracy"] if before else None,
                   "before": before, "after": after}
        print(conductor_table(summary, f"after {steps} steps"), flush=True)
        return summary

    def close(self) -> None:
        self.runner.close()

"""MAPoRL's method: A agents discuss each question for T turns, each answer earns MAPoRL's reward (correctness plus
the incentives of what it did to its peers), and every trained policy learns from the answers of the seats it
plays, with a value head per turn."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from mapoco.config import RunConfig
from mapoco.evaluation.evaluate import discuss_in_batches
from mapoco.evaluation.report import plot_turns, summarize, turn_table
from mapoco.rollout.discussion import DiscussionResult, Team, run_discussion
from mapoco.rollout.rewards import team_rewards
from mapoco.rollout.verifier import VerifierClient
from mapoco.tasks import Problem, load_task
from mapoco.training.batch import AgentBatch, Rollout, with_samples


class DiscussionMethod:
    def __init__(self, cfg: RunConfig, out: Path, team: Team, verifier: VerifierClient,
                 eval_problems: list[Problem]) -> None:
        self.cfg, self.out, self.team, self.verifier, self.eval_problems = cfg, out, team, verifier, eval_problems
        # Held-out domains (train.eval_tasks), evaluated beside the task and never trained on.
        self.eval_domains = {name: load_task(dataclasses.replace(task, limit=cfg.train.eval_limit)).problems
                             for name, task in cfg.train.eval_tasks.items()}

    def value_turns(self) -> int:
        return self.cfg.turns

    def rollout(self, problems: list[Problem], seed: int) -> DiscussionResult:
        return run_discussion(self.team, with_samples(problems, self.cfg.algorithm.samples_per_question),
                              self.cfg.turns, self.cfg.discussion, self.verifier, seed)

    def rewards(self, result: DiscussionResult) -> np.ndarray:
        """MAPoRL's reward of every answer, ``[question, agent, turn]``."""
        return team_rewards(result, self.cfg.rewards, self.cfg.discussion.topology)

    def batches(self, result: DiscussionResult, rewards: np.ndarray,
                policies: dict[str, list[int]]) -> dict[str, AgentBatch]:
        """Per policy: the answers of its seats (flagged samples excluded) with their rewards, keyed by (question
        group, seat, turn)."""
        batches = {}
        for name, seats in policies.items():
            batch = AgentBatch([], [], [], [])
            for (q, a, t), record in sorted(result.records.items()):
                if a not in seats or record.score is None or not record.token_ids:
                    continue
                batch.rows.append(Rollout(record.prompt_ids, record.token_ids, t))
                batch.keys.append((result.problems[q].group_id, a, t))
                batch.rewards.append(float(rewards[q, a, t]))
                batch.engine_logprobs.append(record.logprobs)
            batches[name] = batch
        return batches

    def evaluate(self, label: str) -> dict[str, Any]:
        """The task's held-out questions; each held-out domain's under ``domains``."""
        summary = self._evaluate(label, self.eval_problems, "held-out questions")
        if self.eval_domains:
            summary["domains"] = {name: self._evaluate(label, problems, f"questions of held-out domain {name!r}")
                                  for name, problems in self.eval_domains.items()}
        return summary

    def _evaluate(self, label: str, problems: list[Problem], what: str) -> dict[str, Any]:
        result = discuss_in_batches(self.team, problems, self.cfg, self.verifier, desc=f"eval {label}")
        summary = summarize(result, self.rewards(result))
        print(turn_table(summary, f"{label}: {self.cfg.team.name} on {len(problems)} {what}"), flush=True)
        return summary

    def eval_metrics(self, summary: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
        metrics = {f"{prefix}/turn_{t + 1}/acc": acc for t, acc in enumerate(summary["turn_accuracy"])}
        for i, per_turn in enumerate(summary["agent_turn_accuracy"]):
            metrics.update({f"{prefix}/agent_{i}/turn_{t + 1}/acc": acc for t, acc in enumerate(per_turn)})
        for name, domain in summary.get("domains", {}).items():
            metrics.update(self.eval_metrics(domain, f"eval/{name}"))
        return metrics

    def rollout_metrics(self, result: DiscussionResult, rewards: np.ndarray) -> dict[str, float]:
        summary = summarize(result, rewards)
        seconds = max(result.seconds["generate"], 1e-9)
        metrics = {f"rollout/turn_{t + 1}/acc": acc for t, acc in enumerate(summary["turn_accuracy"])}
        metrics.update({"perf/gen_tokens": summary["gen_tokens"], "perf/prompt_tokens": summary["prompt_tokens"],
                        "perf/tokens_per_s": summary["gen_tokens"] / seconds, "rollout/flagged": summary["flagged"]})
        return metrics

    def progress(self, metrics: dict[str, float], policies: list[str]) -> str:
        """Rollout accuracy per turn, reward and KL per policy."""
        turns = " ".join(f"{metrics[f'rollout/turn_{t + 1}/acc']:.2f}" for t in range(self.cfg.turns))
        agents = " | ".join(f"{name}: reward {metrics[f'train/{name}/reward']:.3f} "
                            f"kl {metrics[f'train/{name}/kl']:.4f}"
                            for name in policies if f"train/{name}/reward" in metrics)
        return f"rollout acc per turn [{turns}]  {agents}"

    def samples(self, result: DiscussionResult, step: int, questions: int = 2) -> tuple[str, list[str], list]:
        rows = [[step, result.problems[q].question, result.problems[q].gold, a + 1, t + 1, r.text, r.correct, r.score]
                for (q, a, t), r in sorted(result.records.items()) if q < questions]
        return ("samples/discussions", ["step", "question", "gold", "agent", "turn", "answer", "correct", "score"],
                rows)

    def summary(self, before: dict[str, Any] | None, after: dict[str, Any], steps: int) -> dict[str, Any]:
        summary = {"steps": steps, "before": before, "after": after}
        if before is not None:
            summary["collaboration_gain_after"] = after["turn_accuracy"][-1] - after["turn_accuracy"][0]
            summary["last_turn_gain"] = after["turn_accuracy"][-1] - before["turn_accuracy"][-1]
            plot_turns(self.out / "before_after.png",
                       {"before training": before["turn_accuracy"], "after training": after["turn_accuracy"]},
                       f"{self.cfg.team.name}: team accuracy per turn")
        return summary

    def close(self) -> None:
        pass

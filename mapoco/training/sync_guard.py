"""``train.logprob_tolerance`` enforced: every step, each policy's engines must sample what its learners hold. The
gap is read on the sampled tokens (on-policy), or on a few rows its engines score again (a stale batch's probe); a
policy above the tolerance for ``train.logprob_breach_steps`` steps in a row stops the run or is reported."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mapoco.config import TrainConfig
from mapoco.rollout.discussion import AgentRuntime
from mapoco.training.batch import AgentBatch, stack
from mapoco.training.policy import Policy

PROBE_ROWS = 4  # rows of a stale batch its engines score again to check the sync


class EnginesOutOfSync(RuntimeError):
    """An agent's engines sampled with other weights than its learners hold, ``train.logprob_breach_steps`` steps
    in a row: its updates would be off-policy by an unknown amount."""


@dataclass
class Probe:
    """Rows ``index`` of a stale batch as every engine replica of its policy scores them now."""

    index: list[int]
    replicas: list[list[list[float]]]  # per replica, per row: the response tokens' logprobs

    def gap(self, learner_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
        """The largest engine-vs-learner logprob gap on these rows, over every replica."""
        learner, rows = learner_logprobs[self.index], mask[self.index]
        return max(float(((learner - stack(scores, rows.size(1))).abs() * rows).max()) for scores in self.replicas)


def probe(agent: AgentRuntime, batch: AgentBatch) -> Probe | None:
    """A stale batch: its engines score its first rows with the weights they and the learners hold now, so the
    sync is still checked when the samples are older."""
    fits = [i for i, row in enumerate(batch.rows)  # room for the one token the scoring request generates
            if len(row.prompt_ids) + len(row.response_ids) < agent.cfg.engine.max_model_len]
    index = fits[:PROBE_ROWS]
    if not index:
        return None
    return Probe(index, agent.engines.logprobs([(batch.rows[i].prompt_ids, batch.rows[i].response_ids)
                                             for i in index], agent.adapter))


def gap_over_tolerance(policy: Policy, metrics: dict[str, float]) -> float | None:
    """The step's engine-vs-learner logprob gap of ``policy`` when it exceeds the tolerance, else None."""
    gap = metrics.get(f"train/{policy.name}/logprob_max_diff")
    return gap if gap is not None and gap > policy.precision.logprob_tolerance else None


@dataclass
class SyncGuard:
    train: TrainConfig
    breaches: dict[str, int] = field(default_factory=dict)  # per policy: consecutive steps above its tolerance

    def check(self, policies: list[Policy], metrics: dict[str, float], step: int, last_checkpoint: str) -> None:
        """A policy whose engines and learners disagree beyond its tolerance for ``train.logprob_breach_steps``
        steps in a row stops the run (``train.on_logprob_breach=stop``) or is reported on every such step
        (``warn``, on the progress line)."""
        for policy in policies:
            gap = gap_over_tolerance(policy, metrics)
            self.breaches[policy.name] = self.breaches.get(policy.name, 0) + 1 if gap is not None else 0
            if self.breaches[policy.name] >= self.train.logprob_breach_steps and self.train.on_logprob_breach == "stop":
                raise EnginesOutOfSync(
                    f"{policy.name}: engine-vs-learner logprob gap {gap:.3g} > train.logprob_tolerance "
                    f"{policy.precision.logprob_tolerance:g} for {self.breaches[policy.name]} step(s) in a row "
                    f"(step {step}): its engines sample with other weights than its learners hold, so its updates "
                    f"are off-policy by an unknown amount; {last_checkpoint}. Check the weight sync "
                    "(train.weight_sync) and the dtypes; train.on_logprob_breach=warn keeps going")

"""What a learner trains on: a rollout row (one answer's exact token ids with its prompt), a policy's rows of a
step with their group keys and rewards, the rows' scores, a collated micro-batch (right-padded ids, attention and
response masks), and how per-rank statistics combine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mapoco.tasks import Problem

SUMMED_STATS = ("policy_loss", "value_loss", "loss")  # normalised by the batch's tokens: parts of one sum
PER_RANK_STATS = ("tokens", "peak_memory_gib")


def combine_stats(parts: dict[str, list[float]], tokens: list[float]) -> dict[str, float]:
    """One figure per statistic from its parts (micro-batches of a step, or ranks): a loss is a share of one sum
    normalised by the whole batch's tokens, so the parts add up; any other statistic is a per-token mean, so the
    parts are weighted by their tokens. The figures then do not depend on the micro-batch size or the rank count."""
    weights = np.asarray(tokens, dtype=np.float64)
    return {key: float(np.sum(values) if key in SUMMED_STATS else np.average(values, weights=weights))
            for key, values in parts.items()} | {"tokens": float(weights.sum())}


@dataclass
class Rollout:
    """One agent answer to learn from: exact engine token ids; ``turn`` is 0-based."""

    prompt_ids: list[int]
    response_ids: list[int]
    turn: int


@dataclass
class RolloutStats:
    """Per-token statistics of a batch of rollouts, ``[rows, max response length]`` tensors, zero past each row's
    end: they stay tensors from the learner that computes them to the update that reads them."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor

    FIELDS = ("logprobs", "ref_logprobs", "values")

    @classmethod
    def zeros(cls, rows: list[Rollout]) -> RolloutStats:
        width = max((len(r.response_ids) for r in rows), default=0)
        return cls(*(torch.zeros((len(rows), width)) for _ in cls.FIELDS))


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, S] prompt + response, right-padded
    attention_mask: torch.Tensor
    positions: torch.Tensor  # [B, R] index of the logit that predicts each response token
    targets: torch.Tensor  # [B, R] response token ids
    mask: torch.Tensor  # [B, R] 1 on real response tokens
    turns: torch.Tensor  # [B]


def collate(rows: list[Rollout], pad_id: int) -> MicroBatch:
    seqs = [r.prompt_ids + r.response_ids for r in rows]
    width, resp = max(map(len, seqs)), max(len(r.response_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), resp), dtype=torch.long)
    targets = torch.zeros((len(rows), resp), dtype=torch.long)
    mask = torch.zeros((len(rows), resp), dtype=torch.float32)
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        n, p = len(row.response_ids), len(row.prompt_ids)
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        positions[i, :n] = torch.arange(p - 1, p - 1 + n)
        targets[i, :n] = torch.tensor(row.response_ids)
        mask[i, :n] = 1
    turns = torch.tensor([r.turn for r in rows], dtype=torch.long)
    return MicroBatch(input_ids, attention, positions, targets, mask, turns)


def response_outputs(logits: torch.Tensor, values: torch.Tensor | None, mb: MicroBatch):
    """Logprobs of the response tokens (and their values and entropies), aligned to ``mb.mask``."""
    index = mb.positions.unsqueeze(-1)
    picked = logits.gather(1, index.expand(-1, -1, logits.size(-1))).float()
    logprobs = torch.log_softmax(picked, dim=-1).gather(-1, mb.targets.unsqueeze(-1)).squeeze(-1)
    token_values = None
    if values is not None:
        per_turn = values.gather(1, index.expand(-1, -1, values.size(-1)))
        token_values = per_turn.gather(-1, mb.turns.view(-1, 1, 1).expand(-1, per_turn.size(1), 1)).squeeze(-1)
    return logprobs, token_values, picked


@dataclass
class AgentBatch:
    """One policy's rows of a step, each with its group key, reward and the logprobs its engine sampled it with."""

    rows: list[Rollout]
    keys: list[tuple[str, int, int]]  # (question group, seat, turn): baselines are keyed by ids, not positions
    rewards: list[float]
    engine_logprobs: list[list[float]]


def with_samples(problems: list[Problem], samples: int) -> list[Problem]:
    """Each question ``samples`` times: ids ``<id>#<s>`` (each sample seeds its own requests), in the question's
    group (``Problem.group``), which baselines and pools key on."""
    return [dataclasses.replace(p, id=f"{p.id}#{s}", group=p.group_id) for p in problems for s in range(samples)]


def stack(lists: list[list[float]], width: int) -> torch.Tensor:
    """Per-row token lists (the engines' sampling logprobs) as one zero-padded ``[rows, width]`` tensor."""
    out = torch.zeros((len(lists), width), dtype=torch.float32)
    for i, values in enumerate(lists):
        out[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


@dataclass
class TokenTargets:
    """What the learner ranks read per token of a policy's rows, each ``[rows, length]`` and zero past each row's
    end: the sampling-time logprobs, the reference's, the advantages; value targets and old values where the
    estimator has a critic (gae); truncated importance weights where the batch was sampled by older weights."""

    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None

    def select(self, rows: list[int], width: int | None = None, device: str | torch.device = "cpu") -> TokenTargets:
        """These rows (their first ``width`` tokens), as float32 on ``device``."""
        def pick(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[rows, :width].to(device, torch.float32)

        return TokenTargets(**{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

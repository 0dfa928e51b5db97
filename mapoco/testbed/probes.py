"""What a built model can do, measured on held-out questions: turn-1 accuracy, workflow-step and composition
accuracy, and a conductor's plans (parse rate, steps, worker choice)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mapoco.answers import extract_math, is_correct
from mapoco.conductor.workflow import (
    SUBTASKS,
    conductor_message,
    parse_workflow,
    worker_message,
)
from mapoco.models.registry import load_causal_lm
from mapoco.models.specs import (
    TinyModelSpec,
)
from mapoco.rollout.prompts import first_turn_message
from mapoco.tasks import Problem, TaskConfig, arithmetic_problems
from mapoco.testbed.chat_data import PICK_LINE, composition_step, operands, prompt_ids

NUM_EVAL = 200
PLAN_TOKENS = 64  # max_new_tokens for a conductor's plan (a two-step plan is well under it)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def _replies(model: Any, tokenizer: Any, threads: list[list[dict[str, str]]], max_new_tokens: int,
             batch_size: int = 50, **sampling: Any) -> list[str]:
    """One reply per chat thread with HF ``generate`` (left-padded batches, stop at end of turn)."""
    model.eval()
    texts = []
    for start in range(0, len(threads), batch_size):
        prompts = [prompt_ids(tokenizer, thread) for thread in threads[start : start + batch_size]]
        input_ids, mask = _left_pad(prompts, tokenizer.pad_token_id)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        texts += tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def turn1_accuracy(model: Any, tokenizer: Any, problems: list[Problem], batch_size: int = 50,
                   message: Callable[[Problem], str] = first_turn_message) -> float:
    """Greedy first-turn accuracy (``message``: the user message a problem is asked in)."""
    texts = _replies(model, tokenizer, [_user(message(p)) for p in problems], 16, batch_size, do_sample=False)
    return sum(is_correct(extract_math(t), p.gold, p.kind) for t, p in zip(texts, problems)) / len(problems)


def composition_accuracy(model: Any, tokenizer: Any, operator: str, problems: list[Problem]) -> float:
    """Greedy accuracy on the specialist's composition step (the ``+`` step shown the right product)."""
    rng = random.Random(0)
    steps = [composition_step(p, operator, rng, earlier=operands(p)[0] * operands(p)[1]) for p in problems]
    texts = _replies(model, tokenizer, [thread for thread, _ in steps], 16, do_sample=False)
    return sum(is_correct(extract_math(t), str(answer), "math") for t, (_, answer) in zip(texts, steps)) / len(steps)


def _user(message: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": message}]


def step_message(problem: Problem) -> str:
    """A first workflow step's message, the subtask picked by the problem id (fixed, spread over ``SUBTASKS``)."""
    return worker_message(problem, SUBTASKS[sum(map(ord, problem.id)) % len(SUBTASKS)])


def sample_plans(model: Any, tokenizer: Any, problems: list[Problem], spec: TinyModelSpec, seed: int = 0,
                 batch_size: int = 50) -> list[tuple[list[int], list[str], str]]:
    """(the pool's ids, its cards or as many empty ones, the reply) of a conductor sampled at temperature 1 on each
    problem, pool sizes drawn uniformly from ``spec.pool_sizes``, cards from ``spec.cards``, stable ids from
    ``spec.stable_ids_of`` workers. Seeded, and the global torch RNG is left as it was."""
    rng = random.Random(seed)
    sizes = [rng.choice(spec.pool_sizes) for _ in problems]
    pools = [[rng.choice(spec.cards) for _ in range(size)] if spec.cards else [""] * size for size in sizes]
    ids = [rng.sample(range(spec.stable_ids_of), size) if spec.stable_ids_of else list(range(size)) for size in sizes]
    messages = [_user(conductor_message(p.question, shown, cards=cards))
                for p, shown, cards in zip(problems, ids, pools)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        texts = sample_replies(model, tokenizer, messages, batch_size)
    return list(zip(ids, pools, texts))


def sample_replies(model: Any, tokenizer: Any, threads: list[list[dict[str, str]]], batch_size: int = 50) -> list[str]:
    """A conductor's replies as training samples them: temperature 1, nothing cut off, ``PLAN_TOKENS`` at most."""
    return _replies(model, tokenizer, threads, PLAN_TOKENS, batch_size, do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0)


def plan_stats(samples: list[tuple[list[int], list[str], str]]) -> dict[str, Any]:
    """Parse rate, and how often each listed position answers (the plan's last step) per pool size; with cards, how
    often the answering worker holds the card the reply named; where the reasoning names its pick (a pool conductor's
    ``pick_line``), how often the plan asks the worker named."""
    parsed = [(ids, cards, parse_workflow(text, ids), pick, pick and pick.group(1))
              for ids, cards, text in samples for pick in [PICK_LINE.search(text)]]
    answering = {size: [0] * size for size in sorted({len(cards) for _, cards, _ in samples})}
    steps: dict[int, int] = {}
    carded = [0, 0]  # plans that name a card, and those whose answering worker holds it
    copied = 0  # plans whose answering worker is the one the reasoning named
    for ids, cards, result, pick, card in parsed:
        if result.plan is not None and result.plan.steps:
            answering_at = ids.index(result.plan.steps[-1].worker)
            answering[len(cards)][answering_at] += 1
            steps[len(result.plan.steps)] = steps.get(len(result.plan.steps), 0) + 1
            if any(cards) and card:
                carded[0] += 1
                carded[1] += cards[answering_at] == card
            copied += bool(pick) and result.plan.steps[-1].worker == int(pick.group(2))
    stats = {"parse_rate": sum(p.plan is not None for _, _, p, _, _ in parsed) / len(parsed),
             "answering_worker": {str(size): counts for size, counts in answering.items()},
             "plan_steps": {str(n): steps[n] for n in sorted(steps)}}
    if any(any(cards) for _, cards, _ in samples):
        stats["card_named_rate"] = carded[0] / len(parsed)
        stats["card_held_rate"] = carded[1] / max(carded[0], 1)
    if any(pick for _, _, _, pick, _ in parsed):
        stats["pick_copied_rate"] = copied / len(parsed)
    return stats


def load_model(path: Path) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    return load_causal_lm(path, torch.float32), AutoTokenizer.from_pretrained(path)


def evaluate_turn1(path: Path, num: int = NUM_EVAL, task: TaskConfig | None = None) -> float:
    """Re-measure a saved model's greedy turn-1 accuracy on the first ``num`` test problems of ``task``
    (default: the default arithmetic task)."""
    model, tokenizer = load_model(path)
    return turn1_accuracy(model, tokenizer, arithmetic_problems(task or TaskConfig(), "test", num))


def evaluate_plans(path: Path, spec: TinyModelSpec, num: int = NUM_EVAL, seed: int = 0) -> dict[str, Any]:
    """Re-measure a saved conductor's ``plan_stats`` on the first ``num`` test questions of its task."""
    model, tokenizer = load_model(path)
    return plan_stats(sample_plans(model, tokenizer, arithmetic_problems(spec.task, "test", num), spec, seed=seed))

"""Can a pretrained small model be the pools conductor without a warm-start? SmolLM2-135M-Instruct, few-shot.

    .venv/bin/python -m experiments.conductor.few_shot [questions]

Three worked examples (a pool of stable ids, a reasoning line, the three lists) precede each test question, whose
pool is 2-4 of four workers in random order; replies are sampled at temperature 1, as training samples them. Prints
the share of replies that parse as a workflow asking only listed ids, and asking any id at all.
"""

from __future__ import annotations

import random
import sys

import torch

from mapoco.conductor.workflow import Plan, Step, conductor_message, parse_workflow
from mapoco.models.registry import resolve_model
from mapoco.models.specs import SMOLLM2, TINY_MODELS
from mapoco.tasks import arithmetic_problems
from mapoco.testbed.chat_data import operation_note
from mapoco.testbed.probes import load_model, sample_replies

SHOTS = 3


def main(questions: int = 40) -> None:
    task = TINY_MODELS["pool-conductor"].task
    rng = random.Random(0)

    def pool() -> list[int]:
        return rng.sample(range(4), rng.choice((2, 3, 4)))

    shots = []
    for problem in arithmetic_problems(task, "train", SHOTS):
        ids = pool()
        plan = Plan((Step(rng.choice(ids), "Solve the problem.", False),))
        shots.append(f"Workers: {', '.join(f'Model {i}' for i in ids)}\n{operation_note(problem.question)}\n"
                     f"{plan.lists()}")
    problems = arithmetic_problems(task, "test", questions)
    pools = [pool() for _ in problems]
    threads = [[{"role": "user", "content": conductor_message(p.question, ids, examples=shots)}]
               for p, ids in zip(problems, pools)]
    model, tokenizer = load_model(resolve_model(SMOLLM2, download=False))
    torch.manual_seed(0)
    texts = sample_replies(model, tokenizer, threads)
    listed = sum(not parse_workflow(t, ids).malformed for t, ids in zip(texts, pools)) / len(texts)
    any_id = sum(not parse_workflow(t, 10).malformed for t in texts) / len(texts)
    print(f"{SMOLLM2}, {SHOTS}-shot, {len(texts)} questions: parses asking only listed ids {listed:.2f}, "
          f"asking any id {any_id:.2f}")
    for text, ids in list(zip(texts, pools))[:3]:
        print(ids, repr(text[:160]))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

"""`mapoco train-verifier`, MAPoRL's recipe: sample answers from the team on training questions, label them against
the gold answer with the rule verifier, balance them per question, train the learned verifier and report its
accuracy and AUC on held-out questions."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from mapoco.config import RunConfig
from mapoco.evaluation.evaluate import discuss_in_batches
from mapoco.models.registry import resolve_model
from mapoco.rollout.discussion import Team
from mapoco.rollout.learned_verifier import (
    Example,
    LearnedVerifier,
    balance,
    evaluate_verifier,
    fit,
)
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.cluster import init_ray
from mapoco.runtime.run_folder import write_json
from mapoco.tasks import load_task


def sample_examples(cfg: RunConfig, team: Team | None = None) -> list[Example]:
    """Every answer of a team discussion on training questions, labelled against the gold answer (by the rule
    verifier: the learned one is what is being trained)."""
    data = load_task(cfg.task, split="train")
    init_ray(cfg)
    own_team = team is None
    team = team or Team.of_run(cfg)
    checker = VerifierClient(dataclasses.replace(cfg.verifier, kind="rule"))
    try:
        result = discuss_in_batches(team, data.problems, cfg, checker, desc="sampling answers")
    finally:
        if own_team:
            team.shutdown()
        checker.shutdown()
    seen, examples = set(), []
    for (q, _, _), record in sorted(result.records.items()):
        problem = result.problems[q]
        key = (problem.id, record.text.strip())
        if record.score is None or key in seen:  # flagged samples have no trustworthy label; duplicates add nothing
            continue
        seen.add(key)
        examples.append(Example(problem.id, problem.question, record.text, int(record.correct)))
    return examples


def split_by_question(examples: list[Example], held_out: float, seed: int) -> tuple[list[Example], list[Example]]:
    ids = sorted({e.question_id for e in examples})
    random.Random(seed).shuffle(ids)
    test_ids = set(ids[: max(1, int(len(ids) * held_out))])
    return [e for e in examples if e.question_id not in test_ids], [e for e in examples if e.question_id in test_ids]


def train_verifier(cfg: RunConfig, out: Path, team: Team | None = None) -> dict[str, object]:
    """``team``: already running engines to sample from (tests share them); by default a new team is started."""
    vcfg = cfg.verifier
    start = time.time()
    examples = balance(sample_examples(cfg, team), cfg.seed)
    train, test = split_by_question(examples, vcfg.held_out, cfg.seed)
    if not train or not test:
        raise RuntimeError(f"only {len(examples)} balanced examples: raise task.limit so some questions have "
                           "both right and wrong answers")
    verifier = LearnedVerifier.from_base(resolve_model(vcfg.base or cfg.team.agents[0].model), cfg.seed)
    before = evaluate_verifier(verifier, test, vcfg.batch_size)
    losses = fit(verifier, train, vcfg.epochs, vcfg.lr, vcfg.train_batch_size, cfg.seed)
    after = evaluate_verifier(verifier, test, vcfg.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    verifier.save(out / "verifier")
    report = {"train_examples": len(train), "held_out_examples": len(test), "losses": losses,
              "held_out_before": before, "held_out": after, "seconds": time.time() - start,
              "path": str(out / "verifier")}
    write_json(out / "verifier_metrics.json", report)
    print(f"verifier: {len(train)} train / {len(test)} held-out balanced examples; held-out accuracy "
          f"{after['accuracy']:.3f} (untrained {before['accuracy']:.3f}), AUC {after['auc']:.3f}; "
          f"use it with verifier=learned verifier.path={out / 'verifier'}")
    return report

"""`mapoco eval method=conductor`, and the Conductor's evaluation pieces its training method reuses: the table of
the conductor beside its baselines, a named pool's evaluation, the transcripts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mapoco.conductor.rollout import (
    ConductorResult,
    ConductorRunner,
    summarize_conductor,
    transcript,
)
from mapoco.config import RunConfig
from mapoco.rollout.discussion import Team
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.cluster import check_local_gpus, init_ray
from mapoco.runtime.run_folder import prepare_output_dir, write_json, write_jsonl
from mapoco.tasks import Problem, load_task


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
    """transcripts.jsonl: each question's workflow."""
    write_jsonl(path, (transcript(problem, record) for problem, record in zip(result.problems, result.records)))


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

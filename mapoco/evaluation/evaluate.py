"""`mapoco eval`: run the discussion on a task and report per-turn team accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from mapoco.config import RunConfig
from mapoco.evaluation.report import (
    discussion_transcripts,
    plot_turns,
    summarize,
    turn_curves,
    turn_table,
)
from mapoco.rollout.discussion import DiscussionResult, Team, run_discussion
from mapoco.rollout.rewards import team_rewards
from mapoco.rollout.verifier import VerifierClient
from mapoco.runtime.cluster import check_local_gpus, init_ray
from mapoco.runtime.run_folder import prepare_output_dir, write_json, write_jsonl
from mapoco.tasks import Problem, load_task


def discuss_in_batches(
    team: Team, problems: list[Problem], cfg: RunConfig, verifier: VerifierClient, desc: str = "discussion"
) -> DiscussionResult:
    """All questions of one batch are in flight together; batches bound memory on long evaluations."""
    merged = DiscussionResult(list(problems), len(team), cfg.turns)
    size = cfg.discussion.batch_size
    for start in tqdm(range(0, len(problems), size), desc=desc, unit="batch", disable=len(problems) <= size):
        part = run_discussion(team, problems[start : start + size], cfg.turns, cfg.discussion, verifier, cfg.seed)
        merged.records.update({(q + start, a, t): r for (q, a, t), r in part.records.items()})
        for phase, seconds in part.seconds.items():
            merged.seconds[phase] += seconds
    return merged


def write_outputs(out: Path, result: DiscussionResult, summary: dict[str, Any], title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    write_jsonl(out / "transcripts.jsonl", discussion_transcripts(result))
    plot_turns(out / "accuracy_per_turn.png", turn_curves(summary), title)


def evaluate(cfg: RunConfig, out: Path) -> dict[str, Any]:
    check_local_gpus(cfg)
    data = load_task(cfg.task)  # before any actor: a bad dataset or output directory fails fast
    prepare_output_dir(out)
    init_ray(cfg)
    team, verifier = Team.of_run(cfg, wait=False), VerifierClient(cfg.verifier)  # all load at once
    try:
        team.wait_ready()
        result = discuss_in_batches(team, data.problems, cfg, verifier)
    finally:
        team.shutdown()
        verifier.shutdown()
    summary = summarize(result, team_rewards(result, cfg.rewards, cfg.discussion.topology), data.skipped)
    title = f"{cfg.team.name} on {cfg.task.name}"
    write_outputs(out, result, summary, title)
    print(turn_table(summary, title))
    print(f"wrote {out}/summary.json, transcripts.jsonl, accuracy_per_turn.png")
    return summary

"""`make reproduce-conductor`: the Conductor's claims over seeds, each beside its baselines, one command.

    .venv/bin/python -m experiments.conductor.reproduce               # every condition, 3 seeds (resumes)
    .venv/bin/python -m experiments.conductor.reproduce --summarize   # rebuild results.json and .md only

Every run is a plain `mapoco train` into outputs/conductor/<condition>/seed_<s>/ and evaluates on the same 200
held-out questions before and after training, with each worker alone, the workers' majority vote and a random
well-formed workflow as baselines (frozen workers: measured on the same questions).

- ``routing`` (`make demo-conductor`): a tiny conductor learns with GRPO whom to ask among a `+` and a `*`
  specialist.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from experiments.runs import (
    ROOT,
    RunSet,
    mean_std,
    read_results,
    reproduce_parser,
    with_recorded,
    write_readme_block,
)

HERE = Path(__file__).resolve().parent
RUNS = RunSet(ROOT / "outputs" / "conductor")
CONDITIONS: dict[str, list[str]] = {"routing": ["+experiment=conductor"]}
# Per seed, from summary.json: the figure's name -> how to read it.
FIGURES = {
    "conductor_accuracy": lambda s: s["conductor_accuracy"],
    "conductor_accuracy_before": lambda s: s["conductor_accuracy_before"],
    "best_worker_accuracy": lambda s: max(s["worker_accuracy"]),
    "majority_vote_accuracy": lambda s: s["majority_vote_accuracy"],
    "random_workflow_accuracy": lambda s: s["random_workflow_accuracy"],
    "malformed_rate": lambda s: s["malformed_rate"],
    "mean_steps": lambda s: s["mean_steps"],
}
BASELINES = ("conductor_accuracy_before", "best_worker_accuracy", "majority_vote_accuracy", "random_workflow_accuracy")


def seed_figures(summaries: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every figure of each run, from its summary.json."""
    return [{"seed": s, **{name: read(summary) for name, read in FIGURES.items()},
             "worker_accuracy": dict(zip(summary["workers"], summary["worker_accuracy"]))}
            for s, summary in summaries]


def condition_figures(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition's figures per seed, and their mean and std over the seeds."""
    out: dict[str, Any] = {"seeds": seeds}
    for name in FIGURES:
        out[f"{name}_mean"], out[f"{name}_std"] = mean_std([s[name] for s in seeds])
    return out


def claims(figures: dict[str, Any]) -> dict[str, Any]:
    """The conductor after training beats each baseline by more than twice the larger of the two stds."""
    mean, std = figures["conductor_accuracy_mean"], figures["conductor_accuracy_std"]
    return {name: {"margin": mean - figures[f"{name}_mean"],
                   "beats_by_twice_std": mean - figures[f"{name}_mean"] > 2 * max(std, figures[f"{name}_std"])}
            for name in BASELINES}


def summarize() -> dict[str, Any]:
    """results.json from every finished run on disk; a seed without one keeps what results.json recorded."""
    recorded = read_results(HERE / "results.json")
    conditions = {name: condition_figures(seeds) for name in CONDITIONS
                  if (seeds := with_recorded(seed_figures(RUNS.summaries(name)), recorded.get(name)))}
    results = {**conditions, "claims": {name: claims(f) for name, f in conditions.items()},
               "command": "make reproduce-conductor", "date": dt.date.today().isoformat(),
               "questions": "200 held-out test questions of the task (task.split=test, task.seed=0)"}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(table(conditions) + "\n")
    return results


def table(conditions: dict[str, Any]) -> str:
    columns = [("conductor, after", "conductor_accuracy"), ("conductor, before", "conductor_accuracy_before"),
               ("best worker alone", "best_worker_accuracy"), ("majority vote", "majority_vote_accuracy"),
               ("random workflow", "random_workflow_accuracy"), ("malformed", "malformed_rate"),
               ("steps", "mean_steps")]
    rows = ["| condition | seeds | " + " | ".join(label for label, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for name, c in conditions.items():
        cells = [f"{c[f'{key}_mean']:.3f} ± {c[f'{key}_std']:.3f}" for _, key in columns]
        rows.append(f"| `{name}` | {len(c['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = reproduce_parser(__doc__, CONDITIONS)
    args = parser.parse_args(argv)
    if not args.summarize:
        for seed in args.seeds:  # seed-major: an interrupted run has every condition's first seeds
            for condition in args.only or list(CONDITIONS):
                RUNS.run(condition, seed, CONDITIONS[condition])
                summarize()
    results = summarize()
    conditions = {k: v for k, v in results.items() if k in CONDITIONS}
    if conditions:
        write_readme_block("conductor", f"`make reproduce-conductor`, {results['date']}:\n\n{table(conditions)}")
    print(table(conditions) if conditions else "no finished runs")
    print(json.dumps(results["claims"], indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()

"""`make reproduce-conductor`: the Conductor's claims over seeds, each beside its baselines, one command.

    .venv/bin/python -m experiments.conductor.reproduce                      # every condition, 3 seeds (resumes)
    .venv/bin/python -m experiments.conductor.reproduce --only composition   # one experiment
    .venv/bin/python -m experiments.conductor.reproduce --only pools recursion   # groups of conditions
    .venv/bin/python -m experiments.conductor.reproduce --summarize          # rebuild results.json, .md, .png only

Every run is a plain `mapoco train` into outputs/conductor/<condition>/seed_<s>/ and evaluates on the same 200
held-out questions before and after training, with each worker alone, the workers' majority vote, a random
well-formed workflow and any hand-written workflow of the experiment as baselines (frozen workers: measured on the
same questions).

- ``routing`` (`make demo-conductor`): a tiny conductor learns with GRPO whom to ask among a `+` and a `*`
  specialist.
- ``composition``: questions `a * b + c` that neither worker answers alone; the conductor has to learn a two-step
  workflow whose second step sees the first. The hand-written baseline is that workflow.
- ``cost_<w>``: a cheap `+` specialist (1 per call) and an expensive generalist (10 per call) on questions that are
  `+` three times in four, at `conductor.cost_weight=w`; results.json's ``cost`` has one entry per weight and
  cost.png the accuracy/cost trade-off.
- ``pools_routing`` then ``heldout_pool`` (the paper's recipe): a routing conductor trained on the first pair
  (``pool-conductor``, workers known by stable ids), then a second phase from it (``train.init_from``) on random
  subsets of four workers in random order, never both b-workers; evaluated on random training-like pools and on
  four named pools each beside its own baselines: the trained pair and the held-out b-pair, each in both orders.
  ``heldout_pool_one_phase``: the second phase alone, from the warm-start.
- ``heldout_pool_cards``: the same pools, renumbered, the workers known only by their cards (``card-conductor``).
- ``recursion``: composition with an adder that fails 30% of its calls and up to two planning rounds: the conductor
  sees its workflow's answer and accepts it or writes a new workflow, earning what its re-plan changed;
  ``recursion_control`` at failure rate 0; ``recursion_discounted`` with the paper's reward (one group over both
  rounds, the first earning 0.75 of its own outcome and 0.25 of the final one).
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
    selected,
    with_recorded,
    write_readme_block,
)
from mapoco.evaluation.report import save_figure

HERE = Path(__file__).resolve().parent
RUNS = RunSet(ROOT / "outputs" / "conductor")
COST_WEIGHTS = ("0", "0.3")
CONDITIONS: dict[str, list[str]] = {
    "routing": ["+experiment=conductor"],
    "composition": ["+experiment=composition"],
    **{f"cost_{w}": ["+experiment=cost", f"conductor.cost_weight={w}"] for w in COST_WEIGHTS},
    "pools_routing": ["+experiment=conductor", "team.agents.0.model=pool-conductor"],
    "heldout_pool": ["+experiment=pools_ids"],
    "heldout_pool_one_phase": ["+experiment=pools_ids"],
    "heldout_pool_cards": ["+experiment=pools"],
    "recursion": ["+experiment=recursion"],
    "recursion_control": ["+experiment=recursion", "team.agents.2.fail_rate=0"],
    "recursion_discounted": ["+experiment=recursion", "conductor.replan_reward=discounted"],
}
# A condition that is a second training phase: it starts from the same seed's run of another (train.init_from)
PHASES = {"heldout_pool": "pools_routing"}
# --only pools recursion: the names stand for these conditions
GROUPS = {"pools": ["pools_routing", "heldout_pool", "heldout_pool_one_phase", "heldout_pool_cards"],
          "recursion": ["recursion", "recursion_control", "recursion_discounted"]}
# experiment/pools.yaml's conductor.eval_pools, in order, as results.json names them
NAMED_POOLS = ("trained_pool", "trained_pool_reversed", "heldout_pool", "heldout_pool_reversed")
POOL_CONDITIONS = ("heldout_pool", "heldout_pool_one_phase", "heldout_pool_cards")
SPECIALTY = {"adder": "+", "multiplier": "*", "adder_b": "+", "multiplier_b": "*"}  # team/conductor_pools*
POOL_FIGURES = {"conductor_accuracy": lambda p: p["conductor_accuracy"],
                "best_worker_accuracy": lambda p: max(p["worker_accuracy"]),
                "majority_vote_accuracy": lambda p: p["majority_vote_accuracy"],
                "random_workflow_accuracy": lambda p: p["random_workflow_accuracy"]}


def _pool_reader(index: int, read: Any, before: bool = False) -> Any:
    """A named pool's figure from a summary (None: a run without named pools)."""
    def figure(s: dict[str, Any]) -> Any:
        pools = (s.get("before") or {}).get("eval_pools") if before else s.get("eval_pools")
        return read(pools[index]) if pools and index < len(pools) else None
    return figure



# Per seed, from summary.json: the figure's name -> how to read it (None: the run has no such figure).
FIGURES = {
    "conductor_accuracy": lambda s: s["conductor_accuracy"],
    "conductor_accuracy_before": lambda s: s["conductor_accuracy_before"],
    "best_worker_accuracy": lambda s: max(s["worker_accuracy"]),
    "majority_vote_accuracy": lambda s: s["majority_vote_accuracy"],
    "random_workflow_accuracy": lambda s: s["random_workflow_accuracy"],
    "best_fixed_workflow_accuracy": lambda s: max(s.get("fixed_workflow_accuracy") or [None]),
    "malformed_rate": lambda s: s["malformed_rate"],
    "mean_steps": lambda s: s["mean_steps"],
    "mean_cost": lambda s: s["mean_cost"],
    "mean_cost_before": lambda s: s["before"]["mean_cost"] if s.get("before") else None,
    **{k: (lambda s, k=k: s.get(k)) for k in ("first_plan_accuracy", "replan_accept_rate", "replan_malformed_rate",
                                              "replan_fixed_rate", "replan_broke_rate")},
    **{f"{pool}_{name}": _pool_reader(i, read) for i, pool in enumerate(NAMED_POOLS)
       for name, read in POOL_FIGURES.items()},
    **{f"{pool}_conductor_accuracy_before": _pool_reader(i, POOL_FIGURES["conductor_accuracy"], before=True)
       for i, pool in enumerate(NAMED_POOLS)},
}
BASELINES = ("conductor_accuracy_before", "best_worker_accuracy", "majority_vote_accuracy",
             "random_workflow_accuracy", "best_fixed_workflow_accuracy")


SPECIALIST_FIGURES = tuple(f"{pool}_specialist_rate" for pool in NAMED_POOLS)


def seed_figures(summaries: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every figure of each run, from its summary.json."""
    return [{"seed": s, **{name: value for name, read in FIGURES.items() if (value := read(summary)) is not None},
             "worker_accuracy": dict(zip(summary["workers"], summary["worker_accuracy"])),
             "worker_cost": dict(zip(summary["workers"], summary["worker_cost"]))}
            for s, summary in summaries]


def specialist_rates(run: Path) -> dict[str, float]:
    """Per named pool after training: the share of questions whose every workflow step asked a worker whose
    specialty is the question's operation (a malformed plan asks no one: not a specialist)."""
    out = {}
    for index, figure in enumerate(SPECIALIST_FIGURES):
        path = run / f"transcripts_after_pool_{index}.jsonl"
        if path.exists():
            records = [json.loads(line) for line in path.read_text().splitlines()]
            out[figure] = sum(bool(r["steps"]) and all(SPECIALTY.get(step["worker"]) == operation(r["question"])
                                                       for step in r["steps"]) for r in records) / len(records)
    return out


def operation(question: str) -> str:
    return "*" if "*" in question else "+"


def condition_figures(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition's figures per seed, and their mean and std over the seeds (of every figure all seeds have)."""
    out: dict[str, Any] = {"seeds": seeds}
    for name in (*FIGURES, *SPECIALIST_FIGURES):
        if all(name in s for s in seeds):
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std([s[name] for s in seeds])
    for per_worker in ("worker_accuracy", "worker_cost"):
        if all(per_worker in s for s in seeds):
            out[f"{per_worker}_mean"] = {w: mean_std([s[per_worker][w] for s in seeds])[0]
                                         for w in seeds[0][per_worker]}
    return out


def example_workflow(condition: str, seed: int = 0) -> dict[str, Any] | None:
    """The first right answer of a run's after-training evaluation: what the conductor wrote and each step."""
    path = RUNS.dir(condition, seed) / "transcripts_after.jsonl"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["correct"]:
            return {"seed": seed, "question": record["question"], "gold": record["gold"], "pool": record["pool"],
                    "conductor": record["conductor"][0]["text"],
                    "steps": [{k: step[k] for k in ("worker", "access", "response")} for step in record["steps"]]}
    return None


def beats(figures: dict[str, Any], pool: str = "") -> dict[str, Any]:
    """The conductor's margin over each baseline, and whether it exceeds twice the larger of the two stds (``pool``:
    on that named pool's figures, its prefix)."""
    mean, std = figures[f"{pool}conductor_accuracy_mean"], figures[f"{pool}conductor_accuracy_std"]
    margins = {name: (mean - figures[f"{pool}{name}_mean"], max(std, figures[f"{pool}{name}_std"]))
               for name in BASELINES if f"{pool}{name}_mean" in figures}
    return {name: {"margin": margin, "beats_by_twice_std": margin > 2 * noise}
            for name, (margin, noise) in margins.items()}


def claims(conditions: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    """Every condition against its baselines; composition's and cost's acceptance figures."""
    out: dict[str, Any] = {name: beats(f) for name, f in conditions.items()}
    for name in POOL_CONDITIONS:
        if name in conditions:
            out[name].update({pool: beats(conditions[name], f"{pool}_") for pool in NAMED_POOLS
                              if f"{pool}_conductor_accuracy_mean" in conditions[name]})
    if "heldout_pool_conductor_accuracy_mean" in conditions.get("heldout_pool", {}):
        c = conditions["heldout_pool"]
        held = [c[f"{pool}_conductor_accuracy_mean"] for pool in ("heldout_pool", "heldout_pool_reversed")]
        trained = [c[f"{pool}_conductor_accuracy_mean"] for pool in ("trained_pool", "trained_pool_reversed")]
        margins = [out["heldout_pool"][pool]["best_worker_accuracy"]["beats_by_twice_std"]
                   for pool in ("heldout_pool", "heldout_pool_reversed")]
        specialist = [c.get(f"{pool}_specialist_rate_mean", 0.0) for pool in ("heldout_pool", "heldout_pool_reversed")]
        out["heldout_pool"]["acceptance"] = {
            "heldout_accuracy": held, "specialist_rate": specialist,
            "trained_minus_heldout": sum(trained) / 2 - sum(held) / 2,
            "met": (min(held) >= 0.85 and all(margins) and min(specialist) >= 0.95
                    and sum(trained) / 2 - sum(held) / 2 <= 0.05)}
    if "recursion" in conditions:
        out["recursion"]["acceptance"] = recursion_acceptance(conditions)
    if "composition" in conditions:
        c = conditions["composition"]
        out["composition"]["acceptance"] = {
            "margin_over_best_worker": c["conductor_accuracy_mean"] - c["best_worker_accuracy_mean"],
            "margin_over_majority_vote": c["conductor_accuracy_mean"] - c["majority_vote_accuracy_mean"],
            "mean_steps": c["mean_steps_mean"],
            "met": (c["conductor_accuracy_mean"] - max(c["best_worker_accuracy_mean"],
                                                        c["majority_vote_accuracy_mean"]) >= 0.2
                    and c["mean_steps_mean"] >= 2)}
    if "0" in cost:
        free = cost["0"]
        out["cost"] = {w: {"cost_drop": 1 - f["mean_cost_mean"] / free["mean_cost_mean"],
                           "accuracy_change": f["conductor_accuracy_mean"] - free["conductor_accuracy_mean"],
                           "met": (1 - f["mean_cost_mean"] / free["mean_cost_mean"] >= 0.3
                                   and abs(f["conductor_accuracy_mean"] - free["conductor_accuracy_mean"]) <= 0.03)}
                       for w, f in cost.items() if w != "0"}
    return out


def recursion_acceptance(conditions: dict[str, Any]) -> dict[str, Any]:
    """Re-planning against a failing worker: the final answer at least 0.15 above the first plan's, at most 1% of
    right first answers broken; at failure rate 0 (the control) within 0.01 of composition."""
    r = conditions["recursion"]
    gain = r["conductor_accuracy_mean"] - r["first_plan_accuracy_mean"]
    out = {"final_minus_first_plan": gain, "right_answers_broken": r["replan_broke_rate_mean"]}
    met = gain >= 0.15 and r["replan_broke_rate_mean"] <= 0.01
    if "recursion_control" in conditions and "composition" in conditions:
        out["control_minus_composition"] = (conditions["recursion_control"]["conductor_accuracy_mean"]
                                            - conditions["composition"]["conductor_accuracy_mean"])
        met = met and abs(out["control_minus_composition"]) <= 0.01
    return {**out, "met": met}


def run_figures(condition: str) -> list[dict[str, Any]]:
    """Every finished run's figures, with its named pools' specialist rates read from its transcripts."""
    return [{**figures, **specialist_rates(RUNS.dir(condition, figures["seed"]))}
            for figures in seed_figures(RUNS.summaries(condition))]


def summarize() -> dict[str, Any]:
    """results.json from every finished run on disk; a seed without one keeps what results.json recorded."""
    recorded = read_results(HERE / "results.json")
    recorded_of = {**{n: recorded.get(n) for n in CONDITIONS},
                   **{f"cost_{w}": recorded.get("cost", {}).get(w) for w in COST_WEIGHTS}}
    found = {name: condition_figures(seeds) for name in CONDITIONS
             if (seeds := with_recorded(run_figures(name), recorded_of[name], name))}
    conditions = {n: f for n, f in found.items() if not n.startswith("cost_")}
    cost = {n.removeprefix("cost_"): f for n, f in found.items() if n.startswith("cost_")}
    if "composition" in conditions:
        example = example_workflow("composition") or recorded.get("composition", {}).get("example")
        conditions["composition"]["example"] = example
    results = {**conditions, "cost": cost, "claims": claims(conditions, cost), "command": "make reproduce-conductor",
               "date": dt.date.today().isoformat(),
               "questions": "200 held-out test questions of each task (task.split=test, task.seed=0)"}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "results.md").write_text(report_tables(results) + "\n")
    if cost:
        plot_cost(cost, HERE / "cost.png")
    return results


def _cell(c: dict[str, Any], key: str) -> str:
    return f"{c[f'{key}_mean']:.3f} ± {c[f'{key}_std']:.3f}" if f"{key}_mean" in c else "–"


def table(conditions: dict[str, Any]) -> str:
    columns = [("conductor, after", "conductor_accuracy"), ("conductor, before", "conductor_accuracy_before"),
               ("best worker alone", "best_worker_accuracy"), ("majority vote", "majority_vote_accuracy"),
               ("random workflow", "random_workflow_accuracy"),
               ("hand-written workflow", "best_fixed_workflow_accuracy"), ("malformed", "malformed_rate"),
               ("steps", "mean_steps")]
    rows = ["| condition | seeds | " + " | ".join(label for label, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for name, c in conditions.items():
        rows.append(f"| `{name}` | {len(c['seeds'])} | " + " | ".join(_cell(c, key) for _, key in columns) + " |")
    return "\n".join(rows)


def cost_table(cost: dict[str, Any]) -> str:
    """The trade-off: per cost weight the conductor's accuracy and mean cost per question, then each worker alone."""
    rows = ["| | seeds | accuracy | cost per question |", "|---|---|---|---|"]
    rows += [f"| conductor, `cost_weight={w}` | {len(c['seeds'])} | {_cell(c, 'conductor_accuracy')} | "
             f"{_cell(c, 'mean_cost')} |" for w, c in cost.items()]
    any_run = next(iter(cost.values()))
    rows += [f"| {worker} alone | | {acc:.3f} | {any_run['worker_cost_mean'][worker]:.3f} |"
             for worker, acc in any_run["worker_accuracy_mean"].items()]
    return "\n".join(rows)


def pools_table(name: str, c: dict[str, Any]) -> str:
    """A pools condition: the conductor on each kind of pool, before and after training, beside that pool's
    baselines, and how often its plans ask only specialists of the question's operation."""
    columns = [("conductor, after", "conductor_accuracy"), ("conductor, before", "conductor_accuracy_before"),
               ("best worker alone", "best_worker_accuracy"), ("majority vote", "majority_vote_accuracy"),
               ("random workflow", "random_workflow_accuracy"), ("asks only specialists", "specialist_rate")]
    rows = [f"`{name}`:", "", "| pool | " + " | ".join(label for label, _ in columns) + " |",
            "|---|" + "---|" * len(columns)]
    for label, prefix in (("random training pools (2-4 workers)", ""), *((pool.replace("_", " "), f"{pool}_")
                                                                         for pool in NAMED_POOLS)):
        rows.append(f"| {label} | " + " | ".join(_cell(c, prefix + key) for _, key in columns) + " |")
    return "\n".join(rows)


def recursion_table(conditions: dict[str, Any]) -> str:
    """recursion beside composition: what the re-plan round did to the first workflow's answer."""
    columns = [("accuracy", "conductor_accuracy"), ("first plan's accuracy", "first_plan_accuracy"),
               ("re-plans accepted", "replan_accept_rate"), ("re-plans unparsed", "replan_malformed_rate"),
               ("wrong → right", "replan_fixed_rate"),
               ("right → wrong", "replan_broke_rate"), ("steps", "mean_steps")]
    rows = ["| condition | seeds | " + " | ".join(label for label, _ in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for name in ("composition", "recursion", "recursion_control", "recursion_discounted"):
        if name in conditions:
            c = conditions[name]
            rows.append(f"| `{name}` | {len(c['seeds'])} | " + " | ".join(_cell(c, k) for _, k in columns) + " |")
    return "\n".join(rows)


def example_text(example: dict[str, Any]) -> str:
    steps = "\n".join(f"step {i}: {s['worker']} (access {s['access']}) -> {s['response']}"
                      for i, s in enumerate(example["steps"]))
    return (f"Seed {example['seed']}, held-out question `{example['question']}` (gold {example['gold']}), pool "
            f"{example['pool']} (the conductor sees Model 0, Model 1); it wrote\n\n```\n{example['conductor']}\n"
            f"```\n\nand the steps answered\n\n```\n{steps}\n```")


def report_tables(results: dict[str, Any]) -> str:
    conditions = {k: v for k, v in results.items() if k in CONDITIONS}
    parts = [table(conditions)] if conditions else []
    if results["cost"]:
        parts.append(cost_table(results["cost"]))
    for name in POOL_CONDITIONS:
        if name in conditions:
            parts.append(pools_table(name, conditions[name]))
    if "recursion" in conditions:
        parts.append(recursion_table(conditions))
    if conditions.get("composition", {}).get("example"):
        parts.append(example_text(conditions["composition"]["example"]))
    return "\n\n".join(parts)


def plot_cost(cost: dict[str, Any], path: Path) -> None:
    """Accuracy against mean cost per question: the conductor at each weight (mean ± std) and each worker alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for w, c in cost.items():
        ax.errorbar(c["mean_cost_mean"], c["conductor_accuracy_mean"], xerr=c["mean_cost_std"],
                    yerr=c["conductor_accuracy_std"], fmt="o", capsize=3, label=f"conductor, cost_weight={w}")
    any_run = next(iter(cost.values()))
    for worker, acc in any_run["worker_accuracy_mean"].items():
        ax.plot(any_run["worker_cost_mean"][worker], acc, "s", color="grey")
        ax.annotate(f"{worker} alone", (any_run["worker_cost_mean"][worker], acc), textcoords="offset points",
                    xytext=(6, -4), fontsize=8)
    ax.set_xlabel("mean cost per question")
    ax.set_ylabel("accuracy (200 held-out questions)")
    ax.set_title("Cost-aware routing: accuracy against cost")
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def overrides(condition: str, seed: int) -> list[str]:
    """A condition's command line; a second phase's starts from its first phase's run of the same seed."""
    if condition not in PHASES:
        return CONDITIONS[condition]
    first = PHASES[condition]
    RUNS.run(first, seed, CONDITIONS[first])
    return [*CONDITIONS[condition], f"train.init_from={RUNS.dir(first, seed)}"]


def main(argv: list[str] | None = None) -> None:
    parser = reproduce_parser(__doc__, CONDITIONS, GROUPS)
    args = parser.parse_args(argv)
    if not args.summarize:
        for seed in args.seeds:  # seed-major: an interrupted run has every condition's first seeds
            for condition in selected(args.only, list(CONDITIONS), GROUPS):
                RUNS.run(condition, seed, overrides(condition, seed))
                summarize()
    results = summarize()
    text = report_tables(results)
    if text:
        write_readme_block("conductor", f"`make reproduce-conductor`, {results['date']}:\n\n{text}")
    print(text or "no finished runs")
    print(json.dumps(results["claims"], indent=2), file=sys.stderr)


if __name__ == "__main__":
    main()

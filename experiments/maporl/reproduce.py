"""`make reproduce`: MAPoRL's claims on the collaboration testbed, each with its control, over seeds, one command.

    .venv/bin/python -m experiments.maporl.reproduce                 # every condition, 3 seeds (resumes)
    .venv/bin/python -m experiments.maporl.reproduce --only cotrain frozen_partner
    .venv/bin/python -m experiments.maporl.reproduce --only unseen       # the unseen domain and its controls
    .venv/bin/python -m experiments.maporl.reproduce --summarize     # rebuild results.json, .md and .png only
    .venv/bin/python -m experiments.maporl.reproduce --verdict outputs/demo   # one run against the controls

Every run is a plain `mapoco train` into outputs/maporl/<condition>/seed_<s>/; a run whose summary.json exists is
kept, so an interrupted reproduction goes on where it stopped. All conditions are evaluated on the same 200
held-out test questions (task.split=test, task.seed 0, whatever the run's seed). results.json keeps, per condition,
every seed's per-turn team accuracy after training and the turn-to-turn transitions; `untrained` is the co-trained
runs' evaluation before their first step (the same team, the same questions). A seed whose run is not on disk
(a fresh clone) keeps the figures results.json recorded, so `--only X` adds X's runs to the table, not replaces it.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.runs import (
    ROOT,
    RunSet,
    columns_mean_std,
    mean_std,
    read_results,
    reproduce_parser,
    selected,
    with_recorded,
    write_readme_block,
)
from mapoco.evaluation.report import save_figure

HERE = Path(__file__).resolve().parent
RUNS = RunSet(ROOT / "outputs" / "maporl")
COLLAB = ["+experiment=collab"]
ALONE = {"adder": "talk-add", "multiplier": "talk-mul"}
UNSEEN = ["+experiment=unseen_domain"]
# name -> overrides. Every trained condition runs the same questions, steps and batch as `cotrain`.
CONDITIONS: dict[str, list[str]] = {
    "cotrain": COLLAB,
    **{f"single_{name}": [*COLLAB, f"team.agents=[{{name:{name},model:{model}}}]", "turns=1"]
       for name, model in ALONE.items()},
    "frozen_partner": [*COLLAB, "+team.agents.1.trainable=false"],  # the adder trains; the multiplier is frozen
    **{f"{coef}_2": [*COLLAB, f"rewards.{coef}=2"] for coef in ("alpha0", "alpha1", "beta0", "beta1")},
    # `cotrain` with the next rollout sampled during each update (one update stale, importance-weighted)
    "cotrain_overlap": [*COLLAB, "train.off_policy_steps=1"],
    "tiny2_cotrain": ["+experiment=tiny2", "train.steps=80", "train.save_every=0"],
    # The unseen domain: co-trained on the arithmetic (domain A) as `cotrain` is, evaluated on it and on the
    # `numbers` questions (domain B), which no run trains on; with the controls that make sense there.
    "unseen_domain": UNSEEN,
    **{f"unseen_single_{name}": [*UNSEEN, f"team.agents=[{{name:{name},model:{model}}}]", "turns=1"]
       for name, model in (("adder", "duo-add"), ("multiplier", "duo-mul"))},
    "unseen_frozen_partner": [*UNSEEN, "+team.agents.1.trainable=false"],
}
DERIVED = {"untrained": "cotrain", "unseen_untrained": "unseen_domain"}  # the `before` evaluation of these runs
# Run first, every seed: the conditions the main claims (collaboration gain, the team beats its controls) rest on.
CORE = ("cotrain", "single_adder", "single_multiplier", "frozen_partner")
GROUPS = {"unseen": [name for name in CONDITIONS if name.startswith("unseen_")]}  # `--only unseen`


def seed_figures(summaries: list[tuple[int, dict[str, Any]]], when: str) -> list[dict[str, Any]]:
    """Each run's figures from its summary.json; ``when`` is the evaluation to read (``before`` or ``after``)."""
    return [{"seed": s, **evaluation_figures(summary[when])} for s, summary in summaries]


def evaluation_figures(evaluation: dict[str, Any]) -> dict[str, Any]:
    """One evaluation's figures; a held-out domain's (``train.eval_tasks``) under ``domains``."""
    figures = {key: evaluation[key] for key in ("turn_accuracy", "agent_turn_accuracy", "transitions", "deferral")
               if key in evaluation}  # deferral: runs since 2026-12-07
    if "domains" in evaluation:
        figures["domains"] = {name: evaluation_figures(domain) for name, domain in evaluation["domains"].items()}
    return figures


def condition_figures(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition over its seeds: per-turn team accuracy (mean, std), the collaboration gain, transitions; the
    same for each held-out domain under ``domains``."""
    mean, std = columns_mean_std([s["turn_accuracy"] for s in seeds])
    gain_mean, gain_std = mean_std([s["turn_accuracy"][-1] - s["turn_accuracy"][0] for s in seeds])
    transitions = [{key: statistics.fmean(s["transitions"][t][key] for s in seeds)
                    for key in ("turn", "wrong_to_right", "right_to_wrong")}
                   for t in range(len(seeds[0]["transitions"]))]
    figures = {"seeds": seeds, "turn_accuracy_mean": mean, "turn_accuracy_std": std,
               "collaboration_gain_mean": gain_mean, "collaboration_gain_std": gain_std, "transitions": transitions}
    if all("deferral" in s for s in seeds):
        figures["deferral"] = [{"turn": turn["turn"], **{key: [_mean_of([s["deferral"][t][key][a] for s in seeds])
                                                              for a in range(len(turn[key]))]
                                                        for key in ("kept_when_right", "kept_when_wrong")}}
                               for t, turn in enumerate(seeds[0]["deferral"])]
    if "domains" in seeds[0]:
        figures["domains"] = {name: {k: v for k, v in condition_figures([s["domains"][name] for s in seeds]).items()
                                     if k != "seeds"} for name in seeds[0]["domains"]}
    return figures


def summarize() -> dict[str, Any]:
    return discussion_results(RUNS, HERE, [*CONDITIONS, *DERIVED], DERIVED, claims, "make reproduce")


def discussion_results(runs: RunSet, here: Path, names: Sequence[str], derived: dict[str, str],
                       claims: Callable[[dict[str, Any]], dict[str, Any]], command: str) -> dict[str, Any]:
    """A discussion experiment's results.json, results.md and turn_accuracy.png in ``here``, from every finished run
    of ``names`` on disk (a derived name reads its source condition's ``before`` evaluation); a seed whose run is
    not here (a fresh clone, another machine's runs) keeps the figures the last results.json recorded for it."""
    recorded = read_results(here / "results.json").get("conditions", {})
    conditions = {}
    for name in names:
        found = seed_figures(runs.summaries(derived.get(name, name)), "before" if name in derived else "after")
        if seeds := with_recorded(found, recorded.get(name), name):
            conditions[name] = condition_figures(seeds)
    results = {"conditions": conditions, "claims": claims(conditions),
               "command": command, "date": dt.date.today().isoformat(),
               "questions": "200 held-out test questions of the task (task.split=test, task.seed=0)"}
    (here / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (here / "results.md").write_text(table(conditions) + "\n")
    if conditions:
        plot(conditions, here / "turn_accuracy.png")
    return results


def _mean_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def claims(conditions: dict[str, Any]) -> dict[str, Any]:
    """The acceptance checks, computed from the figures: (a) the collaboration gain of `cotrain` exceeds twice its
    std over seeds; (b) `cotrain`'s last turn beats every control's best turn."""
    found = {}
    if "cotrain" in conditions:
        cotrain = conditions["cotrain"]
        last = cotrain["turn_accuracy_mean"][-1]
        controls = {name: max(c["turn_accuracy_mean"]) for name, c in conditions.items()
                    if name in ("untrained", "frozen_partner") or name.startswith("single_")}
        found = {"collaboration_gain": cotrain["collaboration_gain_mean"],
                 "collaboration_gain_std": cotrain["collaboration_gain_std"],
                 "gain_exceeds_twice_std": cotrain["collaboration_gain_mean"] > 2 * cotrain["collaboration_gain_std"],
                 "cotrain_last_turn": last, "controls_best_turn": controls,
                 "beats_every_control": all(last > v for v in controls.values())}
    if "unseen_domain" in conditions and "unseen_untrained" in conditions:
        found["unseen_domain"] = unseen_claim(conditions["unseen_domain"], conditions["unseen_untrained"])
    return found


def unseen_claim(trained: dict[str, Any], untrained: dict[str, Any], domain: str = "numbers") -> dict[str, Any]:
    """MAPoRL's unseen-domain claim: after co-training on domain A only, the collaboration gain on domain B (last
    turn minus turn 1) exceeds twice its std over seeds and the untrained team's gain on B; beside it, the share of
    the in-domain gain it keeps."""
    on_b = trained["domains"][domain]
    gain, std = on_b["collaboration_gain_mean"], on_b["collaboration_gain_std"]
    before = untrained["domains"][domain]["collaboration_gain_mean"]
    in_domain = trained["collaboration_gain_mean"] - untrained["collaboration_gain_mean"]
    return {"domain": domain, "gain_on_b": gain, "gain_on_b_std": std, "untrained_gain_on_b": before,
            "gain_on_a": trained["collaboration_gain_mean"],
            "untrained_gain_on_a": untrained["collaboration_gain_mean"],
            "share_of_in_domain_gain_kept": (gain - before) / in_domain if in_domain else None,
            "holds": gain > 2 * std and gain > before}


def table(conditions: dict[str, Any]) -> str:
    width = max(len(c["turn_accuracy_mean"]) for c in conditions.values())
    head = [f"turn {t + 1}" for t in range(width)]
    rows = ["| condition | seeds | " + " | ".join(head) + " | last - turn 1 | wrong->right | right->wrong |",
            "|---|---|" + "---|" * width + "---|---|---|"]
    for name, c in conditions.items():
        rows.append(_row(f"`{name}`", len(c["seeds"]), c, width))
        rows += [_row(f"`{name}` on {domain}", len(c["seeds"]), figures, width)
                 for domain, figures in c.get("domains", {}).items()]
    return "\n".join(rows)


def _row(label: str, seeds: int, c: dict[str, Any], width: int) -> str:
    cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(c["turn_accuracy_mean"], c["turn_accuracy_std"])]
    cells += ["—"] * (width - len(cells))
    w2r = " / ".join(f"{t['wrong_to_right']:.0f}" for t in c["transitions"]) or "—"
    r2w = " / ".join(f"{t['right_to_wrong']:.0f}" for t in c["transitions"]) or "—"
    return (f"| {label} | {seeds} | " + " | ".join(cells) +
            f" | {c['collaboration_gain_mean']:+.3f} ± {c['collaboration_gain_std']:.3f} | {w2r} | {r2w} |")


def plot(conditions: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, c) in enumerate(conditions.items()):
        turns = [t + 1 + (i - len(conditions) / 2) * 0.02 for t in range(len(c["turn_accuracy_mean"]))]
        ax.errorbar(turns, c["turn_accuracy_mean"], yerr=c["turn_accuracy_std"], marker="o", capsize=3, label=name)
    ax.set_xlabel("turn")
    ax.set_ylabel("team accuracy (majority vote)")
    ax.set_title("team accuracy per turn, mean ± std over seeds (200 held-out questions)", fontsize=10)
    ax.set_xticks(range(1, max(len(c["turn_accuracy_mean"]) for c in conditions.values()) + 1))
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_readme_table(results: dict[str, Any]) -> None:
    write_readme_block("maporl", f"`make reproduce`, {results['date']}:\n\n{table(results['conditions'])}")


def verdict(run: Path) -> str:
    """One line on a finished run (`make demo`): its collaboration gain after training, and the controls' best
    turns from the last full reproduction (results.json) beside its last turn."""
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"]["turn_accuracy"], summary["after"]["turn_accuracy"]
    gain = after[-1] - after[0]
    line = (f"verdict: collaboration gain after training {gain:+.3f} (turn {len(after)} {after[-1]:.3f} vs turn 1 "
            f"{after[0]:.3f}; before training {before[-1] - before[0]:+.3f}); last turn {before[-1]:.3f} -> "
            f"{after[-1]:.3f}")
    results = HERE / "results.json"
    controls = json.loads(results.read_text()).get("claims", {}).get("controls_best_turn", {}) if results.exists() else {}
    shown = {k: v for k, v in controls.items() if k != "untrained"}
    if shown:
        line += "; controls (make reproduce, mean over seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items())
    return line


def report(results: dict[str, Any], write_table: Callable[[dict[str, Any]], None]) -> None:
    """A discussion experiment's last word: its README table rewritten, the table and the claims printed."""
    if results["conditions"]:
        write_table(results)
    print(table(results["conditions"]) if results["conditions"] else "no finished runs")
    print(json.dumps(results["claims"], indent=2), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = reproduce_parser(__doc__, CONDITIONS, GROUPS)
    parser.add_argument("--verdict", type=Path, help="print one finished run's verdict against the controls")
    args = parser.parse_args(argv)
    if args.verdict:
        print(verdict(args.verdict))
        return
    if not args.summarize:
        chosen = selected(args.only, list(CONDITIONS), GROUPS)
        for group in ([c for c in chosen if c in CORE], [c for c in chosen if c not in CORE]):
            for seed in args.seeds:  # seed-major within a group: an interrupted run has every condition's first seeds
                for condition in group:
                    RUNS.run(condition, seed, CONDITIONS[condition])
                    summarize()
    report(summarize(), write_readme_table)


if __name__ == "__main__":
    main()

"""Agents as LoRA adapters on one shared engine (`team.lora_engine`), co-trained over seeds, with their controls.

    .venv/bin/python -m experiments.lora.reproduce                 # every condition, 3 seeds (resumes)
    .venv/bin/python -m experiments.lora.reproduce --only shared
    .venv/bin/python -m experiments.lora.reproduce --summarize     # rebuild results.json and .md only

`+experiment=lora`: three `+` specialists (talk-add) train an adapter each, in learner groups of their own, and one
vLLM engine serves all three adapters; a frozen `*` specialist (talk-mul, another family) has engines of its own
and is the star's hub. Each run is a plain `mapoco train` into outputs/lora/<condition>/seed_<s>/, evaluated before
and after training on the same 200 held-out test questions; results.json keeps the per-turn team accuracy of every
seed (the figures and table code are `make reproduce`'s).

- ``shared``: the adapters on one engine (the mode under test);
- ``separate``: the same learners, each agent on an engine of its own with its adapter merged into the weights
  (``team.lora_engine=false``): what the shared engine has to match;
- ``untrained``: the team before training (the ``shared`` runs' first evaluation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments.maporl.reproduce import discussion_results, report, table
from experiments.runs import ROOT, RunSet, reproduce_parser, write_readme_block

HERE = Path(__file__).resolve().parent
RUNS = RunSet(ROOT / "outputs" / "lora")
CONDITIONS: dict[str, list[str]] = {
    "shared": ["+experiment=lora"],
    "separate": ["+experiment=lora", "team.lora_engine=false"],
}
DERIVED = {"untrained": "shared"}  # its figures are the `before` evaluation of these runs


def summarize() -> dict[str, Any]:
    """results.json, results.md and turn_accuracy.png from the finished runs on disk (`make reproduce`'s code)."""
    return discussion_results(RUNS, HERE, [*DERIVED, *CONDITIONS], DERIVED, claims,
                              "python -m experiments.lora.reproduce")


def claims(conditions: dict[str, Any]) -> dict[str, Any]:
    """The acceptance check: the shared-engine team's last turn after training against before it, over seeds; and
    how far the separate-engine control lands from it."""
    if "shared" not in conditions or "untrained" not in conditions:
        return {}
    after, before = (conditions[n]["turn_accuracy_mean"][-1] for n in ("shared", "untrained"))
    stds = [conditions[n]["turn_accuracy_std"][-1] for n in ("shared", "untrained")]
    out = {"last_turn_before": before, "last_turn_after": after, "last_turn_gain": after - before,
           "gain_exceeds_twice_std": after - before > 2 * max(stds)}
    if "separate" in conditions:
        out["separate_last_turn_after"] = conditions["separate"]["turn_accuracy_mean"][-1]
    return out


def write_readme_table(results: dict[str, Any]) -> None:
    write_readme_block("lora", f"`python -m experiments.lora.reproduce`, {results['date']}:\n\n"
                               f"{table(results['conditions'])}")


def main(argv: list[str] | None = None) -> None:
    parser = reproduce_parser(__doc__, CONDITIONS)
    args = parser.parse_args(argv)
    if not args.summarize:
        for condition in args.only or list(CONDITIONS):  # the mode under test first, every seed
            for seed in args.seeds:
                RUNS.run(condition, seed, CONDITIONS[condition])
                summarize()
    report(summarize(), write_readme_table)


if __name__ == "__main__":
    main()

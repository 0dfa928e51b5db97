"""`make reproduce-portability`: the headline claims again, from models built and trained with other float32 kernels.

    .venv/bin/python -m experiments.portability.reproduce               # both headlines, 3 seeds (resumes)
    .venv/bin/python -m experiments.portability.reproduce --summarize

Machines of one kind come with different CPUs (AVX2 only, or AVX-512). Both run mapoco in float32, but their
kernels sum in a different order, so each operation agrees only to float32 rounding; over a warm-start of
thousands of steps those last bits grow into a different model (measured here: the same spec and seed, max weight
difference 0.39). The figures cannot be bitwise equal across CPUs; what must hold is every claim. This check
produces that effect on one machine: ``ATEN_CPU_CAPABILITY=default`` makes
PyTorch use its non-vectorized kernels for the model builds and every run (vLLM's own compiled kernels stay as they
are), with the models in a cache of their own. It reruns the headline conditions over the same seeds and sets them
beside the native figures in experiments/<experiment>/results.json, with whether each claim holds on both.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.conductor import reproduce as conductor
from experiments.maporl import reproduce as maporl
from experiments.runs import ROOT, RunSet, reproduce_parser, write_readme_block

HERE = Path(__file__).resolve().parent
KERNELS = {"ATEN_CPU_CAPABILITY": "default"}
# Its own model cache, and its own torch.compile cache: vLLM's CPU sampler is compiled, and a cache built for this
# CPU's vector ISA does not compile under ATEN_CPU_CAPABILITY=default ("'at::vec' has not been declared").
RUNS = RunSet(ROOT / "outputs" / "portability",
              env={**KERNELS, "MAPOCO_CACHE": str(ROOT / ".cache" / "mapoco-kernels-default"),
                   "TORCHINDUCTOR_CACHE_DIR": str(ROOT / ".cache" / "torchinductor-kernels-default")})


@dataclass(frozen=True)
class Headline:
    experiment: str  # experiments/<experiment>/results.json holds the native figures
    overrides: list[str]
    models: tuple[str, ...]
    figures: Callable[[list[tuple[int, dict[str, Any]]]], dict[str, Any]]  # the experiment's own statistics
    native: Callable[[dict[str, Any]], dict[str, Any]]  # that condition's figures in the native results.json
    compared: dict[str, Callable[[dict[str, Any]], tuple[float, float]]]  # figure -> (mean, std) in a condition
    claim: tuple[str, Callable[[dict[str, Any]], bool]]  # what must hold on every build, and its check


def _gain_above_twice_its_std(c: dict[str, Any]) -> bool:
    return c["collaboration_gain_mean"] > 2 * c["collaboration_gain_std"]


def _conductor_above_best_worker(c: dict[str, Any]) -> bool:
    margin = c["conductor_accuracy_mean"] - c["best_worker_accuracy_mean"]
    return margin > 2 * max(c["conductor_accuracy_std"], c["best_worker_accuracy_std"])


HEADLINES = {
    "cotrain": Headline(
        "maporl", maporl.CONDITIONS["cotrain"], ("talk-add", "talk-mul"),
        lambda found: maporl.condition_figures(maporl.seed_figures(found, "after")),
        lambda results: results["conditions"]["cotrain"],
        {"turn 1": lambda c: (c["turn_accuracy_mean"][0], c["turn_accuracy_std"][0]),
         "last turn": lambda c: (c["turn_accuracy_mean"][-1], c["turn_accuracy_std"][-1]),
         "collaboration gain": lambda c: (c["collaboration_gain_mean"], c["collaboration_gain_std"])},
        ("collaboration gain > 2 std", _gain_above_twice_its_std)),
    "routing": Headline(
        "conductor", conductor.CONDITIONS["routing"], ("tiny-add", "tiny-mul", "tiny-conductor"),
        lambda found: conductor.condition_figures(conductor.seed_figures(found)), lambda results: results["routing"],
        {"conductor after": lambda c: (c["conductor_accuracy_mean"], c["conductor_accuracy_std"]),
         "best worker": lambda c: (c["best_worker_accuracy_mean"], c["best_worker_accuracy_std"])},
        ("conductor - best worker > 2 std", _conductor_above_best_worker)),
}


def comparison(headline: Headline, other: dict[str, Any]) -> dict[str, Any]:
    """Native vs other-kernel figures, the difference of means (what another build moves them by), and whether the
    claim holds on each build."""
    native = headline.native(json.loads((ROOT / "experiments" / headline.experiment / "results.json").read_text()))
    rows = {}
    for figure, read in headline.compared.items():
        (a, sa), (b, sb) = read(native), read(other)
        rows[figure] = {"native_mean": a, "native_std": sa, "other_mean": b, "other_std": sb, "difference": b - a}
    claim, holds = headline.claim
    return {"seeds": [s["seed"] for s in other["seeds"]], "figures": rows, "claim": claim,
            "claim_holds": {"native": holds(native), "other": holds(other)}, "other": other}


def summarize() -> dict[str, Any]:
    headlines = {name: comparison(h, h.figures(found)) for name, h in HEADLINES.items()
                 if (found := RUNS.summaries(name))}
    results = {"kernels": KERNELS, "headlines": headlines, "command": "make reproduce-portability",
               "date": dt.date.today().isoformat()}
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(headlines: dict[str, Any]) -> str:
    rows = ["| condition | figure | native build | other-kernel build | difference |", "|---|---|---|---|---|"]
    for name, h in headlines.items():
        for figure, f in h["figures"].items():
            rows.append(f"| `{name}` | {figure} | {f['native_mean']:.3f} ± {f['native_std']:.3f} | "
                        f"{f['other_mean']:.3f} ± {f['other_std']:.3f} | {f['difference']:+.3f} |")
        holds = h["claim_holds"]
        rows.append(f"| `{name}` | claim: {h['claim']} | {'holds' if holds['native'] else 'fails'} | "
                    f"{'holds' if holds['other'] else 'fails'} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = reproduce_parser(__doc__, HEADLINES)
    args = parser.parse_args(argv)
    chosen = args.only or list(HEADLINES)
    if not args.summarize:
        RUNS.build_models(sorted({m for name in chosen for m in HEADLINES[name].models}))
        for seed in args.seeds:
            for name in chosen:
                RUNS.run(name, seed, HEADLINES[name].overrides)
                summarize()
    results = summarize()
    if results["headlines"]:
        write_readme_block("portability", f"`make reproduce-portability`, {results['date']}, "
                                          f"`{' '.join(f'{k}={v}' for k, v in KERNELS.items())}`:\n\n"
                                          f"{table(results['headlines'])}")
    print(table(results["headlines"]) if results["headlines"] else "no finished runs")


if __name__ == "__main__":
    main()

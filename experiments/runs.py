"""What every experiment under experiments/ shares: its runs, their statistics and the README block it keeps.

A run is a plain `mapoco train` of one condition (a list of overrides) and one seed into
``outputs/<experiment>/<condition>/seed_<s>/``, its log beside it. A run whose summary.json exists is kept, so an
interrupted reproduction goes on where it stopped. ``env`` runs every run of a set in another environment: the
portability check builds and trains with other float32 kernels and its own model cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MAPOCO = ROOT / ".venv" / "bin" / "mapoco"
SEEDS = (0, 1, 2)


@dataclass
class RunSet:
    root: Path  # outputs/<experiment>
    env: dict[str, str] = field(default_factory=dict)

    def dir(self, condition: str, seed: int) -> Path:
        return self.root / condition / f"seed_{seed}"

    def build_models(self, names: Sequence[str]) -> None:
        """Build (or find) the models the runs need, in the runs' environment."""
        self._mapoco(["build-models", *names], self.root / "build-models.log")

    def run(self, condition: str, seed: int, overrides: Sequence[str]) -> Path:
        out = self.dir(condition, seed)
        if (out / "summary.json").exists():
            return out
        shutil.rmtree(out, ignore_errors=True)  # a run cut short: start it again
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self._mapoco(["train", *overrides, f"seed={seed}", f"output_dir={out}", "logger.wandb.mode=offline"],
                     self.root / condition / f"seed_{seed}.log")
        print(f"[{self.root.name}] {condition} seed {seed}: {time.perf_counter() - start:.0f}s", flush=True)
        return out

    def summaries(self, condition: str, seeds: Sequence[int] = SEEDS) -> list[tuple[int, dict[str, Any]]]:
        """(seed, summary.json) of every finished run of ``condition``."""
        found = [(s, self.dir(condition, s) / "summary.json") for s in seeds]
        return [(s, json.loads(path.read_text())) for s, path in found if path.exists()]

    def _mapoco(self, args: list[str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            subprocess.run([str(MAPOCO), *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=True,
                           env={**os.environ, **self.env})


def read_results(path: Path) -> dict[str, Any]:
    """An experiment's last results.json (empty before its first run)."""
    return json.loads(path.read_text()) if path.exists() else {}


def with_recorded(found: list[dict[str, Any]], recorded: dict[str, Any] | None, name: str) -> list[dict[str, Any]]:
    """Condition ``name``'s per-seed figures, by seed: those of its runs on disk, and for every seed without one what
    ``recorded`` (the condition in the last results.json) kept. A fresh clone holds results.json but no runs, so a
    reproduction of one condition adds it to the table instead of erasing the others. A kept seed must have the
    figures the runs on disk have (it may come from an earlier setup of the condition: another team, other pools)."""
    seeds = {entry["seed"]: entry for entry in (recorded or {}).get("seeds", [])}
    kept = set(seeds) - {entry["seed"] for entry in found}
    if found and (stale := sorted(s for s in kept if seeds[s].keys() != found[0].keys())):
        differ = sorted(seeds[stale[0]].keys() ^ found[0].keys())
        raise ValueError(f"results.json's {name} seeds {stale} have other figures than its runs on disk (differing: "
                         f"{', '.join(differ)}): they were recorded with another setup of {name}; run those seeds "
                         f"again, or delete them from results.json's {name}")
    seeds.update({entry["seed"]: entry for entry in found})
    return [seeds[s] for s in sorted(seeds)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def columns_mean_std(rows: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per column of equal-length ``rows`` (per turn over seeds): means and standard deviations."""
    pairs = [mean_std(column) for column in zip(*rows)]
    return [m for m, _ in pairs], [s for _, s in pairs]


def write_readme_block(marker: str, body: str, readme: Path = ROOT / "README.md") -> None:
    """README.md keeps an experiment's latest table between ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    head, found, rest = readme.read_text().partition(start)
    if not found:
        raise ValueError(f"{readme} has no {start} marker")
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def reproduce_parser(doc: str | None, conditions: Sequence[str],
                     groups: dict[str, list[str]] | None = None) -> argparse.ArgumentParser:
    """Every reproduction's command line: ``--only`` some of its conditions (or groups of them: a group's name
    stands for its conditions), ``--seeds``, ``--summarize``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted({*conditions, *(groups or {})}),
                        help="run only these conditions (or groups: " + ", ".join(
                            f"{name} = {' '.join(members)}" for name, members in (groups or {}).items()) + ")")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--summarize", action="store_true", help="only rebuild the results from finished runs")
    return parser


def selected(only: Sequence[str] | None, conditions: Sequence[str],
             groups: dict[str, list[str]] | None = None) -> list[str]:
    """``--only``'s conditions in order, each group replaced by its members (all conditions without ``--only``)."""
    names = [member for name in only or conditions for member in (groups or {}).get(name, [name])]
    return list(dict.fromkeys(names))

"""`mapoco sweep-summary DIR`: final per-turn team accuracy of every run under DIR, one row per configuration.

A run is a folder holding ``summary.json`` (a train run's ``after`` evaluation, or an eval run's); its configuration
is its Hydra overrides (``.hydra/overrides.yaml``) minus ``seed``, so the seeds of one configuration are averaged.
Overrides every configuration shares are printed once (in the table's first line, under the plot's title), not
repeated in each label; a lone configuration shares all of its overrides, so its label is just "all runs".
"""

from __future__ import annotations

import csv
import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from mapoco.evaluation.report import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class NoRunsError(ValueError):
    """DIR holds no run (no summary.json below it)."""


@dataclass
class Run:
    path: Path
    config: tuple[str, ...]  # sorted overrides without seed=
    turn_accuracy: list[float]


@dataclass
class ConfigRow:
    label: str
    seeds: int
    mean: list[float]  # per turn, over the seeds that reached that turn
    std: list[float | None]  # sample std over seeds; None with a single seed
    gain: float  # last turn minus turn 1, mean over seeds


def final_turn_accuracy(summary: dict[str, Any]) -> list[float]:
    """Team accuracy per turn at the end of the run: after training for train runs, the evaluation for eval runs."""
    return (summary["after"] if "after" in summary else summary)["turn_accuracy"]


def _config(run_dir: Path) -> tuple[str, ...]:
    """The job's overrides as Hydra recorded them, without the seed (a run without them has the defaults)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(path.read_text()) or []) if path.exists() else []
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"))


def _natural_key(path: Path) -> list[Any]:
    """Job directories 2 before 10, so configurations come out in the sweep's order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(root: Path) -> list[Run]:
    paths = sorted((p.parent for p in root.rglob("summary.json")), key=_natural_key)
    return [Run(p, _config(p), final_turn_accuracy(json.loads((p / "summary.json").read_text()))) for p in paths]


def _labels(configs: list[tuple[str, ...]]) -> tuple[list[str], list[str]]:
    """(label per configuration: its overrides that not all of them share; the shared ones)."""
    shared = set.intersection(*map(set, configs))
    nothing_left = "all runs" if len(configs) == 1 else "(defaults)"
    labels = [",".join(o for o in c if o not in shared) or nothing_left for c in configs]
    return labels, sorted(shared)


def summarize_runs(runs: list[Run]) -> tuple[list[ConfigRow], list[str]]:
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.config, []).append(run)
    labels, shared = _labels(list(groups))
    return [_row(label, members) for label, members in zip(labels, groups.values())], shared


def _row(label: str, runs: list[Run]) -> ConfigRow:
    turns = max(len(r.turn_accuracy) for r in runs)
    per_turn = [[r.turn_accuracy[t] for r in runs if t < len(r.turn_accuracy)] for t in range(turns)]
    return ConfigRow(
        label=label,
        seeds=len(runs),
        mean=[float(np.mean(v)) for v in per_turn],
        std=[float(np.std(v, ddof=1)) if len(v) > 1 else None for v in per_turn],
        gain=float(np.mean([r.turn_accuracy[-1] - r.turn_accuracy[0] for r in runs])),
    )


def format_table(rows: list[ConfigRow], shared: list[str]) -> str:
    turns = max(len(r.mean) for r in rows)
    header = ["config", "seeds"] + [f"turn {t + 1}" for t in range(turns)] + ["gain"]
    cells = [header] + [
        [r.label, str(r.seeds)]
        + [_mean_std(r, t) if t < len(r.mean) else "" for t in range(turns)]
        + [f"{r.gain:+.3f}"]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join([c[0].ljust(widths[0])] + [x.rjust(w) for x, w in zip(c[1:], widths[1:])]) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    prefix = [f"shared overrides: {','.join(shared)}"] if shared else []
    return "\n".join(prefix + lines + ["final team accuracy (majority vote) per turn, mean ± std over seeds"])


def _mean_std(row: ConfigRow, t: int) -> str:
    std = row.std[t]
    return f"{row.mean[t]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def write_csv(path: Path, rows: list[ConfigRow]) -> None:
    turns = max(len(r.mean) for r in rows)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "seeds"] + [f"turn_{t + 1}" for t in range(turns)]
                        + [f"turn_{t + 1}_std" for t in range(turns)] + ["gain"])
        for r in rows:
            writer.writerow([r.label, r.seeds, *_cells(r.mean, turns), *_cells(r.std, turns), round(r.gain, 6)])


def _cells(values: list[float | None], turns: int) -> list[float | str]:
    """Blanks for a missing std and for turns this configuration did not have."""
    return [("" if v is None else round(v, 6)) for v in values] + [""] * (turns - len(values))


FIG_WIDTH = 7.0  # inches
PLOT_HEIGHT = 3.2  # inches for the axes with their tick and axis labels; the title and legend add theirs
TITLE_CHARS = 76  # per title line at 10 pt, inside FIG_WIDTH
LABEL_CHARS = 40  # per legend line at "small" size: two columns of the longest labels fit FIG_WIDTH


def summary_figure(rows: list[ConfigRow], shared: list[str], name: str) -> Figure:
    """Mean accuracy per turn, one line per configuration. The legend goes below the axes and the figure grows to
    hold it, so it never covers or squeezes them; labels and the shared overrides are wrapped to the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIG_WIDTH, PLOT_HEIGHT), layout="constrained")
    FigureCanvasAgg(fig)  # our own canvas (a renderer to measure text), no pyplot state to leak or close
    ax = fig.add_subplot()
    labels = [_wrap_label(r.label) for r in rows]
    for row, label in zip(rows, labels):
        ax.plot(range(1, len(row.mean) + 1), row.mean, marker="o", label=label)
    ax.set(xlabel="turn", ylabel="accuracy", ylim=(0, 1), xticks=range(1, max(len(r.mean) for r in rows) + 1))
    ax.grid(alpha=0.3)
    lines = [textwrap.fill(f"{name}: final team accuracy", TITLE_CHARS)]
    if shared:  # at most three lines of them: the table printed beside the plot has them all
        lines.append(textwrap.fill("shared: " + ", ".join(shared), TITLE_CHARS, max_lines=3, placeholder=" …"))
    title = ax.set_title("\n".join(lines), fontsize=10)
    widest = max(len(line) for label in labels for line in label.splitlines())
    # about 100 "small" characters span FIG_WIDTH; each column also takes ~8 for its marker and spacing
    ncols = max(1, min(len(rows), 100 // (widest + 8)))
    legend = fig.legend(loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)
    renderer = fig.canvas.get_renderer()
    fig.set_figheight(PLOT_HEIGHT + sum(t.get_window_extent(renderer).height for t in (title, legend)) / fig.dpi)
    return fig


def _wrap_label(label: str) -> str:
    """One override per line once they do not fit on one; only an override longer than a line is broken."""
    return label if len(label) <= LABEL_CHARS else "\n".join(textwrap.fill(o, LABEL_CHARS) for o in label.split(","))


def sweep_summary(root: Path) -> list[ConfigRow]:
    """Print the table and write ``sweep_summary.csv`` and ``sweep_summary.png`` into ``root``."""
    runs = find_runs(root) if root.is_dir() else []
    if not runs:
        raise NoRunsError(f"no run under {root} (a run is a folder holding summary.json)")
    rows, shared = summarize_runs(runs)
    print(format_table(rows, shared))
    write_csv(root / "sweep_summary.csv", rows)
    save_figure(summary_figure(rows, shared, root.name), root / "sweep_summary.png", bbox_inches="tight")
    print(f"wrote {root}/sweep_summary.csv, sweep_summary.png ({len(runs)} runs, {len(rows)} configurations)")
    return rows

"""Shared pieces of the benchmarks: side-by-side repeated measurement, machine facts, results.json, the table.

These machines are noisy, so a benchmark never times one side in isolation: each repeat measures mapoco and its
baseline back to back (alternating which goes first), the ratio is taken per repeat, and the median and spread
(min..max) over repeats are reported.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


@dataclass
class Figure:
    """One side's measurement: ``value`` is the median over repeats, ``spread`` their min and max."""

    name: str
    unit: str
    values: list[float]

    @property
    def value(self) -> float:
        return statistics.median(self.values)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": round(self.value, 4), "unit": self.unit,
                "spread": [round(min(self.values), 4), round(max(self.values), 4)], "repeats": len(self.values)}


@dataclass
class Result:
    """A benchmark's entry in results.json. ``ratio`` is mapoco over baseline, oriented so higher is better."""

    name: str
    mapoco: Figure
    baseline: Figure | None
    sizes: dict[str, Any]
    target: float | None = None
    ratios: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = True  # False: the figures are times (s), and the ratio is baseline / mapoco

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mapoco": self.mapoco.to_json(), "sizes": self.sizes, "target": self.target,
                               "date": dt.date.today().isoformat(), "machine": machine()}
        if self.baseline is not None:
            out["baseline"] = self.baseline.to_json()
        if self.ratios:
            out["ratio"] = round(self.ratio, 4)
            out["ratio_spread"] = [round(min(self.ratios), 4), round(max(self.ratios), 4)]
            out["met"] = None if self.target is None else self.ratio >= self.target
        out.update(self.extra)
        return out


def side_by_side(mapoco: Callable[[], float], baseline: Callable[[], float], repeats: int,
                 higher_is_better: bool = True) -> tuple[list[float], list[float], list[float]]:
    """Run both sides ``repeats`` times, alternating which goes first; each call returns its figure.
    Returns (mapoco figures, baseline figures, per-repeat ratios oriented so that higher is better for mapoco)."""
    ours, theirs, ratios = [], [], []
    for i in range(repeats):
        order = [(ours, mapoco), (theirs, baseline)]
        for sink, fn in order if i % 2 == 0 else order[::-1]:
            sink.append(fn())
        a, b = ours[-1], theirs[-1]
        ratios.append(a / b if higher_is_better else b / a)
    return ours, theirs, ratios


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory of a local process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from mapoco.runtime.precision import cpu_flags, has_native_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "native_bf16": has_native_bf16(cpu_flags()), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


def save(results: list[Result]) -> None:
    """Merge into results.json (benchmarks can be run one at a time), keyed by benchmark name."""
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update({r.name: r.to_json() for r in results})
    RESULTS.write_text(json.dumps(merged, indent=2) + "\n")


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table README.md keeps: one row per benchmark."""
    rows = ["| benchmark | mapoco | baseline | ratio (median, min..max) | target | met |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        ours = _figure(r["mapoco"])
        theirs = _figure(r["baseline"]) if "baseline" in r else "—"
        ratio = f"{r['ratio']:.2f}x ({r['ratio_spread'][0]:.2f}..{r['ratio_spread'][1]:.2f})" if "ratio" in r else "—"
        target = f">= {r['target']}x" if r.get("target") is not None else "—"
        met = {True: "yes", False: "**no**", None: "—"}[r.get("met")]
        rows.append(f"| `{name}` | {ours} | {theirs} | {ratio} | {target} | {met} |")
    return "\n".join(rows)


def _figure(f: dict[str, Any]) -> str:
    return f"{f['name']}: {f['value']:.4g} {f['unit']} ({f['spread'][0]:.4g}..{f['spread'][1]:.4g})"



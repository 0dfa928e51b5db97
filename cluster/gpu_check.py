"""`make gpu-check`: the GPU paths on a machine with 1 or 2 GPUs, in under 10 minutes, as a pass/fail table.

    .venv/bin/python cluster/gpu_check.py            # after `make models`
    .venv/bin/python cluster/gpu_check.py --only sync colocate

Each check is a real `mapoco` run on tiny models (engines on vLLM, learners on DeepSpeed with NCCL), judged from
what the run wrote (summary.json, metrics.jsonl):

| check | what passes |
|---|---|
| engine | a GPU engine answers (bf16 by `dtype=auto`, CUDA graphs on) |
| sync | 3 training steps with NCCL weight sync; every step's engine-vs-learner logprob gap within its tolerance |
| colocate | the same with the learner on the engine's GPU (the engine sleeps during updates and wakes for the sync) |
| tensor_parallel | an engine over 2 GPUs answers (only with >= 2 GPUs) |
| learns | the conductor demo for 40 steps: held-out accuracy rises by at least 0.2 |

On a machine without a GPU it says so and exits 0 without running anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPOCO = Path(sys.executable).parent / "mapoco"
OUT = ROOT / "outputs" / "gpu-check"
SMALL = ["team=tiny1", "turns=1", "train.batch_questions=8", "train.eval_every=0", "train.save_every=0",
         "train.eval_limit=16", "logger.wandb.mode=disabled"]
SHARED_GPU = ["engine.num_gpus=0.5", "learner.num_gpus=0.5"]  # engine and learner on one GPU


@dataclass(frozen=True)
class Check:
    name: str
    command: list[str]  # `mapoco` arguments; output_dir is added
    passed: Callable[[Path], tuple[bool, str]]  # the run's output folder -> (passed, what was seen)
    gpus: int = 1


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def answered(out: Path) -> tuple[bool, str]:
    summary = json.loads((out / "summary.json").read_text())
    return bool(summary["turn_accuracy"]), f"turn-1 accuracy {summary['turn_accuracy'][0]:.2f}"


def in_sync(out: Path) -> tuple[bool, str]:
    steps = [m for m in _metrics(out) if "train/agent_0/logprob_max_diff" in m]
    if not steps:
        return False, "no training step logged"
    gaps = [m["train/agent_0/logprob_max_diff"] for m in steps]
    tolerance = steps[0]["train/agent_0/logprob_tolerance"]
    shown = ", ".join(f"{g:.3g}" for g in gaps)
    return max(gaps) <= tolerance, f"logprob gap per step {shown} (tolerance {tolerance:g})"


def learnt(out: Path) -> tuple[bool, str]:
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["conductor_accuracy_before"], summary["conductor_accuracy"]
    return after - before >= 0.2, f"conductor accuracy {before:.3f} -> {after:.3f}"


CHECKS = [
    Check("engine", ["eval", "team=tiny1", "turns=1", "task.limit=16", "engine.num_gpus=1"], answered),
    Check("sync", ["train", *SMALL, "train.steps=3", *SHARED_GPU, "train.weight_sync=nccl", "learner.lr=1e-4"],
          in_sync),
    Check("colocate", ["train", *SMALL, "train.steps=3", *SHARED_GPU, "+team.agents.0.learner.colocate=true",
                       "learner.lr=1e-4"], in_sync),
    Check("tensor_parallel", ["eval", "team.agents=[{name: a, model: tiny-llama}]", "turns=1", "task.limit=16",
                              "engine.num_gpus=2", "engine.tensor_parallel_size=2"], answered, gpus=2),
    # 40 steps, not 10: on CPU (float32) 10 steps moved the conductor by +0.095, 40 steps by +0.36 (0.52 -> 0.88).
    Check("learns", ["train", "+experiment=conductor", "train.steps=40", "train.save_every=0", "engine.num_gpus=0.25",
                     "learner.num_gpus=0.25", "logger.wandb.mode=disabled"], learnt),
]


def gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run(check: Check) -> tuple[str, str, float]:
    out = OUT / check.name
    start = time.perf_counter()
    with (OUT / f"{check.name}.log").open("w") as log:
        proc = subprocess.run([str(MAPOCO), *check.command, f"output_dir={out}"], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return "FAIL", f"exit {proc.returncode}: see {OUT / check.name}.log", seconds
    ok, seen = check.passed(out)
    return ("PASS" if ok else "FAIL"), seen, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS])
    args = parser.parse_args(argv)
    gpus = gpu_count()
    if gpus == 0:
        print("gpu-check: no GPU on this machine (torch.cuda.is_available() is false); nothing was run")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        if check.gpus > gpus:
            rows.append((check.name, "SKIP", f"needs {check.gpus} GPUs, this machine has {gpus}", 0.0))
            continue
        rows.append((check.name, *run(check)))
        print(f"{rows[-1][0]}: {rows[-1][1]} ({rows[-1][2]})", flush=True)
    print("\n| check | result | what was seen | seconds |\n|---|---|---|---|")
    for name, result, seen, seconds in rows:
        print(f"| {name} | {result} | {seen} | {seconds:.0f} |")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

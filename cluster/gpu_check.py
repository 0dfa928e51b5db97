"""`make gpu-check`: the GPU paths on a machine with 1 or 2 GPUs, in under 10 minutes, as a pass/fail table.

    .venv/bin/python cluster/gpu_check.py --resolve      # any machine: the GPU install resolves (nothing installed)
    .venv-gpu/bin/python cluster/gpu_check.py            # on a GPU machine, after `make models`
    .venv-gpu/bin/python cluster/gpu_check.py --only sync colocate

Each check is a real `mapoco` run on tiny models (engines on vLLM, learners on DeepSpeed with NCCL), judged from
what the run wrote (summary.json, metrics.jsonl). Every one is a configuration the per-GPU guard accepts on a GPU of
its size (tests/runtime/test_devices.py checks that against a Ray cluster advertising 1 GPU):

| check | GPUs | what passes |
|---|---|---|
| engine | 1 | a GPU engine answers (bf16 by `dtype=auto`, CUDA graphs on) |
| sync | 1 | 3 training steps, learner and engine sharing one GPU (so the weights move through the object store); every step's engine-vs-learner logprob gap within its tolerance; and `mapoco plan`'s memory figures against the run's: vLLM's KV cache within the plan's ceiling (and above half of it), the learner's CUDA peak above the plan's floor |
| colocate | 1 | the same with the learner in the engine's bundle (the engine sleeps during updates and wakes for the sync) |
| collective | 2 | 3 training steps with the NCCL broadcast group (learner and engine on a GPU each), gaps within tolerance |
| tensor_parallel | 2 | an engine over 2 GPUs answers |
| learns | 1 | the conductor demo for 40 steps, three engines and the learner on one GPU: held-out accuracy rises by at least 0.2 |

On a machine without a GPU it says so and exits 0 without running anything. Each run writes its table row, its
figures and its time to outputs/gpu-check/results.json as it finishes. The checks fit one H100 in one go: four runs
on tiny models, about 10 minutes with vLLM's start-ups (an estimate: no GPU has run them yet).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
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


def matches_plan(out: Path, gpu_gib: float | None = None) -> tuple[bool, str]:
    """`mapoco plan`'s figures for this run's GPU (``gpu_gib``: by default this machine's first) against what the
    run measured there: the KV cache is at most the plan's ceiling and at least half of it (vLLM's activation peak
    and CUDA graphs take the rest), the learner's peak at least the plan's floor (activations come on top)."""
    import torch
    from omegaconf import OmegaConf

    from mapoco.config import from_dict
    from mapoco.planning.plan import GIB, engine_memory, learner_load

    cfg = from_dict(OmegaConf.to_container(OmegaConf.load(out / ".hydra" / "config.yaml"), resolve=True))
    agent = cfg.team.agents[0]
    gpu_gib = gpu_gib or torch.cuda.get_device_properties(0).total_memory / GIB
    _, _, planned_tokens = engine_memory(agent, gpu_gib)
    kv_tokens = json.loads((out / "placement.json").read_text())["team.agents[0].engine"][0]["kv_cache_tokens"]
    floor = learner_load(agent, agent.learner.num_learners, "learner").gib
    peak = max(m["train/agent_0/peak_memory_gib"] for m in _metrics(out) if "train/agent_0/peak_memory_gib" in m)
    ok = 0.5 * planned_tokens <= kv_tokens <= planned_tokens and floor <= peak
    return ok, (f"KV cache {kv_tokens:,} tokens (plan: at most {planned_tokens:,}); learner peak {peak:.2f} GiB "
                f"(plan: at least {floor:.2f})")


def both(*judges: Callable[[Path], tuple[bool, str]]) -> Callable[[Path], tuple[bool, str]]:
    def judge(out: Path) -> tuple[bool, str]:
        verdicts = [j(out) for j in judges]
        return all(ok for ok, _ in verdicts), "; ".join(seen for _, seen in verdicts)
    return judge


def learnt(out: Path) -> tuple[bool, str]:
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["conductor_accuracy_before"], summary["conductor_accuracy"]
    return after - before >= 0.2, f"conductor accuracy {before:.3f} -> {after:.3f}"


CHECKS = [
    Check("engine", ["eval", "team=tiny1", "turns=1", "task.limit=16", "engine.num_gpus=1"], answered),
    Check("sync", ["train", *SMALL, "train.steps=3", *SHARED_GPU, "learner.lr=1e-4"], both(in_sync, matches_plan)),
    Check("colocate", ["train", *SMALL, "train.steps=3", *SHARED_GPU, "+team.agents.0.learner.colocate=true",
                       "learner.lr=1e-4"], in_sync),
    Check("collective", ["train", *SMALL, "train.steps=3", "engine.num_gpus=1", "learner.num_gpus=1",
                         "train.weight_sync=collective", "learner.lr=1e-4"], in_sync, gpus=2),
    Check("tensor_parallel", ["eval", "team.agents=[{name: a, model: tiny-llama}]", "turns=1", "task.limit=16",
                              "engine.num_gpus=2", "engine.tensor_parallel_size=2"], answered, gpus=2),
    # 40 steps, not 10: on CPU (float32) 10 steps moved the conductor by +0.095, 40 steps by +0.36 (0.52 -> 0.88).
    # Three engines and the learner share the GPU: each engine takes 0.2 of its memory, the learner its 0.25.
    Check("learns", ["train", "+experiment=conductor", "train.steps=40", "train.save_every=0", "engine.num_gpus=0.25",
                     "engine.gpu_memory_utilization=0.2", "learner.num_gpus=0.25", "logger.wandb.mode=disabled"],
          learnt),
]
# What the GPU install pins, as pip resolves it (no download of the wheels themselves).
RESOLVED = ("vllm", "torch", "transformers", "deepspeed", "ray", "peft", "nvidia-nccl-cu13")


def resolve_gpu_install() -> int:
    """`pip install --dry-run` of requirements/gpu.txt + common.txt: the versions it would install, or why not."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
                               "--no-build-isolation", "--report", str(report), "-r", "requirements/gpu.txt",
                               "-r", "requirements/common.txt"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"gpu-check: the GPU install does not resolve:\n{proc.stderr[-3000:]}")
            return 1
        versions = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                    for i in json.loads(report.read_text())["install"]}
    print("gpu-check: the GPU install resolves: " + ", ".join(f"{n} {versions[n]}" for n in RESOLVED if n in versions))
    return 0


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


def write_results(rows: list[tuple[str, str, str, float]], gpus: int) -> None:
    import torch

    (OUT / "results.json").write_text(json.dumps({
        "gpus": gpus, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "checks": [{"check": n, "result": r, "seen": s, "seconds": round(t, 1)} for n, r, s, t in rows]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS])
    parser.add_argument("--resolve", action="store_true", help="only resolve the GPU install (any machine)")
    args = parser.parse_args(argv)
    if args.resolve:
        return resolve_gpu_install()
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
        write_results(rows, gpus)
    print("\n| check | result | what was seen | seconds |\n|---|---|---|---|")
    for name, result, seen, seconds in rows:
        print(f"| {name} | {result} | {seen} | {seconds:.0f} |")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: run the benchmarks side by side in one Ray instance, print one table, update results.json.

    python -m benchmarks.run                      # everything (sizes chosen to fit ~25 min on a 2-core CPU)
    python -m benchmarks.run --only sync train    # some of them
    python -m benchmarks.run --only precision     # float32 vs bf16 on this CPU (9 min; not in the default set)
    python -m benchmarks.run --only overlap       # overlapped vs on-policy steps, tiny2 and SmolLM2 (13.5 min; same)
    python -m benchmarks.run --only lora          # 4 SmolLM2 LoRA agents on one shared engine (not in the default set)
    python -m benchmarks.run --full               # the rollout at the issue's full sizes (32 questions x 3 turns)

``benchmarks/README.md`` keeps the latest table (``--readme`` rewrites it from results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ray

from benchmarks import (
    bench_concurrency,
    bench_lora,
    bench_overlap,
    bench_precision,
    bench_rollout,
    bench_scaling,
    bench_serve,
    bench_sync,
    bench_train,
)
from benchmarks.common import HERE, RESULTS, Figure, Result, save, table

ROOT = HERE.parent
# quick: what fits `make bench`'s 25 minutes on 2 CPU cores. HF generate, the slowest side, takes ~0.35 s a decoding
# step whatever the batch, so its time grows with agents x turns x max_new_tokens, not with questions; the 4-agent
# team discusses half the questions, so every side generates about as much as with 2 agents.
ROLLOUT_SIZES = {"quick": {"questions": 8, "turns": 2, "max_new_tokens": 48},
                 "full": {"questions": 32, "turns": 3, "max_new_tokens": 256}}


def run_rollout(full: bool) -> list[Result]:
    sizes = ROLLOUT_SIZES["full" if full else "quick"]
    two = bench_rollout.run(agents=2, **sizes)
    four = bench_rollout.run(agents=4, **(sizes if full else {**sizes, "questions": sizes["questions"] // 2}))
    for headline, other in zip(two, four):  # the 2-agent figures head the row; 4 agents ride along
        headline.extra["agents_4"] = other.to_json()
    tiny = bench_rollout.run(agents=2, model="tiny-qwen", **sizes)
    for headline, other in zip(two, tiny):
        headline.extra["tiny_model"] = other.to_json()
    return list(two)


def run_sync() -> list[Result]:
    smol, tiny = bench_sync.run("smollm2"), bench_sync.run("tiny-qwen")
    smol.extra["tiny_model"] = tiny.to_json()
    collective, collective_tiny = bench_sync.run_collective("smollm2"), bench_sync.run_collective("tiny-qwen")
    collective.extra["tiny_model"] = collective_tiny.to_json()
    return [smol, collective]


def run_overlap() -> list[Result]:
    tiny, smol = bench_overlap.run("tiny2"), bench_overlap.run("smollm2", repeats=2, window=2)
    tiny.extra["smollm2"] = smol.to_json()
    return [tiny]


def run_precision() -> list[Result]:
    smol, tiny = bench_precision.run("smollm2", questions=8, max_new_tokens=24), bench_precision.run("tiny-qwen")
    smol.extra["tiny_model"] = tiny.to_json()
    return [smol]


def memory(results: list[Result]) -> Result:
    """Peak resident memory of every engine and learner the other benchmarks ran, per model (figures of
    benchmarks not run this time are kept from results.json)."""
    previous = json.loads(RESULTS.read_text()).get("memory", {}) if RESULTS.exists() else {}
    peaks: dict[str, float] = dict(previous.get("peak_rss_mib", {}))
    for result in results:
        peaks.update(result.extra.get("peak_rss_mib", {}))
        for nested in ("tiny_model", "agents_4"):
            peaks.update(result.extra.get(nested, {}).get("peak_rss_mib", {}))
    engine = peaks.get("engine smollm2", 0.0)
    return Result("memory", Figure("peak RSS of one SmolLM2 engine", "MiB", [engine]), None, sizes={},
                  extra={"peak_rss_mib": {k: round(v, 1) for k, v in sorted(peaks.items())}})


BENCHMARKS = {
    "sync": run_sync,
    "train": lambda: [bench_train.run()],
    "concurrency": lambda: [bench_concurrency.run()],
    "overlap": run_overlap,
    "scaling": lambda: [bench_scaling.run()],
    "serve": bench_serve.run,
    "serve_smollm2": bench_serve.run_smollm2,
    "precision": run_precision,
    "lora": lambda: [*bench_lora.run_rollout(), bench_lora.run_sync()],
}
# Too long for make bench's budget: bf16 is emulated on AVX2 CPUs (its SmolLM2 learner alone takes minutes), the
# overlap's SmolLM2 team updates for ~50 s a step on CPU (13.5 min in all), a served SmolLM2 discussion takes a minute.
OPT_IN = ("precision", "overlap", "lora", "serve_smollm2")


def write_readme_table() -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    body = table(json.loads(RESULTS.read_text()))
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["rollout", *BENCHMARKS], help="run only these")
    parser.add_argument("--full", action="store_true", help="rollout at the full sizes (much longer)")
    parser.add_argument("--readme", action="store_true", help="only rewrite README.md's table from results.json")
    args = parser.parse_args(argv)
    if args.readme:
        write_readme_table()
        return
    # Logical CPUs: the scaling grid holds 6 engines, 4 learners and 2 verifiers at once on this 2-core machine;
    # what the benchmarks compare is time, which the bookkeeping does not change.
    ray.init(num_cpus=max(32, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # actors import benchmarks.* too
    chosen = args.only or ["rollout", *(name for name in BENCHMARKS if name not in OPT_IN)]
    results: list[Result] = []
    start = time.perf_counter()
    for name in chosen:
        began = time.perf_counter()
        results += run_rollout(args.full) if name == "rollout" else BENCHMARKS[name]()
        print(f"[bench] {name} done in {time.perf_counter() - began:.0f}s", flush=True)
    if "peak_rss_mib" in json.dumps([r.extra for r in results]):
        results.append(memory(results))
    save(results)
    write_readme_table()
    print(table({r.name: r.to_json() for r in results}))
    print(f"[bench] total {time.perf_counter() - start:.0f}s; wrote {RESULTS.relative_to(ROOT)} and "
          f"benchmarks/README.md", file=sys.stderr)


if __name__ == "__main__":
    main()

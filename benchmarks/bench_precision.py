"""precision_f32_vs_bf16: what float32 and bf16 cost and give on this machine's CPU, side by side in one run.

For one model, an engine and a learner group in each dtype (mapoco's real actors):
- engine: generated tokens per second on the same seeded requests, float32 over bf16;
- learner: PPO-update tokens per second on the same batch, float32 over bf16;
- the engine-vs-learner logprob gap on the sampled tokens when both sides run in that dtype (max and mean), the
  figure ``mapoco.runtime.precision.LOGPROB_TOLERANCE`` is set from.
The machine's bf16 support (avx512_bf16 / amx_bf16) is recorded with the figures (``machine.native_bf16``): the ratios differ between the
two CPU kinds, and that difference is what the dtype policy is about.
"""

from __future__ import annotations

import time

import torch

from benchmarks.bench_sync import start_engines
from benchmarks.bench_train import token_batch
from benchmarks.common import Figure, Result, side_by_side
from mapoco.config import AlgorithmConfig, EngineConfig, LearnerConfig, SamplingConfig
from mapoco.models.registry import resolve_model
from mapoco.training.batch import Rollout, TokenTargets
from mapoco.training.learner_group import LearnerGroup

DTYPES = ("float32", "bfloat16")


def _gap(group: LearnerGroup, rows: list[Rollout], engine_logprobs: list[list[float]]) -> tuple[float, float]:
    """Max and mean |engine - learner| logprob over the sampled tokens."""
    learner = group.rollout_stats(rows).logprobs
    diffs = [abs(float(learner[i, j]) - b) for i, sampled in enumerate(engine_logprobs) for j, b in enumerate(sampled)]
    return max(diffs), sum(diffs) / len(diffs)


def run(model: str = "tiny-qwen", questions: int = 8, max_new_tokens: int = 32, repeats: int = 3) -> Result:
    from transformers import AutoTokenizer

    path = str(resolve_model(model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    chats = [[{"role": "user", "content": f"Calculate {i + 3} * {2 * i + 5} + 7."}] for i in range(questions)]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False) for chat in chats]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens)
    seeds = list(range(questions))
    batch = token_batch(tokenizer, rows=2, response_tokens=max_new_tokens)
    normalizer = float(sum(len(r.response_ids) for r in batch))
    engines, groups = {}, {}
    try:
        for dtype in DTYPES:
            engines[dtype] = start_engines(path, EngineConfig(dtype=dtype), f"{model}.{dtype}")
            groups[dtype] = LearnerGroup(path, LearnerConfig(dtype=dtype, micro_batch_size=2, lr=1e-6),
                                         AlgorithmConfig(ppo_epochs=1, mini_batches=1), num_turns=1, seed=0,
                                         what=f"bench.{model}.{dtype}")
        gaps, payloads = {}, {}
        for dtype in DTYPES:
            generations = engines[dtype].generate(prompts, sampling, seeds)
            rows = [Rollout(p, g.token_ids, 0) for p, g in zip(prompts, generations)]
            gaps[dtype] = _gap(groups[dtype], rows, [g.logprobs for g in generations])
            stats = groups[dtype].rollout_stats(batch)
            payloads[dtype] = TokenTargets(stats.logprobs, stats.ref_logprobs,
                                           advantages=torch.full_like(stats.logprobs, 0.1),
                                           returns=torch.full_like(stats.logprobs, 0.5), old_values=stats.values)
            groups[dtype].update(batch, payloads[dtype], normalizer)  # warm-up

        def generate(dtype: str) -> float:
            start = time.perf_counter()
            tokens = sum(len(g.token_ids) for g in engines[dtype].generate(prompts, sampling, seeds))
            return tokens / (time.perf_counter() - start)

        def update(dtype: str) -> float:
            start = time.perf_counter()
            groups[dtype].update(batch, payloads[dtype], normalizer)
            return normalizer / (time.perf_counter() - start)

        gen32, gen16, gen_ratios = side_by_side(lambda: generate("float32"), lambda: generate("bfloat16"), repeats)
        up32, up16, up_ratios = side_by_side(lambda: update("float32"), lambda: update("bfloat16"), repeats)
    finally:
        for handle in [*engines.values(), *groups.values()]:
            handle.shutdown()
    return Result(
        "precision_f32_vs_bf16",
        Figure("engine in float32", "tok/s", gen32),
        Figure("engine in bf16", "tok/s", gen16),
        sizes={"model": model, "questions": questions, "max_new_tokens": max_new_tokens, "update_rows": len(batch),
               "threads": torch.get_num_threads()},
        ratios=gen_ratios,
        extra={"learner_update": {"float32": Figure("learner in float32", "tok/s", up32).to_json(),
                                  "bfloat16": Figure("learner in bf16", "tok/s", up16).to_json(),
                                  "ratio": round(sorted(up_ratios)[len(up_ratios) // 2], 4),
                                  "ratio_spread": [round(min(up_ratios), 4), round(max(up_ratios), 4)]},
               "logprob_gap": {dtype: {"max": round(gaps[dtype][0], 6), "mean": round(gaps[dtype][1], 6)}
                               for dtype in DTYPES}},
    )

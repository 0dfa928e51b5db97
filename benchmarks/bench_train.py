"""train_vs_deepspeed: one PPO update of an agent (mapoco's learner group, through Ray) versus a plain DeepSpeed
forward + backward + optimizer step of the same model on the same token batch, in tokens per second.

Both sides run in a Ray actor with the same resources (so the same torch threads), the same ZeRO stage, optimizer
and dtype; the token batch is real: GSM8K questions in the model's chat template, answered by their gold solutions.
"""

from __future__ import annotations

import json
import os
import time

import ray
import torch

from benchmarks.common import Figure, Result, peak_rss_mib, side_by_side
from mapoco.config import AlgorithmConfig, LearnerConfig
from mapoco.models.registry import resolve_model
from mapoco.runtime.precision import learner_dtype
from mapoco.training.batch import Rollout, TokenTargets, collate
from mapoco.training.learner import free_port, init_distributed
from mapoco.training.learner_group import LearnerGroup

GSM8K_TRAIN = "../shared/data/gsm8k/train.jsonl"


def token_batch(tokenizer, rows: int, response_tokens: int) -> list[Rollout]:
    with open(GSM8K_TRAIN) as f:
        examples = [json.loads(next(f)) for _ in range(rows)]
    batch = []
    for ex in examples:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex["question"]}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response = tokenizer.encode(ex["answer"], add_special_tokens=False) * 4  # long enough to cut
        batch.append(Rollout(prompt_ids, response[:response_tokens], turn=0))
    return batch


class PlainDeepSpeed:
    """The baseline: the model, AdamW and DeepSpeed with mapoco's learner settings; loss = token cross-entropy."""

    def __init__(self, model_path: str, cfg: LearnerConfig):
        import deepspeed
        from transformers import AutoModelForCausalLM

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        init_distributed("gloo")
        dtype = getattr(torch, learner_dtype(cfg))
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.max_grad_norm, "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True, "bf16": {"enabled": dtype == torch.bfloat16},
            "steps_per_print": 10**9})

    def step(self, rows: list[Rollout], pad_id: int) -> int:
        mb = collate(rows, pad_id)
        logits = self.engine(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        picked = logits.gather(1, mb.positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))
        loss = torch.nn.functional.cross_entropy(picked.flatten(0, 1), mb.targets.flatten(), reduction="none")
        loss = (loss * mb.mask.flatten()).sum() / mb.mask.sum()
        self.engine.backward(loss)
        self.engine.step()
        return int(mb.attention_mask.sum())

    def pid(self) -> int:
        return os.getpid()


def run(model: str = "smollm2", rows: int = 4, response_tokens: int = 128, repeats: int = 3) -> Result:
    path = str(resolve_model(model))
    cfg = LearnerConfig(micro_batch_size=rows, lr=1e-6)
    algo = AlgorithmConfig(ppo_epochs=1, mini_batches=1)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id or 0  # as the learner pads
    batch = token_batch(tokenizer, rows, response_tokens)
    tokens = sum(len(r.prompt_ids) + len(r.response_ids) for r in batch)
    group = LearnerGroup(path, cfg, algo, num_turns=1, seed=0, what="bench.learner")
    plain = ray.remote(PlainDeepSpeed).options(num_cpus=cfg.num_cpus).remote(path, cfg)
    try:
        stats = group.rollout_stats(batch)
        generator = torch.Generator().manual_seed(0)
        shape = stats.logprobs.shape
        payload = TokenTargets(stats.logprobs, stats.ref_logprobs, advantages=torch.randn(shape, generator=generator),
                               returns=torch.rand(shape, generator=generator), old_values=stats.values)
        normalizer = float(sum(len(r.response_ids) for r in batch))
        ray.get(plain.step.remote(batch, pad_id))  # warm both sides up
        group.update(batch, payload, normalizer)

        def ours() -> float:
            start = time.perf_counter()
            group.update(batch, payload, normalizer)
            return tokens / (time.perf_counter() - start)

        def theirs() -> float:
            start = time.perf_counter()
            ray.get(plain.step.remote(batch, pad_id))
            return tokens / (time.perf_counter() - start)

        a, b, ratios = side_by_side(ours, theirs, repeats)
        memory = {f"learner {model} (PPO update)": peak_rss_mib(group.call_all("pid")[0]),
                  f"plain DeepSpeed {model}": peak_rss_mib(ray.get(plain.pid.remote()))}
    finally:
        group.shutdown()
        ray.kill(plain)
    return Result(
        "train_vs_deepspeed",
        Figure("mapoco PPO update (policy + value head, 1 epoch)", "tok/s", a),
        Figure("plain DeepSpeed fwd+bwd+step", "tok/s", b),
        sizes={"model": model, "rows": rows, "response_tokens": response_tokens, "tokens_per_batch": tokens,
               "zero_stage": cfg.zero_stage, "dtype": learner_dtype(cfg)},
        target=0.8, ratios=ratios, extra={"peak_rss_mib": memory},
    )

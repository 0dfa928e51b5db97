"""Engine actors: one Ray actor per agent replica wrapping a vLLM ``LLM``; token ids in, token ids out.

New weights arrive as safetensors bytes: vLLM's ``collective_rpc`` cannot carry raw tensors on CPU (the pickle of
a memoryview fails), serialized bytes can, and the same path works everywhere.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import ray

from mapoco.config import EngineConfig, SamplingConfig


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, as the engine computed it
    text: str
    finish_reason: str


def request_seed(run_seed: int, *keys: object) -> int:
    """A sampling seed fixed by explicit ids, so a request samples the same tokens however it is batched."""
    digest = hashlib.blake2b(repr((run_seed, *keys)).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    from mapoco.models import default_dtype

    return str(default_dtype()).removeprefix("torch.")


def _load_weights_from_bytes(worker, blob: bytes) -> int:
    """Runs inside vLLM's worker: deserialize safetensors bytes and reload them in place. ``reload_weights``
    (not the model's ``load_weights``) also redoes the post-load processing, e.g. CPU weight packing."""
    from safetensors.torch import load

    state = load(blob)
    worker.reload_weights(weights_iterator=iter(state.items()))
    return len(state)


class Engine:
    """The actor body. Environment variables vLLM reads at import are set by ``start_engine`` via runtime_env."""

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int):
        import torch
        from vllm import LLM

        # A request whose prefill is split across steps rewinds its seeded generator, which only CUDA's
        # generator supports ("CPU Generator does not use offset"): on CPU, prefills run whole.
        whole_prefills = {} if torch.cuda.is_available() else {
            "enable_chunked_prefill": False, "max_num_batched_tokens": max(cfg.max_model_len, 8192)}
        self.llm = LLM(
            model=model_path,
            dtype=resolve_dtype(cfg.dtype),
            max_model_len=cfg.max_model_len,
            seed=seed,
            enable_prefix_caching=cfg.enable_prefix_caching,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=True,
            **whole_prefills,
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
                logprobs=0,  # the sampled token's logprob only
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [self._to_generation(prompt, out) for prompt, out in zip(prompts, outputs)]

    @staticmethod
    def _to_generation(prompt: list[int], out) -> Generation:
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(token_ids, completion.logprobs)]
        return Generation(list(prompt), token_ids, logprobs, completion.text, str(completion.finish_reason))

    def update_weights(self, blob: bytes) -> int:
        """Load new weights (safetensors bytes); cached prefixes were computed with the old ones, so drop them."""
        loaded = self.llm.collective_rpc(_load_weights_from_bytes, args=(blob,))[0]
        self.llm.reset_prefix_cache()
        return loaded

    def init_sync_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """GPU weight sync: join this agent's NCCL broadcast group (see ``mapoco.weight_sync``)."""
        from mapoco.weight_sync import init_group_in_worker

        self.llm.collective_rpc(init_group_in_worker, args=(host, port, rank_offset, world_size))

    def receive_weights(self, specs: list[tuple[str, str, list[int]]]) -> int:
        from mapoco.weight_sync import receive_in_worker

        loaded = self.llm.collective_rpc(receive_in_worker, args=(specs,))[0]
        self.llm.reset_prefix_cache()
        return loaded

    def pid(self) -> int:
        return os.getpid()


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
        # In-process engine core: one process per engine, and collective_rpc runs callables directly.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_engine(model_path: str, cfg: EngineConfig, seed: int) -> ray.actor.ActorHandle:
    actor_cls = ray.remote(Engine).options(
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        runtime_env={"env_vars": engine_env(cfg)},
    )
    return actor_cls.remote(model_path, cfg, seed)


class AgentEngines:
    """The engine replicas of one agent; a batch is split evenly across replicas."""

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int):
        self.actors = [start_engine(model_path, cfg, seed + r) for r in range(cfg.replicas)]

    def wait_ready(self) -> None:
        ray.get([a.pid.remote() for a in self.actors])

    def submit(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]) -> list[ray.ObjectRef]:
        """Start generation on every replica at once; returns one ref per non-empty shard, in order."""
        n = len(self.actors)
        size = -(-len(prompts) // n) if prompts else 0
        return [
            actor.generate.remote(prompts[i : i + size], sampling, seeds[i : i + size])
            for actor, i in zip(self.actors, range(0, len(prompts), size or 1))
        ]

    @staticmethod
    def collect(refs: list[ray.ObjectRef]) -> list[Generation]:
        return [g for shard in ray.get(refs) for g in shard]

    def push_weights(self, blob: bytes) -> None:
        ray.get([a.update_weights.remote(blob) for a in self.actors])

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

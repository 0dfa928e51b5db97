"""Engine actors: one Ray actor per agent replica wrapping a vLLM ``LLM``; token ids in, token ids out.

New weights arrive on CPU as a ``mapoco.weights.payload`` read in place from Ray's object store; on GPU
through an NCCL broadcast (``mapoco.weights.collective``).

A shared LoRA engine (``team.lora_engine``) serves several agents on one base model, each request with its agent's
adapter (``load_adapter``: written as a peft folder, loaded by vLLM in place); one batch mixes adapters.

A replica that dies (killed, out of memory) is restarted in its placement bundle, gets the trained weights back
(the last ones pushed, every adapter, or ``AgentEngines.on_restart`` on the NCCL path), and the requests it was
serving are sent again: sampling seeds are per request, so the retried shard samples what the lost one would have.
"""

from __future__ import annotations

import gc
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from mapoco.config import EngineConfig, SamplingConfig
from mapoco.models.registry import resolve_model
from mapoco.runtime.actor_group import ActorGroup, Call
from mapoco.runtime.devices import visible_devices_env
from mapoco.runtime.logs import capture_output
from mapoco.runtime.placement import READY_TIMEOUT_S, Placement, node_of_actor
from mapoco.runtime.precision import engine_dtype, on_this_device
from mapoco.weights.adapters import AdapterPayload, write_adapter
from mapoco.weights.collective import init_group_in_worker, receive_in_worker
from mapoco.weights.object_store import reload_in_worker
from mapoco.weights.payload import WeightPayload


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


class Engine:
    """The actor body. Environment variables vLLM reads at import are set by ``start_engine`` via runtime_env."""

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int, replica: int, sleep_mode: bool = False,
                 name: str = "engine"):
        capture_output(f"{name}-replica{replica}")  # before vLLM says anything
        self.replica = replica  # its bundle in the agent's placement group
        import torch
        from vllm import LLM

        # vLLM's start-up runs gc.collect several times; the millions of objects its imports made live as long as
        # the process does, so they are frozen out of those collections.
        gc.freeze()

        # A request whose prefill is split across steps rewinds its seeded generator, which only CUDA's
        # generator supports ("CPU Generator does not use offset"): on CPU, prefills run whole.
        whole_prefills = {} if torch.cuda.is_available() else {
            "enable_chunked_prefill": False, "max_num_batched_tokens": max(cfg.max_model_len, 8192)}
        # Tensor-parallel workers live inside this actor, which holds all their GPUs (see mapoco.runtime.placement).
        executor = {"distributed_executor_backend": "mp"} if cfg.tensor_parallel_size > 1 else {}
        lora = {"enable_lora": True, "max_loras": cfg.max_loras, "max_cpu_loras": cfg.max_loras,
                "max_lora_rank": cfg.max_lora_rank} if cfg.max_loras else {}
        self.adapters: dict[str, object] = {}  # agent name -> its LoRARequest (id and folder fixed for the run)
        self.adapter_dir = adapter_folder()
        self.llm = LLM(
            model=str(resolve_model(model_path)),  # a hub id: fetched into this node's HF cache
            load_format="safetensors",  # never a pickle checkpoint (mapoco.models.require_safetensors)
            dtype=on_this_device(cfg.dtype, engine_dtype(cfg)),
            max_model_len=cfg.max_model_len,
            seed=seed,
            enable_prefix_caching=cfg.enable_prefix_caching,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            # CUDA graphs on GPU unless asked otherwise; a CPU engine has none to capture.
            enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not torch.cuda.is_available(),
            enable_sleep_mode=sleep_mode and torch.cuda.is_available(),  # CUDA only; see ``sleep``
            **whole_prefills,
            **executor,
            **lora,
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | Sequence[SamplingConfig],
                 seeds: list[int], adapters: Sequence[str | None] | None = None) -> list[Generation]:
        """One batch; ``sampling`` for all or per prompt, ``adapters`` (agent names, None: the base) per prompt."""
        from vllm import SamplingParams, TokensPrompt

        per_prompt = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else sampling
        params = [
            SamplingParams(
                temperature=each.temperature,
                top_p=each.top_p,
                max_tokens=each.max_new_tokens,
                stop=list(each.stop) if each.stop else None,
                seed=seed,
                logprobs=0,  # the sampled token's logprob only
            )
            for each, seed in zip(per_prompt, seeds, strict=True)
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                    lora_request=self._lora_requests(adapters))
        return [self._to_generation(prompt, out) for prompt, out in zip(prompts, outputs)]

    def _lora_requests(self, adapters: Sequence[str | None] | None) -> list | None:
        if adapters is None or not any(adapters):
            return None
        unknown = {a for a in adapters if a is not None} - set(self.adapters)
        if unknown:
            raise KeyError(f"no adapter loaded for {sorted(unknown)} (loaded: {sorted(self.adapters)})")
        return [self.adapters[a] if a is not None else None for a in adapters]

    def load_adapter(self, name: str, adapter: AdapterPayload) -> None:
        """Load agent ``name``'s adapter, or replace it in place (same id, same folder); prefixes cached under the
        old one were computed with it, so they go."""
        from vllm.lora.request import LoRARequest

        config, payload = adapter
        folder = self.adapter_dir / name
        write_adapter(folder, config, payload)
        lora_id = self.adapters[name].lora_int_id if name in self.adapters else len(self.adapters) + 1
        self.llm.llm_engine.add_lora(LoRARequest(name, lora_id, str(folder), load_inplace=True))
        # Requests carry the plain request: in-place loading on every batch would re-read the folder each step.
        self.adapters[name] = LoRARequest(name, lora_id, str(folder))
        self.reset_prefix_cache()

    @staticmethod
    def _to_generation(prompt: list[int], out) -> Generation:
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [step[tok].logprob for tok, step in zip(token_ids, completion.logprobs)]
        return Generation(list(prompt), token_ids, logprobs, completion.text, str(completion.finish_reason))

    def logprobs(self, rows: list[tuple[list[int], list[int]]], adapter: str | None = None) -> list[list[float]]:
        """The logprob of every response token after its prompt and the tokens before it, under the loaded weights
        (and ``adapter``): the engine's side of a sync check on tokens it did not sample itself. It leaves no cached
        prefix behind, so the next rollout runs as it would have without it (cold, as after every push)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0)  # the prompt's own tokens only
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt + response) for prompt, response in rows],
                                    params, use_tqdm=False,
                                    lora_request=self._lora_requests([adapter] * len(rows)))
        self.reset_prefix_cache()
        return [[out.prompt_logprobs[len(prompt) + i][token].logprob for i, token in enumerate(response)]
                for (prompt, response), out in zip(rows, outputs)]

    def update_weights(self, payload: WeightPayload) -> int:
        """Load new weights; cached prefixes were computed with the old ones, so drop them."""
        loaded = self.llm.collective_rpc(reload_in_worker, args=(payload,))[0]
        self.reset_prefix_cache()
        return loaded

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes: they were computed with the old weights (benchmarks: start every run cold)."""
        self.llm.reset_prefix_cache()

    def init_sync_group(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None:
        """Collective weight sync: join this agent's broadcast group (see ``mapoco.weights.collective``)."""
        self.llm.collective_rpc(init_group_in_worker, args=(host, port, rank_offset, world_size, timeout_s))

    def receive_weights(self, specs: list[tuple[str, str, list[int]]]) -> int:
        loaded = self.llm.collective_rpc(receive_in_worker, args=(specs,))[0]
        self.reset_prefix_cache()
        return loaded

    def sleep(self) -> None:
        """Colocated learner's turn: the scheduler pauses and the prefix cache is dropped; on a GPU the weights are
        also offloaded and the KV cache freed (level 1 keeps a CPU copy). vLLM's memory part (``enable_sleep_mode``)
        is CUDA only: on a CPU the pause is all of it."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def is_sleeping(self) -> bool:
        return self.llm.llm_engine.is_sleeping()

    def unfinished_requests(self) -> int:
        """Requests the engine still holds (none between batches: a served client that left leaves none behind)."""
        return self.llm.llm_engine.get_num_unfinished_requests()

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, Any]:
        """Its node, bundle and GPUs, and the KV cache vLLM made room for there (in tokens: `mapoco plan` counts
        them ahead)."""
        cache = self.llm.llm_engine.vllm_config.cache_config
        return {**node_of_actor(self.replica), "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size}

    def describe(self) -> dict[str, Any]:
        """Where this replica runs and with what (tests check placement and settings reached it)."""
        return {"pid": os.getpid(), **self.where(),
                "dtype": str(self.llm.llm_engine.model_config.dtype).removeprefix("torch."),
                "adapters": sorted(self.adapters)}


ADAPTER_PREFIX = "mapoco-adapters-"


def adapter_folder() -> Path:
    """This engine's folder for its adapters, rewritten after every update: in RAM-backed /dev/shm where there is
    one. A killed engine cannot clean up, so each new one removes the folders of engines no longer alive."""
    scratch = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    for old in scratch.glob(f"{ADAPTER_PREFIX}*"):
        pid = old.name.removeprefix(ADAPTER_PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{ADAPTER_PREFIX}{os.getpid()}-", dir=scratch))


def engine_env(cfg: EngineConfig) -> dict[str, str]:
    return {
        **(cfg.env or {}),
        "VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib),
        # In-process engine core: one process per engine, and collective_rpc runs callables directly.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        **visible_devices_env(cfg.num_gpus),
    }


def start_engine(model_path: str, cfg: EngineConfig, seed: int, placement: Placement, bundle: int,
                 sleep_mode: bool, name: str = "engine") -> ray.actor.ActorHandle:
    actor_cls = ray.remote(Engine).options(
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        scheduling_strategy=placement.strategy(bundle),
        runtime_env={"env_vars": engine_env(cfg)},
    )
    return actor_cls.remote(model_path, cfg, seed, bundle, sleep_mode, name)


class ReplicaLost(RuntimeError):
    """A dead replica could not be restarted: its bundle found no node within the timeout (a lost node, and no
    other node can hold it). A training run stops with the resume message."""


class AgentEngines(ActorGroup):
    """The engine replicas of one agent, replica r in bundle r of the agent's placement group; a batch is split
    evenly across replicas. ``on_restart(r)`` (set by the trainer) puts the trained weights into a restarted one.
    A restart waits at most ``restart_timeout_s`` for its bundle: after a node is lost, Ray moves the bundle to a
    node that can hold it, if there is one."""

    restartable = True

    def __init__(self, model_path: str, cfg: EngineConfig, seed: int, placement: Placement, sleep_mode: bool = False,
                 restart_timeout_s: float = 120.0, what: str = "engine"):
        self.model_path, self.cfg, self.seed = model_path, cfg, seed
        self.sleep_mode, self.restart_timeout_s = sleep_mode, restart_timeout_s
        self.restarts = 0
        self._counting = threading.Lock()
        self.on_restart: Callable[[int], None] | None = None
        self.weights: WeightPayload | ray.ObjectRef | None = None  # the last pushed, for replicas that restart
        self.adapters: dict[str, AdapterPayload | ray.ObjectRef] = {}  # a shared LoRA engine's, likewise
        super().__init__(what, cfg.replicas, placement, owns_placement=True)

    def start(self, index: int) -> ray.actor.ActorHandle:
        return start_engine(self.model_path, self.cfg, self.seed + index, self.placement, index, self.sleep_mode,
                            self.what)

    def wait_ready(self) -> None:
        ray.get([a.pid.remote() for a in self.actors])

    def restart(self, replica: int, restore: bool = True) -> None:
        """Replace a dead replica in its own bundle, wait until it serves, and give it the trained weights (unless
        ``restore`` is false: a weight sync that restarts it pushes them itself). The bundle must find a live node
        within ``restart_timeout_s``; the new engine then has ``READY_TIMEOUT_S`` to start there (a busy node's slow
        vLLM start-up is not a lost node)."""
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            while self.placement.bundle_node(replica) is None:  # Ray moves a lost node's bundle, if it can
                if time.monotonic() >= deadline:
                    ray.kill(self.actors[replica], no_restart=True)
                    raise ReplicaLost(f"engine replica {replica} of {self.model_path} died and could not restart: "
                                      f"no node could hold its bundle within {self.restart_timeout_s:g}s")
                time.sleep(0.5)
            ray.kill(self.actors[replica], no_restart=True)
            self.actors[replica] = self.start(replica)
            if self._started(replica):
                break
            if time.monotonic() >= deadline:  # it keeps dying as it starts, on a live node: a real fault
                ray.kill(self.actors[replica], no_restart=True)
                raise ReplicaLost(f"engine replica {replica} of {self.model_path} died again as it restarted, for "
                                  f"{self.restart_timeout_s:g}s (its log, in the run's logs/, says why)")
        if restore and self.on_restart is not None:
            self.on_restart(replica)
        elif restore and self.weights is not None:
            ray.get(self.actors[replica].update_weights.remote(self.weights))
        ray.get([self.actors[replica].load_adapter.remote(name, a) for name, a in self.adapters.items()])
        with self._counting:
            self.restarts += 1
            print(f"engine replica {replica} of {self.model_path} restarted ({self.restarts} so far)", flush=True)

    def restart_all(self, replicas: Sequence[int], restore: bool = True) -> None:
        """Restart several replicas at once (each start is mostly vLLM's import and load, in its own process)."""
        with ThreadPoolExecutor(max_workers=max(len(replicas), 1), thread_name_prefix="restart") as pool:
            for done in [pool.submit(self.restart, replica, restore) for replica in replicas]:
                done.result()

    def _started(self, replica: int) -> bool:
        """Whether the new replica came up; False if it died starting or its bundle's node went away meanwhile
        (a node that dies is only declared dead after its health checks): the caller places it again."""
        ready = self.actors[replica].pid.remote()
        give_up = time.monotonic() + READY_TIMEOUT_S
        while not ray.wait([ready], timeout=1.0)[0]:
            if self.placement.bundle_node(replica) is None:
                return False
            if time.monotonic() >= give_up:
                raise ReplicaLost(f"engine replica {replica} of {self.model_path} restarted but did not start "
                                  f"within {READY_TIMEOUT_S:g}s (its log, in the run's logs/, says why)")
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError:
            return False
        return True

    def submit(self, prompts: list[list[int]], sampling: SamplingConfig | list[SamplingConfig], seeds: list[int],
               adapters: list[str | None] | None = None) -> list[Call]:
        """Start generation on every replica at once; one call per non-empty shard, in order (kept to be sent again
        to a replica's restart). ``sampling`` is one for all prompts or one per prompt; ``adapters`` (a shared LoRA
        engine) one per prompt."""
        sends = []
        for part in self.slices(len(prompts)):
            args = (prompts[part], sampling if isinstance(sampling, SamplingConfig) else sampling[part], seeds[part],
                    adapters[part] if adapters is not None else None)
            sends.append(lambda actor, args=args: actor.generate.remote(*args))
        return self.send(sends)

    def collect(self, shards: list[Call]) -> list[Generation]:
        """Every shard's generations in order; a shard whose replica died is served again by its restart."""
        return [generation for shard in self.results(shards) for generation in shard]

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig | list[SamplingConfig], seeds: list[int],
                 adapters: list[str | None] | None = None) -> list[Generation]:
        return self.collect(self.submit(prompts, sampling, seeds, adapters))

    def logprobs(self, rows: list[tuple[list[int], list[int]]], adapter: str | None = None) -> list[list[list[float]]]:
        """``Engine.logprobs`` of the same rows on every replica (under ``adapter``): each must hold what was pushed."""
        return self.call_all("logprobs", rows, adapter)

    def push_adapter(self, name: str, adapter: AdapterPayload | ray.ObjectRef) -> None:
        """Agent ``name``'s adapter into every replica (kept, as weights are, for a replica that restarts)."""
        self.adapters[name] = adapter
        self.call_all("load_adapter", name, adapter)

    def push_weights(self, payload: WeightPayload | ray.ObjectRef) -> None:
        """Weights, or a reference to them in the object store (each replica reads them from there itself). They are
        kept (the reference keeps them in the store): a replica that restarts later loads them too."""
        self.weights = payload
        self.call_all("update_weights", payload)

    def sleep(self) -> None:
        self.call_all("sleep")

    def wake_up(self) -> None:
        self.call_all("wake_up")

"""A learner rank: per trained agent, the Ray actor running the policy (+ per-turn value head) under DeepSpeed.

Ranks of one group form their own process group (gloo on CPU, NCCL on GPU); DeepSpeed averages gradients across
them. Each group has its own model, optimizer, learning rate, ZeRO stage and LoRA setting. A frozen reference
policy (the base model with adapters disabled under LoRA) gives the KL term.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import resource
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from mapoco.config import AlgorithmConfig, LearnerConfig
from mapoco.runtime.logs import capture_output
from mapoco.runtime.placement import (
    node_of_actor,
)
from mapoco.runtime.precision import learner_dtype, on_this_device
from mapoco.training.algorithms import (
    entropy_from_logits,
    kl_penalty,
    masked_mean,
    masked_sum,
    policy_loss,
    value_loss,
)
from mapoco.training.batch import (
    MicroBatch,
    Rollout,
    RolloutStats,
    TokenTargets,
    collate,
    combine_stats,
    response_outputs,
)
from mapoco.training.checkpoint import ADAPTER_DIR, CheckpointError
from mapoco.training.policy_model import PolicyWithValue, deepspeed_config
from mapoco.training.state_io import load_state, save_state
from mapoco.weights.adapters import (
    AdapterPayload,
    adapter_weights,
    with_lora,
    write_adapter,
)
from mapoco.weights.collective import Broadcaster, join_broadcast, send_weights
from mapoco.weights.payload import WeightPayload, engine_weights, pack


def peak_memory_gib() -> float:
    """The most memory this rank has held: CUDA's allocator peak on a GPU (what `mapoco plan` estimates a floor
    of), the process's peak resident size on CPUs."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def init_distributed(backend: str) -> None:
    """``deepspeed.init_distributed`` without DeepSpeed's shared-memory all-reduce op. That op serves only inference
    tensor parallelism (training reduces through torch.distributed), yet on a CPU its first load compiles C++ for
    about a minute on 2 cores, and again whenever the build command changes (another venv, another Ray node)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the dict DeepSpeed consults before building
    deepspeed.init_distributed(dist_backend=backend)


def free_port() -> int:
    """A TCP port free on every interface of this node."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Learner:
    """One rank of an agent's learner group (the Ray actor body)."""

    def __init__(self, rank: int, world_size: int, model_path: str, cfg: LearnerConfig, algo: AlgorithmConfig,
                 num_turns: int, seed: int, name: str = "learner"):
        capture_output(f"{name}-rank{rank}")
        self.rank, self.world_size, self.cfg, self.algo = rank, world_size, cfg, algo
        self.model_path, self.num_turns, self.seed = model_path, num_turns, seed
        self.master: tuple[str, int] | None = None
        self.sync_comm: Broadcaster | None = None  # rank 0 in the collective weight sync's group

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it: where the group (or the NCCL sync group) meets, reachable from
        ranks and engines on other nodes."""
        return ray.util.get_node_ip_address(), free_port()

    def setup(self, master: tuple[str, int]) -> None:
        """Join the group at rank 0's ``master`` address, load the model and build the DeepSpeed engine."""
        self.master = master
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        self.on_gpu = self.cfg.num_gpus > 0 and torch.cuda.is_available()
        init_distributed("nccl" if self.on_gpu else "gloo")
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        self._build()

    def reset(self, cfg: LearnerConfig, algo: AlgorithmConfig, num_turns: int, seed: int) -> None:
        """Start over as a new rank of the same group would: the model reloaded from its files, a new optimizer
        and DeepSpeed engine with these settings (the group, its world size and its device stay)."""
        self.cfg, self.algo, self.num_turns, self.seed = cfg, algo, num_turns, seed
        self.engine = self.optimizer = self.scheduler = self.reference = None
        self._build()

    def _build(self) -> None:
        import deepspeed
        from transformers import AutoTokenizer

        from mapoco.models.registry import load_causal_lm, resolve_model

        cfg, model_path = self.cfg, resolve_model(self.model_path)  # a hub id: fetched into this node's HF cache
        torch.manual_seed(self.seed)
        self.dtype = getattr(torch, on_this_device(cfg.dtype, learner_dtype(cfg)))  # auto: bf16 on GPUs, f32 on CPUs
        self.pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id or 0
        policy = load_causal_lm(model_path, self.dtype)
        self.reference = None
        if cfg.lora_rank > 0:
            policy = with_lora(policy, cfg)
        else:
            self.reference = load_causal_lm(model_path, self.dtype).eval()
            self.reference.requires_grad_(False)
            self.reference.to(self.device)
        model = PolicyWithValue(policy, self.num_turns).to(self.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(cfg.warmup_steps, 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.dtype)
        )

    # ------------------------------------------------------------------ forward passes
    def _micro_batches(self, rows: list[Rollout]) -> list[tuple[int, MicroBatch]]:
        size = self.cfg.micro_batch_size
        return [(i, collate(rows[i : i + size], self.pad_id)) for i in range(0, len(rows), size)]

    def _to_device(self, mb: MicroBatch) -> MicroBatch:
        return MicroBatch(*(t.to(self.device) for t in vars(mb).values()))

    @torch.no_grad()
    def rollout_stats(self, rows: list[Rollout]) -> RolloutStats:
        """Old-policy logprobs and values, and reference logprobs, of each rollout (no gradient)."""
        self.engine.eval()
        out = RolloutStats.zeros(rows)
        for start, mb in self._micro_batches(rows):
            mb = self._to_device(mb)
            logits, values = self.engine(mb.input_ids, mb.attention_mask)
            logprobs, token_values, _ = response_outputs(logits, values, mb)
            ref = self._reference_logprobs(mb)
            end, n = start + mb.mask.size(0), mb.mask.size(1)
            for field, value in (("logprobs", logprobs), ("ref_logprobs", ref), ("values", token_values)):
                getattr(out, field)[start:end, :n] = (value * mb.mask).float().cpu()
        return out

    def _reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        if self.reference is not None:
            logits = self.reference(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        else:
            with self.engine.module.policy.disable_adapter():
                logits = self.engine.module.policy(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        return response_outputs(logits, None, mb)[0]

    # ------------------------------------------------------------------ PPO update
    def update(self, rows: list[Rollout], targets: TokenTargets, index: list[int], normalizer: float,
               step: int) -> dict[str, float]:
        """PPO epochs over this rank's shard: ``rows``, and rows ``index`` of the agent's ``targets``, read from the
        object store. Losses are summed per token and divided by the tokens of the optimizer step's mini-batch
        across ranks (``normalizer``, the whole batch's, when there is one mini-batch): a token mean. Statistics are
        per epoch (the loss over the epoch's steps, per-token means), averaged over epochs. ``step`` seeds the
        mini-batch shuffle, so a resumed run draws the same mini-batches."""
        self.engine.train()
        world = torch.distributed.get_world_size()
        targets = targets.select(index)
        stats: dict[str, list[float]] = {}
        for epoch_index in range(self.algo.ppo_epochs):
            epoch: dict[str, list[float]] = {}
            minibatches = self._minibatch_slices(len(rows), (self.seed, step, epoch_index))
            for minibatch in minibatches:
                micro = self._micro_batches([rows[i] for i in minibatch])
                tokens = normalizer if len(minibatches) == 1 else self._tokens_across_ranks(micro)
                for j, (start, mb) in enumerate(micro):
                    # Gradients are reduced across ranks, and the optimizer steps, only at the last micro-batch.
                    self.engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
                    picked = [minibatch[start + k] for k in range(mb.mask.size(0))]
                    self._accumulate(self._to_device(mb), targets.select(picked, mb.mask.size(1), self.device),
                                     tokens, world, epoch)
                self.engine.step()
                stats.setdefault("grad_norm", []).append(float(self.engine.get_global_grad_norm() or 0.0))
            for key, value in combine_stats(epoch, epoch.pop("tokens")).items():
                stats.setdefault(key, []).append(value)
        return {k: float(np.mean(v)) for k, v in stats.items()} | {"peak_memory_gib": peak_memory_gib()}

    def _minibatch_slices(self, n: int, key: tuple[int, ...]) -> list[list[int]]:
        """``algorithm.mini_batches`` slices of this rank's rows, drawn anew each epoch (seeded by ``key``: the same
        on every rank, and on a resumed run). One mini-batch keeps the rows in order."""
        chunks = max(1, min(self.algo.mini_batches, n))
        if chunks == 1:
            return [list(range(n))]
        seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=4).digest(), "little")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[i::chunks] for i in range(chunks)]

    def _tokens_across_ranks(self, micro: list[tuple[int, MicroBatch]]) -> float:
        """The response tokens of one optimizer step's mini-batch, on every rank together."""
        count = torch.tensor([float(sum(mb.mask.sum() for _, mb in micro))], device=self.device)
        torch.distributed.all_reduce(count)
        return max(float(count), 1.0)

    def _accumulate(self, mb: MicroBatch, t: TokenTargets, normalizer: float, world: int,
                    stats: dict[str, list[float]]) -> None:
        """Backward of this micro-batch's share of the batch loss (times ``world``: DeepSpeed averages gradients
        over ranks). The shares are logged, so the parts of every rank and micro-batch add up to the batch loss."""
        logits, values = self.engine(mb.input_ids, mb.attention_mask)
        logprobs, token_values, picked = response_outputs(logits, values, mb)
        pg_loss, pstats = policy_loss(logprobs, t.old_logprobs, t.advantages, mb.mask, clip_eps=self.algo.clip_eps,
                                      normalizer=normalizer, is_weights=t.is_weights)
        loss = pg_loss
        logged = {"policy_loss": pg_loss.item(), "clip_frac": float(pstats["clip_frac"])}
        if t.returns is not None:  # a critic (gae)
            vloss, vstats = value_loss(token_values, t.old_values, t.returns, mb.mask,
                                       clip_eps=self.algo.value_clip_eps, normalizer=normalizer)
            loss = loss + self.algo.vf_coef * vloss
            logged.update(value_loss=vloss.item(), vf_clip_frac=float(vstats["vf_clip_frac"]))
        token_entropy = entropy_from_logits(picked)
        if self.algo.entropy_coef:  # a share of the batch's token mean too, like every other term
            loss = loss - self.algo.entropy_coef * masked_sum(token_entropy, mb.mask) / normalizer
        entropy = masked_mean(token_entropy, mb.mask)
        if not self.algo.kl_in_reward and self.algo.kl_coef:
            kl_tokens = kl_penalty(logprobs, t.ref_logprobs, self.algo.kl_estimator)
            loss = loss + self.algo.kl_coef * masked_sum(kl_tokens, mb.mask) / normalizer
        self.engine.backward(loss * world, scale_wrt_gas=False)
        # loss: what was minimised, every term; tokens: the weight of this micro-batch's means
        logged.update(loss=loss.item(), entropy=entropy.item(), tokens=float(mb.mask.sum()))
        for key, value in logged.items():
            stats.setdefault(key, []).append(value)

    # ------------------------------------------------------------------ weights out, checkpoints
    def _engine_weights(self) -> dict[str, torch.Tensor]:
        return engine_weights(self.engine.module.policy, lora=self.cfg.lora_rank > 0)

    def weights(self, dtype: str) -> WeightPayload | None:
        """The policy's weights for the engines (rank 0; every rank must call for ZeRO-3's gather)."""
        params = list(self.engine.module.parameters())
        with _gathered(params, self.cfg.zero_stage):
            state = self._engine_weights() if self.rank == 0 else None
        if state is None:
            return None
        return pack(state, getattr(torch, dtype))

    def adapter(self, dtype: str) -> AdapterPayload | None:
        """A LoRA policy's adapter alone, for the shared LoRA engine (rank 0; every rank calls, as for weights)."""
        with _gathered(list(self.engine.module.parameters()), self.cfg.zero_stage):
            if self.rank != 0:
                return None
            config, state = adapter_weights(self.engine.module.policy)
            return config, pack(state, getattr(torch, dtype))

    def init_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        """Collective weight sync: rank 0 is rank 0 of this agent's broadcast group with its engines (NCCL on a GPU,
        gloo on the CPU); a rebuilt group replaces the old one."""
        if self.sync_comm is not None:
            self.sync_comm.close()
        self.sync_comm = join_broadcast(host, port, 0, world_size, self.device, timeout_s)

    def weight_specs(self, dtype: str) -> list[tuple[str, str, list[int]]]:
        with _gathered(list(self.engine.module.parameters()), self.cfg.zero_stage):
            state = self._engine_weights()
        return [(name, dtype, list(t.shape)) for name, t in state.items()]

    def broadcast_weights(self, dtype: str) -> None:
        """Every rank enters (ZeRO-3 gathers collectively); rank 0 broadcasts tensor by tensor."""
        with _gathered(list(self.engine.module.parameters()), self.cfg.zero_stage):
            if self.rank != 0:
                return
            try:
                send_weights(self.sync_comm, self._engine_weights(), getattr(torch, dtype), self.device)
            except Exception:
                self.sync_comm.close()  # members waiting for the rest of the broadcast fail now, not at their timeout
                self.sync_comm = None
                raise

    def save_checkpoint(self, directory: str) -> None:
        """The weights as safetensors (a LoRA policy: only what trains, the adapter and the value head; its adapter
        also as a peft folder, ``adapter/``); optimizer, scheduler, RNG per rank."""
        from safetensors.torch import save_file

        path = Path(directory)
        params = list(self.engine.module.parameters())
        with _gathered(params, self.cfg.zero_stage):
            if self.rank == 0:
                state = {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()
                         if k in self._saved_names()}
                save_file(state, str(path / "model.safetensors"))
                if self.cfg.lora_rank > 0:
                    config, adapter = adapter_weights(self.engine.module.policy)
                    write_adapter(path / ADAPTER_DIR, config, pack(adapter, next(iter(adapter.values())).dtype))
        with self._optimizer_with_params() as optimizer:
            optimizer_state = optimizer.state_dict()
        save_state(
            {
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": _numpy_rng_state(),
                "python_rng": _python_rng_state(),
            },
            path / f"trainer_rank{self.rank}",
        )

    def load_checkpoint(self, directory: str, weights_only: bool = False) -> None:
        """The checkpoint's weights, and unless ``weights_only`` (a new phase from trained weights:
        ``train.init_from``) the optimizer, scheduler and RNG states it was saved with."""
        from safetensors.torch import load_file

        path = Path(directory)
        params = list(self.engine.module.parameters())
        state = load_file(str(path / "model.safetensors"))
        missing = self._saved_names() - set(state)
        if missing:
            raise CheckpointError(f"{path / 'model.safetensors'} lacks {len(missing)} weights, e.g. {min(missing)}")
        with _gathered(params, self.cfg.zero_stage, modify=True):
            self.engine.module.load_state_dict(state, strict=self.cfg.lora_rank == 0)
        if hasattr(self.optimizer, "_restore_from_bit16_weights"):  # ZeRO keeps fp32 master copies: refresh them
            self.optimizer._restore_from_bit16_weights()
        if weights_only:
            return
        extra = load_state(path / f"trainer_rank{self.rank}")
        with self._optimizer_with_params() as optimizer:
            optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"])
        np.random.set_state(_numpy_rng_tuple(extra["numpy_rng"]))
        random.setstate(_python_rng_tuple(extra["python_rng"]))

    def _saved_names(self) -> set[str]:
        """What a checkpoint holds: every weight, or for a LoRA policy only the trained ones (the base is the
        model folder's, unchanged)."""
        module = self.engine.module
        if self.cfg.lora_rank == 0:
            return set(module.state_dict())
        return {name for name, p in module.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def _optimizer_with_params(self) -> Iterator[torch.optim.Optimizer]:
        """The torch optimizer inside DeepSpeed's ZeRO wrapper: its state is plain tensors and numbers (Adam
        moments of this rank's flat partition), which a checkpoint can hold without pickling. ZeRO-3 empties its
        param groups between steps, so its state would map to no parameter: they are filled while it is read or
        written, as DeepSpeed's own checkpointing does."""
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        zero3 = hasattr(self.optimizer, "_set_fp32_optimizer_param_groups")
        if zero3:
            self.optimizer._set_fp32_optimizer_param_groups()
        try:
            yield base
        finally:
            if zero3:
                self.optimizer._clear_fp32_optimizer_param_groups()

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def describe(self) -> dict[str, Any]:
        """What this rank actually runs with (tests check that each agent's settings reached its actors)."""
        return {
            "rank": self.rank,
            **self.where(),
            "world_size": torch.distributed.get_world_size(),
            "zero_stage": self.engine.zero_optimization_stage(),
            "lr": self.learning_rate(),
            "scheduler_steps": self.scheduler.last_epoch,  # updates the learning-rate schedule has counted
            "lora": self.cfg.lora_rank > 0 and hasattr(self.engine.module.policy, "peft_config"),
            "trainable_params": sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad),
            "model_type": self.engine.module.policy.config.model_type,
        }

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, Any]:
        """This rank's node, and the address its group met at (rank 0's node)."""
        return {**node_of_actor(self.rank), "master": list(self.master or ())}  # rank r rides in bundle r


def _gathered(params: list[nn.Parameter], zero_stage: int, modify: bool = False):
    """ZeRO-3 shards parameters: gather them for a full view (and re-shard edits when ``modify``)."""
    import contextlib

    import deepspeed

    if zero_stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_rng_tuple(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["gauss"])


def _python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_rng_tuple(state: dict[str, Any]) -> tuple:
    return (state["version"], tuple(state["internal"]), state["gauss"])

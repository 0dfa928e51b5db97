"""Weight movement, both ends and both paths: what leaves a learner and how an engine takes it in.

- Learner side: ``engine_weights`` names a policy's tensors as its engines load them (LoRA merged, tied once);
  ``adapter_weights`` is a LoRA policy's adapter alone, for the shared LoRA engine; ``pack`` turns either into the
  object-store payload; ``join_broadcast`` joins the agent's broadcast group and ``send_weights`` sends through it.
- Engine side (runs inside vLLM's workers through ``collective_rpc``): ``reload_in_worker`` (from a payload read in
  place from Ray's object store), ``init_group_in_worker`` and ``receive_in_worker`` (the broadcast group: NCCL on
  GPU, gloo on CPU, one code path). Both re-tie a tied output head after the reload. ``write_adapter`` puts an
  adapter where vLLM loads it from.

The CPU payload is one flat byte array per tensor plus its dtype and shape, a form Ray's object store holds without
pickling the data. The learner's one copy is Ray writing the arrays into shared memory; an engine reads them in
place (zero-copy numpy views), so the only work left on its side is vLLM's own reload. Serializing to safetensors
bytes instead cost a full extra copy on each side (profiled: 90% of the learner's sync time in
``safetensors.torch.save``, a third of the engine's in unpickling the bytes). Flat bytes, not typed arrays, because
numpy has no bfloat16. Who sends when (object store or broadcast group, restarts) is ``mapoco.training.weight_sync``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

WeightPayload = dict[str, tuple[str, list[int], np.ndarray]]
AdapterPayload = tuple[dict[str, Any], WeightPayload]  # peft's adapter config, and the adapter's tensors


def pack(state: dict[str, torch.Tensor], dtype: torch.dtype) -> WeightPayload:
    """CPU tensors in ``dtype`` as byte views (no copy when they already are)."""
    out: WeightPayload = {}
    for name, tensor in state.items():
        flat = tensor.detach().to("cpu", dtype).contiguous().reshape(-1)
        out[name] = (str(dtype).removeprefix("torch."), list(tensor.shape), flat.view(torch.uint8).numpy())
    return out


def unpack(payload: WeightPayload) -> dict[str, torch.Tensor]:
    """Tensors viewing the payload's buffers: read-only when they live in the object store, so callers copy out
    of them (vLLM's weight loaders do) and never write into them."""
    with warnings.catch_warnings():  # torch warns that the buffers are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        return {name: torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)
                for name, (dtype, shape, data) in payload.items()}


def engine_weights(policy: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """A policy's weights as its engines load them: HF names, LoRA adapters merged in, tied weights (lm_head =
    embeddings: one tensor under two names) sent once."""
    if lora:
        policy.merge_adapter()
        state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v.detach().clone()
                 for k, v in policy.state_dict().items() if "lora_" not in k}
        policy.unmerge_adapter()
    else:
        state = {k: v.detach() for k, v in policy.state_dict().items()}
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out


def adapter_weights(policy: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A LoRA policy's adapter as a shared LoRA engine loads it: peft's adapter config (JSON-ready) and the
    adapter tensors alone, under the names peft saves them with (what vLLM's adapter loader reads)."""
    from peft import get_peft_model_state_dict

    config = {k: sorted(v) if isinstance(v, set) else v for k, v in policy.peft_config["default"].to_dict().items()}
    return config, {k: v.detach() for k, v in get_peft_model_state_dict(policy).items()}


def write_adapter(directory: Path, config: dict[str, Any], payload: WeightPayload) -> None:
    """Engine side: an adapter as the peft folder vLLM loads (``adapter_config.json``, ``adapter_model.safetensors``),
    written to a temporary name first so a load never reads half a file."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / "adapter_model.safetensors.partial"
    save_file({k: v.clone() for k, v in unpack(payload).items()}, str(partial))
    (directory / "adapter_config.json").write_text(json.dumps(config, default=str))
    partial.replace(directory / "adapter_model.safetensors")


def read_adapter(folder: Path) -> AdapterPayload:
    """A peft adapter folder (a checkpoint's, or a fixed one a frozen agent plays) as an engine loads it."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    return json.loads((folder / "adapter_config.json").read_text()), pack(state, next(iter(state.values())).dtype)


def reload_in_worker(worker, payload: WeightPayload) -> int:
    """Runs inside vLLM's worker: reload the weights in place, from a payload read in place."""
    state = unpack(payload)
    reload_model(worker, state.items())
    return len(state)


def reload_model(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """``reload_weights`` (not the model's ``load_weights``) also redoes the post-load processing, e.g. CPU weight
    packing; then the tied head is re-tied. Both paths (CPU payload, NCCL broadcast) end here."""
    model = worker.get_model()
    with _quiet_expected_reload_warnings(_tied(model)):
        worker.reload_weights(weights_iterator=iter(weights))
    retie_output_head(model)


class _ExpectedReloadWarnings(logging.Filter):
    """vLLM warns "<layer>: Failed to load weights" for layers a reload sent nothing to. Two are expected on every
    sync: ``RotaryEmbedding`` (its cos/sin cache is computed, no checkpoint holds it) and, in a model with tied
    embeddings, ``ParallelLMHead`` (its tensor travels once, under the embedding's name, and is re-tied right
    after). Any other layer's warning still shows."""

    def __init__(self, tied: bool):
        super().__init__()
        self.expected = {"RotaryEmbedding", *(("ParallelLMHead",) if tied else ())}

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.expected)


@contextlib.contextmanager
def _quiet_expected_reload_warnings(tied: bool) -> Iterator[None]:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    quiet = _ExpectedReloadWarnings(tied)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _tied(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def retie_output_head(model) -> None:
    """A tied output head shares the embedding, but vLLM's reload skips ``lm_head.weight`` and never re-processes
    the head: on CPU it kept a packed copy of the *initial* embedding, so the engine's logits drifted from the
    learner's with every update (measured: logprob gap 0.9 after perturbing only the embedding). Point the head at
    the reloaded embedding and redo its post-load processing."""
    head, embedding = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embedding is None or not _tied(model):
        return
    head.weight = embedding.weight
    head.quant_method.process_weights_after_loading(head)


# ---------------------------------------------------------------- the two ends of the broadcast group
class Broadcaster(Protocol):
    """One member of an agent's weight broadcast group: learner rank 0 (group rank 0) and every engine worker."""

    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...

    def synchronize(self) -> None:
        """Until every broadcast asked for has finished here."""

    def close(self) -> None: ...


class GlooBroadcaster:
    """CPU: a gloo group of its own (vLLM's stateless rendezvous, apart from the process's default group), whose
    collectives give up after ``timeout_s`` instead of waiting on a dead member forever."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.group = stateless_init_torch_distributed_process_group(
            host, port, rank, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s))

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        options = torch.distributed.BroadcastOptions()
        options.rootRank = src
        self.group.broadcast([tensor], options).wait()

    def synchronize(self) -> None:
        pass  # each broadcast waited for itself

    def close(self) -> None:
        self.group.shutdown()


class NcclBroadcaster:
    """GPU: vLLM's NCCL communicator on the current stream. NCCL has no timeout of its own: a stalled broadcast is
    caught by the driver's (``mapoco.training.weight_sync``)."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                             store_timeout=int(timeout_s))
        self.comm = PyNcclCommunicator(group, device=device)
        self.stream = torch.cuda.current_stream(device)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.comm.broadcast(tensor, src=src, stream=self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self.comm = None


def join_broadcast(host: str, port: int, rank: int, world_size: int, device: torch.device,
                   timeout_s: float) -> Broadcaster:
    """The group member for ``device``: NCCL on a CUDA device, gloo on the CPU (same rendezvous, same calls)."""
    if device.type == "cuda":
        return NcclBroadcaster(host, port, rank, world_size, device, timeout_s)
    return GlooBroadcaster(host, port, rank, world_size, timeout_s)


def send_weights(broadcaster: Broadcaster, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device) -> None:
    """Learner rank 0's side: every tensor of ``state`` in ``dtype``, in order, from rank 0."""
    for tensor in state.values():
        broadcaster.broadcast(tensor.to(device, dtype).contiguous(), src=0)
    broadcaster.synchronize()


def init_group_in_worker(worker, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None:
    """Runs in each vLLM worker (collective_rpc): leave the old group (a rebuild after a restart), then join the
    agent's new one after the learner."""
    old = getattr(worker, "mapoco_sync", None)
    if old is not None:
        old.close()
    worker.mapoco_sync = join_broadcast(host, port, rank_offset + worker.rank, world_size, worker.device, timeout_s)


def receive_in_worker(worker, specs: list[tuple[str, str, list[int]]]) -> int:
    """Runs in each vLLM worker: receive every tensor from learner rank 0, then reload the model in place."""
    received = []
    for name, dtype, shape in specs:
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=worker.device)
        worker.mapoco_sync.broadcast(tensor, src=0)
        received.append((name, tensor))
    worker.mapoco_sync.synchronize()
    reload_model(worker, received)
    return len(received)

"""The collective transport: one broadcast group per agent (learner rank 0 plus every engine worker, a rendezvous of
its own, so agents never share a group); each push broadcasts tensor by tensor into buffers the engines reload from.
The group is NCCL on GPUs and gloo on CPUs, through the same code. A push that does not finish within
``train.sync_timeout_s`` names the replicas it waited for; dead or stalled replicas are restarted, the group is
rebuilt around them and the push runs again."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import ray
import torch

from mapoco.weights.reload import reload_model
from mapoco.weights.sync import Engines, Learners, SyncFailed, asleep

PUSH_ATTEMPTS = 3  # a push that fails this often in a row, each time after restarting what failed, is a real fault
RELOAD_GRACE_S = 30.0  # after the broadcast's own timeout, how long members that received may take to reload


class CollectiveSync:
    """Learner rank 0 broadcasts to every engine worker of its agent (world: 1 + replicas x tensor parallel)."""

    def __init__(self, group: Learners, engines: Engines, dtype: str, tensor_parallel_size: int,
                 timeout_s: float, name: str):
        self.group, self.engines, self.dtype, self.name = group, engines, dtype, name
        self.tensor_parallel_size, self.timeout_s = tensor_parallel_size, timeout_s
        self.rebuilds = 0  # groups built after the first (a replica restarted, a push failed)
        self._join()
        engines.on_restart = self.restore

    def _join(self) -> None:
        """A fresh rendezvous (new port) every time, so a rebuilt group never meets a dead member's sockets."""
        leader, tp = self.group.actors[0], self.tensor_parallel_size
        host, port = ray.get(leader.rendezvous_address.remote())
        world = 1 + len(self.engines.actors) * tp
        joining = {r: engine.init_sync_group.remote(host, port, 1 + r * tp, world, self.timeout_s)
                   for r, engine in enumerate(self.engines.actors)}
        outcome = self._finish(joining, [leader.init_sync_group.remote(host, port, world, self.timeout_s)], "join")
        if outcome is not None:
            raise SyncFailed(f"{self.name}: the weight broadcast group did not form within train.sync_timeout_s="
                             f"{self.timeout_s:g}s ({outcome})")

    def updating(self) -> AbstractContextManager[None]:
        return asleep(self.engines)

    def shutdown(self) -> None:
        self.engines.on_restart = None

    def restore(self, replica: int) -> None:
        """A restarted replica is not in the broadcast group: rebuild the group with it, then push."""
        self._rebuild()
        self.push()

    def _rebuild(self) -> None:
        self.rebuilds += 1
        self._join()

    def push(self) -> None:
        for _ in range(PUSH_ATTEMPTS):
            specs = self.group.call_all("weight_specs", self.dtype)[0]
            receiving = {r: engine.receive_weights.remote(specs) for r, engine in enumerate(self.engines.actors)}
            sending = [actor.broadcast_weights.remote(self.dtype) for actor in self.group.actors]  # ZeRO-3 gathers
            outcome = self._finish(receiving, sending, "push")
            if outcome is None:
                return
            print(f"{self.name}: weight sync failed ({outcome}); rebuilding the broadcast group and pushing again",
                  flush=True)
            self.engines.restart_all(outcome.lost, restore=False)  # their weights come with the push that follows
            self._rebuild()
        raise SyncFailed(f"{self.name}: the weight push failed {PUSH_ATTEMPTS} times in a row (last: {outcome})")

    def _finish(self, engines: dict[int, ray.ObjectRef], learners: list[ray.ObjectRef], what: str) -> Broken | None:
        """Wait for one collective call on every member, at most ``timeout_s`` (and a little for a reload). None if
        all finished. Else what broke: replicas that died or stalled (a stalled one is killed: it cannot leave the
        collective) are to be restarted; members whose call failed are alive (the broadcast broke off around a lost
        one) and only rejoin. A learner rank that died raises RayActorError (the run stops); one that stalled,
        SyncFailed."""
        self._wait([*engines.values(), *learners])
        broken = Broken()
        for replica, ref in engines.items():
            if not ray.wait([ref], timeout=0)[0]:
                ray.kill(self.engines.actors[replica], no_restart=True)
                broken.lost.append(replica)
                broken.errors.append(f"engine replica {replica} stalled for {self.timeout_s:g}s")
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                broken.lost.append(replica)
                broken.errors.append(f"engine replica {replica} died")
            except ray.exceptions.RayError as exc:
                broken.errors.append(f"engine replica {replica}: {_last_line(exc)}")
        for rank, ref in enumerate(learners):
            if not ray.wait([ref], timeout=0)[0]:
                raise SyncFailed(f"{self.name}: learner rank {rank} did not finish the weight {what} within "
                                 f"train.sync_timeout_s={self.timeout_s:g}s (stuck in the collective); "
                                 f"{'; '.join(broken.errors) or 'every engine replica finished'}")
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                raise
            except ray.exceptions.RayError as exc:
                broken.errors.append(f"learner rank {rank}: {_last_line(exc)}")
        return broken if broken.errors else None

    def _wait(self, refs: list[ray.ObjectRef]) -> None:
        """Until every call has returned, for at most ``timeout_s`` and a reload's grace; but once ``timeout_s`` has
        passed and a call has failed, the collective has broken off and the calls still out wait for nothing."""
        start, pending = time.monotonic(), list(refs)
        while pending and time.monotonic() - start < self.timeout_s + RELOAD_GRACE_S:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if time.monotonic() - start >= self.timeout_s and any(_failed(r) for r in refs if r not in pending):
                return


def _failed(ref: ray.ObjectRef) -> bool:
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayError:
        return True
    return False


@dataclass
class Broken:
    """What went wrong in one collective call: the replicas to restart, and every member's error."""

    lost: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(self.errors)


def _last_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


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
        from vllm.distributed.utils import (
            stateless_init_torch_distributed_process_group,
        )

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
    caught by the driver's (``CollectiveSync``)."""

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

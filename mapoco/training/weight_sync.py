"""Weight sync: after each update an agent's new weights reach its own engines before the next rollout.

``object_store``: learner rank 0 writes the weights into Ray's object store once and every engine reads them in place
and reloads (both ends: ``mapoco.runtime.weights``). It works wherever the actors run, also when a learner rank and
an engine share one GPU (colocation, fractional GPUs), which no collective group allows.
``collective``: one broadcast group per agent (learner rank 0 plus every engine worker, a rendezvous of its own, so
agents never share a group); each sync broadcasts tensor by tensor into buffers the engines reload from. The group
is NCCL on GPUs and gloo on CPUs, through the same code. A push that does not finish within
``train.sync_timeout_s`` names the replicas it waited for; dead or stalled replicas are restarted, the group is
rebuilt around them and the push runs again.
An agent on the shared LoRA engine sends only its adapter, through the object store (``AdapterSync``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import ray

from mapoco.config import EngineConfig, LearnerConfig, gpu_sharing
from mapoco.rollout.discussion import AgentRuntime
from mapoco.rollout.engine import AgentEngines
from mapoco.training.learner_group import LearnerGroup

PUSH_ATTEMPTS = 3  # a push that fails this often in a row, each time after restarting what failed, is a real fault
RELOAD_GRACE_S = 30.0  # after the broadcast's own timeout, how long members that received may take to reload


class WeightSync(Protocol):
    def updating(self) -> AbstractContextManager[None]:
        """Around the learner's update: colocated engines sleep through it (``asleep``)."""

    def push(self) -> None:
        """The learner group's current weights into every engine replica of its agent."""

    def close(self) -> None:
        """Its trainer is done: the engines (a shared team's outlive it) no longer call back into it."""


@contextlib.contextmanager
def asleep(engines: AgentEngines) -> Iterator[None]:
    """Colocated engines sleep through the learner's update (it gets their device, their KV cache is dropped) and
    wake before the weights come; engines of their own keep serving (an off-policy rollout may be running)."""
    if not engines.sleep_mode:
        yield
        return
    engines.sleep()
    try:
        yield
    finally:
        engines.wake_up()


class SyncFailed(RuntimeError):
    """A collective push kept failing (or its learner stalled): the run stops with the resume message."""


class ObjectStoreSync:
    """The engines keep the reference they were pushed, so a restarted replica reloads it (``AgentEngines``)."""

    def __init__(self, group: LearnerGroup, engines: AgentEngines, dtype: str):
        self.group, self.engines, self.dtype = group, engines, dtype

    def updating(self) -> AbstractContextManager[None]:
        return asleep(self.engines)

    def push(self) -> None:
        self.engines.push_weights(self.group.weights_ref(self.dtype))

    def close(self) -> None:
        pass


class AdapterSync:
    """The shared LoRA engine: only this agent's adapter moves, in place of the adapter it had there."""

    def __init__(self, group: LearnerGroup, agent: AgentRuntime, dtype: str):
        self.group, self.agent, self.dtype = group, agent, dtype

    def updating(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()  # the shared LoRA engine serves every agent: it never sleeps for one

    def push(self) -> None:
        self.agent.load_adapter(self.group.adapter_ref(self.dtype))

    def close(self) -> None:
        pass


class CollectiveSync:
    """Learner rank 0 broadcasts to every engine worker of its agent (world: 1 + replicas x tensor parallel)."""

    def __init__(self, group: LearnerGroup, engines: AgentEngines, dtype: str, tensor_parallel_size: int,
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

    def close(self) -> None:
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


def sync_method(method: str, learner: LearnerConfig, engine: EngineConfig) -> str:
    """What ``train.weight_sync`` means for one agent. ``auto``: the broadcast group where its learner and engines
    are on GPUs that none of them shares (decided from the config, not from the driver, which may sit on a CPU-only
    head), else the object store."""
    if method != "auto":
        return method
    on_gpus = learner.num_gpus > 0 and engine.num_gpus > 0
    return "collective" if on_gpus and gpu_sharing(learner, engine) is None else "object_store"


def make_sync(method: str, group: LearnerGroup, engines: AgentEngines, dtype: str, timeout_s: float,
              name: str) -> WeightSync:
    if sync_method(method, group.cfg, engines.cfg) == "collective":
        return CollectiveSync(group, engines, dtype, engines.cfg.tensor_parallel_size, timeout_s, name)
    return ObjectStoreSync(group, engines, dtype)

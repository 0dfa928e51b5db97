"""What every weight transport implements, what it needs of the two ends, and the factory that picks one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import ray

from mapoco.config import EngineConfig, LearnerConfig, gpu_sharing


class Learners(Protocol):
    """An agent's learner group (``mapoco.training.learner_group.LearnerGroup``), as a transport uses it."""

    cfg: LearnerConfig
    actors: list[ray.actor.ActorHandle]

    def call_all(self, method: str, *args: Any) -> list[Any]: ...

    def weights_ref(self, dtype: str) -> ray.ObjectRef: ...

    def adapter_ref(self, dtype: str) -> ray.ObjectRef: ...


class Engines(Protocol):
    """An agent's engine replicas (``mapoco.rollout.engine.AgentEngines``), as a transport uses them."""

    cfg: EngineConfig
    actors: list[ray.actor.ActorHandle]
    sleep_mode: bool
    on_restart: Callable[[int], None] | None

    def push_weights(self, payload: Any) -> None: ...

    def restart_all(self, replicas: Sequence[int], restore: bool = True) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


class WeightSync(Protocol):
    def updating(self) -> AbstractContextManager[None]:
        """Around the learner's update: colocated engines sleep through it (``asleep``)."""

    def push(self) -> None:
        """The learner group's current weights into every engine replica of its agent."""

    def shutdown(self) -> None:
        """Its trainer is done: the engines (a shared team's outlive it) no longer call back into it."""


@contextlib.contextmanager
def asleep(engines: Engines) -> Iterator[None]:
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


def sync_method(method: str, learner: LearnerConfig, engine: EngineConfig) -> str:
    """What ``train.weight_sync`` means for one agent. ``auto``: the broadcast group where its learner and engines
    are on GPUs that none of them shares (decided from the config, not from the driver, which may sit on a CPU-only
    head), else the object store."""
    if method != "auto":
        return method
    on_gpus = learner.num_gpus > 0 and engine.num_gpus > 0
    return "collective" if on_gpus and gpu_sharing(learner, engine) is None else "object_store"

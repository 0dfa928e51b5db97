"""Weight sync: after each update an agent's new weights reach its own engines before the next rollout.

``object_store`` (CPU, and anywhere): learner rank 0 writes the weights into Ray's object store once and every
engine reads them in place and reloads (both ends: ``mapoco.runtime.weights``).
``nccl`` (GPU): one NCCL broadcast group per agent (learner rank 0 plus every engine worker, a TCP rendezvous of its
own, so agents never share a group); each sync broadcasts tensor by tensor into buffers the engines reload from.
An agent on the shared LoRA engine sends only its adapter, through the object store (``AdapterSync``).
"""

from __future__ import annotations

import ray

from mapoco.rollout.discussion import AgentRuntime
from mapoco.rollout.engine import AgentEngines
from mapoco.training.learner import LearnerGroup


class ObjectStoreSync:
    """The engines keep the reference they were pushed, so a restarted replica reloads it (``AgentEngines``)."""

    def __init__(self, group: LearnerGroup, engines: AgentEngines, dtype: str):
        self.group, self.engines, self.dtype = group, engines, dtype

    def push(self) -> None:
        self.engines.push_weights(self.group.weights_ref(self.dtype))


class AdapterSync:
    """The shared LoRA engine: only this agent's adapter moves, in place of the adapter it had there."""

    def __init__(self, group: LearnerGroup, agent: AgentRuntime, dtype: str):
        self.group, self.agent, self.engines, self.dtype = group, agent, agent.engines, dtype

    def push(self) -> None:
        self.agent.load_adapter(self.group.adapter_ref(self.dtype))


class NcclSync:
    def __init__(self, group: LearnerGroup, engines: AgentEngines, dtype: str, tensor_parallel_size: int):
        self.group, self.engines, self.dtype = group, engines, dtype
        self.tensor_parallel_size = tensor_parallel_size
        self._init_group()
        engines.on_restart = self.restore

    def _init_group(self) -> None:
        """A fresh rendezvous (new port) every time, so a rebuilt group never meets a dead member's sockets."""
        leader, tp = self.group.actors[0], self.tensor_parallel_size
        host, port = ray.get(leader.rendezvous_address.remote())
        world = 1 + len(self.engines.actors) * tp
        refs = [engine.init_sync_group.remote(host, port, 1 + i * tp, world)
                for i, engine in enumerate(self.engines.actors)]
        refs.append(leader.init_sync_group.remote(host, port, world))
        ray.get(refs)

    def restore(self, replica: int) -> None:
        """A restarted replica is not in the broadcast group: rebuild the group with it, then push."""
        self._init_group()
        self.push()

    def push(self) -> None:
        specs = self.group.call_all("weight_specs", self.dtype)[0]
        receiving = [engine.receive_weights.remote(specs) for engine in self.engines.actors]
        sending = [actor.broadcast_weights.remote(self.dtype) for actor in self.group.actors]  # all: ZeRO-3 gather
        ray.get(receiving + sending)


def make_sync(method: str, group: LearnerGroup, engines: AgentEngines, dtype: str, tensor_parallel_size: int,
              engines_on_gpu: bool) -> ObjectStoreSync | NcclSync:
    if method == "auto":  # decided from the placement, not from the driver, which may sit on a CPU-only head
        method = "nccl" if group.cfg.num_gpus > 0 and engines_on_gpu else "object_store"
    if method == "nccl":
        return NcclSync(group, engines, dtype, tensor_parallel_size)
    return ObjectStoreSync(group, engines, dtype)

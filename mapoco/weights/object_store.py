"""The object-store transport: learner rank 0 writes the weights into Ray's object store once and every engine reads
them in place and reloads. It works wherever the actors run, also when a learner rank and an engine share one GPU
(colocation, fractional GPUs), which no collective group allows. The engines keep the reference they were pushed,
so a replica that restarts reloads it (``AgentEngines.restart``)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from mapoco.weights.payload import WeightPayload, unpack
from mapoco.weights.reload import reload_model
from mapoco.weights.sync import Engines, Learners, asleep


class ObjectStoreSync:
    def __init__(self, group: Learners, engines: Engines, dtype: str):
        self.group, self.engines, self.dtype = group, engines, dtype

    def updating(self) -> AbstractContextManager[None]:
        return asleep(self.engines)

    def push(self) -> None:
        self.engines.push_weights(self.group.weights_ref(self.dtype))

    def shutdown(self) -> None:
        pass


def reload_in_worker(worker, payload: WeightPayload) -> int:
    """Runs inside vLLM's worker: reload the weights in place, from a payload read in place."""
    state = unpack(payload)
    reload_model(worker, state.items())
    return len(state)

"""A group of actors, actor ``i`` in bundle ``i`` of one placement group: what an agent's engine replicas and its
learner ranks share. One convention for both: work splits into contiguous shards (``slices``), a call goes to every
actor at once and its results come back in order, the first failure raises without waiting for the rest, and an
actor that dies is restarted in its bundle (``restart``) where the group can do that (engines; a learner rank cannot
rejoin a running collective group, so a learner group raises and the run resumes from its checkpoint)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ray

from mapoco.runtime.placement import Placement

T = TypeVar("T")
Send = Callable[[ray.actor.ActorHandle], ray.ObjectRef]

MAX_RESTARTS_PER_CALL = 2  # an actor that dies again right after a restart is a real fault, not a blip

# A rank's collective fails at once when a peer dies (gloo: "Connection reset by peer"), before Ray declares the peer
# dead (within its health-check window: 15 s by default, a node's loss up to 30 s).
PEER_DEATH_WAIT_S = 60.0


@dataclass
class Call:
    """One actor's part of a group call, kept so it can be sent again to the actor's restart."""

    index: int
    send: Send | None  # None: a call no restart sends again
    ref: ray.ObjectRef | None = None


class ActorGroup:
    """Subclasses start the actors (``start``) and say whether a dead one can be restarted (``restart``)."""

    restartable = False

    def __init__(self, what: str, size: int, placement: Placement, owns_placement: bool):
        self.what, self.placement, self.owns_placement = what, placement, owns_placement
        self.actors = [self.start(i) for i in range(size)]

    def start(self, index: int) -> ray.actor.ActorHandle:
        raise NotImplementedError

    def restart(self, index: int) -> None:
        """Replace dead actor ``index`` in its bundle, ready for calls (only where ``restartable``)."""
        raise NotImplementedError

    def slices(self, n: int) -> list[slice]:
        """``n`` items in contiguous shards of ceil(n / actors): one per actor but at most ``n``, none empty."""
        size = -(-n // len(self.actors)) if n else 0
        return [slice(i, i + size) for i in range(0, n, size or 1)]

    def shard(self, items: Sequence[T]) -> list[Sequence[T]]:
        return [items[part] for part in self.slices(len(items))]

    def send(self, sends: Sequence[Send]) -> list[Call]:
        """``sends[i]`` to actor ``i``, all at once."""
        return [Call(i, send, send(self.actors[i])) for i, send in enumerate(sends)]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``actor.method(*args)`` on every actor; the results in actor order."""
        return self.results(self.send([lambda actor: getattr(actor, method).remote(*args)] * len(self.actors)))

    def results(self, calls: Sequence[Call]) -> list[Any]:
        """Each call's result, in order. The first failure raises at once (its peers may be stuck in a collective
        waiting for it); a dead actor of a restartable group is restarted and its call sent again; a call that failed
        because a peer died raises the peer's death (the fault a run resumes from), not the broken collective."""
        pending = {call.ref: call for call in calls}
        restarts = {call.index: 0 for call in calls}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            call = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if not self._restarts_for(call, exc, restarts[call.index]):
                    raise
                restarts[call.index] += 1
                self.restart(call.index)
                call.ref = call.send(self.actors[call.index])
                pending[call.ref] = call
            except ray.exceptions.RayTaskError:
                _raise_a_peers_death(list(pending))
                raise
        return ray.get([call.ref for call in calls])

    def _restarts_for(self, call: Call, exc: ray.exceptions.RayActorError, restarts: int) -> bool:
        # Another actor's death (a learner whose weights were the argument) is not this actor's fault.
        mine = exc.actor_id in (None, self.actors[call.index]._actor_id.hex())
        return self.restartable and mine and restarts < MAX_RESTARTS_PER_CALL

    def alive(self) -> bool:
        try:
            self.call_all("where")
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
            return False
        return True

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        if self.owns_placement:
            self.placement.remove()


def _raise_a_peers_death(pending: list[ray.ObjectRef]) -> None:
    """Raises the death of the actor behind one of ``pending`` if Ray declares one within PEER_DEATH_WAIT_S."""
    deadline = time.monotonic() + PEER_DEATH_WAIT_S
    while pending and (left := deadline - time.monotonic()) > 0:
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                raise
            except ray.exceptions.RayTaskError:
                pass

"""One trained policy of a run: the seats it plays, its learner group and the channel to its own engines."""

from __future__ import annotations

from dataclasses import dataclass

from mapoco.runtime.precision import AgentPrecision
from mapoco.training.learner_group import LearnerGroup
from mapoco.weights.sync import WeightSync


@dataclass
class Policy:
    seats: list[int]
    group: LearnerGroup
    sync: WeightSync
    precision: AgentPrecision  # its engines' and learners' dtypes, and the logprob gap they allow

    @property
    def name(self) -> str:
        return f"agent_{self.seats[0]}"

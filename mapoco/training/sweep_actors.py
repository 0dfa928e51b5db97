"""A multirun's actors (`mapoco train -m`): its jobs run one after another in one process and take over the last
job's engines and learner groups where they are made the same way."""

from __future__ import annotations

from mapoco.config import RunConfig
from mapoco.rollout.discussion import Team
from mapoco.training.learner_group import LearnerPool


class SweepActors:
    """The engines and learner groups of a multirun's jobs, kept in this process from one job to the next. A job
    whose engines would be made the same way (``engines_key``) takes over the last job's; its learner groups come
    from a pool, rebuilt from the model's files with the job's settings. Every job's first weight sync puts its own
    learners' weights into the engines and each request carries its own seed, so a job samples what it would on
    fresh engines: only the start-ups (vLLM's above all) are saved."""

    def __init__(self) -> None:
        self.team: Team | None = None
        self.key: str | None = None
        self.learners = LearnerPool(per_shape=1, one_shape_per_model=True)

    def team_for(self, cfg: RunConfig) -> Team:
        key = engines_key(cfg)
        if self.team is not None and key != self.key:
            self.team.shutdown()
            self.team = None
        if self.team is None:
            self.team, self.key = Team.of_run(cfg, colocate_learners=True, wait=False), key
        return self.team


def engines_key(cfg: RunConfig) -> str:
    """What a run's engines are made of: runs with the same key can share them (the seed is not part of it)."""
    team = cfg.team
    return repr((team.shared_policy, team.lora_engine, cfg.cluster.placement_timeout_s,
                 [(a.model, a.trainable, a.adapter, a.engine, a.learner.lora_rank, a.learner.colocate,
                   a.learner.num_cpus, a.learner.num_gpus, a.learner.resources) for a in team.agents]))

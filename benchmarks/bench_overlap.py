"""step_overlapped_vs_onpolicy: training steps per second with the next step's rollout running during this step's
update (``train.off_policy_steps=1``) against the on-policy loop (0), side by side on one trainer: the same team,
batch size, engines and learners, windows of a few steps in each mode taken in turn.

Each window starts with an empty pipeline (its first rollout has nothing to overlap), as a run does. On this 2-core
machine the rollout and the update compete for the same cores, so the measured ratio is a floor; from the on-policy
windows' phase times the result also models what the overlap gives when engines and learners hold devices of their
own: a step then costs max(rollout, update) + sync instead of rollout + update + sync.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks.common import Figure, Result, side_by_side
from mapoco.cli import compose
from mapoco.config import changed
from mapoco.training.trainer import Trainer

TEAMS = {  # team -> overrides and what the sizes say
    "tiny2": (["team=tiny2", "train.batch_questions=16", "algorithm.samples_per_question=2"], {}),
    # One SmolLM2 policy in both seats (one engine, one learner): two full fine-tuning SmolLM2 learners and engines do
    # not fit this 24 GiB machine. Short answers and few rows keep a step under a minute.
    "smollm2": (["team=smollm2x2", "team.shared_policy=true", "train.batch_questions=2",
                 "algorithm.samples_per_question=1", "sampling.max_new_tokens=32",
                 "team.agents.0.sampling.max_new_tokens=32", "team.agents.1.sampling.max_new_tokens=32",
                 "learner.micro_batch_size=4"], {"shared_policy": True, "max_new_tokens": 32}),
}


def run(team: str = "tiny2", repeats: int = 3, window: int = 4) -> Result:
    overrides, sizes = TEAMS[team]
    cfg = compose(*overrides, "turns=2", "train.eval_every=0", "train.eval_limit=8", "train.save_every=0",
                  "logger.wandb.mode=disabled")
    phases: dict[str, list[float]] = {"rollout": [], "update": [], "sync": []}
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out), team=None)

        def steps_per_second(off_policy_steps: int) -> float:
            trainer.cfg = changed(trainer.cfg, {"train.off_policy_steps": off_policy_steps,
                                                "train.steps": trainer.step + window})  # the last samples nothing ahead
            seconds = 0.0
            for _ in range(window):
                metrics = trainer.train_step()
                trainer.step += 1
                seconds += metrics["timing/step"]
                if not off_policy_steps:
                    for name, values in phases.items():
                        values.append(metrics[f"timing/{name}"] + (metrics["timing/verify"] if name == "rollout"
                                                                   else 0.0))
            return window / seconds

        try:
            steps_per_second(0)  # warm-up: the first updates and syncs pay one-off costs
            for values in phases.values():
                values.clear()
            overlapped, on_policy, ratios = side_by_side(lambda: steps_per_second(1), lambda: steps_per_second(0),
                                                         repeats)
        finally:
            trainer.close()
    rollout, update, sync = (statistics.median(phases[k]) for k in ("rollout", "update", "sync"))
    on_separate_devices = (rollout + update + sync) / (max(rollout, update) + sync)
    return Result("step_overlapped_vs_onpolicy", Figure("off_policy_steps=1", "steps/s", overlapped),
                  Figure("off_policy_steps=0", "steps/s", on_policy), ratios=ratios,
                  sizes={"team": team, "turns": 2, "batch_questions": cfg.train.batch_questions,
                         "samples_per_question": cfg.algorithm.samples_per_question, "steps_per_window": window,
                         **sizes},
                  extra={"onpolicy_phase_s": {"rollout": round(rollout, 3), "update": round(update, 3),
                                              "sync": round(sync, 3)},
                         "modelled_ratio_on_separate_devices": round(on_separate_devices, 3)})

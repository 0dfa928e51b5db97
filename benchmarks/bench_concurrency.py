"""update_concurrent_vs_sequential: the learning phase of a 2-agent training step (every policy's scoring,
advantages and update) with the policies at once (``train.concurrent_policies=true``, the default) against one
after another, side by side on one trainer and the same batch. Each agent's learner holds a CPU of its own, as on
a cluster where each agent's learners hold their own devices; the engines are idle while the learners work.
Tiny models only: two SmolLM2 agents (two engines and two full fine-tuning learners with their reference copies)
went past Ray's memory threshold on the 24 GiB machine this was written on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import Figure, Result, side_by_side, timed
from mapoco.cli import compose
from mapoco.config import changed
from mapoco.training.trainer import Trainer


def run(repeats: int = 5, batch_questions: int = 32) -> Result:
    cfg = compose("team=tiny2", "turns=2", f"train.batch_questions={batch_questions}",
                  "algorithm.samples_per_question=2", "train.eval_every=0", "train.eval_limit=8",
                  "train.save_every=0", "logger.wandb.mode=disabled")
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out), team=None)
        try:
            result = trainer.rollout(trainer.batch(0), 0)
            batches = trainer.agent_batches(result, trainer.method.rewards(result))

            def learning_phase(concurrent: bool) -> float:
                trainer.cfg = changed(trainer.cfg, {"train.concurrent_policies": concurrent})
                seconds, _ = timed(lambda: trainer.for_each_policy(lambda p: trainer.learn(p, batches[p.name])))
                return seconds

            learning_phase(True)  # warm-up: the first update of a group pays one-off costs
            together, in_turn, ratios = side_by_side(lambda: learning_phase(True), lambda: learning_phase(False),
                                                     repeats, higher_is_better=False)
        finally:
            trainer.close()
    rows = sum(len(b.rows) for b in batches.values())
    return Result("update_concurrent_vs_sequential", Figure("2 policies at once", "s", together),
                  Figure("one after another", "s", in_turn), target=1.6, ratios=ratios, higher_is_better=False,
                  sizes={"model": "tiny-qwen", "agents": 2, "rows": rows, "learners_per_agent": 1,
                         "cpus_per_learner": 1})

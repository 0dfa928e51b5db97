"""scaling: how a training step grows with the team (agents 1, 2, 4) and the discussion (turns 1..4), where its
time goes (``timing/*``), generated and prompt tokens per step, and what prefix caching saves in the rollout.

Tiny models (warm-started tiny-qwen agents), one engine replica and one learner each. Engines are started once
and shared by every configuration (a team of n agents is the first n seats of a 4-agent team), so a row measures
steps, not start-up.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Figure, Result, side_by_side, timed
from mapoco.cli import compose
from mapoco.config import DiscussionConfig, changed
from mapoco.rollout.discussion import Team, run_discussion
from mapoco.rollout.verifier import VerifierClient
from mapoco.tasks import TaskConfig, load_task
from mapoco.training.trainer import Trainer

PHASES = ("rollout", "verify", "advantages", "update", "sync", "step")
BASE = ["team=tiny4", "train.batch_questions=8", "algorithm.samples_per_question=2", "train.eval_every=0",
        "train.eval_limit=8", "train.save_every=0", "logger.wandb.mode=disabled"]


def step_breakdown(team: Team, agents: int, turns: int, steps: int) -> dict[str, Any]:
    """Median ``timing/*`` and token counts over ``steps`` training steps (after one warm-up step)."""
    cfg = compose(*BASE, f"turns={turns}", f"train.steps={steps + 1}")
    cfg = changed(cfg, {"team.agents": cfg.team.agents[:agents]})
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out), team=team.subset(agents))
        try:
            rows = []
            for step in range(steps + 1):
                trainer.step = step
                rows.append(trainer.train_step())
        finally:
            trainer.close()
    measured = rows[1:]
    out = {phase: statistics.median(r.get(f"timing/{phase}", 0.0) for r in measured) for phase in PHASES}
    out.update({key: statistics.median(r[f"perf/{key}"] for r in measured) for key in ("gen_tokens",
                                                                                        "prompt_tokens")})
    return out


def rollout_seconds(team: Team, verifier: VerifierClient, agents: int, turns: int, questions: int) -> float:
    problems = load_task(TaskConfig(limit=questions)).problems
    seconds, _ = timed(lambda: run_discussion(team.subset(agents), problems, turns, DiscussionConfig(), verifier,
                                              seed=0))
    return seconds


def run(steps: int = 2, questions: int = 32, repeats: int = 3) -> Result:
    cfg = compose(*BASE)
    cached = Team(cfg.team, seed=0)
    uncached_team = compose(*BASE, "engine.enable_prefix_caching=false").team
    uncached = Team(changed(uncached_team, {"agents": uncached_team.agents[:2]}), seed=0)
    verifier = VerifierClient(cfg.verifier)
    try:
        grid = {f"agents={a},turns=3": step_breakdown(cached, a, 3, steps) for a in (1, 2, 4)}
        grid.update({f"agents=2,turns={t}": step_breakdown(cached, 2, t, steps) for t in (1, 2, 4)})
        for team in (cached, uncached):  # warm-up: the first discussion of a team pays one-off costs
            rollout_seconds(team, verifier, 2, 1, questions)
        caching = {}
        for t in (1, 2, 3, 4):
            on, off, _ = side_by_side(lambda: rollout_seconds(cached, verifier, 2, t, questions),
                                      lambda: rollout_seconds(uncached, verifier, 2, t, questions), repeats,
                                      higher_is_better=False)
            caching[f"turns={t}"] = {"prefix_caching_s": statistics.median(on),
                                     "no_prefix_caching_s": statistics.median(off)}
    finally:
        for team in (cached, uncached):
            team.shutdown()
        verifier.shutdown()
    plot(grid, Path(__file__).with_name("scaling.png"))
    with_cache = [v["prefix_caching_s"] for v in caching.values()]
    without = [v["no_prefix_caching_s"] for v in caching.values()]
    return Result(
        "scaling",
        Figure("step time, 2 agents x 3 turns", "s", [grid["agents=2,turns=3"]["step"]]),
        None,
        sizes={"model": "tiny-qwen", "batch_questions": 8, "samples_per_question": 2, "measured_steps": steps,
               "prefix_caching_questions": questions, "prefix_caching_repeats": repeats},
        extra={"grid": _rounded(grid), "prefix_caching": _rounded(caching),
               "prefix_caching_speedup": round(sum(without) / sum(with_cache), 3), "plot": "benchmarks/scaling.png"},
    )


def _rounded(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return round(obj, 3) if isinstance(obj, float) else obj


def plot(grid: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: step time by phase as agents grow (3 turns); right: as turns grow (2 agents)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = ((axes[0], {a: f"agents={a},turns=3" for a in (1, 2, 4)}, "agents (3 turns)"),
              (axes[1], {t: f"agents=2,turns={t}" for t in (1, 2, 3, 4)}, "turns (2 agents)"))
    for ax, by_x, xlabel in panels:
        xs, keys = list(by_x), list(by_x.values())
        bottom = [0.0] * len(keys)
        for phase in PHASES[:-1]:
            values = [grid[k][phase] for k in keys]
            ax.bar([str(x) for x in xs], values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per step")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("mapoco step time by phase (tiny models, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

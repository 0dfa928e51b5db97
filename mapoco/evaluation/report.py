"""What a run leaves behind: summary.json, transcripts.jsonl, the per-turn table and an accuracy-per-turn PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mapoco.evaluation import metrics
from mapoco.rollout.discussion import DiscussionResult


def summarize(result: DiscussionResult, rewards: np.ndarray, skipped: int = 0) -> dict[str, Any]:
    """``rewards``: the discussion's ``team_rewards`` (``[question, agent, turn]``, NaN where flagged)."""
    answers, correct = result.grid("answer"), result.grid("correct", bool)
    scored = ~np.isnan(rewards)  # flagged answers have no reward of their own
    mean_reward = np.where(scored, np.nan_to_num(rewards), 0.0).sum(axis=0) / np.maximum(scored.sum(axis=0), 1)
    tokens = [len(r.token_ids) for r in result.records.values()]
    return {
        "num_questions": len(result.problems),
        "num_agents": result.num_agents,
        "num_turns": result.num_turns,
        "turn_accuracy": metrics.turn_accuracy(answers, correct),
        "agent_turn_accuracy": metrics.agent_turn_accuracy(correct),
        "transitions": metrics.transitions(correct),
        "mean_reward": mean_reward.tolist(),
        "skipped": skipped,
        "flagged": len(result.flagged()),
        "gen_tokens": int(sum(tokens)),
        "prompt_tokens": int(sum(len(r.prompt_ids) for r in result.records.values())),
    }


def turn_table(summary: dict[str, Any], title: str = "") -> str:
    """Team accuracy (majority vote) and each agent's accuracy per turn, plus answer flips since the last turn."""
    agents = summary["agent_turn_accuracy"]
    header = ["turn", "team (vote)"] + [f"agent {i + 1}" for i in range(len(agents))] + ["wrong->right", "right->wrong"]
    rows = []
    for t, acc in enumerate(summary["turn_accuracy"]):
        flips = summary["transitions"][t - 1] if t else None
        rows.append(
            [str(t + 1), f"{acc:.3f}"]
            + [f"{agent[t]:.3f}" for agent in agents]
            + ([str(flips["wrong_to_right"]), str(flips["right_to_wrong"])] if flips else ["-", "-"])
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    body = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    suffix = f"({summary['num_questions']} questions, {summary['skipped']} skipped, {summary['flagged']} flagged)"
    return "\n".join(([title] if title else []) + body + [suffix])


def check_output_dir(out: Path) -> None:
    """Fail fast, creating nothing, if ``out`` cannot become a writable directory (``mapoco.config``'s check of
    ``output_dir``: a file in the way, an unwritable ancestor, a read-only or virtual filesystem)."""
    from mapoco.config import check_writable_dir

    check_writable_dir("output_dir", out)


def prepare_output_dir(out: Path) -> None:
    """Create the run directory and prove it takes a file, before any actor starts (not after an hour)."""
    check_output_dir(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        _unwritable(out, f"{type(exc).__name__}: {exc.strerror or exc}")


def _unwritable(out: Path, why: str) -> None:
    from mapoco.config import ConfigError

    raise ConfigError("output_dir", str(out), f"is not a writable directory ({why})")


def write_json(path: Path, payload: Any) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def write_transcripts(path: Path, result: DiscussionResult) -> None:
    with path.open("w") as f:
        for q, problem in enumerate(result.problems):
            turns = [
                [
                    {k: getattr(result.records[(q, a, t)], k) for k in ("agent", "text", "answer", "correct", "score",
                                                                         "error")}
                    for a in range(result.num_agents)
                ]
                for t in range(result.num_turns)
            ]
            f.write(json.dumps({"id": problem.id, "question": problem.question, "gold": problem.gold,
                                "turns": turns}) + "\n")


def plot_turns(path: Path, curves: dict[str, list[float]], title: str) -> None:
    """One line per curve (e.g. team vote, each agent, or before/after training) over turns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_xlabel("turn")
    ax.set_ylabel("accuracy")
    ax.set_xticks(range(1, max(len(v) for v in curves.values()) + 1))
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def turn_curves(summary: dict[str, Any]) -> dict[str, list[float]]:
    curves = {"team (majority vote)": summary["turn_accuracy"]}
    curves.update({f"agent {i + 1}": acc for i, acc in enumerate(summary["agent_turn_accuracy"])})
    return curves

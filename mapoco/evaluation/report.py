"""What a run leaves behind: summary.json, transcripts.jsonl, the per-turn table and an accuracy-per-turn PNG."""

from __future__ import annotations

import json
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
        "deferral": metrics.deferral(answers, correct),
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


def discussion_transcripts(result: DiscussionResult) -> list[dict[str, Any]]:
    """One record per question (transcripts.jsonl): every agent's answer at every turn."""
    fields = ("agent", "text", "answer", "correct", "score", "error")
    return [{"id": problem.id, "question": problem.question, "gold": problem.gold,
             "turns": [[{k: getattr(result.records[(q, a, t)], k) for k in fields} for a in range(result.num_agents)]
                       for t in range(result.num_turns)]}
            for q, problem in enumerate(result.problems)]


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
    save_figure(fig, path)
    plt.close(fig)


FIGURE_DATA = "mapoco:lines"  # the PNG text chunk that holds what a figure plots


def save_figure(fig: Any, path: Path, **savefig: Any) -> None:
    """The figure as a PNG that also carries what it plots: each labelled line's (or error bar's) points, read
    back from its axes, so a figure is checked by its data (``plotted``), not by its pixels."""
    from matplotlib.container import ErrorbarContainer
    from matplotlib.lines import Line2D

    lines: dict[str, list[list[float]]] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            line = handle.lines[0] if isinstance(handle, ErrorbarContainer) else handle
            if isinstance(line, Line2D):
                lines[label] = [[float(v) for v in np.atleast_1d(line.get_xdata())],
                                [float(v) for v in np.atleast_1d(line.get_ydata())]]
    fig.savefig(path, dpi=120, metadata={FIGURE_DATA: json.dumps(lines)}, **savefig)


def plotted(path: Path) -> dict[str, list[list[float]]]:
    """What a PNG written by ``save_figure`` plots: label -> [x values, y values]."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[FIGURE_DATA])


def turn_curves(summary: dict[str, Any]) -> dict[str, list[float]]:
    curves = {"team (majority vote)": summary["turn_accuracy"]}
    curves.update({f"agent {i + 1}": acc for i, acc in enumerate(summary["agent_turn_accuracy"])})
    return curves

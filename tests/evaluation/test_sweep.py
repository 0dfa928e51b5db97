"""`mapoco sweep-summary` on run directories laid out as Hydra's multirun writes them."""

import csv
import json
import statistics
import subprocess
import sys

import pytest
import yaml

from mapoco.evaluation.report import plotted
from mapoco.evaluation.sweep import (
    NoRunsError,
    find_runs,
    summarize_runs,
    summary_figure,
    sweep_summary,
)

TRAIN_RUNS = {  # job dir: (alpha1, seed, after-training accuracy per turn)
    "0": (0, 0, [0.40, 0.50]),
    "1": (0, 1, [0.44, 0.46]),
    "2": (1, 0, [0.30, 0.60]),
    "10": (1, 1, [0.50, 0.70]),
}


def _write_run(path, overrides, summary):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (path / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for job, (alpha1, seed, acc) in TRAIN_RUNS.items():
        _write_run(root / job, ["command=train", "team=tiny2", f"rewards.alpha1={alpha1}", f"seed={seed}"],
                   {"steps": 2, "before": {"turn_accuracy": [0.1, 0.1]}, "after": {"turn_accuracy": acc}})
    _write_run(root / "evals" / "three_turns", ["command=eval", "team=tiny2", "turns=3"],
               {"turn_accuracy": [0.2, 0.3, 0.5]})
    (root / "evals" / "notes").mkdir()  # a folder without summary.json is not a run
    return root


def test_groups_seeds_and_averages_per_turn(sweep_dir, capsys):
    rows = sweep_summary(sweep_dir)
    assert [(r.label, r.seeds) for r in rows] == [
        ("command=train,rewards.alpha1=0", 2), ("command=train,rewards.alpha1=1", 2), ("command=eval,turns=3", 1)]
    alpha0, alpha1, evaluation = rows
    assert alpha0.mean == pytest.approx([0.42, 0.48])
    assert alpha0.std == pytest.approx([statistics.stdev([0.40, 0.44]), statistics.stdev([0.50, 0.46])])
    assert alpha0.gain == pytest.approx(0.06)
    assert alpha1.mean == pytest.approx([0.40, 0.65]) and alpha1.gain == pytest.approx(0.25)
    assert evaluation.mean == pytest.approx([0.2, 0.3, 0.5]) and evaluation.std == [None, None, None]
    assert evaluation.gain == pytest.approx(0.3)

    printed = capsys.readouterr().out
    assert "shared overrides: team=tiny2" in printed
    assert "0.420 ± 0.028" in printed and "+0.250" in printed

    with (sweep_dir / "sweep_summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["config", "seeds", "turn_1", "turn_2", "turn_3", "turn_1_std", "turn_2_std",
                              "turn_3_std", "gain"]
    assert [r["config"] for r in table] == [r.label for r in rows]
    assert float(table[1]["turn_2"]) == pytest.approx(0.65) and table[1]["turn_3"] == ""
    assert float(table[0]["turn_1_std"]) == pytest.approx(statistics.stdev([0.40, 0.44]), abs=1e-6)
    assert table[2]["turn_1_std"] == "" and float(table[2]["turn_3"]) == pytest.approx(0.5)
    lines = plotted(sweep_dir / "sweep_summary.png")  # one line per configuration, its mean per turn
    assert [ys for _, ys in lines.values()] == [pytest.approx(r.mean) for r in rows]
    assert [xs for xs, _ in lines.values()] == [[1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0]]


def test_a_directory_without_runs_is_an_error(tmp_path):
    with pytest.raises(NoRunsError):
        sweep_summary(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mapoco", "sweep-summary", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no run under" in proc.stderr


def _train_sweep(root, configs, seeds=2):
    """A `mapoco train -m` sweep: every configuration (a list of overrides) once per seed."""
    for c, overrides in enumerate(configs):
        for seed in range(seeds):
            _write_run(root / str(c * seeds + seed), [*overrides, f"seed={seed}"],
                       {"after": {"turn_accuracy": [0.3 + 0.05 * c, 0.4 + 0.05 * c + 0.1 * seed]}})
    return root


def _figure(root):
    rows, shared = summarize_runs(find_runs(root))
    fig = summary_figure(rows, shared, root.name)
    fig.canvas.draw()  # runs the layout, so the extents below are the ones the PNG gets
    return fig, fig.canvas.get_renderer()


def _inside(inner, outer):
    return outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1


def test_one_configuration_puts_its_overrides_in_the_title(tmp_path, capsys):
    overrides = ["command=train", "team=tiny2", "rewards.alpha1=0", "train.steps=2", "train.eval_limit=8"]
    root = _train_sweep(tmp_path / "sweep", [overrides])
    rows = sweep_summary(root)
    assert [(r.label, r.seeds) for r in rows] == [("all runs", 2)]
    assert "shared overrides: command=train,rewards.alpha1=0," in capsys.readouterr().out

    fig, renderer = _figure(root)
    (ax,) = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["all runs"]
    title = ax.title.get_text()
    assert all(o in title for o in overrides)  # wrapped between overrides, never inside one
    assert _inside(ax.title.get_window_extent(renderer), fig.bbox)


def test_labels_name_only_the_overrides_that_differ(tmp_path):
    root = _train_sweep(tmp_path / "sweep", [["command=train", "team=tiny2", f"rewards.alpha1={a}"] for a in (0, 1)])
    fig, _ = _figure(root)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["rewards.alpha1=0", "rewards.alpha1=1"]
    assert "command=train" in fig.axes[0].title.get_text() and "team=tiny2" in fig.axes[0].title.get_text()


def test_a_legend_of_many_long_labels_stays_below_the_axes(tmp_path):
    root = _train_sweep(tmp_path / "sweep", [
        ["command=train", "team=tiny2", f"team.agents.0.sampling.temperature=0.{i}",
         f"algorithm.samples_per_question={i + 1}", f"model.name=HuggingFaceTB/SmolLM2-135M-Instruct-variant-{i}"]
        for i in range(6)])
    fig, renderer = _figure(root)
    (ax,) = fig.axes
    (legend,) = fig.legends
    axes_box, legend_box = ax.get_window_extent(renderer), legend.get_window_extent(renderer)
    assert not axes_box.overlaps(legend_box) and legend_box.y1 <= axes_box.y0
    assert _inside(legend_box, fig.bbox) and _inside(ax.title.get_window_extent(renderer), fig.bbox)
    assert _inside(ax.get_tightbbox(renderer), fig.bbox)  # tick and axis labels included
    left, _, width, _ = ax.get_position().bounds  # in figure fractions
    assert 0.02 < left < 0.2 and width > 0.6
    assert len({round(t.get_window_extent(renderer).x0) for t in legend.get_texts()}) > 1  # several columns
    assert all("\n" in t.get_text() for t in legend.get_texts())  # wrapped
    sweep_summary(root)
    assert (root / "sweep_summary.png").stat().st_size > 0

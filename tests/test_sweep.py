"""`mapoco sweep-summary` on run directories laid out as Hydra's multirun writes them."""

import csv
import json
import statistics
import subprocess
import sys

import pytest
import yaml

from mapoco.evaluation.sweep import NoRunsError, sweep_summary

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
    assert (sweep_dir / "sweep_summary.png").stat().st_size > 0


def test_a_directory_without_runs_is_an_error(tmp_path):
    with pytest.raises(NoRunsError):
        sweep_summary(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mapoco", "sweep-summary", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no run under" in proc.stderr

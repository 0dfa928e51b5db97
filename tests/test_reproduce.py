"""experiments/maporl/reproduce.py: results.json, the table and the claims, from run summaries written by hand."""

import dataclasses
import json

import pytest
from conftest import compose_config

from experiments.maporl import reproduce
from experiments.runs import RunSet
from mapoco.evaluation.report import plotted


def _summary(before, after, flips):
    def evaluation(turns):
        return {"turn_accuracy": turns, "agent_turn_accuracy": [turns, turns],
                "transitions": [{"turn": 2, "wrong_to_right": flips[0], "right_to_wrong": flips[1]}]}
    return {"before": evaluation(before), "after": evaluation(after)}


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RUNS", RunSet(tmp_path / "runs"))
    monkeypatch.setattr(reproduce, "HERE", tmp_path)
    figures = {  # condition -> per seed (before, after, (w->r, r->w)); single runs have one turn
        "cotrain": [([0.40, 0.30], [0.45, 0.80], (70, 2)), ([0.38, 0.28], [0.47, 0.84], (74, 3)),
                    ([0.42, 0.32], [0.43, 0.82], (78, 4))],
        "frozen_partner": [([0.40, 0.30], [0.44, 0.60], (40, 10))] * 3,
        "single_adder": [([0.45], [0.48], (0, 0))] * 3,
    }
    for condition, seeds in figures.items():
        for seed, (before, after, flips) in enumerate(seeds):
            out = reproduce.RUNS.dir(condition, seed)
            out.mkdir(parents=True)
            (out / "summary.json").write_text(json.dumps(_summary(before, after, flips)))
    return tmp_path


def test_results_have_every_seed_mean_std_and_transitions(runs):
    results = reproduce.summarize()
    written = json.loads((runs / "results.json").read_text())
    assert written["conditions"].keys() == {"cotrain", "frozen_partner", "single_adder", "untrained"}
    cotrain = written["conditions"]["cotrain"]
    assert [s["seed"] for s in cotrain["seeds"]] == [0, 1, 2]
    assert cotrain["turn_accuracy_mean"] == pytest.approx([0.45, 0.82])
    assert cotrain["turn_accuracy_std"] == pytest.approx([0.02, 0.02])  # sample std of 0.45/0.47/0.43, 0.80/0.84/0.82
    assert cotrain["transitions"] == [{"turn": 2, "wrong_to_right": 74, "right_to_wrong": 3}]
    # untrained: the same runs before training
    assert written["conditions"]["untrained"]["turn_accuracy_mean"] == pytest.approx([0.40, 0.30])
    assert results["command"] == "make reproduce" and written["date"]
    lines = plotted(runs / "turn_accuracy.png")  # each condition's mean per turn (its points dodged sideways)
    assert lines.keys() == written["conditions"].keys()
    assert all(ys == pytest.approx(c["turn_accuracy_mean"]) for (_, ys), c in zip(lines.values(),
                                                                                written["conditions"].values()))
    assert "| `cotrain` | 3 | 0.450 ± 0.020 | 0.820 ± 0.020 | +0.370 ± 0.020 | 74 | 3 |" in (
        runs / "results.md").read_text()


def test_recorded_seeds_stay_when_their_runs_are_gone_and_runs_on_disk_win(runs):
    """A fresh clone holds results.json but no runs: `--only cotrain_overlap` must add that condition, keep the
    others' recorded figures, and let a run on disk replace its own seed's."""
    recorded = reproduce.summarize()
    recorded["conditions"]["beta0_2"] = reproduce.condition_figures(  # recorded on another machine, no run here
        [{"seed": s, "turn_accuracy": [0.5, 0.6 + s / 100], "agent_turn_accuracy": [[0.5, 0.6]] * 2,
          "transitions": [{"turn": 2, "wrong_to_right": 9, "right_to_wrong": 3}]} for s in (0, 1, 2)])
    (runs / "results.json").write_text(json.dumps(recorded))
    seed_1 = reproduce.RUNS.dir("cotrain", 1) / "summary.json"
    seed_1.write_text(json.dumps(_summary([0.38, 0.28], [0.47, 0.74], (74, 3))))  # re-run: 0.84 -> 0.74
    conditions = reproduce.summarize()["conditions"]
    assert conditions["beta0_2"]["turn_accuracy_mean"] == pytest.approx([0.5, 0.61])
    assert [s["turn_accuracy"][-1] for s in conditions["cotrain"]["seeds"]] == [0.80, 0.74, 0.82]
    seed_1.unlink()  # the run is gone: its seed keeps what was recorded last
    assert reproduce.summarize()["conditions"]["cotrain"]["seeds"][1]["turn_accuracy"] == [0.47, 0.74]


def test_a_recorded_seed_of_another_setup_is_named_not_merged(runs):
    """A recorded seed whose figures differ from the runs on disk (the condition's team or pools changed since) fails
    summarize with the condition, the seed and the way out, instead of a bare KeyError in the table code."""
    recorded = reproduce.summarize()
    del recorded["conditions"]["cotrain"]["seeds"][2]["transitions"]  # as an older setup recorded it
    (runs / "results.json").write_text(json.dumps(recorded))
    (reproduce.RUNS.dir("cotrain", 2) / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"cotrain seeds \[2\] .*differing: transitions.*delete them"):
        reproduce.summarize()


def test_claims_are_computed_from_the_figures(runs):
    claims = reproduce.summarize()["claims"]
    assert claims["collaboration_gain"] == pytest.approx(0.37)  # every seed gains 0.35, 0.37, 0.39 -> std 0.02
    assert claims["collaboration_gain_std"] == pytest.approx(0.02)
    assert claims["gain_exceeds_twice_std"] is True
    assert claims["controls_best_turn"] == pytest.approx({"untrained": 0.40, "frozen_partner": 0.60,
                                                          "single_adder": 0.48})
    assert claims["beats_every_control"] is True
    for seed in (0, 1, 2):  # a control whose mean reaches the co-trained team's last turn
        (reproduce.RUNS.dir("single_adder", seed) / "summary.json").write_text(json.dumps(_summary([0.9], [0.83], (0, 0))))
    assert reproduce.summarize()["claims"]["beats_every_control"] is False


def test_a_finished_run_is_kept_and_the_conditions_share_the_testbed():
    assert all(overrides[0] == ("+experiment=unseen_domain" if name.startswith("unseen_") else "+experiment=collab")
               for name, overrides in reproduce.CONDITIONS.items() if name != "tiny2_cotrain")
    assert {"cotrain", "single_adder", "single_multiplier", "frozen_partner", "alpha0_2", "alpha1_2", "beta0_2",
            "beta1_2", "tiny2_cotrain", "cotrain_overlap", "unseen_domain", "unseen_single_adder",
            "unseen_single_multiplier", "unseen_frozen_partner"} == set(reproduce.CONDITIONS)
    assert reproduce.GROUPS["unseen"] == ["unseen_domain", "unseen_single_adder", "unseen_single_multiplier",
                                          "unseen_frozen_partner"]


def test_the_unseen_domain_claim_is_computed_from_each_domains_figures(runs):
    """Runs that evaluate a held-out domain (`numbers`) beside the task: its figures per condition and seed, a
    table row of its own, and the claim: the gain on B after training against twice its std and the untrained
    team's gain on B, with the share of the in-domain gain it keeps."""
    def with_domain(before, after, domain_before, domain_after):
        summary = _summary(before, after, (5, 1))
        for when, turns in (("before", domain_before), ("after", domain_after)):
            summary[when]["domains"] = {"numbers": _summary(turns, turns, (3, 2))["before"]}
        return summary

    for seed, b_after in enumerate(([0.50, 0.60], [0.52, 0.64], [0.48, 0.62])):
        out = reproduce.RUNS.dir("unseen_domain", seed)
        out.mkdir(parents=True)
        summary = with_domain([0.40, 0.30], [0.45, 0.75], [0.50, 0.45], b_after)
        summary["after"]["domains"]["numbers"]["deferral"] = [  # agent 1 was never right at turn 1 in seed 0
            {"turn": 2, "kept_when_right": [0.5 + seed / 10, None if seed == 0 else 0.6],
             "kept_when_wrong": [0.4, 0.5]}]
        (out / "summary.json").write_text(json.dumps(summary))
    results = reproduce.summarize()
    trained = results["conditions"]["unseen_domain"]
    assert trained["domains"]["numbers"]["turn_accuracy_mean"] == pytest.approx([0.50, 0.62])
    assert trained["domains"]["numbers"]["collaboration_gain_std"] == pytest.approx(0.02)  # gains .10, .12, .14
    (turn2,) = trained["domains"]["numbers"]["deferral"]
    assert turn2["turn"] == 2 and turn2["kept_when_right"] == pytest.approx([0.6, 0.6])  # seed 0's None left out
    assert turn2["kept_when_wrong"] == pytest.approx([0.4, 0.5])
    assert "deferral" not in trained  # runs written before the metric existed
    assert results["conditions"]["unseen_untrained"]["domains"]["numbers"]["turn_accuracy_mean"] == pytest.approx(
        [0.50, 0.45])
    claim = results["claims"]["unseen_domain"]
    assert claim["gain_on_b"] == pytest.approx(0.12) and claim["untrained_gain_on_b"] == pytest.approx(-0.05)
    assert claim["share_of_in_domain_gain_kept"] == pytest.approx(0.17 / 0.40)  # (0.12 + 0.05) / (0.30 + 0.10)
    assert claim["holds"] is True
    assert "| `unseen_domain` on numbers | 3 | 0.500 ± 0.020 | 0.620 ± 0.020 | +0.120 ± 0.020 | 3 | 2 |" in (
        runs / "results.md").read_text()


@pytest.mark.parametrize("condition", sorted(reproduce.CONDITIONS))
def test_every_condition_is_a_valid_run_of_the_same_questions(talk_models, tiny_models, condition):
    cfg = compose_config("command=train", *reproduce.CONDITIONS[condition])
    assert (cfg.task.split, cfg.task.seed, cfg.task.limit) == ("test", 0, 200)  # the same held-out questions
    if condition == "tiny2_cotrain":
        assert (cfg.team.name, cfg.turns, cfg.train.steps) == ("tiny2", 3, 80)
        return
    assert cfg.task.params["operators"] == ["+", "*"] and cfg.train.steps == 80
    unseen = condition.startswith("unseen_")
    assert set(cfg.train.eval_tasks) == ({"numbers"} if unseen else set())  # evaluated on B, trained on A only
    models = [a.model for a in cfg.team.agents]
    pair = ["duo-add", "duo-mul"] if unseen else ["talk-add", "talk-mul"]
    if "single_" in condition:
        assert cfg.turns == 1 and models == [pair[condition.endswith("multiplier")]]
        return
    assert cfg.turns == 2 and models == pair
    assert [a.trainable for a in cfg.team.agents] == [True, not condition.endswith("frozen_partner")]
    assert cfg.train.off_policy_steps == (condition == "cotrain_overlap")
    coefs = {k: getattr(cfg.rewards, k) for k in ("alpha0", "alpha1", "beta0", "beta1")}
    assert coefs == {k: 2.0 if condition == f"{k}_2" else 0.0 for k in coefs}


def test_make_demo_runs_the_testbed_as_reproduced(talk_models):
    """demo.yaml moves the output to outputs/demo (compose pins output_dir) and keeps the last step's checkpoint
    (for `mapoco serve`): the run itself is the reproduction's, checkpoints change no figure."""
    demo, collab = compose_config("command=train", "+experiment=demo"), compose_config("command=train", *reproduce.COLLAB)
    assert (demo.train.save_every, collab.train.save_every) == (demo.train.steps, 0)
    assert {**vars(demo), "train": dataclasses.replace(demo.train, save_every=0)} == vars(collab)


def test_the_demo_verdict_states_the_gain_and_the_controls(runs):
    reproduce.summarize()  # results.json with the controls, as the last `make reproduce` left it
    demo = runs / "demo"
    demo.mkdir()
    (demo / "summary.json").write_text(json.dumps(_summary([0.50, 0.35], [0.52, 0.70], (0, 0))))
    line = reproduce.verdict(demo)
    assert line.startswith("verdict: collaboration gain after training +0.180 (turn 2 0.700 vs turn 1 0.520; "
                           "before training -0.150); last turn 0.350 -> 0.700")
    assert "frozen_partner 0.600" in line and "single_adder 0.480" in line and "untrained" not in line

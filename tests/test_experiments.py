"""experiments/conductor, experiments/lora and experiments/portability: figures, claims and comparisons from run summaries written by
hand (the runs themselves are `mapoco train`, tested elsewhere)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import compose_config

from experiments import runs
from experiments.conductor import reproduce as conductor
from experiments.lora import reproduce as lora
from experiments.portability import reproduce as portability
from experiments.runs import RunSet
from mapoco.config import changed
from mapoco.evaluation.report import plotted


def _conductor_summary(after, before, workers=(0.42, 0.48), vote=0.45, random=0.36, cost=0.0, steps=1.0, **more):
    return {"conductor_accuracy": after, "conductor_accuracy_before": before, "workers": ["adder", "multiplier"],
            "worker_accuracy": list(workers), "majority_vote_accuracy": vote, "random_workflow_accuracy": random,
            "malformed_rate": 0.01, "mean_steps": steps, "mean_cost": cost, "worker_cost": [1.0, 10.0],
            "before": {"mean_cost": 5.5}, **more}


def _write(runset: RunSet, condition: str, summaries: list[dict]) -> None:
    for seed, summary in enumerate(summaries):
        out = runset.dir(condition, seed)
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def conductor_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(conductor, "RUNS", RunSet(tmp_path / "runs"))
    monkeypatch.setattr(conductor, "HERE", tmp_path)
    _write(conductor.RUNS, "routing", [_conductor_summary(0.90, 0.44), _conductor_summary(0.86, 0.46),
                                       _conductor_summary(0.88, 0.45, workers=(0.40, 0.50))])
    return tmp_path


def test_conductor_results_have_every_seed_and_mean_std(conductor_runs):
    conductor.summarize()
    routing = json.loads((conductor_runs / "results.json").read_text())["routing"]
    assert [s["seed"] for s in routing["seeds"]] == [0, 1, 2]
    assert routing["seeds"][2]["worker_accuracy"] == {"adder": 0.40, "multiplier": 0.50}
    assert routing["conductor_accuracy_mean"] == pytest.approx(0.88)
    assert routing["conductor_accuracy_std"] == pytest.approx(0.02)
    assert routing["best_worker_accuracy_mean"] == pytest.approx((0.48 + 0.48 + 0.50) / 3)
    assert "| `routing` | 3 | 0.880 ± 0.020 | 0.450 ± 0.010 |" in (conductor_runs / "results.md").read_text()


def test_conductor_claims_need_a_margin_of_twice_the_std(conductor_runs):
    claims = conductor.summarize()["claims"]["routing"]
    assert claims["best_worker_accuracy"]["margin"] == pytest.approx(0.88 - 1.46 / 3)
    assert all(c["beats_by_twice_std"] for c in claims.values())
    for seed, after in enumerate((0.95, 0.50, 0.60)):  # a mean above the workers, but noisy: not a claim
        (conductor.RUNS.dir("routing", seed) / "summary.json").write_text(json.dumps(_conductor_summary(after, 0.45)))
    claims = conductor.summarize()["claims"]["routing"]
    assert claims["best_worker_accuracy"]["margin"] > 0 and not claims["best_worker_accuracy"]["beats_by_twice_std"]


def test_conductor_seeds_without_runs_keep_their_recorded_figures(conductor_runs):
    conductor.summarize()
    (conductor.RUNS.dir("routing", 2) / "summary.json").unlink()  # a fresh clone: seed 2's run is not here
    (conductor.RUNS.dir("routing", 0) / "summary.json").write_text(json.dumps(_conductor_summary(0.70, 0.44)))
    routing = conductor.summarize()["routing"]
    assert [s["conductor_accuracy"] for s in routing["seeds"]] == [0.70, 0.86, 0.88]  # seed 0 re-run, 2 recorded
    assert routing["conductor_accuracy_mean"] == pytest.approx((0.70 + 0.86 + 0.88) / 3)


def test_cost_has_one_entry_per_weight_and_the_claim_compares_each_with_weight_zero(conductor_runs):
    _write(conductor.RUNS, "cost_0", [_conductor_summary(a, 0.5, cost=c) for a, c in ((0.90, 6.0), (0.92, 6.4),
                                                                                      (0.91, 5.6))])
    _write(conductor.RUNS, "cost_0.3", [_conductor_summary(a, 0.5, cost=c) for a, c in ((0.89, 3.0), (0.90, 3.2),
                                                                                        (0.91, 2.8))])
    results = conductor.summarize()
    assert set(results["cost"]) == {"0", "0.3"}
    assert results["cost"]["0.3"]["mean_cost_mean"] == pytest.approx(3.0)
    assert results["cost"]["0"]["conductor_accuracy_mean"] == pytest.approx(0.91)
    claim = results["claims"]["cost"]["0.3"]
    assert claim["cost_drop"] == pytest.approx(0.5) and claim["accuracy_change"] == pytest.approx(-0.01)
    assert claim["met"]
    table = (conductor_runs / "results.md").read_text()
    assert "| conductor, `cost_weight=0.3` | 3 | 0.900 ± 0.010 | 3.000 ± 0.200 |" in table
    assert "| multiplier alone | | 0.480 | 10.000 |" in table
    points = plotted(conductor_runs / "cost.png")  # each cost weight at (mean cost, accuracy)
    assert points["conductor, cost_weight=0.3"] == [[pytest.approx(3.0)], [pytest.approx(0.90)]]
    assert points["conductor, cost_weight=0"] == [[pytest.approx(6.0)], [pytest.approx(0.91)]]
    (conductor.RUNS.dir("cost_0.3", 0) / "summary.json").write_text(json.dumps(_conductor_summary(0.80, 0.5, cost=3)))
    assert not conductor.summarize()["claims"]["cost"]["0.3"]["met"]  # cheaper, but 4 points less accurate


def test_composition_needs_twenty_points_and_two_steps_and_shows_a_learnt_workflow(conductor_runs):
    summaries = [_conductor_summary(a, 0.03, workers=(0.0, 0.02), vote=0.01, steps=2.0,
                                    fixed_workflow_accuracy=[0.93]) for a in (0.85, 0.80, 0.90)]
    _write(conductor.RUNS, "composition", summaries)
    step = {"worker": "multiplier", "access": [], "response": "\\boxed{54}", "cost": 0.0}
    records = [{"question": "Calculate 6 * 9 + 6.", "gold": "60", "pool": ["multiplier", "adder"], "correct": ok,
                "conductor": [{"text": f"plan {i}"}], "steps": [step, {**step, "worker": "adder", "access": ["all"]}]}
               for i, ok in enumerate((False, True))]
    (conductor.RUNS.dir("composition", 0) / "transcripts_after.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    results = conductor.summarize()
    composition = results["composition"]
    assert composition["best_fixed_workflow_accuracy_mean"] == pytest.approx(0.93)
    assert composition["example"]["conductor"] == "plan 1"  # the first right answer
    assert [s["access"] for s in composition["example"]["steps"]] == [[], ["all"]]
    acceptance = results["claims"]["composition"]["acceptance"]
    assert acceptance["margin_over_best_worker"] == pytest.approx(0.85 - 0.02) and acceptance["met"]
    assert "adder (access ['all'])" in (conductor_runs / "results.md").read_text()
    for seed in range(3):
        (conductor.RUNS.dir("composition", seed) / "summary.json").write_text(json.dumps(
            {**summaries[seed], "mean_steps": 1.5}))
    assert not conductor.summarize()["claims"]["composition"]["acceptance"]["met"]  # fewer than 2 steps


def _pool(after, workers, vote=0.3, random=0.4):
    return {"conductor_accuracy": after, "worker_accuracy": list(workers), "majority_vote_accuracy": vote,
            "random_workflow_accuracy": random}


def test_heldout_pools_are_reported_beside_the_training_pools_each_with_its_baselines(conductor_runs):
    before = {"mean_cost": 0, "eval_pools": [_pool(0.5, (0.4, 0.5))] * 4}
    summaries = [{**_conductor_summary(a, 0.5, eval_pools=[_pool(a, (0.4, 0.5)), _pool(a - 0.01, (0.5, 0.4)),
                                                           _pool(held, (0.45, 0.5)), _pool(held, (0.5, 0.45))]),
                  "before": before} for a, held in ((0.9, 0.8), (0.92, 0.84), (0.88, 0.82))]
    _write(conductor.RUNS, "heldout_pool", summaries)
    asked = {"Calculate 2 + 3.": "adder_b", "Calculate 2 * 3.": "multiplier_b", "Calculate 4 * 4.": "adder_b"}
    for seed in range(3):  # one plan in three asks the adder for a product: not a specialist
        records = [{"question": q, "steps": [{"worker": w}]} for q, w in asked.items()] + [{"question": "1 + 1",
                                                                                          "steps": []}]
        (conductor.RUNS.dir("heldout_pool", seed) / "transcripts_after_pool_2.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
    results = conductor.summarize()
    pools = results["heldout_pool"]
    assert pools["heldout_pool_conductor_accuracy_mean"] == pytest.approx(0.82)
    assert pools["heldout_pool_conductor_accuracy_before_mean"] == pytest.approx(0.5)
    assert pools["trained_pool_reversed_conductor_accuracy_mean"] == pytest.approx(0.89)
    assert pools["heldout_pool_reversed_best_worker_accuracy_mean"] == pytest.approx(0.5)
    assert pools["heldout_pool_specialist_rate_mean"] == pytest.approx(0.5)  # and a malformed plan asks no one
    claim = results["claims"]["heldout_pool"]["heldout_pool"]["best_worker_accuracy"]
    assert claim["margin"] == pytest.approx(0.32) and claim["beats_by_twice_std"]
    acceptance = results["claims"]["heldout_pool"]["acceptance"]
    assert acceptance["trained_minus_heldout"] == pytest.approx(0.895 - 0.82) and not acceptance["met"]
    table = (conductor_runs / "results.md").read_text()
    assert ("| heldout pool | 0.820 ± 0.020 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.300 ± 0.000 | 0.400 ± 0.000 | "
            "0.500 ± 0.000 |") in table
    assert "| random training pools (2-4 workers) | 0.900 ± 0.020 |" in table


def test_recursion_shows_what_the_replan_round_did_beside_composition(conductor_runs):
    _write(conductor.RUNS, "composition", [_conductor_summary(0.9, 0.05, steps=2.0)] * 3)
    _write(conductor.RUNS, "recursion", [_conductor_summary(
        0.92, 0.05, steps=2.1, first_plan_accuracy=0.9, replan_accept_rate=0.9, replan_malformed_rate=0.05,
        replan_fixed_rate=0.03, replan_broke_rate=0.01)] * 3)
    recursion = conductor.summarize()["recursion"]
    assert recursion["first_plan_accuracy_mean"] == pytest.approx(0.9)
    assert "composition" not in recursion and "first_plan_accuracy_mean" not in conductor.summarize()["composition"]
    table = (conductor_runs / "results.md").read_text()
    assert ("| `recursion` | 3 | 0.920 ± 0.000 | 0.900 ± 0.000 | 0.900 ± 0.000 | 0.050 ± 0.000 | 0.030 ± 0.000 | "
            "0.010 ± 0.000 |") in table
    assert "| `composition` | 3 | 0.900 ± 0.000 | – | – | – | – | – | 2.000 ± 0.000 |" in table


@pytest.mark.parametrize("condition", conductor.POOL_CONDITIONS)
def test_the_pools_experiment_holds_out_the_pools_the_results_call_held_out(tiny_models, conductor_models, condition):
    """Every pools experiment asks the named pools the results name; the paper's way (stable ids, no cards) is a
    second phase from a routing conductor of the same model, the card variant numbers workers anew by their cards."""
    cfg = compose_config("command=train", *conductor.CONDITIONS[condition])
    con = cfg.conductor
    assert con.random_pools and len(cfg.team.agents) - 1 >= 4
    assert len(con.eval_pools) == len(conductor.NAMED_POOLS)
    for pool, name in zip(con.eval_pools, conductor.NAMED_POOLS):
        assert (set(pool) in [set(p) for p in con.heldout_pools]) == name.startswith("heldout")
    assert con.eval_pools[1] == con.eval_pools[0][::-1] and con.eval_pools[3] == con.eval_pools[2][::-1]
    cards = condition == "heldout_pool_cards"
    assert all(bool(a.description) == cards for a in cfg.team.agents[1:])
    assert con.pool_ids == ("renumbered" if cards else "stable")
    assert (condition in conductor.PHASES) == (condition == "heldout_pool")  # one_phase starts from the warm-start
    if condition in conductor.PHASES:
        first = compose_config("command=train", *conductor.CONDITIONS[conductor.PHASES[condition]])
        assert first.team.agents[0].model == cfg.team.agents[0].model  # the phase starts from the same model
        assert [a.name for a in first.team.agents[1:]] == [a.name for a in cfg.team.agents[1:3]]  # ids 0 and 1


def test_the_routing_condition_is_the_conductor_demo(conductor_models):
    demo = compose_config("command=train", "+experiment=conductor")
    assert vars(compose_config("command=train", *conductor.CONDITIONS["routing"])) == vars(demo)
    assert (demo.task.split, demo.task.seed, demo.task.limit) == ("test", 0, 200)


def _discussion_summary(before: list[float], after: list[float]) -> dict:
    evaluation = {"agent_turn_accuracy": [[0.5, 0.6]] * 4, "transitions": [{"turn": 2, "wrong_to_right": 30,
                                                                           "right_to_wrong": 10}]}
    return {"before": {"turn_accuracy": before, **evaluation}, "after": {"turn_accuracy": after, **evaluation}}


def test_lora_results_set_the_trained_team_against_itself_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(lora, "RUNS", RunSet(tmp_path / "runs"))
    monkeypatch.setattr(lora, "HERE", tmp_path)
    _write(lora.RUNS, "shared", [_discussion_summary([0.50, b], [0.52, a])
                                 for b, a in ((0.44, 0.80), (0.46, 0.84), (0.45, 0.88))])
    results = lora.summarize()
    assert list(results["conditions"]) == ["untrained", "shared"]  # no `separate` runs yet: no row, no claim
    assert results["conditions"]["untrained"]["turn_accuracy_mean"] == pytest.approx([0.50, 0.45])
    claims = results["claims"]
    assert claims["last_turn_after"] == pytest.approx(0.84) and claims["last_turn_gain"] == pytest.approx(0.39)
    assert claims["gain_exceeds_twice_std"] is True and "separate_last_turn_after" not in claims
    assert "| `shared` | 3 | 0.520 ± 0.000 | 0.840 ± 0.040 |" in (tmp_path / "results.md").read_text()
    _write(lora.RUNS, "separate", [_discussion_summary([0.5, 0.45], [0.5, a]) for a in (0.5, 0.9, 0.4)])
    assert lora.summarize()["claims"]["separate_last_turn_after"] == pytest.approx(0.6)


def test_the_lora_conditions_are_one_experiment_in_two_engine_modes(talk_models):
    shared, separate = (compose_config("command=train", *lora.CONDITIONS[name]) for name in ("shared", "separate"))
    assert shared.team.lora_engine and not separate.team.lora_engine
    assert shared.team.lora_seats() == [1, 2, 3] and separate.team.lora_seats() == []
    assert [a.trainable for a in shared.team.agents] == [False, True, True, True]
    assert shared.discussion.topology == "star" and (shared.task.split, shared.task.limit) == ("test", 200)
    assert changed(shared, {"team.lora_engine": False}) == separate  # the engine mode is the only difference


def test_portability_sets_the_other_build_beside_the_native_figures(tmp_path, monkeypatch):
    monkeypatch.setattr(portability, "RUNS", RunSet(tmp_path / "runs", env=portability.RUNS.env))
    monkeypatch.setattr(portability, "HERE", tmp_path)
    _write(portability.RUNS, "routing", [_conductor_summary(a, 0.45) for a in (0.80, 0.84, 0.82)])
    results = portability.summarize()
    assert set(results["headlines"]) == {"routing"}  # cotrain has no runs here
    native = json.loads((runs.ROOT / "experiments" / "conductor" / "results.json").read_text())["routing"]
    routing = results["headlines"]["routing"]
    after = routing["figures"]["conductor after"]
    assert after["native_mean"] == native["conductor_accuracy_mean"]
    assert after["other_mean"] == pytest.approx(0.82) and after["other_std"] == pytest.approx(0.02)
    assert after["difference"] == pytest.approx(0.82 - native["conductor_accuracy_mean"])
    assert routing["claim_holds"]["other"] is True  # 0.82 +/- 0.02 against workers at 0.48
    table = portability.table(results["headlines"])
    assert "| `routing` | conductor after |" in table and "claim: conductor - best worker > 2 std" in table
    for seed, after in enumerate((0.95, 0.50, 0.60)):  # noisy: the claim fails on this build
        (portability.RUNS.dir("routing", seed) / "summary.json").write_text(json.dumps(_conductor_summary(after, 0.45)))
    assert portability.summarize()["headlines"]["routing"]["claim_holds"]["other"] is False


def test_portability_reads_the_cotrain_runs_as_the_maporl_experiment_does(tmp_path, monkeypatch):
    monkeypatch.setattr(portability, "RUNS", RunSet(tmp_path / "runs", env=portability.RUNS.env))
    monkeypatch.setattr(portability, "HERE", tmp_path)
    evaluation = {"agent_turn_accuracy": [[0.5, 0.6]] * 2, "transitions": [{"turn": 2, "wrong_to_right": 9,
                                                                           "right_to_wrong": 3}]}
    _write(portability.RUNS, "cotrain", [{"after": {"turn_accuracy": [0.5, last], **evaluation}}
                                         for last in (0.70, 0.72, 0.74)])
    cotrain = portability.summarize()["headlines"]["cotrain"]
    assert cotrain["figures"]["last turn"]["other_mean"] == pytest.approx(0.72)
    assert cotrain["figures"]["collaboration gain"]["other_std"] == pytest.approx(0.02)


def test_runs_are_kept_once_finished_and_run_in_their_environment(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs.subprocess, "run", lambda *a, **kw: calls.append((a[0], kw["env"])))
    runset = RunSet(tmp_path, env={"ATEN_CPU_CAPABILITY": "default"})
    runset.run("c", 0, ["+experiment=conductor"])
    (args, env), = calls
    assert args[1:4] == ["train", "+experiment=conductor", "seed=0"] and env["ATEN_CPU_CAPABILITY"] == "default"
    _write(runset, "c", [{"done": True}])  # now finished: kept, not run again
    assert runset.run("c", 0, ["+experiment=conductor"]) == runset.dir("c", 0) and len(calls) == 1
    assert runset.summaries("c") == [(0, {"done": True})]


def test_the_other_kernels_change_float32_results():
    """The premise of the portability check: ATEN_CPU_CAPABILITY=default sums in another order than this CPU's
    vectorized kernels (the same tensor, a different last bit). On a CPU without vector kernels (its native
    capability is DEFAULT) both runs use the same kernels and must agree bit for bit."""
    code = ("import hashlib, torch; torch.manual_seed(0); x = torch.randn(64, 257) @ torch.randn(257, 129); "
            "print(torch.backends.cpu.get_cpu_capability(), "
            "hashlib.sha256(torch.softmax(x, -1).sum(0).numpy().tobytes()).hexdigest())")
    native, other = (subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                    env={**os.environ, **env}).stdout.split()
                     for env in ({}, portability.KERNELS))
    assert other[0] == "DEFAULT"
    assert (native[1] != other[1]) == (native[0] != "DEFAULT"), (native, other)


def test_only_names_conditions_or_groups_of_them():
    from experiments.runs import selected

    assert selected(["recursion", "pools"], list(conductor.CONDITIONS), conductor.GROUPS) == [
        "recursion", "recursion_control", "recursion_discounted", "pools_routing", "heldout_pool",
        "heldout_pool_one_phase", "heldout_pool_cards"]
    assert selected(["composition", "composition"], list(conductor.CONDITIONS), conductor.GROUPS) == ["composition"]
    assert selected(None, list(conductor.CONDITIONS), conductor.GROUPS) == list(conductor.CONDITIONS)
    assert set(sum(conductor.GROUPS.values(), [])) <= set(conductor.CONDITIONS)

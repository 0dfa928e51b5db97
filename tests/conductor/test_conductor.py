"""The Conductor with real parts: a tiny conductor and two tiny specialist workers on vLLM engines, GRPO through
a DeepSpeed learner, HTTP workers that fail, recursion, and `mapoco eval method=conductor`."""

import asyncio
import contextlib
import dataclasses
import http.server
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import compose_config, kernels_twin, watch_updates

from mapoco.conductor.evaluate import evaluate_conductor
from mapoco.conductor.method import ConductorMethod
from mapoco.conductor.rollout import (
    ConductorRunner,
    Job,
    summarize_conductor,
    transcript,
)
from mapoco.conductor.workflow import Plan, Step, single_step
from mapoco.config import ConductorConfig, HttpWorkerConfig, PriceConfig
from mapoco.tasks import Problem
from mapoco.training.batch import with_samples
from mapoco.training.trainer import Trainer

pytestmark = pytest.mark.slow

SMALL = ["+experiment=conductor", "train.batch_questions=4", "algorithm.samples_per_question=4",
         "train.eval_limit=8", "logger.wandb.mode=disabled"]
QUESTION = Problem(id="q", question="Calculate 3 * 4.", gold="12")


@pytest.fixture(scope="module")
def conductor_team(ray_session, conductor_models):
    from mapoco.rollout.discussion import Team

    team = Team(compose_config(*SMALL).team, seed=0, wait=False)  # the first user, the trainer, waits for it
    yield team
    team.shutdown()


class _Failing(http.server.BaseHTTPRequestHandler):
    """An OpenAI-style endpoint that answers 500, or (path /slow) too late."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/slow"):
            threading.Event().wait(3)
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"boom")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def failing_endpoint():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


SERVED = Problem(id="served-q", question="Calculate 6 * 7.", gold="")


@dataclass
class TrainedConductor:
    out: Path
    seats: list
    before: dict
    after: dict
    summary: dict
    served: object  # the trained conductor's workflow for SERVED, on the trainer's engines
    eval_problems: list  # the 8 questions of its evaluations
    cfg: object
    directions: list  # what each GRPO update did to the logprobs of the plans it trained on


@pytest.fixture(scope="module")
def trained(conductor_team, tmp_path_factory):
    """Two GRPO steps, the second one's rollout sampled during the first one's update (train.off_policy_steps=1),
    checkpointed, in a run directory `mapoco serve` can read (Hydra's saved config too)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mapoco.cli import CONF_DIR
    from mapoco.serving.served_team import NullVerifier

    out = tmp_path_factory.mktemp("conductor-run")
    overrides = [*SMALL, "command=train", "train.steps=2", "train.save_every=2", "train.off_policy_steps=1",
                 f"output_dir={out}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        (out / ".hydra").mkdir()
        OmegaConf.save(compose("config", overrides=overrides), out / ".hydra" / "config.yaml")
    trainer = Trainer(compose_config(*overrides), out, team=conductor_team, method=ConductorMethod)
    try:
        before = trainer.policies[0].group.weights("float32")
        with watch_updates(trainer.policies[0].group, kernels_twin(trainer, trainer.policies[0])) as directions:
            summary = trainer.fit()
        after = trainer.policies[0].group.weights("float32")
        (served,) = ConductorRunner(conductor_team, trainer.cfg.conductor, NullVerifier()).rollout(
            [SERVED], seed=0, verify=False).records
    finally:
        trainer.close()
    return TrainedConductor(out, [p.seats for p in trainer.policies], before, after, summary, served,
                            trainer.eval_problems, trainer.cfg, directions)


def test_grpo_two_iterations_train_the_conductor(trained):
    tmp_path, before, after, summary = trained.out, trained.before, trained.after, trained.summary
    assert trained.seats == [[0]]  # only the conductor learns; workers stay frozen
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 0
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert (tmp_path / "checkpoints" / "step_000002").is_dir()
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "rollout/staleness" in m]
    assert [m["rollout/staleness"] for m in steps] == [0, 1]  # the second step's plans came from the first weights
    assert steps[0]["train/agent_0/is_weight_mean"] == 1.0  # on-policy
    assert 1.0 != steps[1]["train/agent_0/is_weight_mean"] <= trained.cfg.train.is_weight_cap  # reweighted, truncated
    records = [json.loads(line) for line in (tmp_path / "transcripts_after.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["reward"] in (0.0, 0.5, 1.0) for r in records)
    # The summary is the after-training transcripts', recounted here by hand.
    ran = [len(r["steps"]) for r in records if r["steps"]]
    assert written["conductor_accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 8)
    assert written["malformed_rate"] == pytest.approx(sum(not r["steps"] for r in records) / 8)
    asked = [step["worker"] for r in records for step in r["steps"]]
    assert written["worker_share"] == pytest.approx({w: asked.count(w) / len(asked) for w in set(asked)})
    assert written["mean_steps"] == pytest.approx(sum(ran) / max(len(ran), 1))
    assert written["mean_reward"] == pytest.approx(sum(r["reward"] for r in records) / 8)
    assert written["workers"] == ["adder", "multiplier"] and len(written["worker_accuracy"]) == 2
    for accuracy in [written["random_workflow_accuracy"], *written["worker_accuracy"]]:  # of the same 8 questions
        assert (accuracy * 8) == pytest.approx(round(accuracy * 8))
    parsed = [r for r in records if r["steps"]]
    assert all(set(r["pool"]) == {"adder", "multiplier"} for r in records)
    assert all(r["steps"][-1]["response"] is not None for r in parsed)


@pytest.mark.kernels
def test_each_grpo_update_follows_its_advantages(trained):
    """Both GRPO updates (the second on plans sampled one update earlier, importance-weighted) make the conductor's
    better-than-their-group plans likelier than its worse ones, token by token of the sampled plans; so do the same
    updates on PyTorch's non-vectorized kernels."""
    assert len(trained.directions) == 2
    for step, direction in enumerate(trained.directions):
        direction.assert_follows_advantages(f"step {step}")


def test_the_majority_vote_baseline_credits_a_tie_by_half(trained, conductor_team, rule_verifier):
    """Each worker alone on the evaluation's 8 questions again (frozen workers, the same request seeds), recounted by
    hand: both agree -> that answer's credit; one answer only -> its own; two different answers -> a tie, half the
    right ones (the team's tie-break picks one at random)."""
    from mapoco.answers import extract_answer
    from mapoco.conductor.rollout import Job

    runner = ConductorRunner(conductor_team, trained.cfg.conductor, rule_verifier)
    problems, seed = trained.eval_problems, trained.cfg.seed
    pool = [i for i in range(len(runner.workers)) if i != runner.self_index]  # the workers, as the baseline asks
    alone = [[Job(p, single_step(k), pool, seed) for p in problems] for k in (0, 1)]
    runner.execute([job for jobs in alone for job in jobs])
    correct = [runner.verify(problems, [j.answer() for j in jobs]) for jobs in alone]
    assert trained.summary["worker_accuracy"] == [sum(c) / 8 for c in correct]  # the same answers as the baseline's
    credit = 0.0
    for q, problem in enumerate(problems):
        (a0, a1), (c0, c1) = [extract_answer(alone[k][q].answer(), problem.kind) for k in (0, 1)], \
            [correct[k][q] for k in (0, 1)]
        if a0 is None or a1 is None or a0 == a1:
            credit += c0 if a0 is not None else c1 if a1 is not None else 0.0
        else:
            credit += (c0 + c1) / 2
    assert trained.summary["majority_vote_accuracy"] == pytest.approx(credit / 8)


def test_rollout_rewards_follow_the_parse_and_the_answer(conductor_team, rule_verifier):
    runner = ConductorRunner(conductor_team, ConductorConfig(), rule_verifier)
    problems = [Problem(id=f"p{i}", question=f"Calculate {i} * {i + 1}.", gold=str(i * (i + 1))) for i in range(6)]
    result = runner.rollout(problems, seed=0)
    for record in result.records:
        expected = 0.0 if record.malformed else (1.0 if record.correct else 0.5)
        assert record.reward == expected
        assert record.turns[0].token_ids and len(record.turns[0].logprobs) == len(record.turns[0].token_ids)
    assert result.seconds["generate"] > 0


def test_failing_http_worker_gives_an_error_step_and_the_workflow_goes_on(conductor_team, rule_verifier,
                                                                          failing_endpoint):
    cfg = ConductorConfig(http_workers=[
        HttpWorkerConfig(name="broken", base_url=failing_endpoint, model="m"),
        HttpWorkerConfig(name="slow", base_url=f"{failing_endpoint}/slow", model="m", timeout_s=0.5)])
    runner = ConductorRunner(conductor_team, cfg, rule_verifier)
    try:
        assert runner.names == ["adder", "multiplier", "broken", "slow"]
        plan = Plan((Step(2, "Solve the problem.", False), Step(3, "Solve the problem.", False),
                     Step(1, "Check the work so far and give the final answer.", True)))
        job = Job(QUESTION, plan, [0, 1, 2, 3], seed=0)
        runner.execute([job])
        broken, slow, last = job.responses
        assert broken.error and "HTTP 500" in broken.error
        assert slow.error and "timed out" in slow.error
        assert last.error is None and last.text  # the local worker still answered, seeing both error steps
        result = runner.rollout([QUESTION] * 4, seed=1)  # whole rollouts with failing workers in the pool finish
        assert len(result.records) == 4
    finally:
        runner.close()


def test_replan_rounds_score_the_answer_before_each_and_stop_when_it_stands(conductor_team, rule_verifier):
    """Up to conductor.max_rounds=3 plans per question: each re-plan sees the conversation so far and the last
    answer; accepting or an unparsed re-plan leaves the answer as it was and ends the question's rounds, and earns
    exactly 0 (the final outcome minus what accepting would have earned)."""
    cfg = ConductorConfig(max_rounds=3)
    runner = ConductorRunner(conductor_team, cfg, rule_verifier)
    problems = [Problem(id=f"p{i}", question=f"Calculate {i} + 5.", gold=str(i + 5)) for i in range(6)]
    result = runner.rollout(problems, seed=0)
    records = result.records
    tokenizer = conductor_team.agents[0].tokenizer
    for record in records:
        assert record.first_correct is not None and 1 <= len(record.turns) <= 3
        if record.turns[0].parsed.malformed:
            assert len(record.turns) == 1 and record.job is None and not record.correct
            assert record.turn_rewards == [0.0]
            continue
        assert len(record.turns) >= 2
        for k, turn in enumerate(record.turns[1:], start=1):
            assert tokenizer.decode(turn.prompt_ids).count("The workflow answered:") == k  # the whole conversation
            if turn.parsed.accepts or turn.parsed.malformed:  # the answer before it stands: no more rounds
                assert k == len(record.turns) - 1 and record.turn_rewards[k] == 0.0
        assert record.turn_rewards[0] == (1.0 if record.first_correct else 0.5)
        if all(t.parsed.accepts or t.parsed.malformed for t in record.turns[1:]):
            assert record.correct == record.first_correct and record.job.plan == record.turns[0].parsed.plan
    method = SimpleNamespace(cfg=SimpleNamespace(conductor=cfg))
    (batch,) = ConductorMethod.batches(method, result, np.array([r.reward for r in records]), {"c": [0]}).values()
    assert batch.rewards == [reward for r in records for reward in r.turn_rewards]
    assert [key[2] for key in batch.keys] == [turn for r in records for turn in range(len(r.turns))]
    summary = summarize_conductor(result)
    assert summary["first_plan_accuracy"] == sum(r.first_correct for r in records) / len(records)
    assert summary["conductor_accuracy"] - summary["first_plan_accuracy"] == pytest.approx(
        summary["replan_fixed_rate"] - summary["replan_broke_rate"])
    assert 0 <= summary["replan_accept_rate"] + summary["replan_malformed_rate"] <= 1
    assert "first_plan_accuracy" not in summarize_conductor(
        ConductorRunner(conductor_team, ConductorConfig(), rule_verifier).rollout(problems[:2], seed=0))


def test_a_failing_worker_fails_a_seeded_share_of_its_calls_with_an_error_reply(conductor_team, rule_verifier):
    with reconfigured(conductor_team, {1: {"fail_rate": 0.5}}):
        runner = ConductorRunner(conductor_team, ConductorConfig(), rule_verifier)
        problems = [Problem(id=f"p{i}", question=f"Calculate {i} + 5.", gold=str(i + 5)) for i in range(16)]

        def failures(seed: int) -> list[int]:
            jobs = [Job(p, single_step(0), [0, 1], seed) for p in problems]
            runner.execute(jobs)
            assert all(j.answer().startswith("[worker error: ") == bool(j.responses[0].error) for j in jobs)
            return [i for i, j in enumerate(jobs) if j.responses[0].error]

        first = failures(0)
        assert 0 < len(first) < len(problems) and failures(0) == first and failures(1) != first
        job = Job(problems[first[0]], single_step(0), [0, 1], 0)
        runner.execute([job])
        assert job.answer().startswith("[worker error: ") and "fail_rate" in job.responses[0].error


def test_conductor_as_its_own_worker_recurses_to_the_depth_limit(conductor_team, rule_verifier):
    runner = ConductorRunner(conductor_team, ConductorConfig(self_worker=True, max_depth=1), rule_verifier)
    assert runner.names == ["adder", "multiplier", "conductor"] and runner.self_index == 2
    assert runner.pool(QUESTION, 0, depth=0) == [0, 1, 2]
    assert runner.pool(QUESTION, 0, depth=1) == [0, 1]  # at the limit the conductor no longer offers itself
    job = Job(QUESTION, Plan((Step(2, "Solve the problem.", False),)), [0, 1, 2], seed=0)
    runner.execute([job])
    assert job.responses[0].error is None and job.responses[0].text
    assert runner.workers[2].depth == 0


def test_random_pools_are_subsets_in_random_order_shared_by_a_group(conductor_team, rule_verifier):
    runner = ConductorRunner(conductor_team, ConductorConfig(random_pools=True), rule_verifier)
    pools = [runner.pool(Problem(id=f"p{i}", question="x", gold="1"), seed=0) for i in range(40)]
    assert all(1 <= len(p) <= 2 and len(set(p)) == len(p) for p in pools)
    assert {len(p) for p in pools} == {1, 2} and {tuple(p) for p in pools if len(p) == 2} == {(0, 1), (1, 0)}
    assert pools == [runner.pool(Problem(id=f"p{i}", question="x", gold="1"), seed=0) for i in range(40)]
    samples = with_samples([Problem(id=f"p{i}", question="x", gold="1") for i in range(40)], 4)
    drawn = [runner.pool(sample, seed=0) for sample in samples]
    assert [drawn[i:i + 4] for i in range(0, 160, 4)] == [[pool] * 4 for pool in pools]  # a group shares its pool


@pytest.mark.parametrize("pool_ids", ["stable", "renumbered"])
def test_pools_show_numbers_never_worker_names_to_the_conductor(conductor_team, rule_verifier, pool_ids):
    """The conductor sees numbers only: stable ones (a worker keeps its team index in every pool, listed in the
    pool's order) or "Model 0 .. Model k-1" (whom a number stands for changes with every question); a step's number
    runs the worker it stands for."""
    runner = ConductorRunner(conductor_team, ConductorConfig(random_pools=True, pool_ids=pool_ids), rule_verifier)
    candidates = [Problem(id=f"p{i}", question=f"Calculate {i} + 2.", gold=str(i + 2)) for i in range(40)]
    first_of = {}  # one question per pool: both orders of the two workers, and each alone
    for problem in candidates:
        first_of.setdefault(tuple(runner.pool(problem, seed=0)), problem)
    assert set(first_of) == {(0, 1), (1, 0), (0,), (1,)}
    result = runner.rollout(list(first_of.values()), seed=0)
    assert [tuple(r.pool) for r in result.records] == [tuple(runner.names[w] for w in pool) for pool in first_of]
    tokenizer = conductor_team.agents[0].tokenizer
    for record, (pool, problem) in zip(result.records, first_of.items()):
        assert record.ids == (list(pool) if pool_ids == "stable" else list(range(len(pool))))
        prompt = tokenizer.decode(record.turns[0].prompt_ids)
        assert f"Workers: {', '.join(f'Model {i}' for i in record.ids)}\n" in prompt
        assert not any(name in prompt for name in runner.names)
        if record.job:
            ran = [step["worker"] for step in transcript(problem, record)["steps"]]
            assert ran == [runner.names[pool[record.ids.index(s.worker)]] for s in record.job.plan.steps]


def test_cards_follow_the_renumbering_and_held_out_pools_are_never_drawn(conductor_team, rule_verifier):
    """Each worker's card is shown beside the number it has in the question's pool; a held-out pool is never a
    training pool's subset, while a named pool is asked as given."""
    with reconfigured(conductor_team, {1: {"description": "adds"}, 2: {"description": "multiplies"}}):
        cfg = ConductorConfig(random_pools=True, pool_ids="renumbered", heldout_pools=[["multiplier"]])
        runner = ConductorRunner(conductor_team, cfg, rule_verifier)
        problems = [Problem(id=f"p{i}", question=f"Calculate {i} * 2.", gold=str(i * 2)) for i in range(24)]
        assert {tuple(runner.pool(p, seed=0)) for p in problems} == {(0,)}  # every pool holding the multiplier
        result = runner.rollout(problems[:2], seed=0, pool=["multiplier", "adder"])
        tokenizer = conductor_team.agents[0].tokenizer
        for record in result.records:
            assert record.pool == ["multiplier", "adder"]
            prompt = tokenizer.decode(record.turns[0].prompt_ids)
            assert "Workers: Model 0, Model 1\nCards: " in prompt
            assert sorted(prompt.split("\nCards: ")[1].split("\n")[0].split("; ")) == ["adds=Model 1",
                                                                                      "multiplies=Model 0"]
            assert not any(name in prompt for name in runner.names)


@contextlib.contextmanager
def reconfigured(team, changes: dict[int, dict]):
    """The team's agents with these config fields changed, for one test (the module's team is shared)."""
    saved = {i: team.agents[i].cfg for i in changes}
    for i, fields in changes.items():
        team.agents[i].cfg = dataclasses.replace(saved[i], **fields)
    try:
        yield
    finally:
        for i, cfg in saved.items():
            team.agents[i].cfg = cfg


def test_each_step_costs_its_workers_price_and_the_reward_pays_for_it(conductor_team, rule_verifier):
    """Local workers: a step costs its worker's price per call plus per generated token; a question costs its
    workflow's steps; the reward loses cost_weight times that cost over the scale (the priciest worker's call at
    its token limit: the multiplier's 3 + 0.5 * max_new_tokens)."""
    adder, multiplier = PriceConfig(per_call=1.0), PriceConfig(per_call=3.0, per_token=0.5)
    with reconfigured(conductor_team, {1: {"price": adder}, 2: {"price": multiplier}}):
        runner = ConductorRunner(conductor_team, ConductorConfig(cost_weight=0.2), rule_verifier)
        max_tokens = conductor_team.agents[2].cfg.sampling.max_new_tokens
        assert runner.cost_scale == 3.0 + 0.5 * max_tokens
        plan = Plan((Step(0, "Solve the problem.", False), Step(1, "Check the work so far and give the final "
                                                                "answer.", True)))
        job = Job(QUESTION, plan, [0, 1], seed=0)
        runner.execute([job])
        first, second = job.responses
        assert first.cost == 1.0 and 0 < second.tokens <= max_tokens and second.cost == 3.0 + 0.5 * second.tokens
        assert job.cost() == first.cost + second.cost
        problems = [Problem(id=f"p{i}", question=f"Calculate {i} * 3.", gold=str(i * 3)) for i in range(6)]
        for record in runner.rollout(problems, seed=0).records:
            steps = record.job.responses if record.job else []
            assert record.cost == sum(r.cost for r in steps)
            base = 0.0 if record.malformed else (1.0 if record.correct else 0.5)
            penalty = 0.0 if record.malformed else 0.2 * record.cost / runner.cost_scale
            assert record.reward == pytest.approx(base - penalty)
            assert record.cost > 0 or record.job is None


def test_eval_reports_the_conductor_against_every_baseline(conductor_team, tmp_path):
    """Hand-written workflows run too: one that asks the multiplier alone scores what the multiplier alone does."""
    alone = "{model_id: [1], subtasks: ['Solve the problem.'], access_list: [[]]}"
    chain = "{model_id: [1, 0], subtasks: [Solve., Check.], access_list: [[], [all]]}"
    cfg = compose_config(*SMALL, "task.limit=8", "command=eval", f"conductor.fixed_workflows=[{alone}, {chain}]",
                         "conductor.eval_pools=[[multiplier, adder]]")
    summary = evaluate_conductor(cfg, tmp_path, team=conductor_team)
    renumbered = summary["eval_pools"][0]  # the pool renumbered: its Model 1 is the adder
    assert renumbered["pool"] == renumbered["workers"] == ["multiplier", "adder"]
    assert renumbered["worker_accuracy"] == summary["worker_accuracy"][::-1]
    assert renumbered["fixed_workflow_accuracy"][0] == summary["worker_accuracy"][0]
    pool_transcripts = (tmp_path / "transcripts_pool_0.jsonl").read_text().splitlines()
    assert {tuple(json.loads(line)["pool"]) for line in pool_transcripts} == {("multiplier", "adder")}
    assert set(summary) >= {"conductor_accuracy", "worker_accuracy", "majority_vote_accuracy",
                            "random_workflow_accuracy", "malformed_rate", "mean_steps"}
    assert summary["fixed_workflow_accuracy"][0] == summary["worker_accuracy"][1]
    assert summary["fixed_workflows"][1] == ("model_id = [1, 0]\nsubtasks = ['Solve.', 'Check.']\n"
                                             "access_list = [[], ['all']]")
    assert len(summary["fixed_workflow_cost"]) == 2
    assert np.isclose(summary["conductor_accuracy"], np.mean(
        [json.loads(line)["correct"] for line in (tmp_path / "transcripts.jsonl").read_text().splitlines()]))


def test_a_served_conductor_answers_with_its_trained_workflow(trained, conductor_team):
    """`mapoco serve`'s path for the conductor run, on the module's engines: its config read from the run directory,
    the checkpoint's weights pushed into them, the request through the OpenAI-compatible handler; the reply is the
    workflow the trained conductor wrote on the trainer's engines for the same question and seed (the conductor's
    text, each worker step's response, the final answer). Ray Serve's deployment around it is test_serve's."""
    from mapoco.serving.restore import load_config
    from mapoco.serving.serve import chat_api, model_card, model_name
    from mapoco.serving.served_team import ServedTeam

    question, expected = SERVED, trained.served
    cfg, path = load_config(str(trained.out))
    served = ServedTeam(cfg, path, team=conductor_team)

    async def answer(asked):
        return served.answer([asked])[0]

    async def streamed(body):
        _, stream, _ = await api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
        return [json.loads(line[6:]) for chunk in [c async for c in stream] for line in chunk.split("\n\n")
                if line and line != "data: [DONE]"]

    api = chat_api(cfg, model_name(cfg, path), model_card(cfg, path), None, answer)
    try:
        body = {"model": trained.out.name, "messages": [{"role": "user", "content": question.question}],
                "mapoco": {"id": question.id, "transcript": True}}
        status, reply, _ = asyncio.run(api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode()))
        _, models, _ = asyncio.run(api.handle("GET", "/v1/models", {}, b""))
        events = asyncio.run(streamed({**body, "stream": True}))
        refused, _, _ = asyncio.run(api.handle("POST", "/v1/chat/completions", {}, json.dumps(
            {**body, "temperature": 0.5}).encode()))
    finally:
        served.shutdown()
    assert status == 200, reply
    workflow = reply["mapoco"]["workflow"]
    assert [t["text"] for t in workflow["conductor"]] == [t.text for t in expected.turns]
    responses = [r.text if r else None for r in expected.job.responses] if expected.job else []
    assert [s["response"] for s in workflow["steps"]] == responses
    assert reply["mapoco"]["answer"] == expected.answer and workflow["pool"] == expected.pool
    assert models["data"][0]["mapoco"]["checkpoint"] == "step_000002"
    # streamed: each plan and each step as it ran, then the same answer; sampling stays the trained conductor's
    steps = [e["mapoco"] for e in events if e.get("mapoco", {}).get("type")]
    assert [s["text"] for s in steps if s["type"] == "plan"] == [t.text for t in expected.turns]
    assert [s["text"] for s in steps if s["type"] == "step"] == responses
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")) == \
        reply["choices"][0]["message"]["content"]
    assert refused == 400

"""`mapoco serve`: a trained tiny team behind Ray Serve's OpenAI-compatible endpoint.

One module-wide app: a one-step training run (agent 0 trained at a high learning rate, agent 1 a frozen partner)
checkpoints, and the app serves that checkpoint on 127.0.0.1 with a bearer token. The pure request handling
(validation, auth, 503 on engine failures) is also tested without Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, compose_config

slow = pytest.mark.slow

TOKEN_ENV = "MAPOCO_TEST_SERVE_TOKEN"
TOKEN = "test-token-8d1f"
MAX_INPUT_CHARS = 300
# The session's heterogeneous pair x 2 turns; only agent 0 trains (one step, lr high enough to move the answers).
RUN = ["team=tiny_hetero", "+team.agents.1.trainable=false", "turns=2",
       "learner.lr=1e-2", "train.steps=1", "train.batch_questions=4", "algorithm.samples_per_question=2",
       "train.eval_every=0", "train.eval_limit=4", "train.save_every=1", "logger.wandb.mode=disabled", "task.limit=40"]


def chat(text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


# ---------------------------------------------------------------- request handling alone (no Ray)
def _api(answer, digest=None):
    from mapoco.config import ServeConfig
    from mapoco.serving.openai_api import ChatApi

    return ChatApi(ServeConfig(max_input_chars=MAX_INPUT_CHARS), "team-x", {"method": "discussion"}, digest, 7, answer)


def _call(api, body, method="POST", path="/v1/chat/completions", headers=None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(api.handle(method, path, headers or {}, raw))


RESULT = {"content": "\\boxed{4}", "answer": "4", "votes": {"4": 2}, "batch": 1,
          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, "transcript": {"discussion": []}}

BAD_REQUESTS = [  # (body, status, error code)
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    ([], 400, "invalid_json"),
    ({}, 400, "invalid_value"),
    ({"messages": []}, 400, "invalid_value"),
    ({"messages": "2+2"}, 400, "invalid_value"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, 400, "invalid_value"),
    (chat("   "), 400, "invalid_value"),
    (chat("1+1=" * MAX_INPUT_CHARS), 400, "context_length_exceeded"),
    (chat("2+2", model="gpt-4o"), 404, "model_not_found"),
    (chat("2+2", stream=True), 400, "unsupported_parameter"),
    (chat("2+2", seed="x"), 400, "invalid_value"),
    (chat("2+2", mapoco={"transcript": "yes"}), 400, "invalid_value"),
]


@pytest.mark.parametrize("body,status,code", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(body, status, code):
    async def answer(question):
        raise AssertionError("a bad request must not reach the team")

    got, payload, _ = _call(_api(answer), body)
    assert (got, payload["error"]["code"]) == (status, code)
    assert payload["error"]["message"]


def test_engine_failure_is_a_503_and_the_next_request_is_answered():
    calls = []

    async def answer(question):
        calls.append(question)
        if len(calls) == 1:
            raise RuntimeError("ActorDiedError: the engine replica died twice")
        return RESULT

    api = _api(answer)
    status, payload, headers = _call(api, chat("What is 2 + 2?"))
    assert status == 503 and payload["error"]["code"] == "engine_unavailable" and headers["Retry-After"] == "1"
    status, payload, _ = _call(api, chat("What is 2 + 2?", mapoco={"transcript": True}))
    assert status == 200 and payload["choices"][0]["message"]["content"] == "\\boxed{4}"
    assert payload["object"] == "chat.completion" and payload["model"] == "team-x"
    assert payload["mapoco"]["discussion"] == [] and payload["mapoco"]["seed"] == 7  # the run's seed by default
    # the question id is the text's hash unless the request names it: same question, same id, same seeds
    assert calls[0].id == calls[1].id and calls[1].id.startswith("chat-") and calls[1].text == "What is 2 + 2?"


def test_question_is_the_last_user_message_and_ids_seeds_pass_through():
    seen = []

    async def answer(question):
        seen.append(question)
        return RESULT

    body = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
                         {"role": "assistant", "content": "x"},
                         {"role": "user", "content": [{"type": "text", "text": " What is 3 + 4? "}]}],
            "seed": 11, "mapoco": {"id": "q-1"}, "model": "team-x", "temperature": 0.2}
    status, payload, _ = _call(_api(answer), body)
    assert status == 200 and "discussion" not in payload["mapoco"]  # the transcript only when asked for
    assert (seen[0].text, seen[0].id, seen[0].seed) == ("What is 3 + 4?", "q-1", 11)


def test_bearer_token_auth_and_routes():
    from mapoco.serving.openai_api import token_digest

    async def answer(question):
        return RESULT

    api = _api(answer, token_digest(TOKEN))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
            status, payload, out_headers = _call(api, chat("2+2"), method, path, headers)
            assert status == 401 and out_headers["WWW-Authenticate"] == "Bearer" and payload["error"]["message"]
    ok = {"authorization": f"Bearer {TOKEN}"}
    assert _call(api, chat("2+2"), headers=ok)[0] == 200
    status, payload, _ = _call(api, b"", "GET", "/v1/models", ok)
    assert status == 200 and [m["id"] for m in payload["data"]] == ["team-x"]
    assert _call(api, b"", "GET", "/v1/chat/completions", ok)[0] == 405
    assert _call(api, b"", "GET", "/v2/other", ok)[0] == 404


def test_conductor_answers_carry_the_workflow():
    """The conductor path of the served team, with a stand-in for the rollout (its own tests run it for real)."""
    from mapoco.conductor.rollout import (
        ConductorRecord,
        ConductorResult,
        ConductorTurn,
        Job,
    )
    from mapoco.conductor.workers import Reply
    from mapoco.conductor.workflow import Parsed, Plan, Step
    from mapoco.serving.served_team import Question, ServedTeam

    plan = Plan((Step(0, "add the numbers", False),))

    class Runner:
        def rollout(self, problems, seed, verify=True):
            assert not verify and seed == 3  # no gold answer to verify against
            records = []
            for i, problem in enumerate(problems):
                parsed = Parsed(plan) if i == 0 else Parsed(None, "unequal lists")
                job = Job(problem, plan, [0], seed, [Reply("so \\boxed{7}", tokens=4, cost=1.5)]) if i == 0 else None
                records.append(ConductorRecord(problem.id, ["adder"], [0], [ConductorTurn([1, 2, 3], [4, 5], [0.0, 0.0],
                                                                                          plan.lists(), parsed)],
                                               job, "7" if i == 0 else None, False, 0.0, job.cost() if job else 0.0))
            return ConductorResult(list(problems), records)

    served = object.__new__(ServedTeam)  # no engines: only the answer assembly is under test
    served.kind, served.runner = "math", Runner()
    good, malformed = served.answer([Question("a", "What is 3 + 4?", 3), Question("b", "?", 3)])
    assert (good["content"], good["answer"], good["batch"]) == ("\\boxed{7}", "7", 2)
    assert good["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    workflow = good["transcript"]["workflow"]
    assert workflow["steps"][0]["response"] == "so \\boxed{7}" and workflow["pool"] == ["adder"]
    assert workflow["steps"][0]["cost"] == 1.5 and workflow["cost"] == 1.5  # what the answer cost, step by step
    assert "gold" not in workflow and "reward" not in workflow
    assert (malformed["content"], malformed["answer"]) == ("[malformed workflow]", None)


# ---------------------------------------------------------------- configuration
def _fake_run(root: Path, *steps: int, complete: bool = True) -> Path:
    """A run directory as Hydra and the trainer leave it (interpolations in the saved config unresolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mapoco.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        conf = compose("config", overrides=["team=tiny2", "turns=2", "command=train"])  # output_dir: ${now:...}
    (root / ".hydra").mkdir(parents=True)
    OmegaConf.save(conf, root / ".hydra" / "config.yaml")
    for step in steps:
        folder = root / "checkpoints" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
            (folder / "COMPLETE").write_text("")
    return root


def test_config_comes_from_the_run_and_serve_settings_from_the_command(tiny_models, tmp_path):
    from mapoco.config import ConfigError
    from mapoco.serving.restore import load_config

    run = _fake_run(tmp_path / "run", 1, 2)
    cfg, path = load_config(str(run), {"port": 9123, "api_key_env": None}, None, ["seed=5", "serve.port=1",
                                                                                   "checkpoint=elsewhere"])
    assert path == (run / "checkpoints" / "step_000002").resolve()  # the latest complete checkpoint
    assert (cfg.command, cfg.turns, cfg.team.name, cfg.seed, cfg.serve.port) == ("serve", 2, "tiny2", 5, 9123)
    cfg, path = load_config(str(run / "checkpoints" / "step_000001"))  # a checkpoint folder itself
    assert path.name == "step_000001" and cfg.checkpoint == str(path)
    with pytest.raises(ConfigError, match="takes the team, task and method from the checkpoint"):
        load_config(str(run), overrides=["team=tiny_hetero"])
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        load_config(str(_fake_run(tmp_path / "partial", 3, complete=False)))
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        load_config(str(tmp_path / "partial" / "checkpoints" / "step_000003"))
    with pytest.raises(ConfigError, match="api_key_env"):
        load_config(str(run), {"api_key_env": "MAPOCO_TEST_UNSET_TOKEN_VAR"})
    with pytest.raises(ConfigError, match="serve.max_batch_size"):
        load_config(str(run), {"max_batch_size": 0})


def test_serve_command_without_a_checkpoint_is_a_config_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mapoco", "serve", f"output_dir={tmp_path / 'out'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config error: checkpoint=None" in proc.stderr


# ---------------------------------------------------------------- the served app (real engines, Ray Serve)
@dataclass
class TrainedRun:
    run_dir: Path
    problems: list
    before: list  # mapoco eval's discussion of each problem (alone, as a request is) with the base weights
    after: list  # ... and with the trained weights, on the trainer's engines


@pytest.fixture(scope="module")
def trained(hetero_team, learner_pool, tmp_path_factory):
    """One training step on the session's team, checkpointed; `mapoco eval`'s discussion of two questions before and
    after it. The team's engines serve the base weights again afterwards, as the other modules expect."""
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mapoco.cli import CONF_DIR
    from mapoco.evaluation.evaluate import discuss_in_batches
    from mapoco.tasks import load_task
    from mapoco.training.trainer import Trainer
    from mapoco.weights.payload import pack

    run_dir = tmp_path_factory.mktemp("served-run")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):  # what Hydra saves for the run
        conf = compose("config", overrides=[*RUN, "command=train", f"output_dir={run_dir}"])
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(conf, run_dir / ".hydra" / "config.yaml")
    cfg = compose_config(*RUN, "command=train", f"output_dir={run_dir}")
    problems = load_task(cfg.task).problems[:2]
    trainer = Trainer(cfg, run_dir, team=hetero_team, learners=learner_pool)
    base = trainer.policies[0].group.weights("float32")
    try:
        before = [discuss_in_batches(hetero_team, [p], cfg, trainer.verifier) for p in problems]
        trainer.train_step()
        trainer.step += 1
        trainer.save()
        after = [discuss_in_batches(hetero_team, [p], cfg, trainer.verifier) for p in problems]
    finally:
        trainer.close()
        hetero_team.agents[0].engines.push_weights(pack(base, torch.float32))
    yield TrainedRun(run_dir, problems, before, after)


@pytest.fixture(scope="module")
def served(trained):
    import httpx
    from ray import serve

    from mapoco.serving.restore import load_config
    from mapoco.serving.serve import start
    from mapoco.training.learner import free_port

    os.environ[TOKEN_ENV] = TOKEN
    cfg, path = load_config(str(trained.run_dir), {"port": free_port(), "api_key_env": TOKEN_ENV,
                                                   "max_input_chars": MAX_INPUT_CHARS, "batch_wait_timeout_s": 0.2})
    url = start(cfg, path)
    client = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        yield client, trained.run_dir.name
    finally:
        client.close()
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)


def _texts(result, turns=2, agents=2):
    return [[result.records[(0, a, t)].text for a in range(agents)] for t in range(turns)]


@slow
def test_served_answer_is_mapoco_evals_on_the_same_question_and_seed(served, trained):
    from mapoco.evaluation.metrics import team_answer

    client, model = served
    trained_differs = False
    for q, problem in enumerate(trained.problems):
        reply = client.post("/chat/completions", json=chat(problem.question, model=model,
                                                           mapoco={"id": problem.id, "transcript": True}))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        served_texts = [[answer["text"] for answer in turn] for turn in body["mapoco"]["discussion"]]
        assert served_texts == _texts(trained.after[q])  # the checkpoint's weights, the eval's per-request seeds
        final = [trained.after[q].records[(0, a, 1)].answer for a in range(2)]
        assert body["mapoco"]["answer"] == team_answer(final, problem.id)
        if body["mapoco"]["answer"] is not None:
            assert body["choices"][0]["message"]["content"] == f"\\boxed{{{team_answer(final, problem.id)}}}"
        assert body["usage"]["completion_tokens"] > 0 and body["mapoco"]["seed"] == 0
        trained_differs |= served_texts[0][0] != _texts(trained.before[q])[0][0]
    assert trained_differs, "agent 0 answered as the base model: the trained weights were not served"


@slow
def test_concurrent_requests_are_all_answered_in_shared_batches(served, trained):
    from mapoco.tasks import load_task

    client, _ = served
    problems = [*trained.problems, *load_task(compose_config(*RUN).task).problems[8:38]]  # 32 questions

    def ask(problem):
        return client.post("/chat/completions", json=chat(problem.question, mapoco={"id": problem.id,
                                                                                    "transcript": True}))

    start = time.perf_counter()
    with ThreadPoolExecutor(len(problems)) as pool:
        replies = list(pool.map(ask, problems))
    seconds = time.perf_counter() - start
    assert [r.status_code for r in replies] == [200] * len(problems)
    bodies = [r.json() for r in replies]
    assert all(b["choices"][0]["message"]["content"] and b["mapoco"]["question_id"] == p.id
               for b, p in zip(bodies, problems))
    batches = [b["mapoco"]["batch"] for b in bodies]
    assert max(batches) > 1, f"every request ran alone: {batches}"
    for q, body in enumerate(bodies[: len(trained.problems)]):  # per-request seeds: batched as when alone
        texts = [[answer["text"] for answer in turn] for turn in body["mapoco"]["discussion"]]
        assert texts == _texts(trained.after[q])
    print(f"32 concurrent requests in {seconds:.1f}s, batch sizes {sorted(set(batches))}")


@slow
def test_auth_bad_requests_and_models_on_the_app(served):
    import httpx

    client, model = served
    bare = httpx.Client(base_url=str(client.base_url), timeout=60)
    try:
        assert bare.post("/chat/completions", json=chat("2+2")).status_code == 401
        wrong = bare.post("/chat/completions", json=chat("2+2"), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert bare.get("/models").status_code == 401
    finally:
        bare.close()
    for body, status, code in BAD_REQUESTS:
        if isinstance(body, bytes):
            reply = client.post("/chat/completions", content=body, headers={"Content-Type": "application/json"})
        else:
            reply = client.post("/chat/completions", json=body)
        assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), (body, reply.text)
    models = client.get("/models")
    assert models.status_code == 200
    (card,) = models.json()["data"]
    assert card["id"] == model and card["mapoco"]["method"] == "discussion" and card["mapoco"]["turns"] == 2
    assert card["mapoco"]["checkpoint"] == "step_000001"


@slow
def test_a_killed_engine_restarts_with_the_trained_weights(served, trained):
    from ray import serve

    from mapoco.serving.serve import APP_NAME

    client, _ = served
    handle = serve.get_app_handle(APP_NAME)
    pids = handle.engine_pids.remote().result()
    os.kill(pids[0], signal.SIGKILL)  # agent 0's (trained) engine, started by this module's app
    problem = trained.problems[0]
    reply = client.post("/chat/completions", json=chat(problem.question, mapoco={"id": problem.id,
                                                                                  "transcript": True}))
    assert reply.status_code == 200, reply.text
    served_texts = [[answer["text"] for answer in turn] for turn in reply.json()["mapoco"]["discussion"]]
    assert served_texts == _texts(trained.after[0])
    assert handle.engine_pids.remote().result()[0] != pids[0]


@slow
def test_the_readme_serve_block_runs_as_written(trained, tmp_path):
    """README's "Serve what you trained" block, as a user runs it right after `make demo`: in a project folder whose
    `outputs/demo` is a trained run with its last checkpoint (this module's one-step run, copied there), it starts
    `mapoco serve` on 127.0.0.1:8000 with a fresh token, waits for it, gets the answer with its transcript, and
    stops it with SIGTERM (the block fails if the server exits with an error)."""
    import shutil

    from conftest import readme_block, run_block

    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    shutil.copytree(trained.run_dir, tmp_path / "outputs" / "demo")
    proc = run_block(readme_block("serve"), timeout_s=600, cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    reply = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert reply["object"] == "chat.completion" and reply["model"] == "demo", reply
    assert reply["choices"][0]["message"]["content"] and len(reply["mapoco"]["discussion"]) == 2
    assert "stopping" in proc.stdout  # SIGTERM reached the server, which shut its app down

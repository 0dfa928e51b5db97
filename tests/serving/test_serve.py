"""`mapoco serve`: a trained tiny team behind Ray Serve's OpenAI-compatible endpoint.

One module-wide app: a one-step training run (agent 0 trained at a high learning rate, agent 1 a frozen partner)
checkpoints, and the app serves that checkpoint on 127.0.0.1 with a bearer token. The pure request handling
(validation, auth, 503 on engine failures) is also tested without Ray.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
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
    (chat("2+2", seed="x"), 400, "invalid_value"),
    (chat("2+2", n=0), 400, "invalid_value"),
    (chat("2+2", n=9), 400, "invalid_value"),
    (chat("2+2", temperature=3), 400, "invalid_value"),
    (chat("2+2", top_p=0), 400, "invalid_value"),
    (chat("2+2", max_tokens=0), 400, "invalid_value"),
    (chat("2+2", max_tokens=10_000_000), 400, "invalid_value"),
    (chat("2+2", stop=[""]), 400, "invalid_value"),
    (chat("2+2", stop=["a", "b", "c", "d", "e"]), 400, "invalid_value"),
    (chat("2+2", stream="yes"), 400, "invalid_value"),
    (chat("2+2", stream_options={"include_usage": True}), 400, "invalid_value"),  # without stream=true
    (chat("2+2", logprobs=True), 400, "unsupported_parameter"),
    (chat("2+2", tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter"),
    (chat("2+2", presence_penalty=0.5), 400, "unsupported_parameter"),
    (chat("2+2", best_of=2), 400, "unsupported_parameter"),
    (chat("2+2", mapoco={"transcript": "yes"}), 400, "invalid_value"),
]


@pytest.mark.parametrize("body,status,code", BAD_REQUESTS)
def test_bad_requests_get_a_clear_4xx(body, status, code):
    async def answer(question):
        raise AssertionError("a bad request must not reach the team")

    got, payload, _ = _call(_api(answer), body)
    assert (got, payload["error"]["code"]) == (status, code)
    assert payload["error"]["message"]
    if code in ("invalid_value", "unsupported_parameter"):  # the key to fix, as OpenAI names it
        assert payload["error"]["param"].split("[")[0].split(".")[0] in {*body, "messages"}, payload


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
            "seed": 11, "mapoco": {"id": "q-1"}, "model": "team-x", "user": "u-1"}
    status, payload, _ = _call(_api(answer), body)
    assert status == 200 and "discussion" not in payload["mapoco"]  # the transcript only when asked for
    assert (seen[0].text, seen[0].id, seen[0].seed, seen[0].sampling) == ("What is 3 + 4?", "q-1", 11, ())


def test_sampling_parameters_reach_every_agent_and_n_asks_n_seeds():
    """temperature, top_p, max_tokens (or max_completion_tokens) and stop become each agent's sampling for the
    request; n > 1 is n discussions seeded seed, seed + 1, ...; a conductor refuses sampling it was not trained
    with."""
    seen = []

    async def answer(question):
        seen.append(question)
        return {**RESULT, "content": f"\\boxed{{{question.seed}}}"}

    body = chat("What is 3 + 4?", seed=5, n=3, temperature=0, top_p=0.5, max_completion_tokens=7, stop="\n\n")
    status, payload, _ = _call(_api(answer), body)
    assert status == 200 and [q.seed for q in seen] == [5, 6, 7] and len({q.id for q in seen}) == 1
    assert dict(seen[0].sampling) == {"temperature": 0.0, "top_p": 0.5, "max_new_tokens": 7, "stop": ("\n\n",)}
    assert [c["message"]["content"] for c in payload["choices"]] == ["\\boxed{5}", "\\boxed{6}", "\\boxed{7}"]
    assert [c["index"] for c in payload["choices"]] == [0, 1, 2]
    assert payload["usage"]["total_tokens"] == 3 * RESULT["usage"]["total_tokens"]
    assert [c["seed"] for c in payload["mapoco"]["choices"]] == [5, 6, 7]

    from mapoco.config import ServeConfig
    from mapoco.serving.openai_api import ChatApi

    conductor = ChatApi(ServeConfig(), "team-x", {}, None, 7, answer, sampling=False)
    status, payload, _ = _call(conductor, chat("2+2", temperature=0.5))
    assert status == 400 and payload["error"]["param"] == "temperature"
    assert _call(conductor, chat("2+2", n=2))[0] == 200


def _events(api, body):
    """A streamed reply's events, parsed, and the raw lines."""
    async def read():
        status, stream, headers = await api.handle("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
        assert status == 200 and not isinstance(stream, dict), stream
        return [line async for line in stream]

    lines = asyncio.run(read())
    lines = [line for chunk in lines for line in chunk.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]], lines


def test_a_streamed_reply_sends_each_turn_as_it_completes_then_the_answer():
    async def answer(question):
        for turn in (1, 2):
            for agent in (0, 1):
                question.emit({"type": "turn", "turn": turn, "agent": agent, "name": f"agent_{agent}",
                               "text": f"t{turn}a{agent}", "answer": "4", "finish_reason": "stop"})
            await asyncio.sleep(0)  # the batch's thread, between turns
        return RESULT

    events, _ = _events(_api(answer), chat("What is 2 + 2?", stream=True, stream_options={"include_usage": True}))
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    steps = [e["mapoco"]["text"] for e in events if e.get("mapoco", {}).get("type") == "turn"]
    assert steps == ["t1a0", "t1a1", "t2a0", "t2a1"]
    assert [d["reasoning_content"] for d in deltas[1:5]] == [f"[turn {t}, agent_{a}] t{t}a{a}\n"
                                                            for t in (1, 2) for a in (0, 1)]
    assert "".join(d.get("content", "") for d in deltas) == RESULT["content"]  # what the non-streamed reply says
    finish = events[-2]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["mapoco"]["answer"] == "4"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == RESULT["usage"]


def test_a_stream_whose_client_leaves_cancels_its_questions_and_an_engine_failure_is_an_error_event():
    from mapoco.serving.openai_api import ApiError

    started, questions = asyncio.Event(), []

    async def answer(question):
        questions.append(question)
        started.set()
        await asyncio.sleep(60)  # a discussion still running when the client leaves
        return RESULT

    async def leave():
        api = _api(answer)
        _, stream, _ = await api.handle("POST", "/v1/chat/completions", {}, json.dumps(
            chat("2+2", stream=True, n=2)).encode())
        first = await stream.__anext__()
        await started.wait()
        await stream.aclose()  # what the server does when the client's connection closes
        return first

    assert '"role": "assistant"' in asyncio.run(leave())
    assert len(questions) == 2 and not any(q.wanted for q in questions)  # the batch skips their next turns

    async def failing(question):
        raise RuntimeError("ActorDiedError: the engine replica died twice")

    events, _ = _events(_api(failing), chat("2+2", stream=True))
    assert events[-1]["error"]["code"] == "engine_unavailable"
    assert isinstance(ApiError(503, "x", "y").body()["error"], dict)


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
        def rollout(self, problems, seed, verify=True, on_step=None):
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
    served.kind, served.runner, served.active = "math", Runner(), {}
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
    harness: object  # mapoco eval's discussion of HARNESS_QUESTIONS, each known by its text's hash as served


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
        harness = discuss_in_batches(hetero_team, harness_problems(cfg), cfg, trainer.verifier)
    finally:
        trainer.close()
        hetero_team.agents[0].engines.push_weights(pack(base, torch.float32))
    yield TrainedRun(run_dir, problems, before, after, harness)


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
def test_the_readme_serve_block_runs_as_written(trained, tmp_path):
    """README's "Serve what you trained" block, as a user runs it right after `make demo`: in a project folder whose
    `outputs/demo` is a trained run with its last checkpoint (this module's one-step run, copied there), it starts
    `mapoco serve` on 127.0.0.1:8000 with a fresh token, waits for it, gets the answer with its transcript, streams
    it with the openai client, scores the team on 4 GSM8K questions with lm-eval, and stops it with SIGTERM (the
    block fails if the server exits with an error). First of the served tests: its own Ray instance and Serve app
    start before the module's app takes CPU beside them."""
    import shutil

    from conftest import readme_block, run_block

    project = tmp_path / "project"  # beside ../shared/data, as the clone is
    (tmp_path / "shared").symlink_to((ROOT.parent / "shared").resolve())
    project.mkdir()
    for name in (".venv", "experiments"):
        (project / name).symlink_to(ROOT / name)
    shutil.copytree(trained.run_dir, project / "outputs" / "demo")
    proc = run_block(readme_block("serve"), timeout_s=600, cwd=project)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("{"))
    reply = json.loads(lines[at])
    assert reply["object"] == "chat.completion" and reply["model"] == "demo", reply
    assert reply["choices"][0]["message"]["content"] and len(reply["mapoco"]["discussion"]) == 2
    # the openai client's stream: every agent's turn-1 answer, then turn 2's, then the unstreamed reply's content
    streamed = "\n".join(lines[at + 1 :])
    turns = [f"[turn {t + 1}, {a['name']}] {a['text']}" for t, turn in enumerate(reply["mapoco"]["discussion"])
             for a in turn]
    where = [streamed.find(turn) for turn in turns]
    content = streamed.find(reply["choices"][0]["message"]["content"], max(where))
    assert -1 not in where and where == sorted(where) and content > max(where), streamed
    assert re.search(r"\|mapoco_gsm8k\|.*\|exact_match\|", streamed), streamed  # lm-eval's table of the team
    assert "stopping" in proc.stdout  # SIGTERM reached the server, which shut its app down


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
def test_the_openai_client_streams_each_turn_before_the_answer_it_would_get_unstreamed(served, trained):
    """``openai``'s ``stream=True``: every agent's turn-1 answer arrives before the team's answer (as
    ``reasoning_content``, with the step in ``mapoco``), the content is the unstreamed reply's for the same question
    and seed, the turns are mapoco eval's, and the usage chunk comes last."""
    from openai import OpenAI

    client, model = served
    problem = trained.problems[0]
    body = chat(problem.question, model=model, seed=0, mapoco={"id": problem.id})
    plain = client.post("/chat/completions", json=body).json()
    api = OpenAI(base_url=str(client.base_url), api_key=TOKEN, max_retries=0)
    start, arrivals = time.perf_counter(), []
    stream = api.chat.completions.create(model=model, messages=body["messages"], seed=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"mapoco": body["mapoco"]})
    for chunk in stream:
        arrivals.append((time.perf_counter() - start, chunk))
    steps = [(t, c.model_extra["mapoco"]) for t, c in arrivals if (c.model_extra or {}).get("mapoco", {}).get("type")]
    content = [(t, c.choices[0].delta.content) for t, c in arrivals if c.choices and c.choices[0].delta.content]
    assert [(e["turn"], e["agent"]) for _, e in steps] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert [e["text"] for _, e in steps] == [t for turn in _texts(trained.after[0]) for t in turn]
    assert max(t for t, e in steps if e["turn"] == 1) < content[0][0]  # turn 1 came before the answer
    assert "".join(text for _, text in content) == plain["choices"][0]["message"]["content"]
    finish = [c for _, c in arrivals if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "stop"
    assert arrivals[-1][1].usage.completion_tokens == plain["usage"]["completion_tokens"]
    print(f"first step after {steps[0][0]:.2f}s, the answer after {content[0][0]:.2f}s")


@slow
def test_a_client_leaving_mid_stream_disturbs_no_one_and_leaves_nothing_in_the_engines(served, trained):
    """A streaming client that leaves after the first chunk, while a batch of other clients' questions forms: the
    server notices (its stream ends), the others are answered, a later request still gets mapoco eval's discussion,
    and the engines hold no request."""
    from ray import serve

    from mapoco.serving.serve import APP_NAME

    client, _ = served
    handle = serve.get_app_handle(APP_NAME)
    before = handle.streams_left.remote().result()
    problem = trained.problems[1]

    def ask(question):
        return client.post("/chat/completions", json=chat(question))

    with ThreadPoolExecutor(12) as pool:
        replies = [pool.submit(ask, p.question) for p in load_problems(12)]
        with client.stream("POST", "/chat/completions", json=chat(problem.question, stream=True)) as stream:
            first = next(stream.iter_lines())
        assert first.startswith("data: ") and '"role": "assistant"' in first
        assert all(r.result().status_code == 200 for r in replies)
    body = client.post("/chat/completions", json=chat(problem.question, mapoco={"id": problem.id,
                                                                                "transcript": True})).json()
    assert [[a["text"] for a in turn] for turn in body["mapoco"]["discussion"]] == _texts(trained.after[1])
    after = handle.streams_left.remote().result()
    assert after["left"] == before["left"] + 1 and after["unfinished"] == 0


def test_a_question_whose_client_leaves_gets_no_more_turns(hetero_team):
    """The batch's side, on real engines: a client leaves when its first turn arrives; its question is not sent to
    the engines again, its batch-mates get every turn, and they are what they would be without it."""
    from mapoco.serving.served_team import Listener, Question, ServedTeam

    class LeavesAfterTurnOne(Listener):
        def emit(self, event):
            self.cancelled.set()

    cfg = compose_config(*RUN)
    served = object.__new__(ServedTeam)  # the session team's engines as they are: the batch logic is under test
    served.cfg, served.team, served.kind, served.runner, served.dropped = cfg, hetero_team, "math", None, 0
    served.discussion, served.active = None, {}
    problems = load_problems(3)
    questions = [Question(p.id, p.question, 0) for p in problems]
    alone = served.answer(questions[1:])
    together = served.answer([replace(questions[0], listener=LeavesAfterTurnOne(None, None, 0)), *questions[1:]])
    assert together[0] == {"dropped": True, "batch": 3} and served.dropped == 1
    assert [t["transcript"] for t in together[1:]] == [a["transcript"] for a in alone]
    assert served.unfinished_requests() == 0


def harness_problems(cfg) -> list:
    """Questions as a client that cannot send mapoco.id asks them: each known by its text's hash."""
    from mapoco.serving.served_team import question_id
    from mapoco.tasks import Problem, load_task

    return [Problem(question_id(p.question), p.question, p.gold, p.kind) for p in load_task(cfg.task).problems[2:18]]


@slow
def test_lm_eval_scores_a_served_team_as_mapoco_eval_does(served, trained, tmp_path):
    """lm-eval's `local-chat-completions` with the GSM8K task file of experiments/lm_eval, pointed at the testbed's
    questions and sent the run's sampling (temperature, max_gen_toks) and seed: the answers it extracts are the team
    answers of mapoco eval's discussions of the same questions with the same seed, and so is its accuracy."""
    import yaml

    from mapoco.evaluation.metrics import team_answer

    client, model = served
    cfg = compose_config(*RUN)
    (sampling,) = {a.sampling for a in cfg.team.agents}
    problems = harness_problems(cfg)
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": p.gold}) + "\n" for p in problems))
    task = yaml.safe_load((ROOT / "experiments" / "lm_eval" / "mapoco_gsm8k.yaml").read_text())
    task.update(task="mapoco_testbed", doc_to_target="{{answer}}", dataset_kwargs={"data_files": {"test": str(data)}})
    task["generation_kwargs"].update(temperature=sampling.temperature, max_gen_toks=sampling.max_new_tokens)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mapoco_testbed.yaml").write_text(yaml.safe_dump(task))
    model_args = (f"model={model},base_url={str(client.base_url).rstrip('/')}/chat/completions,num_concurrent=8,max_retries=1,"
                  f"tokenized_requests=False,tokenizer_backend=None,seed={cfg.seed}")
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "lm_eval"), "--model", "local-chat-completions",
                           "--model_args", model_args, "--tasks", "mapoco_testbed",
                           "--include_path", str(tmp_path / "tasks"), "--apply_chat_template",
                           "--output_path", str(tmp_path / "out"), "--log_samples"],
                          env={**os.environ, "OPENAI_API_KEY": TOKEN}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["mapoco_testbed"]["exact_match,boxed"]
    (samples,) = (tmp_path / "out").rglob("samples_mapoco_testbed_*.jsonl")
    extracted = {json.loads(line)["doc"]["question"]: json.loads(line)["filtered_resps"][0]
                 for line in samples.read_text().splitlines()}
    result, last = trained.harness, cfg.turns - 1
    expected, right = [], []
    for q, problem in enumerate(problems):
        final = [result.records[(q, a, last)] for a in range(2)]
        answer = team_answer([r.answer for r in final], problem.id)
        expected.append(answer if answer is not None else "[invalid]")
        right.append(any(r.correct and r.answer == answer for r in final) if answer is not None else False)
    assert [extracted[p.question] for p in problems] == expected and set(expected) != {"[invalid]"}
    assert accuracy == pytest.approx(sum(right) / len(right))
    print(f"lm-eval exact_match {accuracy:.3f} on {len(problems)} questions, mapoco eval {sum(right) / len(right):.3f}")


def load_problems(count: int) -> list:
    from mapoco.tasks import load_task

    return load_task(compose_config(*RUN).task).problems[8 : 8 + count]


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

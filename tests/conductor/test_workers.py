"""``HttpWorker`` against a real OpenAI-compatible server (vLLM's own, serving tiny-qwen on CPU) and against a stdlib
server that misbehaves (too slow, HTTP 500, not JSON): every thread gets a reply, failures as error replies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from mapoco.conductor.workers import HttpWorker, Reply
from mapoco.config import HttpWorkerConfig, PriceConfig

KEY_ENV, KEY = "MAPOCO_TEST_WORKER_KEY", "sk-mapoco-test"
THREADS = [[{"role": "user", "content": f"Calculate {i} + {i + 3}."}] for i in range(8)]
SERVER_START_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ask(base_url: str, threads: list[list[dict[str, str]]] = THREADS, seeds: list[int] | None = None,
         **cfg: object) -> list[Reply]:
    worker = HttpWorker(HttpWorkerConfig(**{"name": "w", "base_url": base_url, "model": "m", **cfg}))
    try:
        return worker.submit(threads, seeds or list(range(len(threads)))).result()
    finally:
        worker.close()


def _assert_all_failed(replies: list[Reply], why: str) -> None:
    assert len(replies) == len(THREADS)
    for reply in replies:
        assert reply.error is not None and why in reply.error
        assert reply.text == f"[worker error: {reply.error}]"


# --- a stdlib server that misbehaves on purpose --------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    """``/<mode>/v1/chat/completions``: ``ok`` echoes the request (and its Authorization header) as the reply."""

    release: threading.Event  # set at teardown: ``slow`` requests stop waiting

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.path.split("/")[1]
        if mode == "slow":
            self.release.wait(10)
            self._send(200, b'{"choices": [{"message": {"content": "too late"}}]}')
        elif mode == "fail":
            self._send(500, b"upstream exploded")
        elif mode == "notjson":
            self._send(200, b"<html>surprise</html>")
        elif mode == "nochoices":
            self._send(200, b'{"object": "error"}')
        elif mode == "null":
            self._send(200, b'{"choices": [{"message": {"role": "assistant", "content": null}}]}')
        elif mode == "usage":  # charged by the tokens it says it generated: the request's max_tokens
            tokens = json.loads(body)["max_tokens"]
            self._send(200, json.dumps({"choices": [{"message": {"content": "ok"}}],
                                        "usage": {"completion_tokens": tokens}}).encode())
        else:
            echo = {"request": json.loads(body), "authorization": self.headers.get("Authorization")}
            self._send(200, json.dumps({"choices": [{"message": {"content": json.dumps(echo)}}]}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    release = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"release": release}))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_request_body_order_and_seeds(fake_server: str):
    replies = _ask(f"{fake_server}/ok/v1/", seeds=[10 + i for i in range(8)], max_tokens=7, temperature=0.5,
                   concurrency=3)
    assert [r.error for r in replies] == [None] * 8
    echoes = [json.loads(r.text) for r in replies]
    assert [e["request"]["messages"] for e in echoes] == THREADS  # one reply per thread, in order
    assert [e["request"]["seed"] for e in echoes] == list(range(10, 18))
    assert {(e["request"]["model"], e["request"]["max_tokens"], e["request"]["temperature"]) for e in echoes} == {
        ("m", 7, 0.5)}
    assert {e["authorization"] for e in echoes} == {None}


def test_api_key_is_sent_as_bearer_header(fake_server: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    replies = _ask(f"{fake_server}/ok/v1", THREADS[:2], api_key_env=KEY_ENV)
    assert {json.loads(r.text)["authorization"] for r in replies} == {f"Bearer {KEY}"}


def test_empty_batch(fake_server: str):
    assert _ask(f"{fake_server}/ok/v1", []) == []


def test_timeout_gives_error_replies(fake_server: str):
    start = time.monotonic()
    replies = _ask(f"{fake_server}/slow/v1", timeout_s=0.3, concurrency=8)
    assert time.monotonic() - start < 5
    _assert_all_failed(replies, "timed out after 0.3 s")
    assert all(r.text.startswith("[worker error: timed out") for r in replies)


def test_http_500_gives_error_replies(fake_server: str):
    replies = _ask(f"{fake_server}/fail/v1")
    _assert_all_failed(replies, "HTTP 500")
    assert "upstream exploded" in replies[0].text


@pytest.mark.parametrize("mode,why", [("notjson", "JSONDecodeError"), ("nochoices", "KeyError")])
def test_bad_reply_gives_error_replies(fake_server: str, mode: str, why: str):
    _assert_all_failed(_ask(f"{fake_server}/{mode}/v1"), why)


def test_null_content_is_an_empty_reply(fake_server: str):
    assert _ask(f"{fake_server}/null/v1", THREADS[:2]) == [Reply(""), Reply("")]


def test_each_reply_costs_the_call_and_its_generated_tokens(fake_server: str):
    price = PriceConfig(per_call=0.5, per_token=0.25)
    replies = _ask(f"{fake_server}/usage/v1", THREADS[:2], max_tokens=6, price=price)
    assert [(r.tokens, r.cost) for r in replies] == [(6, 0.5 + 6 * 0.25)] * 2
    no_usage = _ask(f"{fake_server}/ok/v1", THREADS[:1], price=price)  # the endpoint reports no usage
    assert [(r.tokens, r.cost) for r in no_usage] == [(0, 0.5)]
    failed = _ask(f"{fake_server}/fail/v1", THREADS[:1], price=price)  # a failed call generated nothing
    assert [(r.error is not None, r.tokens, r.cost) for r in failed] == [(True, 0, 0.5)]


def test_connection_refused_gives_error_replies():
    _assert_all_failed(_ask(f"http://127.0.0.1:{_free_port()}/v1", timeout_s=5), "ConnectError")


# --- vLLM's OpenAI-compatible server -------------------------------------------------------------------------------

def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def vllm_server(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve`` on CPU with tiny-qwen, requiring ``KEY``; its whole process group is killed afterwards."""
    port, log = _free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_models["tiny-qwen"]),
               "--served-model-name", "tiny-qwen", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
               "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
               "--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"]
    # One process (the engine core inside the server's, as in mapoco's engines): a second would import vLLM again.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited with {server.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not up after {SERVER_START_S} s:\n{_tail(log)}")
            try:
                if httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield base_url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)
                server.wait(wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def _vllm(base_url: str, key: str, monkeypatch: pytest.MonkeyPatch, **cfg: object) -> list[Reply]:
    monkeypatch.setenv(KEY_ENV, key)
    return _ask(base_url, model="tiny-qwen", api_key_env=KEY_ENV, max_tokens=24, timeout_s=60, **cfg)


@pytest.mark.slow
def test_vllm_server_answers_a_batch(vllm_server: str, monkeypatch: pytest.MonkeyPatch):
    greedy = _vllm(vllm_server, KEY, monkeypatch, temperature=0.0)
    assert [r.error for r in greedy] == [None] * len(THREADS)
    assert all(r.text.strip() for r in greedy)
    assert all(0 < r.tokens <= 24 for r in greedy)  # vLLM's usage.completion_tokens, within max_tokens
    assert _vllm(vllm_server, KEY, monkeypatch, temperature=0.0) == greedy  # temperature 0: deterministic
    sampled = _vllm(vllm_server, KEY, monkeypatch, temperature=1.0)
    assert [r.error for r in sampled] == [None] * len(THREADS)
    assert _vllm(vllm_server, KEY, monkeypatch, temperature=1.0) == sampled  # same seeds, same samples


@pytest.mark.slow
def test_vllm_server_rejects_a_wrong_key(vllm_server: str, monkeypatch: pytest.MonkeyPatch):
    _assert_all_failed(_vllm(vllm_server, "sk-wrong", monkeypatch), "HTTP 401")
    _assert_all_failed(_ask(vllm_server, model="tiny-qwen"), "HTTP 401")  # no key at all

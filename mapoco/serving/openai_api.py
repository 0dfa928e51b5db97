"""The OpenAI-compatible HTTP layer: routes, bearer-token auth, request parsing with clear 4xx errors, and the
chat-completion and model bodies. No Ray Serve here: testable alone."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mapoco.config import ServeConfig
from mapoco.serving.served_team import Question, question_id

MAX_ID_CHARS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ChatApi:
    """OpenAI-compatible request handling: routing, bearer-token auth, validation, the chat.completion object.
    ``answer`` answers one question (in Serve: joins the replica's next batch); an exception from it is a 503."""

    def __init__(self, cfg: ServeConfig, model_name: str, card: dict[str, Any], digest: str | None, default_seed: int,
                 answer: Callable[[Question], Awaitable[dict[str, Any]]]):
        self.cfg, self.model_name, self.card, self.digest = cfg, model_name, card, digest
        self.default_seed, self.answer = default_seed, answer
        self.created = int(time.time())
        self.max_body = max(1 << 20, 8 * cfg.max_input_chars)  # room for a chat history around the question

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes
                     ) -> tuple[int, dict[str, Any], dict[str, str]]:
        try:
            route = self._route(path)
            self._authorize(headers)
            if route == "models":
                if method != "GET":
                    raise ApiError(405, f"{method} {path}: use GET", "method_not_allowed", headers={"Allow": "GET"})
                return 200, self.models(), {}
            if method != "POST":
                raise ApiError(405, f"{method} {path}: use POST", "method_not_allowed", headers={"Allow": "POST"})
            question, transcript = self.parse(body)
            try:
                result = await self.answer(question)
            except Exception as exc:  # the engines restart themselves on the next call: the app stays up
                cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                print(f"mapoco serve: a batch failed ({cause})", file=sys.stderr, flush=True)
                raise ApiError(503, f"the team could not answer ({cause[:300]}); its engines restart by themselves: "
                                    "retry the request", "engine_unavailable", headers={"Retry-After": "1"}) from None
            return 200, self.completion(question, result, transcript), {}
        except ApiError as err:
            return err.status, err.body(), err.headers
        except Exception as exc:  # a bug, not the client's fault: still an OpenAI-style error body
            return 500, ApiError(500, f"internal error ({type(exc).__name__}: {exc})", "internal_error").body(), {}

    def _route(self, path: str) -> str:
        path = path.rstrip("/")
        if path.endswith("/v1/chat/completions"):
            return "chat"
        if path.endswith("/v1/models"):
            return "models"
        raise ApiError(404, f"no route {path or '/'}: POST .../v1/chat/completions or GET .../v1/models", "not_found")

    def _authorize(self, headers: Mapping[str, str]) -> None:
        if self.digest is None:
            return
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'", "missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token_digest(token.strip()), self.digest):
            raise ApiError(401, "invalid bearer token", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def parse(self, body: bytes) -> tuple[Question, bool]:
        if len(body) > self.max_body:
            raise ApiError(413, f"request body of {len(body)} bytes; at most {self.max_body}", "request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object (an OpenAI chat completion request)", "invalid_json")
        model = data.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r} "
                                "(GET /v1/models)", "model_not_found", "model")
        if data.get("stream"):
            raise ApiError(400, "stream=true is not supported: the answer is the team's after the whole discussion",
                           "unsupported_parameter", "stream")
        if data.get("n", 1) not in (1, None):
            raise ApiError(400, "n must be 1: send one request per sample (seed chooses it)", "unsupported_parameter",
                           "n")
        text = self._question(data.get("messages"))
        seed = data.get("seed")
        if seed is None:
            seed = self.default_seed
        elif not isinstance(seed, int) or isinstance(seed, bool) or abs(seed) >= 2**63:
            raise ApiError(400, f"seed must be an integer, got {seed!r}", "invalid_value", "seed")
        extra = data.get("mapoco") or {}
        if not isinstance(extra, dict):
            raise ApiError(400, "mapoco must be an object: {\"transcript\": true, \"id\": \"...\"}", "invalid_value",
                           "mapoco")
        transcript = extra.get("transcript", False)
        if not isinstance(transcript, bool):
            raise ApiError(400, f"mapoco.transcript must be true or false, got {transcript!r}", "invalid_value",
                           "mapoco.transcript")
        qid = extra.get("id")
        if qid is None:
            qid = question_id(text)
        elif not isinstance(qid, str) or not qid or len(qid) > MAX_ID_CHARS:
            raise ApiError(400, f"mapoco.id must be a non-empty string of at most {MAX_ID_CHARS} characters",
                           "invalid_value", "mapoco.id")
        return Question(qid, text, seed), transcript

    def _question(self, messages: Any) -> str:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects",
                           "invalid_value", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(400, f"messages[{i}] must be an object with a string role", "invalid_value",
                               f"messages[{i}]")
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ApiError(400, "messages holds no user message: the last user message is the question",
                           "invalid_value", "messages")
        i = users[-1]
        content = messages[i].get("content")
        if isinstance(content, list):  # content parts: the text ones, in order
            if not all(isinstance(p, dict) for p in content) or any(p.get("type") != "text" for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_value",
                               f"messages[{i}].content")
            content = "\n".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", "invalid_value", f"messages[{i}].content")
        text = content.strip()
        if not text:
            raise ApiError(400, f"messages[{i}].content is empty: the last user message is the question",
                           "invalid_value", f"messages[{i}].content")
        if len(text) > self.cfg.max_input_chars:
            raise ApiError(400, f"the question has {len(text)} characters; this server takes at most "
                                f"{self.cfg.max_input_chars} (serve.max_input_chars)", "context_length_exceeded",
                           f"messages[{i}].content")
        return text

    def completion(self, question: Question, result: dict[str, Any], transcript: bool) -> dict[str, Any]:
        extra = {"question_id": question.id, "seed": question.seed, "answer": result["answer"],
                 "batch": result.get("batch", 1)}
        if "votes" in result:
            extra["votes"] = result["votes"]
        if transcript:
            extra.update(result["transcript"])
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["content"]},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": result["usage"], "mapoco": extra}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "mapoco", "mapoco": self.card}]}

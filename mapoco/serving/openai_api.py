"""The OpenAI-compatible HTTP layer: routes, bearer-token auth, request parsing with clear 4xx errors (every
parameter applied or refused by name, never dropped), the chat-completion and model bodies, and the streamed
chunks. No Ray Serve here: testable alone."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from mapoco.config import ServeConfig
from mapoco.serving.served_team import Listener, Question, question_id

# The sampling a client may set for its discussion (every agent, every turn), by request key.
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop")

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


@dataclass(frozen=True)
class ChatRequest:
    """A parsed chat-completion request: its ``n`` questions (seeds ``seed``, ``seed + 1``, ...) and how to reply."""

    questions: list[Question]
    transcript: bool = False
    stream: bool = False
    include_usage: bool = False


# Request keys that change nothing in a team's answer: accepted whatever their value.
INFORMATIONAL = {"model", "messages", "user", "metadata", "store", "service_tier"}
# Keys a team cannot honour: refused unless they ask for what the server does anyway (their "off" values).
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False), "logit_bias": ({},), "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0), "response_format": ({"type": "text"},), "modalities": (["text"],)}
MAX_N = 8
MAX_STOP = 4


class ChatApi:
    """OpenAI-compatible request handling: routing, bearer-token auth, validation, the chat.completion object and its
    streamed chunks. ``answer`` answers one question (in Serve: joins the replica's next batch); an exception from it
    is a 503. ``max_tokens`` bounds the per-turn ``max_tokens`` a client may ask for (the engines' context);
    ``sampling`` says whether clients may set sampling at all (a conductor's planner and workers keep theirs)."""

    def __init__(self, cfg: ServeConfig, model_name: str, card: dict[str, Any], digest: str | None, default_seed: int,
                 answer: Callable[[Question], Awaitable[dict[str, Any]]], max_tokens: int = 1 << 20,
                 sampling: bool = True):
        self.cfg, self.model_name, self.card, self.digest = cfg, model_name, card, digest
        self.default_seed, self.answer = default_seed, answer
        self.max_tokens, self.sampling = max_tokens, sampling
        self.created = int(time.time())
        self.left = 0  # streams whose client went away before their reply ended
        self.max_body = max(1 << 20, 8 * cfg.max_input_chars)  # room for a chat history around the question

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes
                     ) -> tuple[int, dict[str, Any] | AsyncIterator[str], dict[str, str]]:
        """(status, JSON body or a stream of server-sent events, headers)."""
        try:
            route = self._route(path)
            self._authorize(headers)
            if route == "models":
                if method != "GET":
                    raise ApiError(405, f"{method} {path}: use GET", "method_not_allowed", headers={"Allow": "GET"})
                return 200, self.models(), {}
            if method != "POST":
                raise ApiError(405, f"{method} {path}: use POST", "method_not_allowed", headers={"Allow": "POST"})
            request = self.parse(body)
            if request.stream:
                return 200, self.stream(request), {"Cache-Control": "no-cache"}
            results = await asyncio.gather(*(self._answer(q) for q in request.questions))
            return 200, self.completion(request, results), {}
        except ApiError as err:
            return err.status, err.body(), err.headers
        except Exception as exc:  # a bug, not the client's fault: still an OpenAI-style error body
            return 500, ApiError(500, f"internal error ({type(exc).__name__}: {exc})", "internal_error").body(), {}

    async def _answer(self, question: Question) -> dict[str, Any]:
        try:
            return await self.answer(question)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engines restart themselves on the next call: the app stays up
            cause = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            print(f"mapoco serve: a batch failed ({cause})", file=sys.stderr, flush=True)
            raise ApiError(503, f"the team could not answer ({cause[:300]}); its engines restart by themselves: "
                                "retry the request", "engine_unavailable", headers={"Retry-After": "1"}) from None

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

    # ------------------------------------------------------------------ the request
    def parse(self, body: bytes) -> ChatRequest:
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
        self._refuse_unsupported(data)
        text = self._question(data.get("messages"))
        seed = data.get("seed")
        if seed is None:
            seed = self.default_seed
        elif not _is_int(seed) or abs(seed) >= 2**63 - MAX_N:
            raise ApiError(400, f"seed must be an integer, got {seed!r}", "invalid_value", "seed")
        n = data.get("n")
        n = 1 if n is None else n
        if not _is_int(n) or not 1 <= n <= MAX_N:
            raise ApiError(400, f"n must be an integer in 1..{MAX_N} (each choice is a discussion of its own, seeded "
                                f"seed, seed + 1, ...), got {n!r}", "invalid_value", "n")
        stream, include_usage = self._stream_options(data)
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
        sampling = tuple(sorted(self._sampling(data).items()))
        return ChatRequest([Question(qid, text, seed + i, sampling) for i in range(n)], transcript, stream,
                           include_usage)

    def _refuse_unsupported(self, data: dict[str, Any]) -> None:
        known = INFORMATIONAL | set(OFF_VALUES) | {"seed", "n", "stream", "stream_options", "mapoco", *SAMPLING_KEYS}
        for key, value in data.items():
            if value is None or key in INFORMATIONAL:
                continue
            if key not in known:
                raise ApiError(400, f"{key} is not supported by a served team (README: the request parameters)",
                               "unsupported_parameter", key)
            if key in OFF_VALUES and value not in OFF_VALUES[key]:
                raise ApiError(400, f"{key}={json.dumps(value)[:80]} is not supported: a team answers in plain text, "
                                    "without token logprobs, tools or penalties", "unsupported_parameter", key)

    def _stream_options(self, data: dict[str, Any]) -> tuple[bool, bool]:
        stream = data.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", "invalid_value", "stream")
        options = data.get("stream_options")
        if options is None:
            return stream, False
        if not stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "invalid_value", "stream_options")
        usage = options.get("include_usage", False) if isinstance(options, dict) else None
        if not isinstance(usage, bool) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options must be {\"include_usage\": true | false}", "invalid_value",
                           "stream_options")
        return stream, usage

    def _sampling(self, data: dict[str, Any]) -> dict[str, Any]:
        """The SamplingConfig fields a client sets, for every agent and turn of its discussion."""
        out: dict[str, Any] = {}
        for key in SAMPLING_KEYS:
            value = data.get(key)
            if value is None:
                continue
            if not self.sampling:
                raise ApiError(400, f"{key} is not supported by a served conductor: its planner and workers sample "
                                    "as they were trained", "unsupported_parameter", key)
            out.update(self._sampling_value(key, value))
        if "max_tokens" in data and "max_completion_tokens" in data and data["max_tokens"] != data[
                "max_completion_tokens"] and None not in (data["max_tokens"], data["max_completion_tokens"]):
            raise ApiError(400, "max_tokens and max_completion_tokens differ: send one", "invalid_value", "max_tokens")
        return out

    def _sampling_value(self, key: str, value: Any) -> dict[str, Any]:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "temperature":
            if not number or not 0 <= value <= 2:
                raise ApiError(400, f"temperature must be a number in 0..2, got {value!r}", "invalid_value", key)
            return {"temperature": float(value)}
        if key == "top_p":
            if not number or not 0 < value <= 1:
                raise ApiError(400, f"top_p must be a number in (0, 1], got {value!r}", "invalid_value", key)
            return {"top_p": float(value)}
        if key in ("max_tokens", "max_completion_tokens"):
            if not _is_int(value) or not 1 <= value <= self.max_tokens:
                raise ApiError(400, f"{key} must be an integer in 1..{self.max_tokens} (each agent's reply at each "
                                    f"turn; the engines' context), got {value!r}", "invalid_value", key)
            return {"max_new_tokens": value}
        stops = [value] if isinstance(value, str) else value
        if stops == []:  # no stop strings: what the run does anyway
            return {}
        if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP
                or not all(isinstance(s, str) and s for s in stops)):
            raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them, got {value!r}",
                           "invalid_value", key)
        return {"stop": tuple(stops)}

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

    # ------------------------------------------------------------------ the reply
    def completion(self, request: ChatRequest, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": result["content"]}, "logprobs": None,
                    "finish_reason": "stop"} for i, result in enumerate(results)]
        extras = [self._extra(q, result, request.transcript) for q, result in zip(request.questions, results)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices, "usage": _total_usage(results),
                "mapoco": extras[0] if len(extras) == 1 else {"choices": extras}}

    @staticmethod
    def _extra(question: Question, result: dict[str, Any], transcript: bool) -> dict[str, Any]:
        extra = {"question_id": question.id, "seed": question.seed, "answer": result["answer"],
                 "batch": result.get("batch", 1)}
        if "votes" in result:
            extra["votes"] = result["votes"]
        if transcript:
            extra.update(result["transcript"])
        return extra

    async def stream(self, request: ChatRequest) -> AsyncIterator[str]:
        """The reply as server-sent chat.completion.chunk events: per choice, the role, then every step of its
        discussion or workflow as it completes (``delta.reasoning_content``, which chat front-ends fold away, and
        the step itself in ``mapoco``), then the answer as ``content`` and the finish; the usage chunk if asked; then
        ``[DONE]``. A client that leaves cancels what its questions have left to do."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        listeners = [Listener(loop, events, i) for i in range(len(request.questions))]
        tasks = [asyncio.ensure_future(self._answer(replace(q, listener=listener)))
                 for q, listener in zip(request.questions, listeners)]
        for i, task in enumerate(tasks):
            task.add_done_callback(lambda _, i=i: events.put_nowait((i, None)))
        chunk = Chunks(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.model_name)
        results: list[dict[str, Any]] = []
        try:
            yield "".join(chunk.sse(i, {"role": "assistant", "content": ""}) for i in range(len(tasks)))
            while len(results) < len(tasks):
                ready = [await events.get()]
                while not events.empty():  # what arrived together leaves together (one message through the proxy)
                    ready.append(events.get_nowait())
                out = []
                for i, event in ready:
                    if event is not None:
                        out.append(chunk.sse(i, {"reasoning_content": step_text(event)}, mapoco=event))
                        continue
                    try:
                        result = tasks[i].result()
                    except ApiError as err:  # headers are sent: the error is an event, as vLLM's server sends it
                        yield "".join(out) + f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"
                        return
                    results.append(result)
                    out.append(chunk.sse(i, {"content": result["content"]}))
                    out.append(chunk.sse(i, {}, "stop", mapoco=self._extra(request.questions[i], result,
                                                                           request.transcript)))
                yield "".join(out)
            if request.include_usage:
                yield f"data: {json.dumps({**chunk.head(), 'choices': [], 'usage': _total_usage(results)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.left += len(results) < len(tasks)
            for listener, task in zip(listeners, tasks):
                listener.cancelled.set()  # read by the batch before each turn or round: a left client's
                task.cancel()             # questions get no more of them

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "mapoco", "mapoco": self.card}]}


@dataclass(frozen=True)
class Chunks:
    """The chat.completion.chunk events of one streamed reply."""

    id: str
    created: int
    model: str

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def sse(self, index: int, delta: dict[str, Any], finish: str | None = None,
            mapoco: dict[str, Any] | None = None) -> str:
        body = {**self.head(), "choices": [{"index": index, "delta": delta, "logprobs": None,
                                            "finish_reason": finish}]}
        if mapoco is not None:
            body["mapoco"] = mapoco
        return f"data: {json.dumps(body)}\n\n"


def step_text(event: dict[str, Any]) -> str:
    """One streamed step as a line of reasoning text."""
    if event["type"] == "turn":
        return f"[turn {event['turn']}, {event['name']}] {event['text']}\n"
    if event["type"] == "plan":
        return f"[round {event['round']}, conductor] {event['text']}\n"
    return f"[round {event['round']}, step {event['step']}, {event['worker']}] {event['text']}\n"


def _total_usage(results: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {key: sum(r["usage"][key] for r in results)
            for key in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

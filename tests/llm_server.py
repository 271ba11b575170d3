"""A real HTTP server on 127.0.0.1 that speaks both LLM wire formats, for tests of ``tools.llm``.

It answers ``POST .../v1/chat/completions`` in the OpenAI chat-completions format and ``POST .../v1/messages`` in the
Anthropic messages format, over real TCP in a thread, so timeouts, dropped sockets and Retry-After are exercised
end to end. Tests script behaviours per request:

    with LLMTestServer() as server:
        server.script(RateLimited(retry_after="2"), Answer('{"ok": true}'))        # any request, in order
        server.script(ServerError(), forever=True, match="variant-b")              # requests whose body has this
        ...
        assert len(server.requests) == 2

Each incoming request takes the next behaviour of the first rule (in the order they were added) whose ``match``
substring occurs in the request body and which still has behaviours left; a rule added with ``forever=True`` repeats
its last behaviour. A request that matches nothing gets a 418 whose message says so, and is counted in
``server.unscripted`` (418 is a 4xx, so a client does not retry it). Every request is recorded with its path,
headers (lower-case names) and body.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"


@dataclasses.dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def wire(self) -> str:
        return "openai" if self.path.endswith(OPENAI_PATH) else "anthropic"


# ---- behaviours ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    """A normal 200 answer with ``content`` as the model's text, in the wire format of the request's path.

    ``finish_reason`` overrides the wire's stop value (``stop`` / ``end_turn``); ``extra_blocks`` are Anthropic
    content blocks placed before the text block (e.g. a thinking block the client must ignore); ``delay_s`` waits
    before answering (to observe concurrency).
    """

    content: str
    input_tokens: int = 11
    output_tokens: int = 7
    finish_reason: str | None = None
    extra_blocks: tuple[Mapping[str, Any], ...] = ()
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Status:
    """An error answer with the given status; ``message`` goes into the wire's error body unless ``body`` is given."""

    code: int
    message: str = "scripted error"
    error_type: str = "api_error"
    error_code: str | None = None
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    body: bytes | None = None


def RateLimited(retry_after: str | None = "1", message: str = "rate limit exceeded") -> Status:  # noqa: N802
    """A 429 with an optional Retry-After header (a string, as on the wire)."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Status(429, message, "rate_limit_error", "rate_limit_exceeded", headers)


def ServerError(code: int = 500, message: str = "internal server error") -> Status:  # noqa: N802
    """A 5xx."""
    return Status(code, message, "server_error")


@dataclasses.dataclass(frozen=True)
class Slow:
    """Stall for ``delay_s`` seconds: before the status line (``stage='headers'``) or after the first bytes of the
    body (``stage='body'``, the headers announce the full length). Then the rest is sent if the client still listens.
    """

    delay_s: float
    stage: str = "body"
    content: str = '{"slow": true}'


@dataclasses.dataclass(frozen=True)
class Dribble:
    """Send the headers, then ``count`` blank lines ``interval_s`` apart, then the answer (JSON allows leading
    whitespace). Each line resets a client's read timeout, as DeepSeek's keep-alive lines do under load."""

    interval_s: float
    count: int
    content: str = '{"dribbled": true}'


@dataclasses.dataclass(frozen=True)
class Drop:
    """Close the socket: before any response bytes (``stage='before_response'``) or in the middle of the body."""

    stage: str = "mid_body"
    content: str = '{"dropped": true}'


@dataclasses.dataclass(frozen=True)
class Raw:
    """Send ``body`` as is, e.g. a non-JSON page with status 200."""

    body: bytes
    status: int = 200
    content_type: str = "text/html"


Behaviour = Answer | Status | Slow | Dribble | Drop | Raw


# ---- wire rendering --------------------------------------------------------------------------------------------


def render_answer(wire: str, answer: Answer, model: str) -> dict:
    """The JSON body of a successful answer in ``wire`` format."""
    if wire == "openai":
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.content},
                         "finish_reason": answer.finish_reason or "stop"}],
            "usage": {"prompt_tokens": answer.input_tokens, "completion_tokens": answer.output_tokens,
                      "total_tokens": answer.input_tokens + answer.output_tokens},
        }
    return {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [dict(b) for b in answer.extra_blocks] + [{"type": "text", "text": answer.content}],
        "stop_reason": answer.finish_reason or "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens},
    }


def render_error(wire: str, status: Status) -> dict:
    """The JSON error body in ``wire`` format."""
    if wire == "openai":
        return {"error": {"message": status.message, "type": status.error_type, "param": None,
                          "code": status.error_code}}
    err: dict[str, Any] = {"type": status.error_type, "message": status.message}
    if status.error_code:
        err["details"] = {"error_code": status.error_code}
    return {"type": "error", "error": err, "request_id": "req_test"}


# ---- server ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Rule:
    match: str | None
    queue: list
    forever: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle keep-alive connection's thread ends after this

    def do_POST(self) -> None:  # noqa: N802
        self.server.owner._handle(self)  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802
        self.server.owner._handle(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass


class LLMTestServer:
    """A threaded loopback server; use as a context manager. ``base_url`` is ``http://127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._requests: list[RecordedRequest] = []
        self._stop = threading.Event()
        self._in_flight = 0
        self.max_in_flight = 0
        self.unscripted = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> LLMTestServer:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="llm-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LLMTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # scripting
    def script(self, *behaviours: Behaviour, match: str | None = None, forever: bool = False) -> None:
        """Queue behaviours for requests whose body contains ``match`` (any request if None)."""
        if not behaviours:
            raise ValueError("script() needs at least one behaviour")
        with self._lock:
            self._rules.append(_Rule(match, list(behaviours), forever))

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_matching(self, text: str) -> list[RecordedRequest]:
        return [r for r in self.requests if text.encode() in r.body]

    def _next_behaviour(self, body: bytes) -> Behaviour | None:
        with self._lock:
            for rule in self._rules:
                if rule.match is not None and rule.match.encode() not in body:
                    continue
                if not rule.queue:
                    continue
                if rule.forever and len(rule.queue) == 1:
                    return rule.queue[0]
                return rule.queue.pop(0)
            self.unscripted += 1
            return None

    # handling
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in h.headers.items()}
        with self._lock:
            self._requests.append(RecordedRequest(h.command, h.path, headers, body))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            self._respond(h, body)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError):
            h.close_connection = True  # the client went away (expected after its read timeout)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _respond(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        path = h.path.split("?", 1)[0]
        if h.command != "POST" or not (path.endswith(OPENAI_PATH) or path.endswith(ANTHROPIC_PATH)):
            self._send_json(h, 404, {"error": {"message": f"no route {h.command} {path}", "type": "not_found"}})
            return
        wire = "openai" if path.endswith(OPENAI_PATH) else "anthropic"
        try:
            model = json.loads(body).get("model", "?")
        except (ValueError, AttributeError):
            self._send_json(h, 400, render_error(wire, Status(400, "request body is not a JSON object",
                                                              "invalid_request_error")))
            return
        behaviour = self._next_behaviour(body)
        if behaviour is None:
            self._send_json(h, 418, render_error(wire, Status(418, "llm_server: no behaviour scripted for this "
                                                                   "request", "unscripted")))
        elif isinstance(behaviour, Answer):
            if behaviour.delay_s:
                self._stop.wait(behaviour.delay_s)
            self._send_json(h, 200, render_answer(wire, behaviour, model), behaviour.headers)
        elif isinstance(behaviour, Status):
            payload = behaviour.body if behaviour.body is not None else \
                json.dumps(render_error(wire, behaviour)).encode()
            self._send_bytes(h, behaviour.code, payload, "application/json", behaviour.headers)
        elif isinstance(behaviour, Slow):
            payload = json.dumps(render_answer(wire, Answer(behaviour.content), model)).encode()
            if behaviour.stage == "headers":
                self._stop.wait(behaviour.delay_s)
                self._send_bytes(h, 200, payload, "application/json")
                return
            self._start(h, 200, len(payload), "application/json")
            h.wfile.write(payload[:10])
            h.wfile.flush()
            self._stop.wait(behaviour.delay_s)
            h.wfile.write(payload[10:])
            h.wfile.flush()
            h.close_connection = True
        elif isinstance(behaviour, Dribble):
            payload = json.dumps(render_answer(wire, Answer(behaviour.content), model)).encode()
            self._start(h, 200, behaviour.count + len(payload), "application/json")
            for _ in range(behaviour.count):
                h.wfile.write(b"\n")
                h.wfile.flush()
                if self._stop.wait(behaviour.interval_s):
                    return
            h.wfile.write(payload)
            h.wfile.flush()
        elif isinstance(behaviour, Drop):
            if behaviour.stage == "mid_body":
                payload = json.dumps(render_answer(wire, Answer(behaviour.content), model)).encode()
                self._start(h, 200, len(payload), "application/json")
                h.wfile.write(payload[: len(payload) // 2])
                h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif isinstance(behaviour, Raw):
            self._send_bytes(h, behaviour.status, behaviour.body, behaviour.content_type)
        else:  # pragma: no cover - a test scripted something unknown
            raise TypeError(f"unknown behaviour {behaviour!r}")

    @staticmethod
    def _start(h: BaseHTTPRequestHandler, code: int, length: int, content_type: str,
               headers: Mapping[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()

    def _send_bytes(self, h: BaseHTTPRequestHandler, code: int, payload: bytes, content_type: str,
                    headers: Mapping[str, str] | None = None) -> None:
        self._start(h, code, len(payload), content_type, headers)
        h.wfile.write(payload)
        h.wfile.flush()

    def _send_json(self, h: BaseHTTPRequestHandler, code: int, obj: Any,
                   headers: Mapping[str, str] | None = None) -> None:
        self._send_bytes(h, code, json.dumps(obj).encode(), "application/json", headers)

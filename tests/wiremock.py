"""Scripted mock providers that speak ONLY their own API, on 127.0.0.1, for cross-API end-to-end tests.

    oa = OpenAIChatMock("oa").start()          # POST /v1/chat/completions, nothing else
    an = AnthropicMessagesMock("an").start()   # POST /v1/messages, nothing else
    files = AnyPathMock("files").start()       # any method, any path (files, audio, responses, …)

    oa.script(Reply(429), Reply())             # 1st request 429, then a normal answer forever
    oa.requests[-1].json, .headers, .path      # every request seen, parsed

A `Reply` scripts one answer: a status (errors come in the provider's real error shape, with the
provider's name in the message so a test can tell whose words reached the client), `retry_after`,
extra `headers`, a `delay` before the answer, the answer `text` and `tool_calls`, and whether to
stream (by default: as the request asked). A stream is the provider's real SSE, one event per HTTP
chunk, `interval` seconds apart. `stream_error=True` answers 200 with an SSE stream whose FIRST event
is an error (Anthropic `event: error` overloaded_error; OpenAI `data: {"error": …}`), as both
providers do when they fail after the headers are out. `body` overrides everything with raw bytes.

The chat mocks check requests the way their real APIs do, before looking at the script: the wrong
path is a 404, missing credentials a 401, a body their API does not accept (unknown top-level fields,
an Anthropic body without `max_tokens`, a `system` role inside Anthropic `messages`, …) a 400, each
in the provider's own error shape. Such a refusal is recorded in `Seen.rejected` (and
`mock.rejections`), so a test can assert that the gateway only ever sent valid requests.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from tests.mockprovider import Server, peer_closed_within

__all__ = ["AnthropicMessagesMock", "AnyPathMock", "OpenAIChatMock", "Reply", "Seen", "ToolCall", "multipart_parts",
           "serving"]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None  # default: call_<n> (OpenAI) / toolu_<n> (Anthropic)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    retry_after: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before the response headers (stops early when the client goes away)
    text: str | None = None  # the answer; default "Hello from <name>! How can I help?"
    tool_calls: tuple[ToolCall, ...] = ()
    finish: str | None = None  # the provider's own finish_reason / stop_reason; default from the tool calls
    usage: tuple[int, int] = (12, 7)  # input (prompt) tokens, output (completion) tokens
    stream: bool | None = None  # None: stream when the request asked for it
    interval: float = 0.0  # between SSE events
    first_event_delay: float = 0.0  # between the stream's headers and its first event (a slow first token)
    cut_after: int | None = None  # a stream: reset the connection after this many events (a provider that breaks)
    pieces: int = 3  # the text is streamed in this many content events
    cut_mode: str = "reset"  # how `cut_after` ends: "reset" (RST) or "close" (a clean close, no terminator)
    stream_error: bool = False  # 200 SSE whose first event is an error
    error_type: str | None = None  # error replies: the provider's type (default: by status)
    error_code: str | None = None  # OpenAI error replies: `code` (None: the status's usual one; "": null)
    message: str | None = None  # error replies: the message (default names the mock and the status)
    body: bytes | dict[str, Any] | None = None  # sent as is (a dict as JSON), whatever the status
    content_type: str | None = None  # with `body`
    reset: bool = False  # close the connection without answering


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival
    rejected: str | None = None  # why the mock refused it as its real API would (None: accepted)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def multipart_parts(seen: Seen) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/form-data request: (lower-cased part headers, exact content bytes)."""
    content_type = seen.headers.get("content-type", "")
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in content_type.split(";")
                     if p.strip().lower().startswith("boundary=")), None)
    assert boundary, f"not a multipart body: content-type {content_type!r}"
    delimiter = b"--" + boundary.encode()
    pieces = seen.body.split(b"\r\n" + delimiter)
    first = pieces[0]
    assert first.startswith(delimiter), "multipart body does not start with its boundary"
    pieces[0] = first[len(delimiter):]
    parts = []
    for piece in pieces:
        if piece.startswith(b"--"):
            break  # the closing delimiter
        head, _, content = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


_M = TypeVar("_M", bound="_Mock")


def serving(mocks: dict[str, _M]) -> Iterator[dict[str, _M]]:
    """Start `mocks`, hand them over, stop them: `yield from serving({...})` in a fixture."""
    for mock in mocks.values():
        mock.start()
    yield mocks
    for mock in mocks.values():
        mock.stop()


class _Bad(Exception):
    """A request the mock's real API refuses: (status, error type, message)."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


class _Mock(ABC):
    """Scripted replies, recorded requests, a threaded HTTP/1.1 server on 127.0.0.1; a subclass per
    API says what it accepts (`check`), how it fails (`error_body`) and how it answers (`answer`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._replies: list[Reply] = [Reply()]
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        self._served = 0  # requests that took a scripted reply
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def rejections(self) -> list[str]:
        return [f"{s.method} {s.path}: {s.rejected}" for s in self.requests if s.rejected]

    def script(self, *replies: Reply) -> _Mock:
        """The n-th accepted request gets the n-th reply; the last one repeats. Forgets the requests seen."""
        with self._lock:
            self._replies = list(replies) or [Reply()]
            self.requests = []
            self._served = 0
        return self

    def start(self) -> _Mock:
        handler = type("Handler", (_Handler,), {"mock": self})
        self._server = Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name=f"mock-{self.name}").start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def _record(self, seen: Seen) -> Reply | None:
        with self._lock:
            self.requests.append(seen)
            if seen.rejected:
                return None
            index = min(self._served, len(self._replies) - 1)
            self._served += 1
            return self._replies[index]

    # --- per API

    def check(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        """Validate as the real API would; return the parsed body. Raises _Bad."""
        return None

    @abstractmethod
    def error_body(self, status: int, kind: str | None, code: str | None, message: str) -> bytes:
        """An error body in the API's own shape."""

    @abstractmethod
    def answer(self, handler: _Handler, seen: Seen, parsed: Any, reply: Reply) -> None:
        """Send `reply` the way the API does."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mock: _Mock

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _handle(self, method: str) -> None:
        mock = self.mock
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        parsed = None
        try:
            parsed = mock.check(method, self.path, headers, body)
        except _Bad as bad:
            mock._record(Seen(method, self.path, headers, body, time.monotonic(), rejected=bad.message))
            self.send_json(bad.status, mock.error_body(bad.status, bad.kind, "", bad.message))
            return
        seen = Seen(method, self.path, headers, body, time.monotonic())
        reply = mock._record(seen)
        assert reply is not None
        if reply.reset:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if reply.delay and self.wait_for_close(reply.delay):
            return
        try:
            if reply.body is not None:
                raw = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                self.send_json(reply.status, raw, reply, reply.content_type or "application/json")
            elif reply.status >= 400:
                message = reply.message or f"{mock.name}: provider error {reply.status}"
                self.send_json(reply.status, mock.error_body(reply.status, reply.error_type, reply.error_code,
                                                             message), reply)
            else:
                mock.answer(self, seen, parsed, reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # --- writing

    def send_json(self, status: int, raw: bytes, reply: Reply | None = None,
                  content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(raw)))
        self._extra_headers(reply)
        self.end_headers()
        self.wfile.write(raw)
        self.wfile.flush()

    def _extra_headers(self, reply: Reply | None) -> None:
        if reply is None:
            return
        if reply.retry_after is not None:
            self.send_header("retry-after", reply.retry_after)
        for key, value in reply.headers.items():
            self.send_header(key, value)

    def start_stream(self, reply: Reply) -> None:
        self.events_sent = 0
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self._extra_headers(reply)
        self.end_headers()
        self.wfile.flush()

    def send_event(self, data: bytes, reply: Reply) -> bool:
        """One SSE event as one HTTP chunk; False when the client went away (or `cut_after` cut it)."""
        if reply.cut_after is not None and self.events_sent >= reply.cut_after:
            if reply.cut_mode == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()  # mid-stream: no terminator, no last chunk
            self.close_connection = True
            return False
        self.events_sent += 1
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
        return not (reply.interval and self.wait_for_close(reply.interval))

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def wait_for_close(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True (and stop) as soon as the client closes the connection."""
        if peer_closed_within(self.connection, seconds):
            self.close_connection = True
            return True
        return False


def _prefill(parsed: Any) -> str:
    """The text of a trailing assistant message (Anthropic's prefill), or ""."""
    messages = parsed.get("messages") or []
    last = messages[-1] if messages else {}
    if last.get("role") != "assistant":
        return ""
    content = last.get("content")
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content or [] if isinstance(b, dict) and b.get("type") == "text")


def _split(text: str, parts: int = 3) -> list[str]:
    """`text` in `parts` non-empty pieces (fewer when it is short)."""
    size = max(1, -(-len(text) // parts))
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]


def _default_text(name: str) -> str:
    return f"Hello from {name}! How can I help?"


# ==== OpenAI Chat Completions


_OPENAI_PARAMS = frozenset({
    "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
_OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_OPENAI_ERRORS = {  # status → (type, code, message)
    400: ("invalid_request_error", None, "Invalid request"),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided"),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it"),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1"),
    500: ("server_error", None, "The server had an error while processing your request"),
    502: ("server_error", None, "Bad gateway"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}


def openai_error(status: int, kind: str | None, code: str | None, message: str) -> bytes:
    default_kind, default_code, _ = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else
                                                                "invalid_request_error", None, ""))
    # code: None → the status's usual code; "" → null
    return json.dumps({"error": {"message": message, "type": kind or default_kind, "param": None,
                                 "code": (code or None) if code is not None else default_code}}).encode()


class OpenAIChatMock(_Mock):
    """OpenAI's Chat Completions API: POST /v1/chat/completions only (any other path: 404 JSON).

    `check_auth`: a request without `Authorization: Bearer …` is a 401, as at OpenAI."""

    def __init__(self, name: str, *, check_auth: bool = True) -> None:
        super().__init__(name)
        self.check_auth = check_auth

    def error_body(self, status: int, kind: str | None, code: str | None, message: str) -> bytes:
        return openai_error(status, kind, code, message)

    def check(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        if method != "POST" or path.partition("?")[0] != "/v1/chat/completions":
            raise _Bad(404, "invalid_request_error", f"Invalid URL ({method} {path})")
        if self.check_auth and not headers.get("authorization", "").startswith("Bearer "):
            raise _Bad(401, "invalid_request_error",
                       "You didn't provide an API key. You need to provide your API key in an Authorization "
                       "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        try:
            parsed = json.loads(body)
        except ValueError:
            raise _Bad(400, "invalid_request_error", "We could not parse the JSON body of your request.") from None
        if not isinstance(parsed, dict):
            raise _Bad(400, "invalid_request_error", "The request body must be a JSON object.")
        for key in parsed:
            if key not in _OPENAI_PARAMS:
                raise _Bad(400, "invalid_request_error", f"Unrecognized request argument supplied: {key}")
        if not isinstance(parsed.get("model"), str) or not parsed["model"]:
            raise _Bad(400, "invalid_request_error", "you must provide a model parameter")
        messages = parsed.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Bad(400, "invalid_request_error", "'messages' must be a non-empty array")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in _OPENAI_ROLES:
                raise _Bad(400, "invalid_request_error", f"messages[{i}]: invalid role")
            if msg["role"] == "tool" and not isinstance(msg.get("tool_call_id"), str):
                raise _Bad(400, "invalid_request_error", f"messages[{i}]: tool messages need a tool_call_id")
            for j, call in enumerate(msg.get("tool_calls") or []):
                function = call.get("function") if isinstance(call, dict) else None
                if call.get("type") != "function" or not isinstance(function, dict) or \
                        not isinstance(function.get("arguments"), str) or not isinstance(call.get("id"), str):
                    raise _Bad(400, "invalid_request_error", f"messages[{i}].tool_calls[{j}]: invalid tool call")
            content = msg.get("content")
            if isinstance(content, list):
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") not in (
                            "text", "image_url", "input_audio", "file", "refusal"):
                        raise _Bad(400, "invalid_request_error", f"messages[{i}].content[{j}]: invalid part")
            elif content is not None and not isinstance(content, str):
                raise _Bad(400, "invalid_request_error", f"messages[{i}].content: invalid content")
        for i, tool in enumerate(parsed.get("tools") or []):
            if not isinstance(tool, dict) or tool.get("type") != "function" or \
                    not isinstance(tool.get("function"), dict) or not isinstance(tool["function"].get("name"), str):
                raise _Bad(400, "invalid_request_error", f"tools[{i}]: invalid tool")
        choice = parsed.get("tool_choice")
        if choice is not None and choice not in ("none", "auto", "required") and not (
                isinstance(choice, dict) and choice.get("type") == "function"
                and isinstance(choice.get("function"), dict)):
            raise _Bad(400, "invalid_request_error", "tool_choice: invalid value")
        options = parsed.get("stream_options")
        if options is not None and not parsed.get("stream"):
            raise _Bad(400, "invalid_request_error",
                       "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        return parsed

    def answer(self, handler: _Handler, seen: Seen, parsed: Any, reply: Reply) -> None:
        n = len(self.requests)
        ident = f"chatcmpl-{self.name}-{n}"
        model = parsed["model"]
        created = int(time.time())
        text = reply.text if reply.text is not None else (None if reply.tool_calls else _default_text(self.name))
        calls = [(c.id or f"call_{self.name}_{n}_{i}", c.name, json.dumps(c.arguments))
                 for i, c in enumerate(reply.tool_calls)]
        finish = reply.finish or ("tool_calls" if calls else "stop")
        prompt, completion = reply.usage
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}
        stream = reply.stream if reply.stream is not None else bool(parsed.get("stream"))
        if not stream and not reply.stream_error:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
            if calls:
                message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": name, "arguments": a}}
                                         for i, name, a in calls]
            out = {"id": ident, "object": "chat.completion", "created": created, "model": model,
                   "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                   "usage": usage, "service_tier": "default", "system_fingerprint": "fp_mock"}
            handler.send_json(200, json.dumps(out).encode(), reply)
            return
        handler.start_stream(reply)
        if reply.first_event_delay and handler.wait_for_close(reply.first_event_delay):
            return
        if reply.stream_error:
            error = {"error": {"message": reply.message or f"{self.name}: The server had an error while "
                               f"processing your request", "type": reply.error_type or "server_error",
                               "param": None, "code": reply.error_code}}
            handler.send_event(b"data: " + json.dumps(error).encode() + b"\n\n", reply)
            handler.end_stream()
            return
        include_usage = bool((parsed.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bool:
            obj: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "service_tier": "default", "system_fingerprint": "fp_mock",
                                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish_reason}]}
            if include_usage:
                obj["usage"] = None
            return handler.send_event(b"data: " + json.dumps(obj).encode() + b"\n\n", reply)

        if not chunk({"role": "assistant", "content": "", "refusal": None}):
            return
        for piece in _split(text, reply.pieces) if text else []:
            if not chunk({"content": piece}):
                return
        for index, (call_id, name, arguments) in enumerate(calls):
            if not chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]}):
                return
            for piece in _split(arguments):
                if not chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}):
                    return
        if not chunk({}, finish):
            return
        if include_usage:
            obj = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "service_tier": "default", "system_fingerprint": "fp_mock", "choices": [], "usage": usage}
            if not handler.send_event(b"data: " + json.dumps(obj).encode() + b"\n\n", reply):
                return
        handler.send_event(b"data: [DONE]\n\n", reply)
        handler.end_stream()


# ==== Anthropic Messages


_ANTHROPIC_PARAMS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "tools", "tool_choice", "thinking", "service_tier", "container", "mcp_servers", "context_management",
    "output_config", "inference_geo",
})
_ANTHROPIC_BLOCKS = frozenset({"text", "image", "document", "tool_use", "tool_result", "thinking",
                               "redacted_thinking", "search_result", "server_tool_use", "web_search_tool_result"})
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 500: "api_error", 503: "overloaded_error", 504: "timeout_error",
                    529: "overloaded_error"}


def anthropic_error(status: int, kind: str | None, message: str) -> bytes:
    kind = kind or _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message},
                       "request_id": "req_011CMockRequest"}).encode()


class AnthropicMessagesMock(_Mock):
    """Anthropic's Messages API: POST /v1/messages only; `x-api-key` and `anthropic-version` required."""

    def error_body(self, status: int, kind: str | None, code: str | None, message: str) -> bytes:
        return anthropic_error(status, kind, message)

    def check(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        if method != "POST" or path.partition("?")[0] != "/v1/messages":
            raise _Bad(404, "not_found_error", "Not Found")
        if not headers.get("x-api-key"):
            raise _Bad(401, "authentication_error", "x-api-key header is required")
        if not headers.get("anthropic-version"):
            raise _Bad(401, "authentication_error", "anthropic-version: header is required")
        try:
            parsed = json.loads(body)
        except ValueError:
            raise _Bad(400, "invalid_request_error", "There was an issue with your request body: invalid JSON") from None
        if not isinstance(parsed, dict):
            raise _Bad(400, "invalid_request_error", "The request body must be a JSON object")
        for key in parsed:
            if key not in _ANTHROPIC_PARAMS:
                raise _Bad(400, "invalid_request_error", f"{key}: Extra inputs are not permitted")
        if not isinstance(parsed.get("model"), str):
            raise _Bad(400, "invalid_request_error", "model: Field required")
        max_tokens = parsed.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _Bad(400, "invalid_request_error", "max_tokens: Field required")
        messages = parsed.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _Bad(400, "invalid_request_error", "messages: Field required")
        system = parsed.get("system")
        if system is not None and not isinstance(system, str) and not (
                isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system)):
            raise _Bad(400, "invalid_request_error", "system: Input should be a valid string or list of text blocks")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise _Bad(400, "invalid_request_error", f"messages.{i}: Input should be an object")
            if msg.get("role") not in ("user", "assistant"):
                raise _Bad(400, "invalid_request_error",
                           f"messages.{i}.role: Unexpected role {msg.get('role')!r}. The Messages API accepts a "
                           f"top-level `system` parameter, not \"system\" as an input message role.")
            extra = set(msg) - {"role", "content"}
            if extra:
                raise _Bad(400, "invalid_request_error", f"messages.{i}.{sorted(extra)[0]}: Extra inputs are not "
                                                         f"permitted")
            content = msg.get("content")
            if isinstance(content, str):
                if not content and i != len(messages) - 1:
                    raise _Bad(400, "invalid_request_error", f"messages.{i}: text content blocks must be non-empty")
                continue
            if not isinstance(content, list):
                raise _Bad(400, "invalid_request_error", f"messages.{i}.content: Input should be a string or list")
            for j, block in enumerate(content):
                if not isinstance(block, dict) or block.get("type") not in _ANTHROPIC_BLOCKS:
                    raise _Bad(400, "invalid_request_error", f"messages.{i}.content.{j}: invalid content block")
                if block["type"] == "tool_use" and not (isinstance(block.get("input"), dict)
                                                       and isinstance(block.get("id"), str)):
                    raise _Bad(400, "invalid_request_error", f"messages.{i}.content.{j}: invalid tool_use")
                if block["type"] == "tool_result" and not isinstance(block.get("tool_use_id"), str):
                    raise _Bad(400, "invalid_request_error", f"messages.{i}.content.{j}.tool_use_id: Field required")
                if block["type"] == "text" and not block.get("text"):
                    raise _Bad(400, "invalid_request_error", f"messages.{i}.content.{j}: text content blocks "
                                                             f"must be non-empty")
        for i, tool in enumerate(parsed.get("tools") or []):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or \
                    not isinstance(tool.get("input_schema"), dict) or "function" in tool:
                raise _Bad(400, "invalid_request_error", f"tools.{i}: invalid custom tool")
        choice = parsed.get("tool_choice")
        if choice is not None and not (isinstance(choice, dict) and choice.get("type") in ("auto", "any", "tool",
                                                                                            "none")):
            raise _Bad(400, "invalid_request_error", "tool_choice: Input should be an object with a valid type")
        return parsed

    def answer(self, handler: _Handler, seen: Seen, parsed: Any, reply: Reply) -> None:
        n = len(self.requests)
        ident = f"msg_{self.name}_{n}"
        model = parsed["model"]
        text = reply.text if reply.text is not None else (None if reply.tool_calls else _default_text(self.name))
        prefill = _prefill(parsed)
        if text and prefill and text.startswith(prefill):
            text = text[len(prefill):]  # Anthropic continues a trailing assistant message (a prefill)
        calls = [(c.id or f"toolu_{self.name}_{n}_{i}", c.name, c.arguments) for i, c in enumerate(reply.tool_calls)]
        stop = reply.finish or ("tool_use" if calls else "end_turn")
        input_tokens, output_tokens = reply.usage
        stream = reply.stream if reply.stream is not None else bool(parsed.get("stream"))
        if not stream and not reply.stream_error:
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
            content += [{"type": "tool_use", "id": i, "name": name, "input": args} for i, name, args in calls]
            out = {"id": ident, "type": "message", "role": "assistant", "model": model, "content": content,
                   "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                             "cache_read_input_tokens": 0, "output_tokens": output_tokens,
                             "service_tier": "standard"}}
            handler.send_json(200, json.dumps(out).encode(), reply)
            return
        handler.start_stream(reply)
        if reply.first_event_delay and handler.wait_for_close(reply.first_event_delay):
            return

        def event(name: str, data: dict[str, Any]) -> bool:
            return handler.send_event(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode(), reply)

        if reply.stream_error:
            event("error", {"type": "error", "error": {"type": reply.error_type or "overloaded_error",
                                                      "message": reply.message or "Overloaded"}})
            handler.end_stream()
            return
        start = {"type": "message_start", "message": {
            "id": ident, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                      "output_tokens": 1, "service_tier": "standard"}}}
        if not event("message_start", start) or not event("ping", {"type": "ping"}):
            return
        index = 0
        if text:
            if not event("content_block_start", {"type": "content_block_start", "index": 0,
                                                 "content_block": {"type": "text", "text": ""}}):
                return
            for piece in _split(text, reply.pieces):
                if not event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": piece}}):
                    return
            if not event("content_block_stop", {"type": "content_block_stop", "index": 0}):
                return
            index = 1
        for call_id, name, arguments in calls:
            if not event("content_block_start", {"type": "content_block_start", "index": index, "content_block": {
                    "type": "tool_use", "id": call_id, "name": name, "input": {}}}):
                return
            for piece in ["", *_split(json.dumps(arguments))]:
                if not event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                     "delta": {"type": "input_json_delta", "partial_json": piece}}):
                    return
            if not event("content_block_stop", {"type": "content_block_stop", "index": index}):
                return
            index += 1
        if not event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": stop, "stop_sequence": None},
                                       "usage": {"output_tokens": output_tokens}}):
            return
        event("message_stop", {"type": "message_stop"})
        handler.end_stream()


# ==== anything else (files, audio, images, responses, embeddings)


class AnyPathMock(_Mock):
    """Any method on any path; answers the scripted JSON (`Reply.body`, default
    `{"object": "mock", "provider": name, "method", "path"}`); errors in OpenAI's shape."""

    def error_body(self, status: int, kind: str | None, code: str | None, message: str) -> bytes:
        return openai_error(status, kind, code, message)

    def answer(self, handler: _Handler, seen: Seen, parsed: Any, reply: Reply) -> None:
        out = {"object": "mock", "provider": self.name, "method": seen.method, "path": seen.path}
        handler.send_json(200, json.dumps(out).encode(), reply)

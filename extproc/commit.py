"""The commit point of a streamed response: has the provider sent content yet, or an error?

A streamed answer is held (its headers included) until its first content event, so a provider that
opens a 200 stream and then sends an error event (Anthropic's `overloaded_error`, an OpenAI
`{"error": …}` chunk) can still be failed over before the client sees anything. Pure: bytes in,
a verdict out. Both stream formats are recognised whatever the provider is said to speak.

Usage: `peek = CommitPeek(); verdict = peek.feed(chunk)` until `verdict` is not None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from extproc.translate.sse import SSEParser

__all__ = ["CommitPeek", "Content", "StreamError"]


@dataclass(frozen=True, slots=True)
class Content:
    """The stream carries content (or finished without any): deliver it."""


@dataclass(frozen=True, slots=True)
class StreamError:
    """The stream's first meaningful event is an error: treat the attempt as this HTTP status."""

    status: int
    type: str | None
    code: str | None
    message: str | None


Verdict = Content | StreamError
CONTENT = Content()

# Anthropic's error types, and OpenAI's codes/types, as the status they stand for.
_STATUS = {
    "overloaded_error": 529, "rate_limit_error": 429, "api_error": 500, "timeout_error": 504,
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "billing_error": 402,
    "rate_limit_exceeded": 429, "insufficient_quota": 429, "requests": 429, "tokens": 429,
    "server_error": 500, "service_unavailable": 503, "overloaded": 503,
}
# Anthropic events that end the answer; content_block_delta carries content; anything else
# (message_start, ping, a text block's start, …) is preamble.
_ANTHROPIC_END = frozenset({"message_delta", "message_stop"})
_ONE_MORE = object()  # a content event: one more towards the commit point


class CommitPeek:
    """Reads a provider's SSE stream until its commit point — `events` content events (1: the first
    token), or the stream's end — or until its first error.

    Holding more than the first event makes an early cut invisible too (the held events are simply
    not sent, and the attempt fails over), at the cost of a later first token for the client."""

    def __init__(self, events: int = 1) -> None:
        self._parser = SSEParser()
        self._wanted = events
        self._seen = 0

    def feed(self, chunk: bytes) -> Verdict | None:
        for event in self._parser.feed(chunk):
            verdict = self._event(event.event, event.data)
            if verdict is _ONE_MORE:
                self._seen += 1
                if self._seen < self._wanted:
                    continue
                return CONTENT
            if isinstance(verdict, Content | StreamError):
                return verdict
        return None

    def _event(self, name: str | None, data: str) -> Verdict | object | None:
        if data.strip() == "[DONE]":
            return CONTENT  # the stream ends: nothing more to hold it for
        try:
            obj: Any = json.loads(data)
        except ValueError:
            return None  # not JSON (a comment, a keep-alive): keep looking
        if not isinstance(obj, dict):
            return None
        kind = obj.get("type") if isinstance(obj.get("type"), str) else name
        if kind == "error" or name == "error" or "error" in obj:
            return _error(obj.get("error", obj))
        if kind in _ANTHROPIC_END:
            return CONTENT
        if kind == "content_block_delta":
            return _ONE_MORE
        if kind == "content_block_start":
            block = obj.get("content_block")
            return _ONE_MORE if isinstance(block, dict) and block.get("type") != "text" else None
        choices = obj.get("choices")
        if isinstance(choices, list):  # an OpenAI chunk: content, a tool call or a finish is content
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") or {}
                if choice.get("finish_reason"):
                    return CONTENT
                if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")):
                    return _ONE_MORE
        return None


def _error(error: Any) -> StreamError:
    if not isinstance(error, dict):
        return StreamError(500, None, None, str(error) if error else None)
    kind = error.get("type") if isinstance(error.get("type"), str) else None
    code = error.get("code")
    code = str(code) if code is not None else None
    message = error.get("message") if isinstance(error.get("message"), str) else None
    status = _STATUS.get(code or "") or _STATUS.get(kind or "") or 500
    return StreamError(status, kind, code, message)

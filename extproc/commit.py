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
# Anthropic events that carry content; anything else (message_start, ping, …) is preamble.
_ANTHROPIC_CONTENT = frozenset({"content_block_delta", "message_delta", "message_stop"})


class CommitPeek:
    """Reads a provider's SSE stream until its first content event or its first error."""

    def __init__(self) -> None:
        self._parser = SSEParser()

    def feed(self, chunk: bytes) -> Verdict | None:
        for event in self._parser.feed(chunk):
            verdict = self._event(event.event, event.data)
            if verdict is not None:
                return verdict
        return None

    def _event(self, name: str | None, data: str) -> Verdict | None:
        if data.strip() == "[DONE]":
            return CONTENT  # ended without content: nothing to fail over from
        try:
            obj: Any = json.loads(data)
        except ValueError:
            return None  # not JSON (a comment, a keep-alive): keep looking
        if not isinstance(obj, dict):
            return None
        kind = obj.get("type") if isinstance(obj.get("type"), str) else name
        if kind == "error" or name == "error" or "error" in obj:
            return _error(obj.get("error", obj))
        if kind in _ANTHROPIC_CONTENT:
            return CONTENT
        if kind == "content_block_start":
            block = obj.get("content_block")
            return CONTENT if isinstance(block, dict) and block.get("type") != "text" else None
        choices = obj.get("choices")
        if isinstance(choices, list):  # an OpenAI chunk: content, a tool call or a finish is content
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") or {}
                if choice.get("finish_reason") or (isinstance(delta, dict) and (
                        delta.get("content") or delta.get("tool_calls") or delta.get("refusal"))):
                    return CONTENT
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

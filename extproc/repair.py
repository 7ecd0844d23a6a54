"""Repairing a streamed answer whose provider broke after the client got part of it. Pure: SSE
events in, SSE events out; the relay (`extproc/relay.py`) does the I/O.

A `Follower` keeps what the client has been sent (its text, whether a tool call started, whether
the stream finished). When the provider breaks, the relay asks for a continuation from another
provider — `prefill` (the text so far as a trailing assistant message, which Anthropic's API
continues) or `regenerate` (the original request again: only what follows the text the client
already has is delivered, when the new answer starts with exactly that text) — and a `Splice`
turns the continuation's events into the rest of the client's one stream: one id, one role
preamble, content continuing where it stopped, its own finish, usage and terminator. When that is
impossible the stream ends with a well-formed error event (`terminal_error`), never a bare reset.

Usage: `f = Follower(api); f.feed(event)`; then `s = Splice(api, f, "prefill"); out = s.feed(event)`.
"""

from __future__ import annotations

import json
from typing import Any

from controlplane.apierrors import Api

__all__ = ["Follower", "Mismatch", "Splice", "events", "terminal_error"]


class Mismatch(Exception):
    """A regenerated answer does not start with the text the client already has."""


def events(buffer: bytearray) -> list[bytes]:
    """Take the complete SSE events (each ending with a blank line) out of `buffer`; a partial event
    stays in it (a half event must never reach the client)."""
    out = []
    while (end := buffer.find(b"\n\n")) >= 0:
        out.append(bytes(buffer[:end + 2]))
        del buffer[:end + 2]
    return out


def _fields(event: bytes) -> tuple[str | None, Any]:
    """(event name, parsed data) of one SSE event; data "[DONE]" stays a string, junk is None."""
    name = None
    data = []
    for line in event.decode("utf-8", "replace").split("\n"):
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    text = "\n".join(data)
    if text.strip() == "[DONE]":
        return name, "[DONE]"
    try:
        return name, json.loads(text)
    except ValueError:
        return name, None


def _encode(name: str | None, data: Any) -> bytes:
    body = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return (f"event: {name}\n" if name else "").encode() + f"data: {body}\n\n".encode()


class Follower:
    """What a client has been sent of a streamed answer, in its API."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.id: str | None = None
        self.parts: list[str] = []
        self.tool_call_sent = False
        self.finished = False  # the provider's own terminator went out

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def broken(self, event: bytes) -> bool:
        """Is this event the provider failing (an in-stream error, or garbage where an event's JSON
        should be), rather than part of the answer? Comments and keep-alives are neither."""
        name, data = _fields(event)
        if data is None:
            return any(line.startswith(b"data:") for line in event.split(b"\n"))
        return name == "error" or (isinstance(data, dict) and ("error" in data and "choices" not in data))

    def feed(self, event: bytes) -> None:
        name, data = _fields(event)
        if data == "[DONE]":
            self.finished = True
            return
        if not isinstance(data, dict):
            return
        if self.api is Api.ANTHROPIC:
            kind = data.get("type") or name
            if kind == "message_start":
                self.id = (data.get("message") or {}).get("id") or self.id
            elif kind == "content_block_start" and (data.get("content_block") or {}).get("type") == "tool_use":
                self.tool_call_sent = True
            elif kind == "content_block_delta":
                delta = data.get("delta") or {}
                if delta.get("type") == "text_delta":
                    self.parts.append(delta.get("text") or "")
                elif delta.get("type") == "input_json_delta":
                    self.tool_call_sent = True
            elif kind == "message_stop":
                self.finished = True
            return
        self.id = self.id or data.get("id")
        for choice in data.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.parts.append(delta["content"])
            if delta.get("tool_calls"):
                self.tool_call_sent = True


class Splice:
    """Turns a continuation stream (already in the client's API) into the rest of the client's stream."""

    def __init__(self, api: Api, follower: Follower, mode: str) -> None:
        self.api = api
        self.follower = follower
        self.pending = follower.text if mode == "regenerate" else ""  # text to skip before delivering
        # a prefill goes without its trailing whitespace (Anthropic refuses it), which the provider then
        # repeats at the start of its continuation: the client has it already
        text = follower.text
        self.seam = text[len(text.rstrip()):] if mode == "prefill" else ""

    def feed(self, event: bytes) -> bytes:
        """The bytes to send on for one continuation event (b"" to drop it). Raises Mismatch."""
        name, data = _fields(event)
        if data == "[DONE]" or not isinstance(data, dict):
            return event
        if self.api is Api.ANTHROPIC:
            kind = data.get("type") or name
            if kind in ("message_start", "ping") or (kind == "content_block_start" and data.get("index", 0) == 0
                                                     and (data.get("content_block") or {}).get("type") == "text"):
                return b""  # the client has its preamble and its open text block already
            if kind == "content_block_delta" and (data.get("delta") or {}).get("type") == "text_delta":
                text = self._skip(data["delta"].get("text") or "")
                if text is None:
                    return b""
                data["delta"]["text"] = text
                return _encode(name, data)
            return event
        if self.follower.id:
            data["id"] = self.follower.id
        choices = data.get("choices") or []
        for choice in choices:
            delta = choice.get("delta") or {}
            delta.pop("role", None)  # one role preamble per stream: the client has it
            if delta.get("content"):
                text = self._skip(delta["content"])
                if text is None:
                    delta.pop("content")
                else:
                    delta["content"] = text
        if choices and all(not (c.get("delta") or {}) and not c.get("finish_reason") for c in choices) \
                and data.get("usage") is None:
            return b""  # nothing left in it (the continuation's preamble, or skipped text)
        return _encode(None, data)

    def _skip(self, text: str) -> str | None:
        """What of a continued delta is new to the client (None: nothing yet). Raises Mismatch."""
        if self.seam:
            if text.startswith(self.seam):
                text = text[len(self.seam):]
            self.seam = ""
            if not text:
                return None
        if not self.pending:
            return text
        if self.pending.startswith(text):
            self.pending = self.pending[len(text):]
            return None
        if text.startswith(self.pending):
            rest = text[len(self.pending):]
            self.pending = ""
            return rest or None
        raise Mismatch("the regenerated answer does not start with the text already sent")


def terminal_error(api: Api, message: str) -> bytes:
    """A well-formed end of a stream that cannot be repaired: an error event the client's SDK raises
    (and, for OpenAI, the terminator)."""
    if api is Api.ANTHROPIC:
        return _encode("error", {"type": "error", "error": {"type": "api_error", "message": message}})
    return _encode(None, {"error": {"message": message, "type": "stream_broken", "code": "stream_broken"}}) + \
        b"data: [DONE]\n\n"

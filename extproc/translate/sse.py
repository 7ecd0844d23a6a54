"""Incremental Server-Sent Events parsing and serialization, shared by both translation directions.

The parser follows the WHATWG event-stream rules that matter for LLM APIs (``data`` lines joined with
``\\n``, ``event`` names, ``:`` comments, LF / CRLF / CR line ends, one optional space after the colon,
a leading BOM) and accepts the stream cut anywhere, including inside a multi-byte UTF-8 character:
it only decodes complete lines, and a line end is always a single ASCII byte that cannot occur inside
a UTF-8 sequence.

Usage::

    parser = SSEParser()
    for ev in parser.feed(chunk):   # SSEEvent(event="message_start", data='{"type": ...}')
        ...
    out = encode_event(compact_json(obj), event="message_start")
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["SSEEvent", "SSEParser", "encode_event"]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


class SSEEvent(NamedTuple):
    """One dispatched event: ``event`` is None when the stream gave no ``event:`` field."""

    event: str | None
    data: str


class SSEParser:
    """Turns arbitrarily split SSE bytes into complete events, keeping only the unfinished tail.

    Usage: ``events = parser.feed(b"data: {}\\n\\n")``; at the end of the stream ``parser.close()``.
    """

    __slots__ = ("_pending", "_event", "_data", "_first_line")

    def __init__(self) -> None:
        self._pending: list[bytes] = []  # bytes of the unfinished last line (a held trailing CR included)
        self._event: str | None = None
        self._data: list[str] = []
        self._first_line = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete (often none, often one)."""
        if not chunk:
            return []
        if b"\n" not in chunk and b"\r" not in chunk:
            # No line end: nothing can complete. Keep pieces instead of re-joining the tail each time,
            # so a long line (a big JSON event) delivered in many small chunks stays linear.
            self._pending.append(chunk)
            return []
        if self._pending:
            self._pending.append(chunk)
            buf = b"".join(self._pending)
            self._pending = []
        else:
            buf = chunk
        if b"\r" in buf:
            buf = self._normalize(buf)
        lines = buf.split(b"\n")
        tail = lines.pop()
        if tail:
            self._pending.append(tail)
        events: list[SSEEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: return the event made of the complete lines still waiting for a blank line.

        Strictly, SSE discards an event that the blank line never ended; we keep it when all its lines
        are complete (a provider that ends with ``data: [DONE]\\n`` did finish), and drop a cut line.
        """
        events: list[SSEEvent] = []
        buf = b"".join(self._pending)
        self._pending = []
        if b"\r" in buf:
            # A held CR was a line end after all, since nothing followed it; the cut last line is dropped.
            lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")[:-1]
            for line in lines:
                self._line(line, events)
        self._line(b"", events)
        return events

    def _normalize(self, buf: bytes) -> bytes:
        """CRLF and lone CR become LF; a CR at the very end waits, as an LF may follow in the next chunk."""
        held = b""
        if buf.endswith(b"\r"):
            buf, held = buf[:-1], b"\r"
        buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # Re-attached, the held CR lands in the unfinished tail: the next feed sees "\r" + its first byte.
        return buf + held

    def _line(self, raw: bytes, events: list[SSEEvent]) -> None:
        if self._first_line:
            self._first_line = False
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
        if not raw:
            if self._data:
                events.append(SSEEvent(self._event, "\n".join(self._data)))
                self._data = []
            self._event = None  # a blank line ends the event even when it had no data (spec)
            return
        if raw[0] == 0x3A:  # ":" comment, e.g. keep-alives
            return
        field, sep, value = raw.decode("utf-8", "replace").partition(":")
        if sep and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        # "id" and "retry" matter to browsers reconnecting, not to a translator.


def encode_event(data: str, event: str | None = None) -> bytes:
    """Serialize one event: ``event: NAME`` (when given), one ``data:`` line per line of ``data``, blank line.

    Usage: ``encode_event('{"a":1}') == b'data: {"a":1}\\n\\n'``
    """
    if "\n" in data or "\r" in data:
        body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    else:
        body = f"data: {data}\n"
    if event is not None:
        return f"event: {event}\n{body}\n".encode()
    return f"{body}\n".encode()

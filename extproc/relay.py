"""The stream relay: owns the client-facing side of streamed chat answers, so that a provider that
breaks after the commit point (a reset, an end without its terminator, a stall past the stall
window, an error event) can be continued from another provider without the client noticing.

    client ─► Envoy model listener ─(stream: true, repair_streams)─► relay (this, a Unix socket)
                 relay ─► Envoy "relayed" listener (a Unix socket) ─► held attempts cluster (ext_proc) ─► …

Each of the relay's upstream requests is an ordinary sidestep request (the ext_proc chooses the
target, Envoy retries whatever fails before the headers); the relay only handles what Envoy cannot,
a break after the headers went out. It forwards complete SSE events only, and asks for a
continuation with `x-sidestep-continue` (the targets to avoid, the text the client has): the
ext_proc picks the next target and says how it continues (`x-sidestep-continued`: prefill or
regenerate); `extproc.repair` splices the result. HTTP/1.1 both ways, plain asyncio streams.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import AsyncIterator

from controlplane import internalapi as api
from controlplane.apierrors import api_for_path
from extproc.repair import Follower, Mismatch, Splice, events, terminal_error

__all__ = ["Relay"]

log = logging.getLogger("sidestep.relay")
MAX_CONTINUATIONS = 2
_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade",
                  "x-request-id", "proxy-connection"})


class _Broken(Exception):
    """The upstream stream ended before its terminator."""


class Relay:
    def __init__(self, socket_path: str, upstream_path: str, worker: str) -> None:
        self.socket_path = socket_path
        self.upstream_path = upstream_path
        self.worker = worker

    async def start(self) -> asyncio.AbstractServer:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        return await asyncio.start_unix_server(self._connection, path=self.socket_path)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # Envoy reuses the connection for one request after another
                try:
                    line, headers = await _read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await _read_body(reader, headers)
                method, path, _ = line.split(" ", 2)
                await self._relay(method, path, headers, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception:
            log.exception("stream relay failed")
        finally:
            writer.close()

    async def _relay(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                     client: asyncio.StreamWriter) -> None:
        caller = api_for_path(path)
        follower = Follower(caller)
        avoid: list[str] = []
        splice: Splice | None = None
        for continuation in range(MAX_CONTINUATIONS + 1):
            extra = [] if continuation == 0 else [(api.CONTINUE_HEADER, _continue(avoid, follower.text))]
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.upstream_path)
            try:
                await _send(upstream_writer, method, path, headers + extra + [(api.WORKER_ROUTE_HEADER, self.worker)],
                            body)
                status_line, response = await _read_head(upstream_reader)
                status = int(status_line.split(" ", 2)[1])
                streamed = status == 200 and _get(response, "content-type").startswith("text/event-stream")
                if continuation == 0:
                    if not streamed:  # an error, or JSON: pass it on as it is
                        await _pass_through(status_line, response, upstream_reader, client)
                        return
                    await _head(client, status_line, response)
                elif not streamed:
                    await _end(client, terminal_error(caller, f"the stream broke and its continuation failed "
                                                              f"({status_line.split(' ', 1)[1]})"))
                    return
                else:
                    splice = Splice(caller, follower, _get(response, api.CONTINUED_HEADER) or "regenerate")
                avoid.append(_get(response, api.MODEL_HEADER))
                if await self._stream(_pieces(upstream_reader, response), client, follower, splice):
                    await _chunk(client, b"")
                    return
                if _get(response, api.NO_REPAIR_HEADER):  # its provider opted out: end it as it ended
                    client.transport.abort()
                    return
                if follower.tool_call_sent:
                    await _end(client, terminal_error(caller, "the stream broke during a tool call"))
                    return
                log.info("stream from %s broke after %d characters; continuing", avoid[-1], len(follower.text))
            except Mismatch as exc:
                await _end(client, terminal_error(caller, f"the stream broke and could not be continued: {exc}"))
                return
            finally:
                upstream_writer.close()
        await _end(client, terminal_error(caller, "the stream broke and every continuation failed"))

    async def _stream(self, pieces: AsyncIterator[bytes], client: asyncio.StreamWriter, follower: Follower,
                      splice: Splice | None) -> bool:
        """Forward complete events until the answer is finished (True) or the provider breaks (False)."""
        buffer = bytearray()
        try:
            async for piece in pieces:
                buffer += piece
                for event in events(buffer):
                    if follower.broken(event):
                        return False  # an error event (or garbage) mid-answer: a break like any other
                    out = splice.feed(event) if splice is not None else event
                    follower.feed(event if splice is None else out or b"")
                    if out:
                        await _chunk(client, out)
                if follower.finished:
                    return True
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return False
        return follower.finished  # the body ended: finished only if the terminator came


async def _pieces(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked, of a content-length, or to the end of the connection."""
    if _get(headers, "transfer-encoding").lower() == "chunked":
        while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            yield (await reader.readexactly(size + 2))[:-2]
        return
    length = _get(headers, "content-length")
    left = int(length) if length else None
    while left is None or left > 0:
        piece = await reader.read(65536 if left is None else min(left, 65536))
        if not piece:
            if left:
                raise asyncio.IncompleteReadError(b"", left)
            return
        if left is not None:
            left -= len(piece)
        yield piece


def _continue(avoid: list[str], text: str) -> str:
    return base64.b64encode(json.dumps({"avoid": avoid, "text": text}).encode()).decode()


def _get(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k == name), "")


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip().lower(), value.strip()))
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: list[tuple[str, str]]) -> bytes:
    if length := _get(headers, "content-length"):
        return await reader.readexactly(int(length))
    if _get(headers, "transfer-encoding").lower() == "chunked":
        body = bytearray()
        while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return bytes(body)
    return b""


async def _send(writer: asyncio.StreamWriter, method: str, path: str, headers: list[tuple[str, str]],
                body: bytes) -> None:
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers if k not in _HOP]
    lines.append(f"content-length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


async def _head(client: asyncio.StreamWriter, status_line: str, headers: list[tuple[str, str]]) -> None:
    lines = [status_line] + [f"{k}: {v}" for k, v in headers if k not in _HOP] + ["transfer-encoding: chunked"]
    client.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await client.drain()


async def _chunk(client: asyncio.StreamWriter, data: bytes) -> None:
    """One HTTP chunk; b"" is the terminator (so an empty event must never be sent as one)."""
    client.write(b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")
    await client.drain()


async def _end(client: asyncio.StreamWriter, data: bytes) -> None:
    await _chunk(client, data)
    await _chunk(client, b"")


async def _pass_through(status_line: str, headers: list[tuple[str, str]], upstream: asyncio.StreamReader,
                        client: asyncio.StreamWriter) -> None:
    body = await _read_body(upstream, headers)
    lines = [status_line] + [f"{k}: {v}" for k, v in headers if k not in _HOP] + [f"content-length: {len(body)}"]
    client.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await client.drain()

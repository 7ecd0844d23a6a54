"""A scripted LLM provider on 127.0.0.1 for data-plane tests (the only thing the tests mock).

    provider = MockProvider("a").start()
    provider.script(Reply(429, retry_after="2"), Reply(200))   # 1st request 429, then 200 forever
    ... provider.requests  → every request seen: path, headers, body, arrival time

Replies: a status with a JSON body and headers, `hang=True` (never answers; notices the peer
closing), `delay` before answering, `stream` SSE chunks at an interval, `reset=True` (close the
socket without answering).
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Reply:
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0
    hang: bool = False
    reset: bool = False
    stream: int = 0  # number of SSE chunks (0: a plain JSON body)
    interval: float = 0.2  # between SSE chunks
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float  # time.monotonic() on arrival
    ended: str = ""

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class MockProvider:
    def __init__(self, name: str) -> None:
        self.name = name
        self._replies: list[Reply] = [Reply()]
        self._lock = threading.Lock()
        self.requests: list[Seen] = []
        self.aborted = threading.Event()  # set when a client closed a hanging/streaming request
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *replies: Reply) -> MockProvider:
        """The n-th request gets the n-th reply; the last one repeats."""
        with self._lock:
            self._replies = list(replies) or [Reply()]
            self.requests = []
            self.aborted.clear()
        return self

    def start(self) -> MockProvider:
        handler = type("Handler", (_Handler,), {"provider": self})
        self._server = Server(("127.0.0.1", 0), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def _next(self, seen: Seen) -> Reply:
        with self._lock:
            self.requests.append(seen)
            index = min(len(self.requests), len(self._replies)) - 1
            return self._replies[index]


class Server(ThreadingHTTPServer):
    """A threaded HTTP server for mocks: daemon threads, a deep accept queue."""

    daemon_threads = True
    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    provider: MockProvider

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        seen = Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
        reply = self.provider._next(seen)
        if reply.reset:
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if reply.hang:
            self._wait_for_close(120)
            return
        if reply.delay and self._wait_for_close(reply.delay):
            return
        try:
            if reply.stream:
                self._stream(reply)
            else:
                self._json(reply, seen)
        except (BrokenPipeError, ConnectionResetError):
            self.provider.aborted.set()
            self.close_connection = True

    def _json(self, reply: Reply, seen: Seen) -> None:
        if reply.body is not None:
            out = reply.body
        elif reply.status < 400:
            model = json.loads(seen.body).get("model") if seen.body else None
            out = json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": model,
                              "provider": self.provider.name,
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}).encode()
        else:
            out = json.dumps({"error": {"message": f"{self.provider.name} says {reply.status}",
                                        "code": reply.status}}).encode()
        self.send_response(reply.status)
        if "content-type" not in {k.lower() for k in reply.headers}:
            self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        if reply.retry_after is not None:
            self.send_header("retry-after", reply.retry_after)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(out)

    def _stream(self, reply: Reply) -> None:
        self.send_response(reply.status)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(reply.stream):
            chunk = f"data: {json.dumps({'provider': self.provider.name, 'i': i, 't': time.time()})}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
            if self._wait_for_close(reply.interval):
                return
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        self.wfile.flush()

    def _wait_for_close(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True (and stop) as soon as the client closes the connection."""
        if peer_closed_within(self.connection, seconds):
            self.provider.aborted.set()
            self.close_connection = True
            return True
        return False


def peer_closed_within(connection: socket.socket, seconds: float) -> bool:
    """Wait up to `seconds`; True as soon as the peer closes `connection` (its data is left unread)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([connection], [], [], min(left, 0.05))
        if ready:
            try:
                if connection.recv(1, socket.MSG_PEEK) == b"":
                    return True
            except OSError:
                return True
    return False

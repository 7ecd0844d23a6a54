"""The control plane's state service: the authoritative table, and the relay between workers.

Usage: `python -m controlplane.state --socket PATH --compiled FILE` (the supervisor starts it; SIGHUP
loads the compiled config again after a reload). With `shared_state` in the config it also
exchanges facts with the other gateways through Redis (`controlplane.state.redis_store`). It
listens on a Unix socket in the stack's private run directory: only the stack's own processes may
report facts (a forged block would steer every request away from a provider).
Each worker holds one `Sync` stream: it says Hello with everything it knows, receives a
snapshot, then reports each new fact; every fact that changes the table is passed on to the
other workers. A worker too slow to keep up is disconnected; it reconnects and catches up
from a fresh snapshot, so no fact is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio

from controlplane.compiled import load as load_compiled
from controlplane.config.runtime import SharedStore
from controlplane.state.codec import clock_offset, from_proto, from_protos, to_proto
from controlplane.state.redis_store import RedisStore
from controlplane.state.table import Fact, StateTable
from controlplane.state.v1 import state_pb2 as pb
from controlplane.state.v1 import state_pb2_grpc as pb_grpc

__all__ = ["StateService", "main", "serve"]

log = logging.getLogger("sidestep.state")
QUEUE_LIMIT = 10_000


@dataclass(eq=False)
class _Peer:
    worker: str
    pid: int
    connected_at: float  # Unix
    config_hash: str
    queue: asyncio.Queue[pb.Fact | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_LIMIT))
    reported: int = 0


class StateService(pb_grpc.StateServicer):
    def __init__(self, config_hash: str, *, shared: SharedStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config_hash = config_hash
        self.clock = clock
        self.table = StateTable()
        self.peers: dict[int, _Peer] = {}
        self._ids = itertools.count()
        # Other gateways' facts go to every worker; this gateway's go to the store.
        self.store = None if shared is None else RedisStore(
            shared, self.table, lambda facts: self._relay(facts, clock_offset(), source=None), clock=clock)

    def _learned(self, facts: list[Fact], offset: float, source: _Peer | None) -> None:
        """Facts a worker taught the table: to the other workers, and to the other gateways."""
        self._relay(facts, offset, source)
        if self.store is not None and facts:
            self.store.publish(facts)

    async def Sync(self, request_iterator: AsyncIterator[pb.Report],  # noqa: N802 - gRPC name
                   context: aio.ServicerContext) -> AsyncIterator[pb.Update]:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("hello"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a Sync stream starts with Hello")
            return  # abort raises; this tells the type checker so
        hello = first.hello
        if hello.config_hash != self.config_hash:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"config {hello.config_hash} is not the control plane's {self.config_hash}")
        peer = _Peer(hello.worker, hello.pid, time.time(), hello.config_hash)
        pid = next(self._ids)
        offset = clock_offset()
        self._learned(self.table.load(from_protos(hello.known, offset)), offset, source=None)
        self.peers[pid] = peer
        log.info("worker %s (pid %d) connected; %d facts known to it", peer.worker, peer.pid, len(hello.known))
        reader = asyncio.create_task(self._read(request_iterator, peer))
        try:
            yield pb.Update(snapshot=self.snapshot())
            while True:
                fact = await peer.queue.get()
                if fact is None:
                    return  # fell behind: it reconnects and catches up from a snapshot
                yield pb.Update(fact=fact)
        finally:
            reader.cancel()
            self.peers.pop(pid, None)
            log.info("worker %s (pid %d) disconnected", peer.worker, peer.pid)

    async def Get(self, request: pb.SnapshotRequest, context: aio.ServicerContext) -> pb.Snapshot:  # noqa: N802
        return self.snapshot()

    def snapshot(self) -> pb.Snapshot:
        offset = clock_offset()
        return pb.Snapshot(
            facts=[to_proto(f, offset) for f in self.table.export(self.clock())],
            workers=[pb.Worker(id=p.worker, pid=p.pid, connected_at=p.connected_at, reported=p.reported,
                               config_hash=p.config_hash) for p in self.peers.values()],
            now=time.time(),
            store=self.store.to_proto() if self.store is not None else None,
        )

    async def _read(self, reports: AsyncIterator[pb.Report], peer: _Peer) -> None:
        try:
            async for report in reports:
                if not report.HasField("fact"):
                    continue
                peer.reported += 1
                offset = clock_offset()
                fact = from_proto(report.fact, offset)
                if fact is not None and self.table.apply(fact):
                    self._learned([fact], offset, source=peer)
        except (aio.AioRpcError, asyncio.CancelledError):
            pass

    def _relay(self, facts: list[Fact], offset: float, source: _Peer | None) -> None:
        for fact in facts:
            message = to_proto(fact, offset)
            for peer in list(self.peers.values()):
                if peer is source:
                    continue
                try:
                    peer.queue.put_nowait(message)
                except asyncio.QueueFull:
                    log.warning("worker %s fell %d facts behind; resyncing it", peer.worker, QUEUE_LIMIT)
                    peer.queue = asyncio.Queue(1)
                    peer.queue.put_nowait(None)


async def serve(socket_path: str, compiled_path: str) -> None:
    compiled, config_hash = load_compiled(compiled_path)
    server = aio.server()
    service = StateService(config_hash, shared=compiled.gateway.shared_state)
    pb_grpc.add_StateServicer_to_server(service, server)
    if os.path.exists(socket_path):  # left behind by a previous process
        os.unlink(socket_path)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    log.info("state service on %s (config %s)", socket_path, config_hash)
    store = asyncio.create_task(service.store.run()) if service.store is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:  # `sidestep reload`: workers with the new config are welcome from now on
        try:
            service.config_hash = load_compiled(compiled_path)[1]
            log.info("config %s loaded", service.config_hash)
        except (OSError, ValueError) as exc:
            log.error("could not load the new config (%s); keeping %s", exc, service.config_hash)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    if store is not None:
        store.cancel()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.state", description=__doc__)
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--compiled", required=True,
                        help="the compiled config (its hash: workers with another are refused; its shared_state)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(args.socket, args.compiled))
    return 0

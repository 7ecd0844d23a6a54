"""A worker's replica of the shared state: its `StateTable`, kept in sync with the control plane.

The worker's hot path only reads and records into the local table; this client reports what
was recorded and applies what the other workers reported, in the background. When the control
plane is unreachable the worker keeps serving with what it knows and retries; on reconnecting it
sends everything it knows (the control plane may have restarted empty) and loads the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

from grpc import aio

from controlplane.state.codec import clock_offset, from_proto, from_protos, to_proto
from controlplane.state.table import Fact, StateTable
from controlplane.state.v1 import state_pb2 as pb
from controlplane.state.v1 import state_pb2_grpc as pb_grpc

__all__ = ["Replica"]

log = logging.getLogger("sidestep.state")
OUTBOX_LIMIT = 10_000


class Replica:
    def __init__(self, table: StateTable, address: str, *, worker: str, config_hash: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.address = address
        self.worker = worker
        self.config_hash = config_hash
        self.clock = clock
        self._outbox: asyncio.Queue[pb.Fact] | None = None  # None while disconnected
        self._session: asyncio.Task[None] | None = None
        self._rehello = False
        table.on_record = self._report

    def _report(self, fact: Fact) -> None:
        if self._outbox is None:
            return  # disconnected: the next Hello carries it
        try:
            self._outbox.put_nowait(to_proto(fact, clock_offset()))
        except asyncio.QueueFull:
            log.warning("state outbox full (%d facts); the next reconnect resends everything", OUTBOX_LIMIT)

    def rehello(self, config_hash: str) -> None:
        """The worker runs another config (a reload): say so in a new Hello."""
        self.config_hash = config_hash
        if self._session is not None:
            self._rehello = True
            self._session.cancel()

    async def run(self) -> None:
        """Stay in sync until cancelled."""
        while True:
            self._session = asyncio.create_task(self._sync())
            try:
                await self._session
            except asyncio.CancelledError:
                if not self._rehello:
                    self._session.cancel()
                    raise
                self._rehello = False

    async def _sync(self) -> None:
        delay = 0.2
        failures = 0
        while True:
            try:
                async with aio.insecure_channel(self.address) as channel:
                    call = pb_grpc.StateStub(channel).Sync(self._reports())
                    async for update in call:
                        offset = clock_offset()
                        if update.HasField("snapshot"):
                            self.table.load(from_protos(update.snapshot.facts, offset))
                            delay, failures = 0.2, 0
                            log.info("worker %s synced with the state service (%d facts)",
                                     self.worker, len(update.snapshot.facts))
                        elif (fact := from_proto(update.fact, offset)) is not None:
                            self.table.apply(fact)
            except aio.AioRpcError as exc:
                failures += 1
                if failures == 3:  # not the first miss: at start-up the service may be a moment behind
                    log.warning("state service %s unavailable (%s); serving with local state, retrying",
                                self.address, exc.code().name)
            finally:
                self._outbox = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _reports(self) -> AsyncIterator[pb.Report]:
        outbox: asyncio.Queue[pb.Fact] = asyncio.Queue(OUTBOX_LIMIT)
        self._outbox = outbox  # from here on every recorded fact is sent after the Hello
        offset = clock_offset()
        known = [to_proto(f, offset) for f in self.table.export(self.clock())]
        yield pb.Report(hello=pb.Hello(worker=self.worker, pid=os.getpid(), config_hash=self.config_hash,
                                       known=known))
        while True:
            yield pb.Report(fact=await outbox.get())

"""State shared by many gateways (`shared_state: {redis_url}`): every gateway's state service
publishes the facts its workers learn to Redis and applies what the other gateways publish.

In Redis, under the config's namespace:
- `<ns>:facts`, a sorted set: every fact still in force, scored by when it expires (Unix seconds).
  A gateway that (re)connects reads it to catch up; ZADD GT keeps the latest expiry of a fact.
- `<ns>:facts`, a pub/sub channel: each batch of new facts (`pb.Shared`), for the gateways
  connected now. Delivery is immediate: a block learned by one gateway reaches the others' workers
  within milliseconds (the documented bound is 100 ms).

The same idempotent merge as between workers (a block keeps its latest end, a retired key stays
retired, a trigger counts once by id) makes every exchange safe to repeat, so a gateway that
reconnects simply publishes everything it knows and reads everything stored.

Nothing on the request path waits for Redis: workers report to the state service, which hands
facts to this store's outbox and returns. When Redis is down the gateway keeps serving with what
it knows, logs it once, retries with backoff, and resyncs both ways when Redis is back.
Keys never reach Redis: a key state carries the key's fingerprint (its masked hint is dropped).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from controlplane.config.runtime import SharedStore
from controlplane.state.codec import clock_offset, from_proto, to_proto
from controlplane.state.table import FOREVER, Block, Fact, KeyState, SlowResponse, StateTable
from controlplane.state.v1 import state_pb2 as pb

__all__ = ["RedisStore"]

log = logging.getLogger("sidestep.state")
OUTBOX_LIMIT = 10_000
BATCH = 500  # facts per pipeline round trip
RETIRED_TTL = 24 * 3600.0  # how long Redis remembers a retired key (each gateway keeps it until restart)
PING_EVERY = 1.0  # an idle connection is checked this often: a hung Redis is noticed within ~3 s
COMMAND_TIMEOUT = 2.0
SWEEP_EVERY = 60.0  # expired facts are removed from the sorted set this often


@dataclass
class Health:
    state: str = "connecting"  # "connecting" | "connected" | "unreachable"
    detail: str = ""
    since: float = 0.0  # Unix seconds
    published: int = 0
    learned: int = 0


def expires(fact: Fact, now_unix: float, offset: float) -> float:
    """When a fact stops mattering (Unix seconds): its sorted-set score."""
    if isinstance(fact, Block):
        return fact.until + offset
    if isinstance(fact, SlowResponse):
        return fact.at + offset + fact.rule.window
    if fact.unauthorized:
        return now_unix + RETIRED_TTL
    return fact.until + offset if fact.until not in (0.0, FOREVER) else now_unix


def stored(fact: Fact, offset: float) -> pb.Fact:
    """The form a fact takes in Redis: a key's masked hint stays home."""
    if isinstance(fact, KeyState):
        fact = KeyState(fact.pool, fact.key_id, "", fact.until, fact.unauthorized, fact.status)
    return to_proto(fact, offset)


class RedisStore:
    def __init__(self, spec: SharedStore, table: StateTable, on_learned: Callable[[list[Fact]], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.table = table
        self.on_learned = on_learned  # facts from other gateways that changed the table: pass to workers
        self.clock = clock
        self.key = f"{spec.namespace}:facts"
        self.channel = f"{spec.namespace}:facts"
        self.origin = uuid.uuid4().hex  # this gateway's messages come back on the channel: skip them
        self.health = Health(since=time.time())
        self._outbox: asyncio.Queue[Fact] | None = None  # None while disconnected

    # ---- the state service's side

    def publish(self, facts: list[Fact]) -> None:
        """Hand facts to the background writer; never waits. While Redis is unreachable they are
        dropped here: the resync on reconnect publishes everything the table holds."""
        outbox = self._outbox
        if outbox is None:
            return
        for fact in facts:
            try:
                outbox.put_nowait(fact)
            except asyncio.QueueFull:
                log.warning("shared store outbox full (%d facts); reconnecting to resync", OUTBOX_LIMIT)
                self._outbox = None  # the writer sees it and ends the connection
                return

    def to_proto(self) -> pb.Store:
        h = self.health
        return pb.Store(url=self.spec.hint, namespace=self.spec.namespace, state=h.state, detail=h.detail,
                        since=h.since, published=h.published, learned=h.learned)

    # ---- the connection

    async def run(self) -> None:
        """Stay connected until cancelled."""
        delay = 0.2
        while True:
            client = aioredis.Redis.from_url(self.spec.url, socket_connect_timeout=COMMAND_TIMEOUT,
                                             socket_timeout=COMMAND_TIMEOUT, health_check_interval=0)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)  # first: nothing published during the resync is missed
                    await self._resync(client)
                    delay = 0.2
                    async with asyncio.TaskGroup() as tasks:
                        tasks.create_task(self._read(pubsub))
                        tasks.create_task(self._write(client))
            except* (RedisError, OSError, _Resync) as group:
                self._down(group.exceptions[0])
            finally:
                self._outbox = None
                await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _resync(self, client: aioredis.Redis) -> None:
        """Publish everything this gateway knows, then apply everything stored: both ways, since
        either side may have learned facts while they could not talk."""
        self._outbox = asyncio.Queue(OUTBOX_LIMIT)  # facts arriving from now on follow the resync
        offset, now_unix = clock_offset(), time.time()
        known = self.table.export(self.clock())
        async with client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.key, "-inf", now_unix)
            for fact in known:
                pipe.zadd(self.key, {stored(fact, offset).SerializeToString(): expires(fact, now_unix, offset)},
                          gt=True)
            if known:
                pipe.publish(self.channel, self._message(known, offset))
            pipe.zrangebyscore(self.key, now_unix, "+inf")
            results = await pipe.execute()
        self.health.published += len(known)
        learned = self._learn(results[-1], offset)
        was = self.health.state
        self.health = replace(self.health, state="connected", detail="", since=time.time())
        if was == "unreachable":
            log.warning("shared store %s is back: resynced (%d facts sent, %d learned)",
                        self.spec.hint, len(known), len(learned))
        else:
            log.info("shared store %s connected: %d facts sent, %d learned", self.spec.hint, len(known), len(learned))

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=PING_EVERY)
            if message is None or message["type"] != "message":
                continue
            try:
                shared = pb.Shared.FromString(message["data"])
            except DecodeError:
                log.warning("ignored a malformed message on %s", self.channel)
                continue
            if shared.origin != self.origin:
                self._learn([f.SerializeToString() for f in shared.facts], clock_offset())

    async def _write(self, client: aioredis.Redis) -> None:
        outbox = self._outbox
        assert outbox is not None
        swept = time.monotonic()
        while True:
            if self._outbox is not outbox:
                raise _Resync()
            try:
                first = await asyncio.wait_for(outbox.get(), PING_EVERY)
            except TimeoutError:
                await client.ping()  # an idle connection to a hung Redis fails here
                if time.monotonic() - swept > SWEEP_EVERY:
                    await client.zremrangebyscore(self.key, "-inf", time.time())
                    swept = time.monotonic()
                continue
            batch = [first]
            while len(batch) < BATCH and not outbox.empty():
                batch.append(outbox.get_nowait())
            offset, now_unix = clock_offset(), time.time()
            async with client.pipeline(transaction=False) as pipe:
                for fact in batch:
                    pipe.zadd(self.key, {stored(fact, offset).SerializeToString(): expires(fact, now_unix, offset)},
                              gt=True)
                pipe.publish(self.channel, self._message(batch, offset))
                await pipe.execute()
            self.health.published += len(batch)

    def _message(self, facts: list[Fact], offset: float) -> bytes:
        return pb.Shared(origin=self.origin, facts=[stored(f, offset) for f in facts]).SerializeToString()

    def _learn(self, raw: list[bytes], offset: float) -> list[Fact]:
        facts: list[Fact] = []
        for data in raw:
            try:
                fact = from_proto(pb.Fact.FromString(data), offset)
            except DecodeError:
                continue  # not ours, or from a newer version: nothing to apply
            if fact is not None:
                facts.append(fact)
        changed = self.table.load(facts)
        if changed:
            self.health.learned += len(changed)
            self.on_learned(changed)
        return changed

    def _down(self, exc: BaseException) -> None:
        if isinstance(exc, _Resync):
            log.info("shared store outbox overflowed; reconnecting to resync")
            return
        detail = f"{type(exc).__name__}: {exc}"
        if self.health.state != "unreachable":
            log.warning("shared store %s unreachable (%s); serving with local state and retrying",
                        self.spec.hint, detail)
            self.health = replace(self.health, state="unreachable", detail=detail, since=time.time())


class _Resync(Exception):
    """The outbox overflowed: reconnect, which republishes everything."""

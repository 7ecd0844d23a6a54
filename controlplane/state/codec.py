"""Facts ↔ protobuf. The wire carries Unix time (processes' monotonic clocks differ, containers
included); tables use their own monotonic clock, so every conversion takes the offset between them."""

from __future__ import annotations

import time
from collections.abc import Iterable

from controlplane.config.runtime import LatencyRule
from controlplane.config.schema import BlockScope
from controlplane.state.table import FOREVER, Block, Fact, KeyState, SlowResponse
from controlplane.state.v1 import state_pb2 as pb

__all__ = ["clock_offset", "from_proto", "from_protos", "to_proto"]


def clock_offset() -> float:
    """Add to a monotonic time to get Unix time."""
    return time.time() - time.monotonic()


def to_proto(fact: Fact, offset: float) -> pb.Fact:
    if isinstance(fact, Block):
        return pb.Fact(block=pb.Block(scope=fact.scope.value, name=fact.name, until=fact.until + offset,
                                      reason=fact.reason))
    if isinstance(fact, SlowResponse):
        rule = fact.rule
        return pb.Fact(slow=pb.SlowResponse(
            id=fact.id, scope=fact.scope.value, name=fact.name, at=fact.at + offset,
            latency_ms=fact.latency * 1000, measure=rule.measure, threshold_ms=rule.threshold * 1000,
            window_seconds=rule.window, min_triggers=rule.min_triggers, block_seconds=rule.block_for))
    until = 0.0 if fact.until in (0.0, FOREVER) else fact.until + offset
    return pb.Fact(key=pb.KeyState(pool=fact.pool, key_id=fact.key_id, hint=fact.hint, until=until,
                                   unauthorized=fact.unauthorized, status=fact.status))


def from_protos(messages: Iterable[pb.Fact], offset: float) -> list[Fact]:
    """The facts this version understands, in order."""
    return [f for f in (from_proto(m, offset) for m in messages) if f is not None]


def from_proto(message: pb.Fact, offset: float) -> Fact | None:
    """None for a message this version does not understand (a newer peer)."""
    kind = message.WhichOneof("kind")
    if kind == "block":
        b = message.block
        return Block(BlockScope(b.scope), b.name, b.until - offset, b.reason)
    if kind == "slow":
        s = message.slow
        rule = LatencyRule(threshold=s.threshold_ms / 1000, measure=s.measure, min_triggers=s.min_triggers,
                           window=s.window_seconds, block_for=s.block_seconds, scope=BlockScope(s.scope))
        return SlowResponse(s.id, BlockScope(s.scope), s.name, s.at - offset, s.latency_ms / 1000, rule)
    if kind == "key":
        k = message.key
        until = k.until - offset if k.until else 0.0
        return KeyState(k.pool, k.key_id, k.hint, until, k.unauthorized, k.status)
    return None

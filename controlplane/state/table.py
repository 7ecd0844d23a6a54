"""The shared state: facts about providers that every ext_proc worker must know, as one pure table.

Three kinds of fact (see protos/controlplane/state/v1/state.proto):
- `Block`: a model or a provider is not to be called until a time (Retry-After, high latency);
- `SlowResponse`: one response over a latency threshold; every table counts them per target inside
  the rule's window and derives the block itself, so all replicas agree without a coordinator;
- `KeyState`: one key of a pool is resting (429) or retired (401/403).

The control plane and every worker hold a `StateTable`. A worker `record`s what it observes
(applied at once, then handed to `on_record`, which reports it) and `apply`s what the others saw.
Applying is idempotent (a block keeps its latest end, a trigger counts once by id, a retired key
stays retired), so facts can be exchanged again after any restart. Times are this process's
monotonic seconds; `controlplane.state.codec` converts them to Unix time on the wire.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controlplane.config.runtime import LatencyRule, Target
from controlplane.config.schema import BlockScope

__all__ = ["FOREVER", "Block", "Blocks", "Fact", "KeyState", "SlowResponse", "StateTable", "block_name"]

FOREVER = math.inf
TRIGGERS_KEPT = 1024  # per target: more than any sane min_triggers


@dataclass(frozen=True, slots=True)
class Block:
    scope: BlockScope
    name: str  # target key for model scope, provider prefix for provider scope
    until: float
    reason: str  # "retry_after 429", "high_latency ttfb 1520ms", …


@dataclass(frozen=True, slots=True)
class SlowResponse:
    id: str  # unique per observation
    scope: BlockScope
    name: str
    at: float
    latency: float  # seconds
    rule: LatencyRule


@dataclass(frozen=True, slots=True)
class KeyState:
    pool: str  # the target key the pool belongs to
    key_id: str
    hint: str
    until: float  # resting until; 0 when not
    unauthorized: bool
    status: int


Fact = Block | SlowResponse | KeyState


def block_name(scope: BlockScope, target: Target) -> str:
    return target.key if scope is BlockScope.MODEL else target.provider


@dataclass(slots=True)
class Blocks:
    """Block bookkeeping on its own: a request's private blocks, and part of every `StateTable`."""

    _by_key: dict[tuple[BlockScope, str], Block] = field(default_factory=dict)

    def put(self, block: Block) -> bool:
        """Keep `block` unless a block that ends later exists. True when the table changed."""
        key = (block.scope, block.name)
        current = self._by_key.get(key)
        if current is not None and current.until >= block.until:
            return False
        self._by_key[key] = block
        return True

    def add(self, scope: BlockScope, target: Target, until: float, reason: str) -> None:
        self.put(Block(scope, block_name(scope, target), until, reason))

    def until(self, target: Target, now: float) -> float:
        """When `target` may be called again; `now` or earlier means it is not blocked."""
        latest = 0.0
        for key in ((BlockScope.MODEL, target.key), (BlockScope.PROVIDER, target.provider)):
            block = self._by_key.get(key)
            if block is not None:
                if block.until <= now:
                    del self._by_key[key]
                elif block.until > latest:
                    latest = block.until
        return latest

    def active(self, now: float) -> list[Block]:
        return [b for b in self._by_key.values() if b.until > now]


class StateTable:
    """Blocks, slow-response triggers and key states, replicated by exchanging facts."""

    def __init__(self, on_record: Callable[[Fact], None] | None = None) -> None:
        self.on_record = on_record
        self.blocks = Blocks()
        self._triggers: dict[tuple[BlockScope, str], deque[SlowResponse]] = {}
        self._trigger_ids: set[str] = set()
        self._keys: dict[tuple[str, str], KeyState] = {}

    # ---- changing the table

    def record(self, fact: Fact) -> None:
        """A fact this process observed: applied now, then reported."""
        self.apply(fact)
        if self.on_record is not None:
            self.on_record(fact)

    def apply(self, fact: Fact) -> bool:
        """Apply a fact (observed here or elsewhere). True when it changed the table."""
        if isinstance(fact, Block):
            return self.blocks.put(fact)
        if isinstance(fact, SlowResponse):
            return self._count(fact)
        return self._set_key(fact)

    def add(self, scope: BlockScope, target: Target, until: float, reason: str) -> None:
        """Block `target` (its model or its provider) until `until`: a fact to share."""
        self.record(Block(scope, block_name(scope, target), until, reason))

    def _count(self, slow: SlowResponse) -> bool:
        if slow.id in self._trigger_ids:
            return False
        self._trigger_ids.add(slow.id)
        triggers = self._triggers.setdefault((slow.scope, slow.name), deque(maxlen=TRIGGERS_KEPT))
        if len(triggers) == triggers.maxlen:
            self._trigger_ids.discard(triggers[0].id)
        triggers.append(slow)
        rule = slow.rule
        recent = sum(1 for t in triggers if slow.at - rule.window < t.at <= slow.at)
        if recent >= rule.min_triggers:
            self.blocks.put(Block(slow.scope, slow.name, slow.at + rule.block_for,
                                  f"high_latency {rule.measure} {slow.latency * 1000:.0f}ms"))
        return True

    def _set_key(self, state: KeyState) -> bool:
        key = (state.pool, state.key_id)
        current = self._keys.get(key)
        if current is not None:
            if current.unauthorized or (not state.unauthorized and current.until >= state.until):
                return False  # a retired key stays retired; a longer rest stays
        self._keys[key] = state
        return True

    # ---- reading it (the hot path)

    def until(self, target: Target, now: float) -> float:
        """When `target` may be called again: its blocks, and for a key pool the first key to rest out
        (`FOREVER` when every key was rejected). `now` or earlier means it is available."""
        blocked = self.blocks.until(target, now)
        return max(blocked, self.pool_until(target, now)) if target.pooled else blocked

    def pool_until(self, target: Target, now: float) -> float:
        """When the first key of `target`'s pool is usable again (≤ now: one is usable now)."""
        if not target.pooled:
            return 0.0
        return min(self.key_until(target, key.id) for key in target.keys)

    def key_until(self, target: Target, key_id: str) -> float:
        state = self._keys.get((target.key, key_id))
        if state is None:
            return 0.0
        return FOREVER if state.unauthorized else state.until

    def usable_key(self, target: Target, now: float) -> int | None:
        """Index of the first key of `target` that is neither resting nor retired."""
        for index, key in enumerate(target.keys):
            if self.key_until(target, key.id) <= now:
                return index
        return None

    # ---- exchanging it

    def export(self, now: float) -> list[Fact]:
        """Every fact still in force: what a (re)connecting peer needs to catch up."""
        facts: list[Fact] = list(self.blocks.active(now))
        for triggers in self._triggers.values():
            facts.extend(t for t in triggers if t.at > now - t.rule.window)
        facts.extend(k for k in self._keys.values() if k.unauthorized or k.until > now)
        return facts

    def load(self, facts: Iterable[Fact]) -> list[Fact]:
        """Apply many facts; the ones that changed the table (to pass on to others)."""
        return [f for f in facts if self.apply(f)]

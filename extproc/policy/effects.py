"""What a retry decision changes, as values, and the one place they are written.

`next_attempt` never writes the shared table, the pacer or the request's blocks: it reads them
through a `View`, which also shows what this decision has already decided (a key it just rested, a
block it just learned), and returns the changes as `Effects`. The caller applies them with `apply`.

Usage: `decision, effects = next_attempt(...); apply(effects, table, pacer, state)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.config.runtime import Target
from controlplane.config.schema import BlockScope
from controlplane.state.table import Block, Blocks, Fact, StateTable, block_name
from extproc.policy.pacing import Pacer
from extproc.policy.state import RequestState

__all__ = ["Effects", "PacingSlot", "View", "apply"]


@dataclass(frozen=True, slots=True)
class PacingSlot:
    """A delayed retry to `target_key` reserved its start; the next one waits `gap` after it."""

    target_key: str
    start: float
    gap: float


@dataclass(slots=True)
class Effects:
    facts: list[Fact] = field(default_factory=list)  # shared with every worker: blocks, key states
    request_blocks: list[Block] = field(default_factory=list)  # this request only (apply_to: request)
    pacing: PacingSlot | None = None


class View:
    """The shared table and the request's own blocks as a decision sees them: what they say, plus the
    changes the decision has made so far (which `effects` collects)."""

    def __init__(self, table: StateTable, state: RequestState) -> None:
        self.table = table
        self.state = state
        self.effects = Effects()
        self._facts = StateTable()  # the decision's own facts, to read back
        self._request = Blocks()

    def record(self, fact: Fact) -> None:
        self.effects.facts.append(fact)
        self._facts.apply(fact)

    def block(self, scope: BlockScope, target: Target, until: float, reason: str, *, shared: bool) -> None:
        block = Block(scope, block_name(scope, target), until, reason)
        if shared:
            self.record(block)
        else:
            self.effects.request_blocks.append(block)
            self._request.put(block)

    def until(self, target: Target, now: float) -> float:
        """When `target` may be called again by any request (its blocks, its key pool)."""
        blocked = max(self.table.blocks.until(target, now), self._facts.blocks.until(target, now))
        return max(blocked, self.pool_until(target, now)) if target.pooled else blocked

    def request_until(self, target: Target, now: float) -> float:
        """`until`, and this request's own blocks."""
        return max(self.until(target, now), self.state.blocks.until(target, now), self._request.until(target, now))

    def key_until(self, target: Target, key_id: str) -> float:
        return max(self.table.key_until(target, key_id), self._facts.key_until(target, key_id))

    def pool_until(self, target: Target, now: float) -> float:
        if not target.pooled:
            return 0.0
        return min(self.key_until(target, key.id) for key in target.keys)

    def usable_key(self, target: Target, now: float) -> int | None:
        for index, key in enumerate(target.keys):
            if self.key_until(target, key.id) <= now:
                return index
        return None


def apply(effects: Effects, table: StateTable, pacer: Pacer, state: RequestState) -> None:
    """Write a decision's effects: shared facts into the table (and so to every worker), the request's
    own blocks into its state, a pacing slot into the pacer."""
    for fact in effects.facts:
        table.record(fact)
    for block in effects.request_blocks:
        state.blocks.put(block)
    if effects.pacing is not None:
        pacer.reserve(effects.pacing.target_key, effects.pacing.start, effects.pacing.gap)

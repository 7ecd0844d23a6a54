"""Blocks: a model or a whole provider is not to be called until a given time.

A table is either request-scoped (lives in the request's state) or global (owned by the worker
and, later, shared through the control plane). Times are monotonic seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.config.runtime import Target
from controlplane.config.schema import BlockScope

__all__ = ["Block", "Blocks"]


@dataclass(frozen=True, slots=True)
class Block:
    scope: BlockScope
    name: str  # target key for model scope, provider prefix for provider scope
    until: float
    reason: str  # "retry_after 429", …


@dataclass(slots=True)
class Blocks:
    _by_key: dict[tuple[BlockScope, str], Block] = field(default_factory=dict)

    def add(self, scope: BlockScope, target: Target, until: float, reason: str) -> None:
        """Block `target`'s model or provider until `until`; an existing longer block stays."""
        name = target.key if scope is BlockScope.MODEL else target.provider
        current = self._by_key.get((scope, name))
        if current is None or current.until < until:
            self._by_key[(scope, name)] = Block(scope, name, until, reason)

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

"""Which target an attempt goes to."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from controlplane.config.runtime import Target
from controlplane.config.schema import Strategy

__all__ = ["first_available", "next_target"]


def next_target(strategy: Strategy, failed: Target, order: Iterable[Target], tried: set[str],
                available: Callable[[Target], bool]) -> Target | None:
    """The next target under `strategy` after `failed`, or None when the strategy has none left.

    `order` is the failover order (fallback_models first, then the other providers in config
    order). `same_model` retries `failed` itself; the others take the first untried, available
    candidate of the same provider (other model) or of a different provider.
    """
    if strategy is Strategy.SAME_MODEL:
        return failed if available(failed) else None
    same = strategy is Strategy.SAME_PROVIDER
    for candidate in order:
        if candidate.key in tried or (candidate.provider == failed.provider) != same:
            continue
        if available(candidate):
            return candidate
    return None


def first_available(order: Iterable[Target], tried: set[str], available: Callable[[Target], bool]) -> Target | None:
    """Failing over without a strategy constraint: the first untried, available candidate."""
    for candidate in order:
        if candidate.key not in tried and available(candidate):
            return candidate
    return None

"""Which target an attempt goes to."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from controlplane.config.runtime import Target
from controlplane.config.schema import Strategy

__all__ = ["allowed", "first_available", "next_target"]


def allowed(strategy: Strategy, failed: Target, tried: Collection[Target]) -> Callable[[Target], bool]:
    """Which targets `strategy` may pick after `failed`, blocks aside: `same_model` only `failed`;
    `same_provider` an untried model of `failed`'s provider; `different_provider` a model of a provider
    this request has not tried yet (a provider that failed once is not come back to)."""
    if strategy is Strategy.SAME_MODEL:
        return lambda c: c.key == failed.key
    tried_keys = {t.key for t in tried}
    if strategy is Strategy.SAME_PROVIDER:
        return lambda c: c.provider == failed.provider and c.key not in tried_keys
    tried_providers = {t.provider for t in tried}
    return lambda c: c.provider not in tried_providers


def next_target(strategy: Strategy, failed: Target, order: Iterable[Target], tried: Collection[Target],
                available: Callable[[Target], bool]) -> Target | None:
    """The next target under `strategy` after `failed` (see `allowed`), or None when the strategy has
    none left. `order` is the failover order (fallback_models first, then the other providers in
    config order)."""
    if strategy is Strategy.SAME_MODEL:
        return failed if available(failed) else None
    eligible = allowed(strategy, failed, tried)
    return next((c for c in order if eligible(c) and available(c)), None)


def first_available(order: Iterable[Target], tried: Collection[Target],
                    available: Callable[[Target], bool]) -> Target | None:
    """Failing over without a strategy constraint: the first untried, available candidate."""
    tried_keys = {t.key for t in tried}
    return next((c for c in order if c.key not in tried_keys and available(c)), None)

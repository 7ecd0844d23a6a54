"""Which target an attempt goes to."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from controlplane.config.runtime import Target
from controlplane.config.schema import Strategy

__all__ = ["first_available", "next_target"]


def next_target(strategy: Strategy, failed: Target, order: Iterable[Target], tried: Collection[Target],
                available: Callable[[Target], bool]) -> Target | None:
    """The next target under `strategy` after `failed`, or None when the strategy has none left.

    `order` is the failover order (fallback_models first, then the other providers in config
    order). `same_model` retries `failed` itself; `same_provider` takes the first untried model of
    `failed`'s provider; `different_provider` the first model of a provider this request has not
    tried yet (a provider that failed once is not come back to).
    """
    if strategy is Strategy.SAME_MODEL:
        return failed if available(failed) else None
    tried_keys = {t.key for t in tried}
    if strategy is Strategy.SAME_PROVIDER:
        eligible = lambda c: c.provider == failed.provider and c.key not in tried_keys  # noqa: E731
    else:
        tried_providers = {t.provider for t in tried}
        eligible = lambda c: c.provider not in tried_providers  # noqa: E731
    return next((c for c in order if eligible(c) and available(c)), None)


def first_available(order: Iterable[Target], tried: Collection[Target],
                    available: Callable[[Target], bool]) -> Target | None:
    """Failing over without a strategy constraint: the first untried, available candidate."""
    tried_keys = {t.key for t in tried}
    return next((c for c in order if c.key not in tried_keys and available(c)), None)

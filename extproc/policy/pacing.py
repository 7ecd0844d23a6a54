"""Pacing: delayed retries to one target start at least a backoff base apart, with jitter.

Without it, fifty requests that got a 429 together would all retry together when their backoff
(or the Retry-After) ends, and get fifty 429s again. Immediate failovers are never paced: a healthy
fallback takes the traffic at once. Each worker paces its own retries (no round trip to the
control plane per retry), so N workers allow up to N retries per gap.
"""

from __future__ import annotations

import random

from controlplane.config.schema import Backoff

__all__ = ["Pacer"]


class Pacer:
    def __init__(self) -> None:
        self._free_at: dict[str, float] = {}  # target key → earliest start of its next delayed retry

    def delay(self, target_key: str, earliest: float) -> float:
        """How much later than `earliest` a delayed retry to `target_key` must start (0: not at all)."""
        return max(0.0, self._free_at.get(target_key, 0.0) - earliest)

    @staticmethod
    def gap(backoff: Backoff, rng: random.Random) -> float:
        """The gap a delayed retry leaves before the next one to the same target: the backoff base,
        times a random factor in [1, 1.5) with jitter."""
        gap = backoff.base_ms / 1000
        return gap * (1 + rng.random() / 2) if backoff.jitter else gap

    def reserve(self, target_key: str, start: float, gap: float) -> None:
        """Reserve `start`: the next delayed retry to the target waits `gap` after it."""
        self._free_at[target_key] = max(self._free_at.get(target_key, 0.0), start + gap)

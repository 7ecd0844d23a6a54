"""The retry decision after each attempt: retry where and after how long, deliver, or give up.

Semantics (see README "Retry semantics"): the primary model's policy governs the whole request;
each failure class (a status rule, timeouts, connection failures) has its own strategy and its
own count of retries; the wait is the larger of the backoff (when its `apply_to` matches the next
target) and the remaining block on the next target (a Retry-After it sent); a Retry-After longer
than `max_retry_after_seconds` is never waited on: the target is blocked and the request fails over.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controlplane.config.runtime import Policy, Rule, Target
from controlplane.config.schema import Backoff, BackoffApplyTo, BlockApplyTo, Strategy
from extproc.policy.blocks import Blocks
from extproc.policy.classify import ErrorType, Outcome
from extproc.policy.selection import first_available, next_target
from extproc.policy.state import RequestState

__all__ = ["Decision", "Deliver", "GiveUp", "Retry", "backoff_delay", "first_target", "next_attempt"]


@dataclass(frozen=True, slots=True)
class Retry:
    target: Target
    wait: float  # seconds before the attempt starts
    rule: str  # label of the failure class that retried


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand the provider's response to the client as it is."""


@dataclass(frozen=True, slots=True)
class GiveUp:
    status: int
    reason: str  # "max_attempts" | "no_candidates" | "budget" | "all_blocked" | "no_retry_policy"
    retry_after: int | None = None  # seconds, for a 429


Decision = Retry | Deliver | GiveUp
DELIVER = Deliver()


def backoff_delay(backoff: Backoff, retry_number: int, rng: random.Random) -> float:
    """min(base·2^(n−1), max) seconds for the n-th retry, times a factor in [0.5, 1) with jitter."""
    delay = min(backoff.base_ms * 2 ** (retry_number - 1), backoff.max_ms) / 1000
    return delay * (0.5 + rng.random() / 2) if backoff.jitter else delay


def first_target(primary: Target, order: Sequence[Target], blocks: Blocks, now: float) -> Target | GiveUp:
    """The first attempt's target: the primary unless a global block says otherwise (then fail over)."""
    if primary.policy is None or blocks.until(primary, now) <= now:
        return primary
    for candidate in order:
        if blocks.until(candidate, now) <= now:
            return candidate
    remaining = min(blocks.until(t, now) for t in (primary, *order)) - now
    return GiveUp(429, "all_blocked", math.ceil(remaining))


def next_attempt(state: RequestState, outcome: Outcome, order: Sequence[Target], *, now: float,
                 blocks: Blocks, rng: random.Random) -> Decision:
    """Decide after the current attempt ended with `outcome`. Records Retry-After blocks.

    `order` is the primary's failover order (`Gateway.order`); `blocks` the global table.
    """
    policy = state.primary.policy
    attempt = state.current
    if outcome.ok or attempt is None:
        return DELIVER
    if policy is None:
        # no provider answer to pass through: say what happened instead of Envoy's text
        unanswered = outcome.error_type in (ErrorType.TIMEOUT, ErrorType.CONNECTION)
        return GiveUp(outcome.status, "no_retry_policy") if unanswered else DELIVER
    rule = _rule_for(policy, outcome)
    if rule is None:
        return DELIVER
    failed = attempt.target
    handling = policy.retry_after
    if outcome.retry_after is not None and outcome.retry_after > 0:
        table = blocks if handling.apply_to is BlockApplyTo.GLOBAL else state.blocks
        table.add(handling.scope, failed, now + outcome.retry_after, f"retry_after {outcome.status}")

    def blocked_until(target: Target) -> float:
        return max(blocks.until(target, now), state.blocks.until(target, now))

    def available(target: Target) -> bool:
        return blocked_until(target) <= now

    everything = (state.primary, *order)
    if state.retries_for(rule.label) >= rule.max_attempts:
        return _give_up(outcome, "max_attempts", everything, blocked_until, now)
    tried = state.tried()
    if rule.strategy is Strategy.SAME_MODEL:
        if blocked_until(failed) - now <= handling.max_retry_after_seconds:
            chosen: Target | None = failed  # wait out its Retry-After
        else:
            chosen = first_available(everything, tried, available)
    else:
        chosen = next_target(rule.strategy, failed, everything, tried, available)
    if chosen is None:
        return _give_up(outcome, "no_candidates", everything, blocked_until, now)
    wait = max(0.0, blocked_until(chosen) - now)
    if policy.backoff is not None and _backoff_applies(policy.backoff.apply_to, failed, chosen):
        wait = max(wait, backoff_delay(policy.backoff, state.attempt_number, rng))
    if policy.max_retry_duration is not None and now + wait - state.started > policy.max_retry_duration:
        return _give_up(outcome, "budget", everything, blocked_until, now)
    return Retry(chosen, wait, rule.label)


def _rule_for(policy: Policy, outcome: Outcome) -> Rule | None:
    if outcome.error_type is ErrorType.TIMEOUT:
        return policy.timeout_rule
    if outcome.error_type is ErrorType.CONNECTION:
        return policy.connection_rule
    return policy.status_rules.get(outcome.status)


def _backoff_applies(apply_to: BackoffApplyTo, failed: Target, chosen: Target) -> bool:
    if apply_to is BackoffApplyTo.SAME_MODEL:
        return chosen.key == failed.key
    if apply_to is BackoffApplyTo.SAME_PROVIDER:
        return chosen.provider == failed.provider
    return True


def _give_up(outcome: Outcome, reason: str, everything: Sequence[Target], blocked_until: Callable[[Target], float],
             now: float) -> GiveUp:
    retry_after = None
    if outcome.error_type is ErrorType.RATE_LIMITED:
        remaining = [blocked_until(t) - now for t in everything]
        if all(r > 0 for r in remaining):
            retry_after = math.ceil(min(remaining))  # every target is rate-limited: when the first frees up
        elif outcome.retry_after:
            retry_after = math.ceil(outcome.retry_after)
    return GiveUp(outcome.status, reason, retry_after)

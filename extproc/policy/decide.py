"""The retry decision after each attempt: retry where and after how long, deliver, or give up.

Semantics (see README "Retry semantics"): the primary model's policy governs the whole request;
each failure class (a status rule, timeouts, connection failures) has its own strategy and its
own count of retries; the wait is the larger of the backoff (when its `apply_to` matches the next
target) and the remaining block on the next target (a Retry-After it sent); a Retry-After longer
than `max_retry_after_seconds` is never waited on: the target is blocked and the request fails over.
Delayed retries to one target are paced (`Pacer`). A key pool (`access_keys`) is walked first:
a 429/401/403 rests or retires the key and the request moves to the next key at once, with or
without a policy; only an exhausted pool becomes a failure of the target.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from controlplane.config.runtime import Policy, Rule, Target
from controlplane.config.schema import Backoff, BackoffApplyTo, BlockApplyTo, BlockScope, Strategy
from controlplane.state.table import FOREVER, KeyState, StateTable
from extproc.policy.classify import ErrorType, Meaning, Outcome
from extproc.policy.effects import Effects, PacingSlot, View
from extproc.policy.pacing import Pacer
from extproc.policy.selection import allowed, first_available, next_target
from extproc.policy.state import RequestState

__all__ = ["Decision", "Deliver", "GiveUp", "Retry", "backoff_delay", "first_target", "next_attempt"]

KEY_RULE = "key"  # label of a retry with the pool's next key (counted against no rule)
KEY_REST_DEFAULT = 60.0  # seconds a key rests after a 429 without Retry-After
KEY_REST_MIN = 1.0  # `Retry-After: 0` must not make the same key come straight back
QUOTA_BLOCK = 3600.0  # seconds a key (or target) out of quota or credit is left alone
PACING = Backoff()  # the gap between paced retries when a policy sets no backoff


@dataclass(frozen=True, slots=True)
class Retry:
    target: Target
    wait: float  # seconds before the attempt starts
    rule: str  # label of the failure class that retried
    why: str = ""  # what the wait is for: "blocked" (Retry-After, a latency block, resting keys), "backoff",
    #               either with "+paced" (behind other requests retrying the same target); "" without a wait


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand the provider's response to the client as it is."""

    until_last_byte: bool = False  # follow the body to its end: latency is measured at the last byte


@dataclass(frozen=True, slots=True)
class GiveUp:
    status: int
    reason: str  # "max_attempts" | "no_candidates" | "budget" | "deadline" | "all_blocked" | "no_retry_policy" | "keys_…"
    retry_after: int | None = None  # seconds, for a 429


Decision = Retry | Deliver | GiveUp
DELIVER = Deliver()


def backoff_delay(backoff: Backoff, retry_number: int, rng: random.Random) -> float:
    """min(base·2^(n−1), max) seconds for the n-th retry, times a factor in [0.5, 1) with jitter."""
    delay = min(backoff.base_ms * 2 ** (retry_number - 1), backoff.max_ms) / 1000
    return delay * (0.5 + rng.random() / 2) if backoff.jitter else delay


def _anything(target: Target) -> bool:
    return True


def first_target(primary: Target, order: Sequence[Target], table: StateTable, now: float,
                 eligible: Callable[[Target], bool] = _anything, *, fails_over: bool = True,
                 limit: float | None = None) -> Target | Retry | GiveUp:
    """The first attempt's target: the primary unless a global block says otherwise (then fail over
    to the first `eligible` candidate: one that can serve this request). When every candidate is
    blocked, wait for the first to free up if that ends before `limit` (the client's deadline or the
    policy's budget) and within `max_retry_after_seconds` (a `Retry` from now); else give up.

    Without a policy (or for a request that never fails over, `fails_over=False`) only the primary's
    own key pool can stop it: there is nowhere to fail over to.
    """
    if primary.policy is None or not fails_over:
        return primary if table.pool_until(primary, now) <= now else _pool_exhausted(primary, table, now)
    if table.until(primary, now) <= now:
        return primary  # the usual case: nothing else is looked at
    everything = (primary, *(t for t in order if eligible(t)))
    for candidate in everything:
        if table.until(candidate, now) <= now:
            return candidate
    until, soonest = min(((table.until(t, now), t) for t in everything), key=lambda pair: pair[0])
    if limit is not None and until <= limit and until - now <= primary.policy.retry_after.max_retry_after_seconds:
        return Retry(soonest, until - now, "blocked", "blocked")  # everything is blocked, but not for longer than we may wait
    remaining = until - now
    if remaining == FOREVER:
        return GiveUp(502, "keys_unauthorized")
    return GiveUp(429, "all_blocked", math.ceil(remaining))


def next_attempt(state: RequestState, outcome: Outcome, order: Sequence[Target], *, now: float,
                 table: StateTable, pacer: Pacer, rng: random.Random,
                 eligible: Callable[[Target], bool] = _anything) -> tuple[Decision, Effects]:
    """Decide after the current attempt ended with `outcome`: the decision, and what it changes (key
    states, blocks, a pacing slot) as values for the caller to `apply`. Nothing is written here.

    `order` is the primary's failover order (`Gateway.order`); `eligible` says which of them can serve
    this request (its API family, its kind of model, its body); `table` the worker's shared state.
    """
    view = View(table, state)
    return _decide(state, outcome, order, now, view, pacer, rng, eligible), view.effects


def _decide(state: RequestState, outcome: Outcome, order: Sequence[Target], now: float, view: View, pacer: Pacer,
            rng: random.Random, eligible: Callable[[Target], bool]) -> Decision:
    policy = state.policy
    attempt = state.current
    if outcome.ok or attempt is None:
        return DELIVER
    failed = attempt.target
    if policy is not None and outcome.meaning is Meaning.CONTENT_POLICY:
        return DELIVER  # every model would refuse it: the provider's reason goes to the client
    if outcome.meaning is Meaning.QUOTA:  # out of credit: no use coming back soon, unlike a burst 429
        outcome = Outcome(outcome.status, ErrorType.RATE_LIMITED, max(outcome.retry_after or 0.0, QUOTA_BLOCK),
                          Meaning.QUOTA)
        if not failed.pooled and policy is not None:
            view.block(BlockScope.MODEL, failed, now + QUOTA_BLOCK, f"quota {outcome.status}", shared=True)
    pool: GiveUp | None = None  # set when this attempt used up the target's key pool
    if failed.pooled and outcome.error_type in (ErrorType.RATE_LIMITED, ErrorType.AUTH):
        view.record(_key_state(failed, attempt.key, outcome, now))
        if view.usable_key(failed, now) is not None:
            return Retry(failed, 0.0, KEY_RULE)
        pool = _pool_exhausted(failed, view, now)
        # the pool's rest is in the table: no Retry-After block on the whole target
        outcome = Outcome(pool.status, outcome.error_type)
    if policy is None:
        if pool is not None:
            return pool
        # no provider answer to pass through: say what happened instead of Envoy's text
        unanswered = outcome.error_type in (ErrorType.TIMEOUT, ErrorType.CONNECTION)
        return GiveUp(outcome.status, "no_retry_policy") if unanswered else DELIVER
    if outcome.meaning is Meaning.CONTEXT_LENGTH:
        return _larger_context(state, failed, order, view, now, eligible)
    rule = _rule_for(policy, outcome)
    if rule is None:
        return pool or DELIVER
    handling = policy.retry_after
    if outcome.retry_after is not None and outcome.retry_after > 0:
        view.block(handling.scope, failed, now + outcome.retry_after, f"retry_after {outcome.status}",
                   shared=handling.apply_to is BlockApplyTo.GLOBAL)

    def blocked_until(target: Target) -> float:
        return view.request_until(target, now)

    def available(target: Target) -> bool:
        return blocked_until(target) <= now and (target is state.primary or eligible(target))

    def give_up(reason: str) -> GiveUp:
        candidates = [t for t in everything if t is state.primary or eligible(t)]
        decision = _give_up(outcome, reason, candidates, blocked_until, now)
        return GiveUp(decision.status, pool.reason, decision.retry_after) if pool else decision

    everything = (state.primary, *order)
    retries = state.retries_for(rule.label)
    strategy = rule.strategy
    if retries >= rule.max_attempts:  # spent: give up, or go on with the rule's `then` strategy
        if rule.then is None or retries >= rule.max_attempts + rule.then_max_attempts:
            return give_up("max_attempts")
        strategy = rule.then
    tried = state.tried()
    if strategy is Strategy.SAME_MODEL:
        if blocked_until(failed) - now <= handling.max_retry_after_seconds:
            chosen: Target | None = failed  # wait out its Retry-After
        else:
            chosen = first_available(everything, tried, available)
    else:
        chosen = next_target(strategy, failed, everything, tried, available)
    if chosen is None:
        may = allowed(strategy, failed, tried) if strategy is not Strategy.SAME_MODEL else (lambda t: t not in tried)
        later = (t for t in everything if may(t) and (t is state.primary or eligible(t)))
        soonest = _wait_for_block(state, later, blocked_until, policy, now)
        if soonest is None:
            return give_up("no_candidates")
        chosen = soonest
    wait = max(0.0, blocked_until(chosen) - now)
    why = "blocked" if wait > 0 else ""
    if policy.backoff is not None and _backoff_applies(policy.backoff.apply_to, failed, chosen):
        backoff = backoff_delay(policy.backoff, state.attempt_number, rng)
        if backoff > wait:
            wait, why = backoff, "backoff"
    if wait > 0:  # a delayed retry: take its turn behind the other requests retrying this target
        paced = pacer.delay(chosen.key, now + wait)
        if paced > 0:
            wait, why = wait + paced, why + "+paced"
    limit = state.limit(policy.max_retry_duration)
    if limit is not None and now + wait > limit:  # a wait that cannot end in time is not started
        return give_up("deadline" if limit == state.deadline else "budget")
    if wait > 0:
        view.effects.pacing = PacingSlot(chosen.key, now + wait, Pacer.gap(policy.backoff or PACING, rng))
    return Retry(chosen, wait, rule.label, why)


def _key_state(target: Target, index: int, outcome: Outcome, now: float) -> KeyState:
    """A 429 rests the key for its Retry-After; a 401/403 retires it until the config is reloaded."""
    key = target.keys[index]
    if outcome.error_type is ErrorType.RATE_LIMITED:
        rest = KEY_REST_DEFAULT if outcome.retry_after is None else max(outcome.retry_after, KEY_REST_MIN)
        return KeyState(target.key, key.id, key.hint, now + rest, False, outcome.status)
    return KeyState(target.key, key.id, key.hint, 0.0, True, outcome.status)


def _pool_exhausted(target: Target, table: StateTable | View, now: float) -> GiveUp:
    """No key of the pool is usable: 429 until the first one rests out, or 502 when all were rejected."""
    until = table.pool_until(target, now)
    if until == FOREVER:
        return GiveUp(502, "keys_unauthorized")
    return GiveUp(429, "keys_rate_limited", math.ceil(until - now))


def _rule_for(policy: Policy, outcome: Outcome) -> Rule | None:
    if outcome.error_type is ErrorType.TIMEOUT:
        return policy.timeout_rule
    if outcome.error_type is ErrorType.CONNECTION:
        return policy.connection_rule
    rule = policy.status_rules.get(outcome.status)
    if rule is None and outcome.meaning is Meaning.QUOTA:  # a 402, or a 403 saying so: a rate limit's rule
        return policy.status_rules.get(429)
    return rule


def _larger_context(state: RequestState, failed: Target, order: Sequence[Target], view: View, now: float,
                    eligible: Callable[[Target], bool]) -> Decision:
    """A prompt too long for `failed`: the first untried candidate with a larger context window, or the
    provider's own error when there is none (the same request to a model of the same size fails the same)."""
    size = failed.max_input_tokens
    if size is None:
        return DELIVER
    tried = {t.key for t in state.tried()}
    for candidate in order:
        window = candidate.max_input_tokens
        if (window is not None and window > size and candidate.key not in tried and eligible(candidate)
                and view.request_until(candidate, now) <= now):
            return Retry(candidate, 0.0, "context_length")
    return DELIVER


def _backoff_applies(apply_to: BackoffApplyTo, failed: Target, chosen: Target) -> bool:
    if apply_to is BackoffApplyTo.SAME_MODEL:
        return chosen.key == failed.key
    if apply_to is BackoffApplyTo.SAME_PROVIDER:
        return chosen.provider == failed.provider
    return True


def _wait_for_block(state: RequestState, candidates: Iterable[Target], blocked_until: Callable[[Target], float],
                    policy: Policy, now: float) -> Target | None:
    """When every target the strategy allows is blocked for a while: the one that frees up first, if
    its block ends before the client's deadline (or the budget) and within `max_retry_after_seconds`.
    Waiting a few seconds beats failing at once when a burst of 429s blocked everything."""
    limit = state.limit(policy.max_retry_duration)
    if limit is None:
        return None
    blocked = [(blocked_until(t), t) for t in candidates if blocked_until(t) > now]
    if not blocked:
        return None
    until, target = min(blocked, key=lambda pair: pair[0])
    if until >= FOREVER or until > limit or until - now > policy.retry_after.max_retry_after_seconds:
        return None
    return target


def _give_up(outcome: Outcome, reason: str, everything: Sequence[Target], blocked_until: Callable[[Target], float],
             now: float) -> GiveUp:
    soonest = min(blocked_until(t) for t in everything) - now
    if 0 < soonest < FOREVER:  # every candidate is blocked: come back when the first one frees up
        return GiveUp(429, reason, math.ceil(soonest))
    retry_after = None
    if outcome.error_type is ErrorType.RATE_LIMITED and outcome.retry_after:
        retry_after = math.ceil(outcome.retry_after)
    return GiveUp(outcome.status, reason, retry_after)

"""Per-request bookkeeping between Envoy's per-attempt streams and the pure policy.

Envoy opens one ext_proc stream per attempt; the request's history lives here, keyed by the
`x-request-id` Envoy generated (never a client-chosen id). No grpc in this module: the servicer
feeds it plain values and turns its answers into protobuf.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from controlplane import apierrors
from controlplane.apierrors import ApiError
from controlplane.config.runtime import ClientKey, Gateway, Target
from controlplane.state.table import SlowResponse, StateTable, block_name
from extproc.auth import Credentials
from extproc.body import BadBody, ModelField, find_model, replace_model
from extproc.policy.classify import ErrorType, Outcome, classify
from extproc.policy.decide import Decision, Deliver, GiveUp, Retry, first_target, next_attempt
from extproc.policy.errors import exhausted
from extproc.policy.pacing import Pacer
from extproc.policy.state import Attempt, RequestState

__all__ = ["AttemptPlan", "Coordinator"]

log = logging.getLogger("sidestep.extproc")


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """Send this attempt to `target` with key `key` and `body`, after waiting until `state.not_before`."""

    state: RequestState
    target: Target
    key: int
    body: bytes


class Coordinator:
    """Owns in-flight request state, the worker's replica of the shared state (`table`) and its
    retry pacing. Usage: see `extproc.servicer`."""

    def __init__(self, gateway: Gateway, *, origin: str = "local", clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, rng: random.Random | None = None,
                 state_ttl: float = 900.0) -> None:
        self.gateway = gateway
        self.table = StateTable()  # kept in sync with the other workers by a `Replica`, when there is one
        self.pacer = Pacer()
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.requests: dict[str, RequestState] = {}
        self.state_ttl = state_ttl
        self._trigger_ids = (f"{origin}.{n}" for n in itertools.count())

    def begin_attempt(self, request_id: str, envoy_attempt: int, path: str, credentials: Credentials, body: bytes,
                      client: ClientKey | None = None) -> AttemptPlan | ApiError:
        """Called with each attempt's request body: where it goes, or the error that ends the request.

        `credentials`: the client's own (a gateway key already taken out); `client`: the gateway key
        it authenticated with, when the gateway requires one."""
        now = self.clock()
        state = self.requests.get(request_id)
        if envoy_attempt <= 1:
            return self._first_attempt(request_id, path, credentials, body, client, now)
        if state is None:  # a retry whose history died with another worker: its headers are not the client's
            return apierrors.state_lost()
        current = state.current
        if current is not None and current.outcome is None:
            # Envoy retried on its own (reset of the internal hop): the attempt never answered.
            decision = self._decide(request_id, state, Outcome(502, ErrorType.CONNECTION), now)
            if isinstance(decision, GiveUp):  # a connection failure is never simply delivered
                self.requests.pop(request_id, None)
                return exhausted(state, decision)
        return self._plan(state, body, now)

    def end_attempt(self, request_id: str, status: int, details: str | None, retry_after: str | None) -> Decision:
        """Called with each attempt's response headers: deliver, retry (recorded), or give up."""
        state = self.requests.get(request_id)
        if state is None or state.current is None:
            return Deliver()
        now = self.clock()
        outcome = classify(status, details, retry_after, self.wall_clock())
        decision = self._decide(request_id, state, outcome, now)
        if not isinstance(decision, Retry):
            del self.requests[request_id]
        if isinstance(decision, Deliver) and state.primary.policy and state.primary.policy.latency:
            if state.primary.policy.latency.measure == "total":
                return Deliver(until_last_byte=True)  # measured by `response_complete`
            self._observe_latency(state, now)
        return decision

    def response_complete(self, state: RequestState) -> None:
        """The last byte of a delivered response (asked for with `Deliver(until_last_byte=True)`)."""
        self._observe_latency(state, self.clock())

    def _observe_latency(self, state: RequestState, now: float) -> None:
        """A response slower than the policy's threshold is a trigger (shared); enough of them block."""
        rule = state.primary.policy.latency if state.primary.policy else None
        attempt = state.current
        if rule is None or attempt is None:
            return
        latency = now - attempt.started
        if latency > rule.threshold:
            name = block_name(rule.scope, attempt.target)
            self.table.record(SlowResponse(next(self._trigger_ids), rule.scope, name, now, latency, rule))
            log.info("slow response model=%s %s=%.0fms threshold=%.0fms", attempt.target.key, rule.measure,
                     latency * 1000, rule.threshold * 1000)

    def sweep(self) -> int:
        """Forget requests whose client went away mid-way (their last stream was cancelled)."""
        horizon = self.clock() - self.state_ttl
        stale = [rid for rid, s in self.requests.items() if max(s.started, s.not_before) < horizon]
        for rid in stale:
            del self.requests[rid]
        return len(stale)

    def _first_attempt(self, request_id: str, path: str, credentials: Credentials, body: bytes,
                       client: ClientKey | None, now: float) -> AttemptPlan | ApiError:
        try:
            field = find_model(body)
        except BadBody as exc:
            return apierrors.invalid_request(str(exc))
        primary = self.gateway.resolve(field.value)
        allowed = client.models if client is not None else None  # None: every model
        if client is not None and allowed is not None and primary is not None and primary.key not in allowed:
            if field.value in self.gateway.names:  # asked for by name: it exists, but not for this key
                return apierrors.forbidden(f"gateway key {client.name!r} may not use model {primary.key!r}; "
                                           f"it may use: {', '.join(sorted(allowed))}")
            primary = None  # the default model, which this key may not use
        if primary is None:
            known = ", ".join(self.gateway.names if allowed is None else sorted(allowed)) or "none"
            if field.value is None:
                return apierrors.invalid_request(f'the request has no "model" and no default model is '
                                                 f"configured; models: {known}")
            return apierrors.model_not_found(f"model {field.value!r} is not configured and there is no "
                                             f"default model; models: {known}")
        if primary.passthrough_auth and client is not None and not credentials:
            return apierrors.unauthenticated(
                f"model {primary.key!r} forwards your own provider key (passthrough_auth), but the request "
                f"carries only the gateway key: send the gateway key in x-sidestep-key and your provider key "
                f"as your SDK's api_key")
        first = first_target(primary, self.gateway.order(primary), self.table, now)
        state = RequestState(primary=primary, started=now, client_path=path,
                             client_credentials=credentials, next_target=primary)
        if isinstance(first, GiveUp):
            return exhausted(state, first)
        state.next_target = first
        self.requests[request_id] = state
        return self._plan(state, body, now, field=field)

    def _plan(self, state: RequestState, body: bytes, now: float,
              field: ModelField | None = None) -> AttemptPlan | ApiError:
        target = state.next_target
        try:
            field = field or find_model(body)
        except BadBody as exc:  # cannot happen for a body that parsed on the first attempt
            return apierrors.invalid_request(str(exc))
        start = max(now, state.not_before)
        # the first usable key; should none be left (it rested during the wait), the first one
        key = (self.table.usable_key(target, start) or 0) if target.pooled else 0
        state.attempts.append(Attempt(target=target, started=start, key=key))
        return AttemptPlan(state, target, key, replace_model(body, field, target.model_id))

    def _decide(self, request_id: str, state: RequestState, outcome: Outcome, now: float) -> Decision:
        attempt = state.current
        assert attempt is not None
        attempt.outcome = outcome
        decision = next_attempt(state, outcome, self.gateway.order(state.primary), now=now,
                                table=self.table, pacer=self.pacer, rng=self.rng)
        if isinstance(decision, Retry):
            attempt.retried_by = decision.rule
            state.next_target = decision.target
            state.not_before = now + decision.wait
            log.info("retry request=%s attempt=%d model=%s key=%s outcome=%s status=%d -> model=%s wait=%.3fs "
                     "rule=%s", request_id, state.attempt_number, attempt.target.key, _hint(attempt), outcome.error_type,
                     outcome.status, decision.target.key, decision.wait, decision.rule)
        elif isinstance(decision, GiveUp):
            log.info("give_up request=%s attempts=%d model=%s key=%s outcome=%s status=%d reason=%s",
                     request_id, state.attempt_number, attempt.target.key, _hint(attempt), outcome.error_type,
                     outcome.status,
                     decision.reason)
        return decision


def _hint(attempt: Attempt) -> str:
    """The masked key an attempt used, for logs."""
    target = attempt.target
    return target.keys[attempt.key].hint if target.keys else target.key_hint

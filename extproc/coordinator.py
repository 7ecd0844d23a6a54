"""Per-request bookkeeping between Envoy's per-attempt streams and the pure policy.

Envoy opens one ext_proc stream per attempt; the request's history lives here, keyed by the
`x-request-id` Envoy generated (never a client-chosen id). No grpc in this module: the servicer
feeds it plain values and turns its answers into protobuf.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from controlplane import apierrors
from controlplane import internalapi as api
from controlplane.apierrors import Api, ApiError
from controlplane.config.runtime import ClientKey, Gateway, Target
from controlplane.endpoints import Endpoint
from controlplane.state.table import SlowResponse, StateTable, block_name
from extproc.auth import Credentials
from extproc.body import BadBody, ModelField, find_model, replace_model
from extproc.multipart import boundary_of, find_form_field
from extproc.policy.classify import ErrorType, Outcome, ProviderError, classify
from extproc.policy.decide import Decision, Deliver, GiveUp, Retry, first_target, next_attempt
from extproc.policy.effects import apply
from extproc.policy.errors import exhausted
from extproc.policy.pacing import Pacer
from extproc.policy.state import Attempt, RequestState
from extproc.translate import TranslatedRequest, Untranslatable
from extproc.translate.pairs import PROVIDER_PATHS, direction

__all__ = ["AttemptPlan", "ClientRequest", "Continuation", "Coordinator", "Translation"]

log = logging.getLogger("sidestep.extproc")
MIN_ATTEMPT_TIMEOUT = 0.5  # seconds: an attempt shortened by a deadline still gets this long


@dataclass(frozen=True, slots=True)
class Translation:
    """How this attempt's response goes back to the client: the translator module (see
    `extproc.translate.pairs`) and what the client asked for."""

    module: ModuleType
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """Send this attempt to `target` at `path` with key `key` and `body`, after waiting until
    `state.not_before`; translate its response with `translation` when it is set."""

    state: RequestState
    target: Target
    key: int
    body: bytes
    path: str  # the provider's path, before a base_url prefix
    translation: Translation | None = None
    continued: str | None = None  # a continuation: "prefill" (the text so far is the provider's to go on from)
    #                                or "regenerate" (the answer again; the relay skips what the client has)

    @property
    def attempt_timeout(self) -> float:
        """Time to first byte this attempt may take (see `_shortened`)."""
        return self._shortened(self.target.attempt_timeout)

    @property
    def first_token_timeout(self) -> float:
        """Time to the first content of a streamed answer this attempt may take (see `_shortened`)."""
        return self._shortened(self.target.first_token_timeout)

    def _shortened(self, limit: float) -> float:
        """The target's `limit`, but at most half of what is left before the client's deadline, so
        that a failover can still answer in time."""
        state = self.state
        if state.deadline is None or state.current is None:
            return limit
        left = state.deadline - state.current.started
        return max(MIN_ATTEMPT_TIMEOUT, min(limit, left / 2))


@dataclass(frozen=True, slots=True)
class Continuation:
    """The stream relay asks to continue an answer whose provider broke: not from the targets that
    broke (`avoid`), from where the client's text stops (`text`)."""

    avoid: frozenset[str]
    text: str


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What the ext_proc read from the client's request headers (first attempt)."""

    path: str
    endpoint: Endpoint
    credentials: Credentials  # the client's own (a gateway key already taken out)
    client: ClientKey | None = None  # the gateway key it authenticated with, when one is required
    content_type: bytes = b""
    model_header: str | None = None  # x-sidestep-model: the provider for requests without a model
    timeout: float | None = None  # seconds the client waits in all (its SDK's timeout, or x-sidestep-deadline-ms)
    continuation: Continuation | None = None  # from the stream relay: continue a broken answer


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

    def begin_attempt(self, request_id: str, envoy_attempt: int, request: ClientRequest | None,
                      body: bytes) -> AttemptPlan | ApiError:
        """Called with each attempt's request body (its headers, for requests without one): where it
        goes, or the error that ends the request. `request` is read from the first attempt's headers
        (later attempts' headers carry what earlier ones set)."""
        now = self.clock()
        state = self.requests.get(request_id)
        if envoy_attempt <= 1 and request is not None:
            return self._first_attempt(request_id, request, body, now)
        if state is None:  # a retry whose history died with another worker: its headers are not the client's
            return apierrors.state_lost()
        current = state.current
        if current is not None and current.outcome is None:
            # Envoy retried on its own (reset of the internal hop): the attempt never answered.
            decision = self._decide(request_id, state, Outcome(502, ErrorType.CONNECTION), now)
            if isinstance(decision, GiveUp):  # a connection failure is never simply delivered
                self.requests.pop(request_id, None)
                return exhausted(state, decision)
        return self._plan(state, now)

    def caller(self, request_id: str) -> Api | None:
        """The API family of the client of a request in flight (the shape of its errors)."""
        state = self.requests.get(request_id)
        return state.endpoint.api if state is not None else None

    def reads_errors(self, state: RequestState) -> bool:
        """Must an error response be read before deciding? Only when a policy or a key pool decides."""
        current = state.current
        return state.policy is not None or (current is not None and current.target.pooled)

    def end_attempt(self, request_id: str, status: int, details: str | None, retry_after: str | None,
                    error: ProviderError | None = None) -> Decision:
        """Called with each attempt's response headers (and its error body, when read first): deliver,
        retry (recorded), or give up."""
        state = self.requests.get(request_id)
        if state is None or state.current is None:
            return Deliver()
        now = self.clock()
        outcome = classify(status, details, retry_after, self.wall_clock(), error)
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

    def _first_attempt(self, request_id: str, request: ClientRequest, body: bytes,
                       now: float) -> AttemptPlan | ApiError:
        endpoint = request.endpoint
        field: ModelField | None = None
        if endpoint.body == "json":
            try:
                field = find_model(body)
            except BadBody as exc:
                return apierrors.invalid_request(str(exc))
            requested = field.value
        elif endpoint.body == "multipart":
            boundary = boundary_of(request.content_type)
            form = find_form_field(body, boundary, "model") if boundary else None
            if form is None:
                return apierrors.invalid_request(f"{endpoint.path} takes a multipart/form-data body with a "
                                                 f"'model' field")
            requested = form.value
            field = ModelField(form.value, form.start, form.end)
        else:
            requested = request.model_header
            if requested is None and self.gateway.default is None:
                return apierrors.invalid_request(
                    f"{endpoint.method} {endpoint.path.strip('^$')} goes to the provider of the model named in "
                    f"{api.MODEL_REQUEST_HEADER}, or of the default model, and none is configured")
        primary = self._primary(requested, request.client)
        if isinstance(primary, ApiError):
            return primary
        if primary.passthrough_auth and request.client is not None and not request.credentials:
            return apierrors.unauthenticated(
                f"model {primary.key!r} forwards your own provider key (passthrough_auth), but the request "
                f"carries only the gateway key: send the gateway key in x-sidestep-key and your provider key "
                f"as your SDK's api_key")
        state = RequestState(primary=primary, order=self.gateway.order(primary), started=now, client_path=request.path,
                             client_credentials=request.credentials, next_target=primary, endpoint=endpoint,
                             body=body, model=field, pinned=endpoint.body == "json" and _refers_to_stored(body),
                             deadline=now + request.timeout if request.timeout else None,
                             client=request.client.name if request.client is not None else "")
        untranslatable = self._check_translatable(state, primary)
        if untranslatable is not None:
            return untranslatable
        budget = primary.policy.max_retry_duration if primary.policy else None
        first: Target | Retry | GiveUp
        if request.continuation is not None:  # the stream relay: a broken answer, to continue elsewhere
            state.continuation = request.continuation.text
            eligible = self._eligible(state)
            avoid = request.continuation.avoid
            first = next((t for t in (primary, *state.order) if t.key not in avoid
                          and (t is primary or eligible(t)) and self.table.until(t, now) <= now),
                         GiveUp(502, "no_candidates"))
        else:
            first = first_target(primary, state.order, self.table, now, self._eligible(state),
                                 fails_over=endpoint.fails_over, limit=state.limit(budget))
        if isinstance(first, GiveUp):
            return exhausted(state, first)
        if isinstance(first, Retry):  # everything is blocked for a moment: wait for the first to free up
            state.next_target, state.not_before, state.wait_why = first.target, now + first.wait, first.why
        else:
            state.next_target = first
        self.requests[request_id] = state
        return self._plan(state, now)

    def _primary(self, requested: str | None, client: ClientKey | None) -> Target | ApiError:
        """The model a request asked for (or the default), if this client may use it."""
        primary = self.gateway.resolve(requested)
        allowed = client.models if client is not None else None  # None: every model
        if client is not None and allowed is not None and primary is not None and primary.key not in allowed:
            if requested in self.gateway.names:  # asked for by name: it exists, but not for this key
                return apierrors.forbidden(f"gateway key {client.name!r} may not use model {primary.key!r}; "
                                           f"it may use: {', '.join(sorted(allowed))}")
            primary = None  # the default model, which this key may not use
        if primary is None:
            known = ", ".join(self.gateway.names if allowed is None else sorted(allowed)) or "none"
            if requested is None:
                return apierrors.invalid_request(f'the request has no "model" and no default model is '
                                                 f"configured; models: {known}")
            return apierrors.model_not_found(f"model {requested!r} is not configured and there is no "
                                             f"default model; models: {known}")
        return primary

    def _check_translatable(self, state: RequestState, target: Target) -> ApiError | None:
        """A 400 before any provider is called when the requested model's API cannot carry the request."""
        endpoint = state.endpoint
        if target.api is None or target.api is endpoint.api or endpoint.body != "json":
            return None  # a request without a model of its own goes to its provider as it is
        if not endpoint.translatable:
            return apierrors.invalid_request(
                f"model {target.key!r} speaks the {target.api.value} API, and {endpoint.path} requests cannot "
                f"be translated to it (only chat completions ⇄ messages are)")
        try:
            self._translated(state, target)
        except Untranslatable as exc:
            return apierrors.invalid_request(f"model {target.key!r} speaks the {target.api.value} API, which "
                                             f"cannot carry this request: {exc}")
        return None

    def _eligible(self, state: RequestState) -> Callable[[Target], bool]:
        """Which failover candidates can serve this request: the same kind of model, an API the request
        is (or can be translated to), and, for a request that refers to state stored at its provider
        (`previous_response_id`, file ids), that provider only."""
        endpoint = state.endpoint
        primary = state.primary

        def eligible(target: Target) -> bool:
            if target.kind != endpoint.kind:
                return False
            if state.pinned and (target.provider, target.upstream) != (primary.provider, primary.upstream):
                return False
            if target.api is None or target.api is endpoint.api:
                return True
            if not endpoint.translatable:
                return False
            refused = state.refused.get(target.api)
            if refused is None:
                try:
                    self._translated(state, target)
                    state.refused[target.api] = ""
                except Untranslatable as exc:
                    state.refused[target.api] = refused = str(exc)
                    log.info("not failing over to %s: the request cannot be translated (%s)", target.key, exc)
            return not refused

        return eligible

    def _translated(self, state: RequestState, target: Target) -> TranslatedRequest:
        """The request in `target`'s API (raises Untranslatable)."""
        module = direction(state.endpoint.api, target.api)
        assert module is not None
        if state.parsed is None:
            state.parsed = json.loads(state.body)  # it parsed once already: find_model walked it
        return module.translate_request(state.parsed, model=target.model_id,
                                        default_max_tokens=target.default_max_tokens)

    def _plan(self, state: RequestState, now: float) -> AttemptPlan | ApiError:
        target = state.next_target
        start = max(now, state.not_before)
        # the first usable key; should none be left (it rested during the wait), the first one
        key = (self.table.usable_key(target, start) or 0) if target.pooled else 0
        module = direction(state.endpoint.api, target.api) if state.endpoint.translatable else None
        state.attempts.append(Attempt(target=target, started=start, key=key, waited=start - now,
                                      wait_why=state.wait_why if start > now else "", translated=module is not None))
        if module is not None:
            try:
                translated = self._translated(state, target)
            except Untranslatable as exc:  # eligibility checked it: only a bug gets here
                return apierrors.invalid_request(str(exc))
            body, continued = _continued(state, translated.body, target.api)
            return AttemptPlan(state, target, key, body, PROVIDER_PATHS[target.api],  # type: ignore[index]
                               Translation(module, translated.stream, translated.include_usage), continued)
        body = state.body
        if state.model is not None:
            if state.endpoint.body == "multipart":  # a form field's value is raw text, not JSON
                body = body[:state.model.start] + target.model_id.encode() + body[state.model.end:]
            else:
                body = replace_model(body, state.model, target.model_id)
        body, continued = _continued(state, body, target.api or state.endpoint.api)
        return AttemptPlan(state, target, key, body, state.client_path, continued=continued)

    def _decide(self, request_id: str, state: RequestState, outcome: Outcome, now: float) -> Decision:
        attempt = state.current
        assert attempt is not None
        attempt.outcome, attempt.ended = outcome, now
        decision, effects = next_attempt(state, outcome, state.order, now=now,
                                         table=self.table, pacer=self.pacer, rng=self.rng,
                                         eligible=self._eligible(state))
        apply(effects, self.table, self.pacer, state)
        if isinstance(decision, Retry):
            attempt.retried_by = decision.rule
            state.next_target = decision.target
            state.not_before, state.wait_why = now + decision.wait, decision.why
            log.info("retry request=%s attempt=%d model=%s key=%s outcome=%s status=%d -> model=%s wait=%.3fs "
                     "rule=%s", request_id, state.attempt_number, attempt.target.key, _hint(attempt), outcome.error_type,
                     outcome.status, decision.target.key, decision.wait, decision.rule)
        elif isinstance(decision, GiveUp):
            log.info("give_up request=%s attempts=%d model=%s key=%s outcome=%s status=%d reason=%s",
                     request_id, state.attempt_number, attempt.target.key, _hint(attempt), outcome.error_type,
                     outcome.status,
                     decision.reason)
        return decision


def _continued(state: RequestState, body: bytes, provider_api: Api | None) -> tuple[bytes, str | None]:
    """The body of a continuation, and how it continues. Anthropic's API continues a trailing
    assistant message (prefill; it refuses one ending in whitespace, which the relay restores);
    OpenAI's chat API has no such thing, so the question is asked again (regenerate)."""
    if state.continuation is None:
        return body, None
    if provider_api is not Api.ANTHROPIC or not state.continuation.strip():
        return body, "regenerate"
    parsed = json.loads(body)
    parsed["messages"] = [*parsed.get("messages", []),
                          {"role": "assistant", "content": state.continuation.rstrip()}]
    return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode(), "prefill"


def _refers_to_stored(body: bytes) -> bool:
    """Does a request refer to state its provider keeps (a stored response, a conversation, an
    uploaded file)? Then it never fails over to another provider, which would not know it."""
    return any(marker in body for marker in _STORED_STATE)


_STORED_STATE = (b'"previous_response_id"', b'"conversation"', b'"file_id"', b'"container"')


def _hint(attempt: Attempt) -> str:
    """The masked key an attempt used, for logs."""
    target = attempt.target
    return target.keys[attempt.key].hint if target.keys else target.key_hint

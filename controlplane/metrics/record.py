"""What one request teaches the metrics, as pure functions over plain values.

Envoy streams an access-log entry for every client request to the metrics service (gRPC access
log service): its route, status, durations, the served model, the gateway key's name, and the
attempt ledger (`x-sidestep-ledger`, written by the ext_proc: `extproc/policy/ledger.py`). Every
attempt, retry, failover and wait is read from the ledger, so the metrics of all ext_proc workers
are counted in one process without the workers doing any work for them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from controlplane.endpoints import find_endpoint

__all__ = ["Attempt", "Entry", "Recorder", "parse_ledger", "route_of"]

# seconds: from a fast first byte to a long generation
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt of the ledger."""

    target: str
    status: int | None = None
    error: str | None = None  # the error class; None for a success
    ms: float | None = None  # to its response headers (or its failure)
    wait_ms: float = 0.0
    wait: str = ""  # why it waited
    translated: bool = False


@dataclass(frozen=True, slots=True)
class Entry:
    """One client request, as the access log saw it."""

    method: str
    path: str
    status: int
    model: str  # the model that served it (x-sidestep-model), "" when none did
    ledger: list[Attempt] = field(default_factory=list)
    client: str = ""  # the gateway key's name, when keys are required
    duration: float | None = None  # seconds to the last byte sent to the client
    first_byte: float | None = None  # seconds to the first byte sent to the client
    repair: bool = False  # the stream relay continuing a broken answer (not a client request)


def parse_ledger(text: str) -> list[Attempt]:
    """The attempts of an `x-sidestep-ledger` value; [] for "none" or anything unreadable."""
    attempts = []
    for item in text.split(","):
        target, *params = item.strip().split(";")
        if not target or target == "none":
            continue
        values: dict[str, str] = {}
        for param in params:
            name, _, value = param.partition("=")
            values[name] = value
        try:
            attempts.append(Attempt(
                target=target, status=int(values["status"]) if "status" in values else None,
                error=values.get("error"), ms=float(values["ms"]) if "ms" in values else None,
                wait_ms=float(values.get("wait_ms", 0)), wait=values.get("wait", ""),
                translated="translated" in values))
        except ValueError:
            continue
    return attempts


@functools.lru_cache(maxsize=4096)  # one lookup per distinct path, not per request
def route_of(method: str, path: str) -> str:
    """The served endpoint a request path belongs to (`/v1/models/{id}` for every model id), so
    labels stay few; "other" for anything sidestep does not serve."""
    endpoint = find_endpoint(method, path)
    return f"{method} {endpoint.route}" if endpoint is not None else "other"


class Recorder:
    """The request metrics, in their own registry (the service adds the live gauges)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("sidestep_requests", "Client requests by route, serving model and status",
                                ["route", "model", "status"], registry=registry)
        self.duration = Histogram("sidestep_request_duration_seconds",
                                  "Time to the last byte sent to the client, by route and serving model",
                                  ["route", "model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_byte = Histogram("sidestep_time_to_first_byte_seconds",
                                    "Time to the first byte sent to the client (for a stream: its first token, "
                                    "after every failover), by route and serving model",
                                    ["route", "model"], buckets=LATENCY_BUCKETS, registry=registry)
        self.attempts = Counter("sidestep_attempts", "Attempts by target and outcome (success or the error class)",
                                ["target", "outcome"], registry=registry)
        self.attempt_seconds = Histogram("sidestep_attempt_seconds",
                                         "Time from sending an attempt to its response headers, by target",
                                         ["target"], buckets=LATENCY_BUCKETS, registry=registry)
        self.retries = Counter("sidestep_retries",
                               "Attempts after a failed one: `retry` (same target) or `failover` (another), "
                               "by the failed target and its error class", ["target", "kind", "reason"],
                               registry=registry)
        self.waits = Histogram("sidestep_wait_seconds", "Waits before attempts (backoff, Retry-After, pacing)",
                               ["why"], buckets=WAIT_BUCKETS, registry=registry)
        self.translated = Counter("sidestep_translated_responses",
                                  "Answers served in the other API family and translated back, by target",
                                  ["target"], registry=registry)
        self.repairs = Counter("sidestep_stream_repairs",
                               "Broken streams the relay continued elsewhere, by outcome (repaired or failed)",
                               ["outcome"], registry=registry)
        self.clients = Counter("sidestep_gateway_key_requests", "Requests by gateway key name", ["key"],
                               registry=registry)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def record(self, entry: Entry) -> None:
        child = self._child
        if entry.repair:
            child(self.repairs, "repaired" if entry.status < 400 else "failed").inc()
            return
        route, model = route_of(entry.method, entry.path), entry.model or "none"
        child(self.requests, route, model, str(entry.status)).inc()
        if entry.duration is not None:
            child(self.duration, route, model).observe(entry.duration)
        if entry.first_byte is not None:
            child(self.first_byte, route, model).observe(entry.first_byte)
        if entry.client:
            child(self.clients, entry.client).inc()
        previous: Attempt | None = None
        for attempt in entry.ledger:
            child(self.attempts, attempt.target, attempt.error or ("success" if attempt.status else "unknown")).inc()
            if attempt.ms is not None:
                child(self.attempt_seconds, attempt.target).observe(attempt.ms / 1000)
            if attempt.wait_ms > 0:
                child(self.waits, attempt.wait or "unknown").observe(attempt.wait_ms / 1000)
            if previous is not None:
                kind = "retry" if attempt.target == previous.target else "failover"
                child(self.retries, previous.target, kind, previous.error or "unknown").inc()
            previous = attempt
        if entry.ledger and entry.ledger[-1].translated and entry.status < 400:
            child(self.translated, entry.ledger[-1].target).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: every request updates about five of them."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

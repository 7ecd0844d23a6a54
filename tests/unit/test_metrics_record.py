"""The metrics of one access-log entry: the ledger read back, routes without id explosion."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from controlplane.metrics.record import Attempt, Entry, Recorder, parse_ledger, route_of


def test_the_ledger_reads_back() -> None:
    text = ("a/one;status=503;error=server_error;ms=12;key=sk-a..01, "
            "a/one;wait_ms=250;wait=backoff+paced;status=503;error=server_error;ms=20, "
            "b/two;status=200;ms=830;key=sk-b..09;translated")
    assert parse_ledger(text) == [
        Attempt("a/one", 503, "server_error", 12.0),
        Attempt("a/one", 503, "server_error", 20.0, 250.0, "backoff+paced"),
        Attempt("b/two", 200, None, 830.0, translated=True),
    ]
    assert parse_ledger("none") == parse_ledger("") == parse_ledger("x;status=oops") == []


def test_routes_are_endpoints() -> None:
    assert route_of("POST", "/v1/chat/completions?x=1") == "POST /v1/chat/completions"
    assert route_of("GET", "/v1/models/openai/gpt-4o") == "GET /v1/models/{id}"
    assert route_of("GET", "/v1/files/file-abc/content") == "GET /v1/files/{id}(/content)?"
    assert route_of("GET", "/v1/secret/admin") == "other"


def test_one_entry_counts_requests_attempts_retries_failovers_waits_and_translation() -> None:
    registry = CollectorRegistry()
    recorder = Recorder(registry)
    recorder.record(Entry("POST", "/v1/messages", 200, "b/two", parse_ledger(
        "a/one;status=429;error=rate_limited;ms=5, a/one;wait_ms=1000;wait=blocked;status=503;error=server_error;ms=7, "
        "b/two;status=200;ms=900;translated"), client="team-a", duration=1.2, first_byte=0.95))

    def get(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert get("sidestep_requests_total", route="POST /v1/messages", model="b/two", status="200") == 1
    assert get("sidestep_attempts_total", target="a/one", outcome="rate_limited") == 1
    assert get("sidestep_attempts_total", target="b/two", outcome="success") == 1
    assert get("sidestep_retries_total", target="a/one", kind="retry", reason="rate_limited") == 1
    assert get("sidestep_retries_total", target="a/one", kind="failover", reason="server_error") == 1
    assert get("sidestep_wait_seconds_sum", why="blocked") == 1.0
    assert get("sidestep_translated_responses_total", target="b/two") == 1
    assert get("sidestep_gateway_key_requests_total", key="team-a") == 1
    assert get("sidestep_request_duration_seconds_sum", route="POST /v1/messages", model="b/two") == 1.2
    recorder.record(Entry("POST", "/v1/chat/completions", 200, "", repair=True))
    recorder.record(Entry("POST", "/v1/chat/completions", 502, "", repair=True))
    assert get("sidestep_stream_repairs_total", outcome="repaired") == get("sidestep_stream_repairs_total",
                                                                           outcome="failed") == 1

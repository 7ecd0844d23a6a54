from __future__ import annotations

import json

import pytest

from controlplane.apierrors import ApiError
from controlplane.config import parse_config
from extproc.body import BadBody, find_model, replace_model
from extproc.coordinator import AttemptPlan, Coordinator
from extproc.policy.decide import Deliver, GiveUp, Retry
from tests.unit.helpers import req

# ---- body


@pytest.mark.parametrize("body", [
    b'{"model":"a/x"}',
    b'  {\n "messages": [{"model": "nested"}], "model" : "a/x" , "z": {"model": 1}}\n',
    '{"content": "h\u00e9 \u2603", "model": "a/x", "tail": "\u00fc"}'.encode(),
    b'{"model": "a\\/x"}',
])
def test_model_is_replaced_and_nothing_else(body: bytes) -> None:
    field = find_model(body)
    assert field.value == "a/x"
    out = replace_model(body, field, "gpt-4o")
    assert json.loads(out)["model"] == "gpt-4o"
    before, after = body[: field.start], body[field.end:]
    assert out == before + b'"gpt-4o"' + after


def test_body_without_model_is_left_alone() -> None:
    field = find_model(b'{"messages": []}')
    assert field.value is None
    assert replace_model(b'{"messages": []}', field, "x") == b'{"messages": []}'


@pytest.mark.parametrize("body, fragment", [
    (b"", "JSON object"), (b"[]", "JSON object"), (b"nope", "JSON object"), (b'{"model": 5}', "string"),
    (b'{"a": 1,}', "valid JSON"), (b'{"a": 1} {}', "extra data"), (b"\xff\xfe", "UTF-8"), (b'{"a" 1}', "':'"),
])
def test_bad_bodies_say_what_is_wrong(body: bytes, fragment: str) -> None:
    with pytest.raises(BadBody) as info:
        find_model(body)
    assert fragment in str(info.value)


# ---- coordinator (fake clock)

CONFIG = """
model_providers:
  - model: a/one
    base_url: http://127.0.0.1:1
    retry_policy:
      default_strategy: same_model
      backoff: {apply_to: same_model, base_ms: 500, jitter: false}
  - {model: b/two, base_url: "http://127.0.0.1:2", passthrough_auth: true}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def coordinator() -> tuple[Coordinator, Clock]:
    clock = Clock()
    return Coordinator(parse_config(CONFIG, {}).gateway, clock=clock, wall_clock=lambda: 0.0), clock


def test_a_request_across_attempts() -> None:
    coord, clock = coordinator()
    plan = coord.begin_attempt("r1", 1, req("/v1/chat/completions", (("authorization", b"Bearer c"),)),
                               b'{"model": "a/one"}')
    assert isinstance(plan, AttemptPlan)
    assert plan.target.key == "a/one" and plan.body == b'{"model": "one"}' and plan.state.not_before == 0.0
    decision = coord.end_attempt("r1", 503, "via_upstream", None)
    assert isinstance(decision, Retry) and decision.wait == 0.5
    plan = coord.begin_attempt("r1", 2, req("/v1/rewritten-by-attempt-1", ()), b'{"model": "one"}')
    assert plan.state.not_before == 1000.5 and plan.state.client_path == "/v1/chat/completions"
    assert plan.state.client_credentials == (("authorization", b"Bearer c"),)
    clock.now = 1000.6
    decision = coord.end_attempt("r1", 200, "via_upstream", None)
    assert isinstance(decision, Deliver)
    assert coord.requests == {}  # finished requests leave nothing behind


def test_unplanned_envoy_retry_counts_as_a_connection_failure() -> None:
    coord, _ = coordinator()
    coord.begin_attempt("r1", 1, req("/v1/x", ()), b'{"model": "a/one"}')
    # no response headers: the internal hop reset and Envoy retried on its own
    plan = coord.begin_attempt("r1", 2, req("/v1/x", ()), b'{"model": "a/one"}')
    assert isinstance(plan, AttemptPlan)
    assert plan.state.attempts[0].outcome.error_type == "connection_error"
    assert plan.state.attempt_number == 2


def test_bad_requests_become_client_errors() -> None:
    coord, _ = coordinator()
    error = coord.begin_attempt("r1", 1, req("/v1/x", ()), b"{oops")
    assert isinstance(error, ApiError) and error.status == 400
    error = coord.begin_attempt("r2", 1, req("/v1/x", ()), b'{"model": "zzz"}')
    assert isinstance(error, ApiError) and error.status == 404 and "a/one" in error.message
    assert coord.requests == {}


def test_no_policy_passes_through_and_exhaustion_cleans_up() -> None:
    coord, _ = coordinator()
    coord.begin_attempt("r1", 1, req("/v1/x", ()), b'{"model": "b/two"}')
    decision = coord.end_attempt("r1", 429, "via_upstream", "3")
    assert isinstance(decision, Deliver)
    coord.begin_attempt("r2", 1, req("/v1/x", ()), b'{"model": "a/one"}')
    coord.end_attempt("r2", 500, "via_upstream", None)
    coord.begin_attempt("r2", 2, req("/v1/x", ()), b'{"model": "a/one"}')
    coord.end_attempt("r2", 500, "via_upstream", None)
    plan = coord.begin_attempt("r2", 3, req("/v1/x", ()), b'{"model": "a/one"}')
    decision = coord.end_attempt("r2", 500, "via_upstream", None)
    assert decision == GiveUp(500, "max_attempts") and plan.state.attempt_number == 3
    assert coord.requests == {}


def test_abandoned_requests_are_swept() -> None:
    coord, clock = coordinator()
    coord.begin_attempt("gone", 1, req("/v1/x", ()), b'{"model": "a/one"}')
    clock.now += 60
    assert coord.sweep() == 0
    clock.now += coord.state_ttl
    assert coord.sweep() == 1 and coord.requests == {}

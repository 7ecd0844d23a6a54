"""The attempt ledger (`x-sidestep-ledger`) of requests driven through the coordinator with a fake
clock: every attempt's target, wait and why, status or error class, time, key hint."""

from __future__ import annotations

from controlplane.config import parse_config
from extproc.coordinator import Coordinator
from extproc.policy.decide import Deliver, GiveUp, Retry
from extproc.policy.errors import exhausted
from extproc.policy.ledger import NONE, ledger
from tests.unit.helpers import req
from tests.unit.test_body_and_coordinator import Clock

CONFIG = """
model_providers:
  - model: a/one
    base_url: http://127.0.0.1:1
    access_keys: [sk-aaaa-0000000001, sk-aaaa-0000000002]
    retry_policy:
      fallback_models: [b/two]
      on_status_codes: [{codes: [503], strategy: same_model, max_attempts: 1, then: different_provider}]
      backoff: {apply_to: same_model, base_ms: 250, jitter: false}
  - {model: b/two, base_url: "http://127.0.0.1:2", access_key: sk-bbbb-0000000009, provider_interface: claude}
"""
BODY = b'{"model": "a/one", "messages": [{"role": "user", "content": "hi"}]}'


def run(*replies: tuple[int, float]) -> tuple[Coordinator, str, object]:
    """Each reply: (status, seconds the provider took). Returns the final decision's ledger."""
    clock = Clock()
    coord = Coordinator(parse_config(CONFIG, {}).gateway, clock=clock, wall_clock=lambda: 0.0)
    decision: object = None
    for n, (status, took) in enumerate(replies, start=1):
        plan = coord.begin_attempt("r1", n, req() if n == 1 else None, BODY)
        assert not isinstance(plan, Exception) and hasattr(plan, "state"), plan
        state = plan.state
        clock.now = max(clock.now, state.not_before) + took
        decision = coord.end_attempt("r1", status, "via_upstream", None)
        if not isinstance(decision, Retry):
            break
    if isinstance(decision, GiveUp):
        return coord, exhausted(state, decision).ledger, decision
    return coord, ledger(state), decision


def test_a_retry_after_backoff_then_a_translated_failover() -> None:
    _, line, decision = run((503, 0.012), (503, 0.020), (200, 0.830))
    assert isinstance(decision, Deliver)
    assert line == ("a/one;status=503;error=server_error;ms=12;key=sk-a..01, "
                    "a/one;wait_ms=250;wait=backoff;status=503;error=server_error;ms=20;key=sk-a..01, "
                    "b/two;status=200;ms=830;key=sk-b..09;translated")
    assert line.isascii()


def test_a_key_pool_walk_and_the_ledger_of_a_final_error() -> None:
    _, line, decision = run((429, 0.005), (401, 0.004), (500, 0.1), (500, 0.1))
    assert isinstance(decision, GiveUp)
    entries = line.split(", ")
    assert entries[0] == "a/one;status=429;error=rate_limited;ms=5;key=sk-a..01"
    assert entries[1].startswith("a/one;") and entries[1].endswith("key=sk-a..02")  # the next key of the pool
    assert entries[-1].startswith("b/two;") and "error=server_error" in entries[-1]


def test_no_attempt_is_none() -> None:
    assert ledger(None) == NONE

"""Several ext_proc workers under load while one dies; budgets and all-blocked answers.

Small stacks of their own: these tests kill processes or block every model.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import wait_for
from tests.e2e.test_shared_state import ask
from tests.mockprovider import Reply

pytestmark = pytest.mark.e2e

TWO_MODELS = """
listeners: [{{type: model, port: {port}, attempt_timeout: 10s}}]
model_providers:
  - model: a/x
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [c/y]
      retry_after_handling: {{max_retry_after_seconds: 5, scope: provider}}
  - model: a/budget
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      max_retry_duration_ms: 500
      backoff: {{apply_to: same_model, base_ms: 1000, jitter: false}}
  - {{model: c/y, base_url: "{c}", access_key: sk-c-0123456789abcdef}}
"""


def test_killing_a_worker_under_load_loses_no_request_silently(make_stack, providers) -> None:
    stack = make_stack(TWO_MODELS, "--workers", "2", a=providers["a"].url, c=providers["c"].url)
    wait_for(lambda: all(w["synced"] for w in stack.status()["workers"]), "both workers synced")
    providers["a"].script(Reply(200, delay=0.05))
    results: list[tuple[object, ...]] = []
    deadline = time.monotonic() + 4.0

    def client() -> None:
        with httpx.Client() as http:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    r = http.post(stack.url + "/v1/chat/completions", json={"model": "a/x", "messages": []},
                                  timeout=10)
                    results.append((r.status_code, r.headers.get("content-type"), r.content,
                                    time.monotonic() - started))
                except httpx.HTTPError as exc:  # a hang, a reset, a refused connection: a silent loss
                    results.append(("transport error", repr(exc)))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = stack.status()["processes"]["extproc-0"]["pid"]
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join()

    errors = [r for r in results if r[0] != 200]
    assert not [r for r in errors if r[0] == "transport error"], errors[:3]
    # only the requests in flight on the dead worker fail, each with an explicit JSON error: 502 when
    # the attempt had gone on to the provider (it may have received it), 503 when it had not; every
    # later request is retried by Envoy on the other worker
    for status, content_type, body, _ in errors:
        assert content_type == "application/json", (status, body)
        assert (status, b'"gateway_failed"' in body) == (502, True) or \
            (status, b'"gateway_unavailable"' in body) == (503, True), (status, body)
    assert len(errors) <= 8, errors  # at most one per client thread: those in flight at the kill
    assert max(r[3] for r in results) < 5  # nobody hung
    assert sum(1 for r in results if r[0] == 200) > 50
    assert len(errors) < len(results) / 4, f"{len(errors)} of {len(results)} failed"
    wait_for(lambda: stack.status()["processes"]["extproc-0"]["pid"] not in (None, victim), "worker 0 back")
    wait_for(lambda: all(w["synced"] for w in stack.status()["workers"]), "worker 0 synced again")
    seen = set()
    for _ in range(40):
        response = ask(stack, "a/x")
        assert response.status_code == 200
        seen.add(response.headers["x-sidestep-worker"])
        if len(seen) == 2:
            break
    assert seen == {"0", "1"}  # the restarted worker takes requests again


def test_every_candidate_blocked_is_a_429_with_the_shortest_block(make_stack, providers) -> None:
    stack = make_stack(TWO_MODELS, a=providers["a"].url, c=providers["c"].url)
    providers["a"].script(Reply(429, retry_after="30"))
    providers["c"].script(Reply(429, retry_after="45"))
    response = ask(stack, "a/x")
    assert response.status_code == 429 and response.headers["retry-after"] == "30"
    assert response.json()["error"]["total_attempts"] == 2
    again = ask(stack, "a/x")  # no attempt at all: everything is blocked
    assert again.status_code == 429 and 28 <= int(again.headers["retry-after"]) <= 30
    error = again.json()["error"]
    assert error["code"] == "all_blocked" and error["total_attempts"] == 0
    assert len(providers["a"].requests) == 1 and len(providers["c"].requests) == 1


def test_a_wait_that_cannot_finish_inside_the_budget_is_not_started(make_stack, providers) -> None:
    stack = make_stack(TWO_MODELS, a=providers["a"].url, c=providers["c"].url)
    providers["a"].script(Reply(503), Reply(200))
    started = time.monotonic()
    response = ask(stack, "a/budget")
    assert response.status_code == 503 and response.json()["error"]["code"] == "budget"
    assert time.monotonic() - started < 0.5  # the 1 s backoff was never slept
    assert len(providers["a"].requests) == 1

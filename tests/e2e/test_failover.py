"""Retries and failover end to end: one stack, many models whose policies the tests pick by name.

Providers: a, b, c (prefixes `a/`, `b/`, `c/`). Retry-After tests use `apply_to: request` so a
block never leaks into the next test through the worker's global block table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from controlplane.rundir import free_port
from tests.e2e.conftest import Stack, start_stack
from tests.mockprovider import MockProvider, Reply

pytestmark = pytest.mark.e2e

CONFIG = """
version: v0.3.0
listeners:
  - {{type: model, name: llm, address: 127.0.0.1, port: {port}, attempt_timeout: 10s}}
model_providers:
  - model: a/primary
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [b/fallback]
  - model: b/fallback
    base_url: {b}
    access_key: sk-b-0123456789abcdef
  - model: c/third
    base_url: {c}
    access_key: sk-c-0123456789abcdef
  - model: a/nopolicy
    base_url: {a}
    access_key: sk-a-0123456789abcdef
  - model: a/once
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      default_max_attempts: 1
  - model: a/backoff
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      default_max_attempts: 3
      backoff: {{apply_to: same_model, base_ms: 500, max_ms: 5000, jitter: false}}
  - model: a/ordered
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [c/third, b/fallback]
  - model: a/retry-after
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      retry_after_handling: {{apply_to: request, max_retry_after_seconds: 10}}
  - model: a/long-retry-after
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      fallback_models: [b/fallback]
      retry_after_handling: {{apply_to: request, max_retry_after_seconds: 5}}
  - model: a/slow
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    attempt_timeout: 1s
    retry_policy:
      fallback_models: [b/fallback]
  - model: a/stall
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    stream_idle_timeout: 1s
  - model: a/listed-400
    base_url: {a}
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [b/fallback]
      on_status_codes:
        - {{codes: [400], strategy: different_provider, max_attempts: 1}}
"""


@pytest.fixture(scope="module")
def stack(providers: dict[str, MockProvider], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    config = CONFIG.format(port=port, a=providers["a"].url, b=providers["b"].url, c=providers["c"].url)
    stack = start_stack(tmp_path_factory.mktemp("failover"), config, port)
    yield stack
    stack.client.close()
    stack.sidestep("down", check=False)


def test_success_passes_through_with_attempt_headers(stack: Stack, providers) -> None:
    response = stack.chat({"model": "a/primary", "messages": [{"role": "user", "content": "hi"}]},
                          headers={"authorization": "Bearer client-secret"})
    assert response.status_code == 200
    assert response.headers["x-sidestep-attempts"] == "1"
    assert response.headers["x-sidestep-model"] == "a/primary"
    assert response.json()["model"] == "primary"  # the upstream's own body, untouched
    seen = providers["a"].requests[-1]
    assert seen.json["model"] == "primary"  # provider prefix stripped
    assert seen.headers["authorization"] == "Bearer sk-a-0123456789abcdef"  # the client's key never forwarded
    assert not any(h.startswith(("x-sidestep", "x-envoy")) for h in seen.headers)


def test_429_fails_over_to_fallback(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429))
    response = stack.chat({"model": "a/primary", "messages": []})
    assert response.status_code == 200
    assert response.headers["x-sidestep-attempts"] == "2"
    assert response.headers["x-sidestep-model"] == "b/fallback"
    assert len(providers["a"].requests) == 1 and len(providers["b"].requests) == 1
    seen = providers["b"].requests[0]
    assert seen.json["model"] == "fallback"
    assert seen.headers["authorization"] == "Bearer sk-b-0123456789abcdef"


def test_the_ledger_explains_a_two_attempt_request_in_the_header_and_the_access_log(stack: Stack,
                                                                                    providers) -> None:
    providers["a"].script(Reply(429, delay=0.05))
    providers["b"].script(Reply(200, delay=0.1))
    response = stack.chat({"model": "a/primary", "messages": []})
    assert response.status_code == 200
    first, second = response.headers["x-sidestep-ledger"].split(", ")
    name, *params = first.split(";")
    assert name == "a/primary" and params[:2] == ["status=429", "error=rate_limited"]
    assert 50 <= int(params[2].removeprefix("ms=")) < 1000 and params[3] == "key=sk-a..ef"
    name, *params = second.split(";")
    assert name == "b/fallback" and params[0] == "status=200" and params[2] == "key=sk-b..ef"
    assert 100 <= int(params[1].removeprefix("ms=")) < 1000
    request_id = None
    deadline = time.monotonic() + 5  # Envoy flushes the access log every second
    while request_id is None and time.monotonic() < deadline:
        for line in (stack.home / "logs" / "access.log").read_text().splitlines():
            entry = json.loads(line)
            if entry["ledger"] == response.headers["x-sidestep-ledger"]:
                request_id = entry["request_id"]
        time.sleep(0.2)
    assert request_id, "the ledger is not in the access log"
    # an error carries its ledger too, and a request refused before any attempt says none
    providers["a"].script(Reply(503))
    providers["b"].script(Reply(500))
    providers["c"].script(Reply(502))
    failed = stack.chat({"model": "a/primary", "messages": []})
    assert [e.split(";")[0] for e in failed.headers["x-sidestep-ledger"].split(", ")] == \
        ["a/primary", "b/fallback", "c/third"]
    assert stack.chat({"model": "nope/none", "messages": []}).headers["x-sidestep-ledger"] == "none"


def test_503_fails_over_to_fallback(stack: Stack, providers) -> None:
    providers["a"].script(Reply(503))
    response = stack.chat({"model": "a/primary", "messages": []})
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "b/fallback"
    assert [len(providers[p].requests) for p in "ab"] == [1, 1]


def test_all_exhausted_returns_structured_error(stack: Stack, providers) -> None:
    providers["a"].script(Reply(503))
    providers["b"].script(Reply(500))
    providers["c"].script(Reply(502))
    started = time.monotonic()
    response = stack.chat({"model": "a/primary", "messages": []})
    assert time.monotonic() - started < 2  # fast, no hidden waits
    assert response.status_code == 502  # the last attempt's status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "retry_exhausted"
    assert error["total_attempts"] == 3 == int(response.headers["x-sidestep-attempts"])
    assert [(a["model"], a["error_type"], a["attempt"], a["status"]) for a in error["attempts"]] == [
        ("a/primary", "server_error", 1, 503),
        ("b/fallback", "server_error", 2, 500),
        ("c/third", "server_error", 3, 502),
    ]
    assert "c/third" in error["message"]


def test_without_policy_429_passes_through_untouched(stack: Stack, providers) -> None:
    body = b'{"error": {"message": "slow down", "type": "rate_limit"}}'
    providers["a"].script(Reply(429, retry_after="7", body=body))
    response = stack.chat({"model": "a/nopolicy", "messages": []})
    assert response.status_code == 429
    assert response.content == body
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-sidestep-attempts"] == "1"
    assert len(providers["a"].requests) == 1
    assert providers["b"].requests == [] and providers["c"].requests == []


def test_max_attempts_one_stops_after_one_retry(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429))
    response = stack.chat({"model": "a/once", "messages": []})
    assert response.status_code == 429
    assert response.json()["error"]["total_attempts"] == 2
    assert response.json()["error"]["code"] == "max_attempts"
    assert len(providers["a"].requests) == 2


def test_same_model_backoff_waits_between_attempts(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429), Reply(429), Reply(200))
    started = time.monotonic()
    response = stack.chat({"model": "a/backoff", "messages": []})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["x-sidestep-attempts"] == "3"
    seen = providers["a"].requests
    assert len(seen) == 3
    assert seen[1].at - seen[0].at >= 0.49  # base_ms 500
    assert seen[2].at - seen[1].at >= 0.99  # doubled
    assert elapsed >= 1.5


def test_fallback_models_order_with_three_providers(stack: Stack, providers) -> None:
    providers["a"].script(Reply(503))
    providers["c"].script(Reply(503))
    providers["b"].script(Reply(200))
    response = stack.chat({"model": "a/ordered", "messages": []})
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "b/fallback"
    a, b, c = (providers[p].requests for p in "abc")
    assert len(a) == len(b) == len(c) == 1
    assert a[0].at < c[0].at < b[0].at  # primary, then fallback_models in their order


def test_retry_after_is_waited_on_for_the_same_model(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after="2"), Reply(200))
    response = stack.chat({"model": "a/retry-after", "messages": []})
    assert response.status_code == 200
    first, second = providers["a"].requests
    assert second.at - first.at >= 1.8
    assert "retry-after" not in response.headers


def test_retry_after_beyond_the_cap_fails_over_instead_of_waiting(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after="60"))
    started = time.monotonic()
    response = stack.chat({"model": "a/long-retry-after", "messages": []})
    assert response.status_code == 200
    assert time.monotonic() - started < 2
    assert response.headers["x-sidestep-model"] == "b/fallback"


def test_hanging_primary_is_served_by_fallback_after_attempt_timeout(stack: Stack, providers) -> None:
    providers["a"].script(Reply(hang=True))
    started = time.monotonic()
    response = stack.chat({"model": "a/slow", "messages": []})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "b/fallback"
    assert 0.9 <= elapsed < 3
    assert providers["a"].aborted.wait(2)  # Envoy closed the hanging attempt


def test_sse_stream_from_fallback_arrives_incrementally(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429))
    providers["b"].script(Reply(stream=5, interval=0.3))
    arrivals: list[float] = []
    chunks: list[dict] = []
    with stack.client.stream("POST", stack.url + "/v1/chat/completions", timeout=30,
                             content=json.dumps({"model": "a/primary", "stream": True, "messages": []})) as response:
        assert response.status_code == 200
        assert response.headers["x-sidestep-model"] == "b/fallback"
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.time())
                chunks.append(json.loads(line[6:]))
    assert [c["i"] for c in chunks] == list(range(5))
    assert all(c["provider"] == "b" for c in chunks)
    # each chunk reached the client soon after the provider sent it, not all at the end
    assert max(arrival - chunk["t"] for arrival, chunk in zip(arrivals, chunks, strict=True)) < 0.25
    assert arrivals[-1] - arrivals[0] >= 1.0


def test_request_body_reaches_providers_byte_for_byte_except_model(stack: Stack, providers) -> None:
    providers["a"].script(Reply(500))
    body = ('{\n  "messages": [{"role": "user", "content": "h\u00e9llo \\"model\\": x", "model": "inner"}],\n'
            '  "zeta": {"unknown": [1, 2.50, null]},   "model" :  "a/primary",\n'
            '  "alpha": true\n}').encode()
    response = stack.chat(body)
    assert response.status_code == 200
    expected_a = body.replace(b'"a/primary"', b'"primary"')
    expected_b = body.replace(b'"a/primary"', b'"fallback"')
    assert providers["a"].requests[0].body == expected_a
    assert providers["b"].requests[0].body == expected_b
    assert providers["b"].requests[0].headers["content-length"] == str(len(expected_b))


def test_other_4xx_is_not_retried_unless_listed(stack: Stack, providers) -> None:
    providers["a"].script(Reply(400, body=b'{"error": {"message": "context too long"}}'))
    response = stack.chat({"model": "a/primary", "messages": []})
    assert response.status_code == 400
    assert response.json() == {"error": {"message": "context too long"}}
    assert providers["b"].requests == []

    providers["a"].script(Reply(400))
    response = stack.chat({"model": "a/listed-400", "messages": []})
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "b/fallback"


def test_path_and_client_headers_are_preserved(stack: Stack, providers) -> None:
    response = stack.chat({"model": "a/primary", "messages": []}, path="/v1/chat/completions?trace=1",
                          headers={"x-custom": "kept", "openai-organization": "org-1", "x-api-key": "client-key"})
    assert response.status_code == 200
    seen = providers["a"].requests[0]
    assert seen.path == "/v1/chat/completions?trace=1"
    assert seen.headers["x-custom"] == "kept" and seen.headers["openai-organization"] == "org-1"
    assert "x-api-key" not in seen.headers  # client credentials never reach a provider


def test_client_cannot_choose_the_target_or_force_a_retry(stack: Stack, providers) -> None:
    response = stack.chat({"model": "a/nopolicy", "messages": []},
                          headers={"x-sidestep-target": "t1", "x-sidestep-retry": "1"})
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "a/nopolicy"
    assert len(providers["a"].requests) == 1 and providers["b"].requests == []


def test_concurrent_failovers_all_succeed(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429))
    import concurrent.futures

    def one(_: int) -> httpx.Response:
        with httpx.Client() as client:
            return client.post(stack.url + "/v1/chat/completions", timeout=30,
                               content=json.dumps({"model": "a/primary", "messages": []}))

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(64)))
    assert [r.status_code for r in responses] == [200] * 64
    assert {r.headers["x-sidestep-model"] for r in responses} == {"b/fallback"}
    assert len(providers["a"].requests) == 64 and len(providers["b"].requests) == 64


def test_client_disconnect_during_a_wait_stops_the_request(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after="2"), Reply(200))
    with pytest.raises(httpx.TimeoutException):
        stack.chat({"model": "a/retry-after", "messages": []}, timeout=0.5)
    time.sleep(2.5)
    assert len(providers["a"].requests) == 1  # the planned retry never went out


def test_request_state_is_keyed_by_envoys_id_not_the_clients(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429), Reply(200))
    import concurrent.futures

    def one(_: int) -> httpx.Response:
        with httpx.Client() as client:
            return client.post(stack.url + "/v1/chat/completions", headers={"x-request-id": "same-for-all"},
                               content=json.dumps({"model": "a/primary", "messages": []}), timeout=30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert {r.headers["x-sidestep-attempts"] for r in responses} <= {"1", "2"}
    ids = {seen.headers["x-request-id"] for p in "ab" for seen in providers[p].requests}
    assert "same-for-all" not in ids and len(ids) == 8


def test_stalled_stream_is_cut_after_the_idle_timeout(stack: Stack, providers) -> None:
    providers["a"].script(Reply(stream=3, interval=4))  # one chunk, then 4 s of silence
    started = time.monotonic()
    received: list[str] = []
    with pytest.raises(httpx.HTTPError):
        with stack.client.stream("POST", stack.url + "/v1/chat/completions", timeout=30,
                                 content=json.dumps({"model": "a/stall", "stream": True})) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                received.append(line)
    assert 0.9 <= time.monotonic() - started < 3
    assert any(line.startswith("data: {") for line in received)  # what did arrive was delivered


def test_large_body_survives_failover(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429))
    content = "x" * (5 * 1024 * 1024)
    body = json.dumps({"model": "a/primary", "messages": [{"role": "user", "content": content}]}).encode()
    response = stack.chat(body, timeout=60)
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "b/fallback"
    assert providers["b"].requests[0].body == body.replace(b'"a/primary"', b'"fallback"')

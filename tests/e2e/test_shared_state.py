"""Shared state end to end: blocks that outlive a request and cross workers, latency blocks, key
pools, pacing, and the control plane's own failures. One two-worker stack; each test uses its own
models (blocks and key states are global on purpose, so tests must not share targets).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate

import httpx
import pytest

from controlplane.rundir import free_port
from tests.e2e.conftest import Stack, start_stack, wait_for
from tests.mockprovider import MockProvider, Reply

pytestmark = pytest.mark.e2e

KEYS = ["sk-c-key0-aaaaaaaaaa00", "sk-c-key1-bbbbbbbbbb01", "sk-c-key2-cccccccccc02"]
POLICY = "retry_policy: {{fallback_models: [b/fallback]}}"

CONFIG = """
listeners: [{{type: model, port: {port}, attempt_timeout: 10s}}]
model_providers:
  - {{model: b/fallback, base_url: "{b}", access_key: sk-b-0123456789abcdef}}
  - {{model: a/limited, base_url: "{a}", access_key: sk-a-0123456789abcdef, %(policy)s}}
  - {{model: a/limited-x, base_url: "{a}", access_key: sk-a-0123456789abcdef, %(policy)s}}
  - {{model: a/limited-y, base_url: "{a}", access_key: sk-a-0123456789abcdef, %(policy)s}}
  - {{model: a/dated, base_url: "{a}", access_key: sk-a-0123456789abcdef, %(policy)s}}
  - model: a/slow-total
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [b/fallback]
      on_high_latency: {{threshold_ms: 1000, measure: total, min_triggers: 1, block_duration_seconds: 60}}
  - model: a/slow-ttfb
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [b/fallback]
      on_high_latency: {{threshold_ms: 1000, measure: ttfb, min_triggers: 2, trigger_window_seconds: 60,
                         block_duration_seconds: 60}}
  - {{model: c/pool, base_url: "{c}", access_keys: {keys}}}
  - {{model: c/pool-stream, base_url: "{c}", access_keys: {keys}}}
  - {{model: c/pool-limited, base_url: "{c}", access_keys: {keys}}}
  - {{model: c/pool-revoked, base_url: "{c}", access_keys: {keys}}}
  - {{model: c/pool-500, base_url: "{c}", access_keys: {keys}}}
  - {{model: c/pool-failover, base_url: "{c}", access_keys: {keys}, %(policy)s}}
  - {{model: c/passthrough, base_url: "{c}", passthrough_auth: true}}
  - model: a/paced
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      default_max_attempts: 1
      backoff: {{apply_to: same_model, base_ms: 200, max_ms: 200, jitter: false}}
""" % {"policy": POLICY}


@pytest.fixture(scope="module")
def stack(providers: dict[str, MockProvider], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    config = CONFIG.format(port=port, a=providers["a"].url, b=providers["b"].url, c=providers["c"].url,
                           keys=json.dumps(KEYS))
    stack = start_stack(tmp_path_factory.mktemp("shared"), config, port, "--workers", "2")
    wait_for(lambda: all(w["synced"] for w in stack.status()["workers"]), "both workers synced")
    yield stack
    stack.client.close()
    stack.sidestep("down", check=False)


def ask(stack: Stack, model: str, **extra: object) -> httpx.Response:
    return stack.chat({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def blocks(stack: Stack) -> dict[str, dict]:
    return {b["name"]: b for b in stack.status()["blocks"]}


# ---- Retry-After blocks


def test_retry_after_blocks_the_primary_for_later_requests_on_every_worker(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after="60"), Reply(200))
    first = ask(stack, "a/limited")
    assert first.status_code == 200 and first.headers["x-sidestep-model"] == "b/fallback"
    origin = first.headers["x-sidestep-worker"]
    # the very next request on the same worker already sees the block (no replication involved)
    wait_for(lambda: blocks(stack).get("a/limited"), "the block to reach the control plane")
    time.sleep(0.2)  # and from there to the other worker
    block = blocks(stack)["a/limited"]
    assert block["reason"] == "retry_after 429" and 55 < block["remaining_s"] <= 60
    workers = set()
    for _ in range(40):
        response = ask(stack, "a/limited")
        assert response.status_code == 200 and response.headers["x-sidestep-model"] == "b/fallback"
        assert response.headers["x-sidestep-attempts"] == "1"  # straight to the fallback
        workers.add(response.headers["x-sidestep-worker"])
        if len(workers) == 2:
            break
    assert workers == {"0", "1"}, f"never reached the worker other than {origin}"
    assert len(providers["a"].requests) == 1  # the primary was never called again


def test_same_worker_sees_the_block_immediately(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after="60"), Reply(200))
    served = []
    for _ in range(12):  # back to back: no time for replication
        response = ask(stack, "a/limited-x")
        assert response.headers["x-sidestep-model"] == "b/fallback"
        served.append((response.headers["x-sidestep-worker"], response.headers["x-sidestep-attempts"]))
    origin = served[0][0]
    assert served[0][1] == "2"  # the 429, then the fallback
    assert [attempts for worker, attempts in served[1:] if worker == origin] == \
        ["1"] * sum(1 for worker, _ in served[1:] if worker == origin)
    assert len(providers["a"].requests) <= 2  # at most once per worker, before it heard of the block


def test_retry_after_as_http_date(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after=formatdate(time.time() + 90, usegmt=True)), Reply(200))
    assert ask(stack, "a/dated").headers["x-sidestep-model"] == "b/fallback"
    wait_for(lambda: blocks(stack).get("a/dated"), "the dated block")
    assert 80 < blocks(stack)["a/dated"]["remaining_s"] <= 91
    time.sleep(0.2)
    assert all(ask(stack, "a/dated").headers["x-sidestep-model"] == "b/fallback" for _ in range(4))
    assert len(providers["a"].requests) == 1


# ---- latency blocks


def test_slow_total_response_is_delivered_then_blocks(stack: Stack, providers) -> None:
    # first byte at once, last byte after ~1.5 s: only `total` sees it as slow
    providers["a"].script(Reply(200, stream=3, interval=0.5), Reply(200))
    started = time.monotonic()
    slow = ask(stack, "a/slow-total", stream=True)
    assert slow.status_code == 200 and slow.headers["x-sidestep-model"] == "a/slow-total"
    assert slow.text.count("data: ") == 4 and time.monotonic() - started >= 1.4  # delivered whole
    worker = slow.headers["x-sidestep-worker"]
    wait_for(lambda: blocks(stack).get("a/slow-total"), "the latency block")
    assert blocks(stack)["a/slow-total"]["reason"].startswith("high_latency total")
    time.sleep(0.2)
    for _ in range(6):
        response = ask(stack, "a/slow-total")
        assert response.headers["x-sidestep-model"] == "b/fallback", response.headers
    assert len(providers["a"].requests) == 1, worker


def test_ttfb_block_needs_min_triggers_inside_the_window(stack: Stack, providers) -> None:
    providers["a"].script(Reply(200, delay=1.2))
    assert ask(stack, "a/slow-ttfb").headers["x-sidestep-model"] == "a/slow-ttfb"
    time.sleep(0.3)
    assert "a/slow-ttfb" not in blocks(stack)  # one trigger of two
    assert ask(stack, "a/slow-ttfb").headers["x-sidestep-model"] == "a/slow-ttfb"  # still the primary
    wait_for(lambda: blocks(stack).get("a/slow-ttfb"), "the latency block after the second trigger")
    assert blocks(stack)["a/slow-ttfb"]["reason"].startswith("high_latency ttfb")
    time.sleep(0.2)
    assert ask(stack, "a/slow-ttfb").headers["x-sidestep-model"] == "b/fallback"
    assert len(providers["a"].requests) == 2


# ---- key pools


def keys_seen(provider: MockProvider) -> list[str]:
    return [r.headers["authorization"].removeprefix("Bearer ") for r in provider.requests]


def pool(stack: Stack, model: str) -> list[tuple[str, str]]:
    return [(k["key"], k["state"]) for k in stack.status()["key_pools"][model]]


HINTS = ["sk-c…00", "sk-c…01", "sk-c…02"]


@pytest.mark.parametrize("model", ["c/pool", "c/pool-stream"])
def test_key_pool_walks_keys_on_429_and_401(stack: Stack, providers, model: str) -> None:
    stream = model.endswith("stream")
    ok = Reply(200, stream=2, interval=0.05) if stream else Reply(200)
    providers["c"].script(Reply(429, retry_after="30"), Reply(401), ok)
    response = ask(stack, model, stream=stream)
    assert response.status_code == 200 and response.headers["x-sidestep-attempts"] == "3"
    if stream:
        assert response.text.count("data: ") == 3
    assert keys_seen(providers["c"]) == KEYS  # in pool order
    wait_for(lambda: pool(stack, model)[1][1] == "unauthorized", "the key states")
    assert pool(stack, model) == [(HINTS[0], "rate_limited"), (HINTS[1], "unauthorized"), (HINTS[2], "ok")]
    limited = stack.status()["key_pools"][model][0]
    assert limited["status"] == 429 and 25 < limited["remaining_s"] <= 30
    time.sleep(0.2)  # replication to the other worker
    # the next request starts with the one usable key
    assert ask(stack, model, stream=stream).status_code == 200
    assert keys_seen(providers["c"])[-1] == KEYS[2]
    status = stack.sidestep("status").stdout
    assert f"{HINTS[1]} unauthorized (401)" in status and "rate-limited" in status
    assert not any(key in status for key in KEYS)  # masked only


def test_every_key_rate_limited_is_a_429_with_the_shortest_rest(stack: Stack, providers) -> None:
    providers["c"].script(Reply(429, retry_after="40"), Reply(429, retry_after="20"), Reply(429))
    response = ask(stack, "c/pool-limited")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "20"  # key 1 rests the shortest (key 2: the default 60 s)
    error = response.json()["error"]
    assert error["code"] == "keys_rate_limited" and "all configured keys are rate-limited" in error["message"]
    assert keys_seen(providers["c"]) == KEYS
    wait_for(lambda: [s for _, s in pool(stack, "c/pool-limited")] == ["rate_limited"] * 3, "the key states")
    time.sleep(0.2)
    again = ask(stack, "c/pool-limited")  # nothing usable: answered without calling the provider
    assert again.status_code == 429 and int(again.headers["retry-after"]) <= 20
    assert len(providers["c"].requests) == 3


def test_every_key_unauthorized_is_a_502(stack: Stack, providers) -> None:
    providers["c"].script(Reply(401), Reply(403), Reply(401))
    response = ask(stack, "c/pool-revoked")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "keys_unauthorized" and "rejected" in error["message"]
    assert "retry-after" not in response.headers
    assert keys_seen(providers["c"]) == KEYS
    wait_for(lambda: [s for _, s in pool(stack, "c/pool-revoked")] == ["unauthorized"] * 3, "the key states")
    time.sleep(0.2)
    assert ask(stack, "c/pool-revoked").status_code == 502 and len(providers["c"].requests) == 3


def test_500_is_not_a_key_problem(stack: Stack, providers) -> None:
    providers["c"].script(Reply(500), Reply(200))
    assert ask(stack, "c/pool-500").status_code == 500  # no policy: delivered as it is
    assert ask(stack, "c/pool-500").status_code == 200
    assert keys_seen(providers["c"]) == [KEYS[0], KEYS[0]]


def test_exhausted_pool_blocks_the_target_and_the_policy_fails_over(stack: Stack, providers) -> None:
    providers["c"].script(Reply(429, retry_after="30"))
    response = ask(stack, "c/pool-failover")
    assert response.status_code == 200 and response.headers["x-sidestep-model"] == "b/fallback"
    assert response.headers["x-sidestep-attempts"] == "4"  # three keys, then the fallback
    assert keys_seen(providers["c"]) == KEYS
    wait_for(lambda: [s for _, s in pool(stack, "c/pool-failover")] == ["rate_limited"] * 3, "the key states")
    time.sleep(0.2)
    again = ask(stack, "c/pool-failover")
    assert again.headers["x-sidestep-model"] == "b/fallback" and again.headers["x-sidestep-attempts"] == "1"
    assert len(providers["c"].requests) == 3


def test_passthrough_never_fails_over_keys(stack: Stack, providers) -> None:
    providers["c"].script(Reply(429, retry_after="7"))
    response = stack.chat({"model": "c/passthrough", "messages": []},
                          headers={"authorization": "Bearer user-own-key"})
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["message"] == "c says 429"  # the provider's own answer
    assert keys_seen(providers["c"]) == ["user-own-key"]


# ---- pacing


def test_concurrent_retries_to_one_target_are_spread_out(stack: Stack, providers) -> None:
    burst = 16
    providers["a"].script(*[Reply(429)] * burst, Reply(200))
    with ThreadPoolExecutor(burst) as pool_:
        responses = list(pool_.map(lambda _: ask(stack, "a/paced"), range(burst)))
    assert [r.status_code for r in responses] == [200] * burst
    arrivals = sorted(r.at for r in providers["a"].requests)
    first, retries = arrivals[:burst], arrivals[burst:]
    assert len(retries) == burst and first[-1] - first[0] < 0.5  # the 429s came as one burst
    # each worker starts at most one retry per 200 ms gap: two workers, at most two per gap
    assert all(later - earlier >= 0.19 for earlier, later in zip(retries, retries[2:], strict=False)), retries
    assert retries[-1] - retries[0] >= (burst / 2 - 1) * 0.19


# ---- failures of the gateway's own processes


def test_control_plane_down_workers_keep_serving_and_resync(stack: Stack, providers) -> None:
    providers["a"].script(Reply(429, retry_after="120"), Reply(200))
    assert ask(stack, "a/limited-y").status_code == 200
    state_pid = stack.status()["processes"]["state"]["pid"]
    os.kill(state_pid, signal.SIGKILL)
    for _ in range(6):  # the workers serve on, with what they know
        response = ask(stack, "a/limited-y")
        assert response.status_code == 200 and response.headers["x-sidestep-model"] == "b/fallback"
    assert len(providers["a"].requests) <= 2

    def resynced() -> bool:
        status = stack.status()
        return (status["state_service"] == "up" and status["processes"]["state"]["pid"] != state_pid
                and all(w["synced"] for w in status["workers"]) and "a/limited-y" in blocks(stack))

    wait_for(resynced, "the restarted control plane to learn the blocks back from the workers", 15)

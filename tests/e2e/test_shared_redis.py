"""Shared state across gateways through a real Redis (`shared_state: {redis_url}`): two complete
stacks (`sidestep --home DIR up` on two ports), one redis-server, the same config. What one gateway
learns about a provider, the other honours; Redis dying and coming back loses no request.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import pytest

from controlplane.rundir import free_port
from controlplane.state.v1 import state_pb2 as pb
from controlplane.state.v1 import state_pb2_grpc as pb_grpc
from tests.e2e.conftest import Stack, start_stack, wait_for
from tests.e2e.test_shared_state import ask, keys_seen
from tests.mockprovider import MockProvider, Reply
from tests.redisserver import RedisServer

pytestmark = pytest.mark.e2e

KEYS = ["sk-r-key0-aaaaaaaaaa00", "sk-r-key1-bbbbbbbbbb01"]
POLICY = "retry_policy: {fallback_models: [b/fallback]}"
CONFIG = """
listeners: [{type: model, port: %(port)s, attempt_timeout: 10s}]
shared_state: {redis_url: "$SIDESTEP_TEST_REDIS", namespace: "%(namespace)s"}
model_providers:
  - {model: b/fallback, base_url: "%(b)s", access_key: sk-b-0123456789abcdef}
  - {model: a/limited, base_url: "%(a)s", access_key: sk-a-0123456789abcdef, %(policy)s}
  - {model: a/during-outage, base_url: "%(a)s", access_key: sk-a-0123456789abcdef, %(policy)s}
  - {model: a/after-restart, base_url: "%(a)s", access_key: sk-a-0123456789abcdef, %(policy)s}
  - {model: c/steady, base_url: "%(c)s", access_key: sk-c-0123456789abcdef}  # the load: not on a, whose script the test sets
  - {model: c/pool, base_url: "%(c)s", access_keys: %(keys)s}
"""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def gateways(redis_server: RedisServer, providers: dict[str, MockProvider],
             tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[list[Stack]]:
    monkeypatch_module.setenv("SIDESTEP_TEST_REDIS", redis_server.url)  # the config reads it: $VAR works
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    stacks = []
    for name in ("a", "b"):
        port = free_port()
        config = CONFIG % {"port": port, "namespace": namespace, "policy": POLICY, "keys": json.dumps(KEYS),
                           **{n: m.url for n, m in providers.items()}}
        stacks.append(start_stack(tmp_path_factory.mktemp(f"gateway-{name}"), config, port))
    for stack in stacks:  # each gateway on Redis, and its worker on its state service
        wait_for(lambda s=stack: store(s).state == "connected" and len(snapshot(s).workers) == 1,
                 "the gateway to connect to Redis and its worker to sync")
    yield stacks
    for stack in stacks:
        stack.client.close()
        stack.sidestep("down", check=False)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def snapshot(stack: Stack) -> pb.Snapshot:
    """The gateway's state service, read directly: cheaper than `status` for polling."""
    path = json.loads((stack.home / "run" / "stack.json").read_text())["state_socket"]
    with grpc.insecure_channel(f"unix:{path}") as channel:
        return pb_grpc.StateStub(channel).Get(pb.SnapshotRequest(), timeout=2)


def store(stack: Stack) -> pb.Store:
    return snapshot(stack).store


def blocked(stack: Stack, name: str) -> bool:
    return any(f.HasField("block") and f.block.name == name for f in snapshot(stack).facts)


def test_a_429_seen_by_one_gateway_keeps_the_other_off_the_provider(gateways: list[Stack], providers) -> None:
    a, b = gateways
    providers["a"].script(Reply(429, retry_after="60"), Reply(200))
    first = ask(a, "a/limited")
    assert first.status_code == 200 and first.headers["x-sidestep-model"] == "b/fallback"
    started = time.monotonic()
    wait_for(lambda: blocked(b, "a/limited"), "gateway B to learn A's block", timeout=5)
    learned_after = time.monotonic() - started
    time.sleep(0.2)  # from B's state service to B's worker
    for _ in range(5):
        response = ask(b, "a/limited")
        assert response.status_code == 200 and response.headers["x-sidestep-model"] == "b/fallback"
        assert response.headers["x-sidestep-attempts"] == "1"  # straight to the fallback
    assert len(providers["a"].requests) == 1  # only A's first attempt ever reached the provider
    assert learned_after < 2, learned_after
    report = json.loads(b.sidestep("status", "--json").stdout)
    assert report["shared_state"]["state"] == "connected" and report["shared_state"]["learned"] >= 1
    assert any(x["name"] == "a/limited" and x["reason"] == "retry_after 429" for x in report["blocks"])


def test_a_key_retired_on_one_gateway_is_skipped_by_the_other(gateways: list[Stack], providers,
                                                              redis_server: RedisServer) -> None:
    a, b = gateways
    providers["c"].script(Reply(401), Reply(200))
    assert ask(a, "c/pool").status_code == 200
    assert keys_seen(providers["c"]) == KEYS  # key 0 refused, key 1 served
    wait_for(lambda: any(f.HasField("key") and f.key.unauthorized for f in snapshot(b).facts),
             "gateway B to learn the retired key")
    time.sleep(0.2)
    providers["c"].script(Reply(200))
    for _ in range(4):
        assert ask(b, "c/pool").status_code == 200
    assert keys_seen(providers["c"]) == [KEYS[1]] * 4
    pool = json.loads(b.sidestep("status", "--json").stdout)["key_pools"]["c/pool"]
    assert [k["state"] for k in pool] == ["unauthorized", "ok"]
    # what Redis holds names keys by fingerprint only: neither the key nor its masked hint
    stored = b"".join(redis_server.client().zrange(f"{namespace(a)}:facts", 0, -1))
    assert stored and b"c/pool" in stored
    for key in KEYS:
        assert key.encode() not in stored and key[:4].encode() + "…".encode() not in stored


def namespace(stack: Stack) -> str:
    return store(stack).namespace


def test_redis_killed_and_restarted_under_load(gateways: list[Stack], providers, redis_server: RedisServer) -> None:
    """No request is lost or hangs while Redis is down; each gateway logs the outage once; what was
    learned during it reaches the other gateway once Redis is back, as does what is learned after."""
    a, b = gateways
    providers["c"].script(Reply(200))
    stop = threading.Event()
    outcomes: list[int | str] = []

    def load(stack: Stack) -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                try:
                    response = client.post(stack.url + "/v1/chat/completions", timeout=10, json={
                        "model": "c/steady", "messages": [{"role": "user", "content": "hi"}]})
                    outcomes.append(response.status_code)
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)

    with ThreadPoolExecutor(4) as pool:
        for stack in (a, b, a, b):
            pool.submit(load, stack)
        try:
            time.sleep(0.5)
            redis_server.kill()
            wait_for(lambda: store(a).state == "unreachable" and store(b).state == "unreachable",
                     "both gateways to notice Redis is gone", timeout=10)
            # learned while Redis is down: A blocks a model B has never called
            providers["a"].script(Reply(429, retry_after="120"), Reply(200))
            assert ask(a, "a/during-outage").headers["x-sidestep-model"] == "b/fallback"
            time.sleep(1.0)
            assert not blocked(b, "a/during-outage")  # no path between them now
            redis_server.start()  # empty: it lost everything
            wait_for(lambda: store(a).state == "connected" and store(b).state == "connected",
                     "both gateways to reconnect", timeout=10)
            time.sleep(0.5)
        finally:
            stop.set()  # the load threads end, whatever failed
    assert outcomes and set(outcomes) == {200}, {o for o in outcomes if o != 200}
    wait_for(lambda: blocked(b, "a/during-outage"), "B to learn the block A learned during the outage")
    # and the rebuilt Redis carries what both knew before (A's earlier block, re-published on resync)
    assert redis_server.client().zcard(f"{namespace(a)}:facts") >= 1
    providers["a"].script(Reply(429, retry_after="60"), Reply(200))
    assert ask(b, "a/after-restart").headers["x-sidestep-model"] == "b/fallback"
    wait_for(lambda: blocked(a, "a/after-restart"), "A to learn B's block after the restart", timeout=5)
    for stack in (a, b):
        log = (stack.home / "logs" / "state.log").read_text()
        assert log.count("unreachable (") == 1, log  # logged once, not per retry
        assert "is back: resynced" in log


def test_the_password_in_the_url_is_never_shown(tmp_path: Path, providers, make_stack) -> None:
    """A Redis that requires a password: the gateway authenticates, and shows the URL masked."""
    secret = "s3cret-redis-passw0rd"
    server = RedisServer(tmp_path / "redis", password=secret).start()
    try:
        stack = make_stack(
            "listeners: [{{type: model, port: {port}}}]\n"
            "shared_state: {{redis_url: 'redis://:{secret}@127.0.0.1:{redis}/0'}}\n"
            "model_providers: [{{model: b/fallback, base_url: '{b}', access_key: sk-b-0123456789abcdef}}]\n",
            secret=secret, redis=server.port, b=providers["b"].url)
        wait_for(lambda: store(stack).state == "connected", "the gateway to authenticate to Redis")
        shown = stack.sidestep("status").stdout
        assert f"redis://:****@127.0.0.1:{server.port}/0" in shown and "CONNECTED" in shown
        logs = "".join(p.read_text() for p in (stack.home / "logs").glob("*.log"))
        assert secret not in shown and secret not in logs
        assert secret not in (stack.home / "run" / "stack.json").read_text()
    finally:
        server.kill()


def test_without_redis_reachable_the_gateway_starts_and_serves(make_stack, providers) -> None:
    """A Redis that is not there at start-up: `up` succeeds, requests are served, status says why."""
    dead = free_port()
    stack = make_stack(
        "listeners: [{{type: model, port: {port}}}]\n"
        "shared_state: {{redis_url: 'redis://127.0.0.1:{dead}/0'}}\n"
        "model_providers: [{{model: b/fallback, base_url: '{b}', access_key: sk-b-0123456789abcdef}}]\n",
        dead=dead, b=providers["b"].url)
    assert ask(stack, "b/fallback").status_code == 200
    wait_for(lambda: store(stack).state == "unreachable", "status to say Redis is unreachable")
    assert "UNREACHABLE" in stack.sidestep("status").stdout

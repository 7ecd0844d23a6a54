"""Bad input gets a clear JSON error with the right status, fast, and nothing reaches a provider."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from controlplane.config import parse_config
from controlplane.render.envoy import Sockets, render_envoy
from controlplane.rundir import free_port
from controlplane.supervisor import envoy_binary
from tests.mockprovider import Reply

pytestmark = pytest.mark.e2e

NO_DEFAULT = """
listeners: [{{type: model, port: {port}, max_request_body_bytes: 65536}}]
model_providers:
  - model: a/only
    base_url: {a}
    access_key: sk-a-0123456789abcdef
"""


@pytest.fixture
def stack(make_stack, providers):
    return make_stack(NO_DEFAULT, a=providers["a"].url)


def _error(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


def test_non_json_body_is_400(stack, providers) -> None:
    response = stack.chat(b"this is not json")
    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"
    assert "JSON" in _error(response)["message"]
    assert providers["a"].requests == []


def test_json_that_is_not_an_object_and_non_string_model_are_400(stack, providers) -> None:
    assert stack.chat(b"[1, 2]").status_code == 400
    response = stack.chat(b'{"model": 42}')
    assert response.status_code == 400 and "string" in _error(response)["message"]
    assert providers["a"].requests == []


def test_missing_model_without_default_is_400(stack, providers) -> None:
    response = stack.chat({"messages": []})
    assert response.status_code == 400
    assert "a/only" in _error(response)["message"]  # tells the client what it can ask for


def test_unknown_model_without_default_is_404(stack, providers) -> None:
    response = stack.chat({"model": "gpt-9", "messages": []})
    assert response.status_code == 404
    assert _error(response)["type"] == "model_not_found"
    assert "gpt-9" in _error(response)["message"]
    assert providers["a"].requests == []


def test_bare_model_id_resolves_when_unique(stack, providers) -> None:
    response = stack.chat({"model": "only", "messages": []})
    assert response.status_code == 200
    assert providers["a"].requests[0].json["model"] == "only"


def test_oversized_body_is_413_json(stack, providers) -> None:
    big = {"model": "a/only", "messages": [{"role": "user", "content": "x" * 100_000}]}
    response = stack.chat(big)
    assert response.status_code == 413
    error = _error(response)
    assert error["type"] == "request_too_large" and "65536" in error["message"]
    assert providers["a"].requests == []


def test_empty_body_is_400(stack, providers) -> None:
    response = stack.client.post(stack.url + "/v1/chat/completions")
    assert response.status_code == 400
    assert _error(response)["type"] == "invalid_request_error"


def test_unknown_route_is_404_json_and_models_are_listed(stack) -> None:
    response = stack.client.get(stack.url + "/nope")
    assert response.status_code == 404 and _error(response)["type"] == "not_found"
    models = stack.client.get(stack.url + "/v1/models")
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ["a/only"]


def test_dead_provider_gives_clean_502(make_stack) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stack = make_stack("""
listeners: [{{type: model, port: {port}}}]
model_providers:
  - {{model: a/gone, base_url: {dead}, access_key: k-0123456789ab, default: true}}
  - {{model: b/gone, base_url: {dead}, access_key: k-0123456789ab,
      retry_policy: {{default_strategy: same_model, default_max_attempts: 1}}}}
""", dead=dead)
    response = stack.chat({"model": "a/gone"})  # no policy: one attempt, a JSON error
    assert response.status_code == 502
    assert _error(response)["code"] == "no_retry_policy"
    assert _error(response)["attempts"][0]["error_type"] == "connection_error"
    response = stack.chat({"model": "b/gone"})
    assert response.status_code == 502
    error = _error(response)
    assert error["type"] == "retry_exhausted"
    assert [a["error_type"] for a in error["attempts"]] == ["connection_error", "connection_error"]
    # no provider answered: Envoy's own reply is not passed off as the provider's words
    assert "provider_error" not in error and all("provider_error" not in a for a in error["attempts"])


def test_a_dead_worker_is_replaced_without_failing_requests(stack, providers) -> None:
    """Envoy retries a refused ext_proc stream (the restarted worker, or another one) instead of
    failing the request: a crash costs the requests in flight, not the ones after it."""
    extproc_pid = stack.status()["processes"]["extproc-0"]["pid"]
    os.kill(extproc_pid, signal.SIGKILL)
    for _ in range(20):
        started = time.monotonic()
        response = stack.chat({"model": "a/only", "messages": []}, timeout=10)
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 3
    status = stack.status()
    assert status["processes"]["extproc-0"]["restarts"] >= 1
    assert status["processes"]["extproc-0"]["pid"] not in (None, extproc_pid)
    assert status["processes"]["extproc-0"]["last_exit"] == -signal.SIGKILL


def test_worker_down_for_long_gives_clean_503_then_recovers(stack, providers) -> None:
    supervisor = stack.status()["supervisor_pid"]
    extproc_pid = stack.status()["processes"]["extproc-0"]["pid"]
    os.kill(supervisor, signal.SIGSTOP)  # nobody restarts the worker for now
    try:
        os.kill(extproc_pid, signal.SIGKILL)
        started = time.monotonic()
        response = stack.chat({"model": "a/only", "messages": []}, timeout=10)
        assert time.monotonic() - started < 5  # never a hang
        assert response.status_code == 503
        error = _error(response)
        assert error["type"] == "gateway_unavailable" and "was not sent to any provider" in error["message"]
        assert providers["a"].requests == []
    finally:
        os.kill(supervisor, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while (response := stack.chat({"model": "a/only", "messages": []})).status_code != 200:
        assert time.monotonic() < deadline, "the supervisor did not bring the ext_proc back"
        time.sleep(0.1)


def test_worker_death_mid_attempt_says_the_provider_may_have_it(stack, providers) -> None:
    """Honest errors: once the ext_proc sent the attempt on, its death is not 'not sent'."""
    providers["a"].script(Reply(200, delay=3))
    extproc_pid = stack.status()["processes"]["extproc-0"]["pid"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(stack.chat, {"model": "a/only", "messages": []})
        deadline = time.monotonic() + 5
        while not providers["a"].requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(extproc_pid, signal.SIGKILL)
        response = pending.result(timeout=10)
    assert response.status_code == 502
    error = _error(response)
    assert error["type"] == "gateway_failed" and "may have received it" in error["message"]
    assert len(providers["a"].requests) == 1


def test_dispatch_without_routing_header_is_a_clear_400(tmp_path: Path, providers) -> None:
    """The dispatch listener, reached without the ext_proc's routing header, refuses with JSON 400.

    Real Envoy with the real rendered config, plus one test listener that goes straight to the
    internal dispatch listener (skipping the ext_proc, which would always set the header)."""
    loaded = parse_config(f"""
listeners: [{{type: model, port: {free_port()}}}]
model_providers: [{{model: a/x, base_url: "{providers['a'].url}", access_key: k-0123456789ab}}]
""")
    sockets = Sockets.in_dir(str(tmp_path), 1)
    bootstrap = render_envoy(loaded.gateway, sockets, str(tmp_path))
    probe_port = free_port()
    resources = bootstrap["static_resources"]
    probe_cluster = json.loads(json.dumps(next(c for c in resources["clusters"] if c["name"] == "sidestep_attempts_0")))
    probe_cluster["name"] = "probe"
    probe_cluster["load_assignment"]["cluster_name"] = "probe"
    del probe_cluster["typed_extension_protocol_options"]  # no ext_proc on this path
    resources["clusters"].append(probe_cluster)
    probe = json.loads(json.dumps(resources["listeners"][0]))
    probe["name"] = "probe"
    probe["address"]["socket_address"]["port_value"] = probe_port
    hcm = probe["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = hcm["http_filters"][-1:]
    hcm["route_config"] = {"virtual_hosts": [{"name": "p", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "probe"}}]}]}
    resources["listeners"].append(probe)
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(bootstrap))
    envoy = subprocess.Popen([envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "error"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{probe_port}/v1/chat/completions"
        for _ in range(100):
            try:
                response = httpx.post(url, content=b'{"model": "a/x"}')
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "routing_header_missing"
        assert "x-sidestep-target" in response.json()["error"]["message"]
        assert providers["a"].requests == []
        # and with the header, the same path reaches the provider without leaking it
        providers["a"].script(Reply(200))
        response = httpx.post(url, content=b'{"model": "x"}',
                              headers={"x-sidestep-target": loaded.gateway.targets["a/x"].route_id})
        assert response.status_code == 200
        assert "x-sidestep-target" not in providers["a"].requests[0].headers
    finally:
        envoy.terminate()
        envoy.wait(10)

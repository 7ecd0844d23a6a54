"""Live reload on real Envoy: `sidestep reload` (and SIGHUP to the supervisor) during a slow stream.
The stream completes unchanged, new requests use the new config, blocks of unchanged targets
survive, and a bad config is refused with the running one still serving."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from controlplane.rundir import free_port
from tests.e2e.conftest import Stack, start_stack, wait_for
from tests.mockprovider import MockProvider, Reply

pytestmark = pytest.mark.e2e

BASE = """
listeners: [{{type: model, port: {port}, attempt_timeout: 10s}}]
model_providers:
  - {{model: b/fallback, base_url: "{b}", access_key: {b_key}}}
  - {{model: a/primary, base_url: "{a}", access_key: sk-a-0123456789abcdef,
     retry_policy: {{fallback_models: [b/fallback]}}}}
  - {{model: a/slow, base_url: "{a}", access_key: sk-a-0123456789abcdef}}
"""
ADDED = """  - {{model: c/new, base_url: "{c}", access_key: sk-c-0123456789abcdef}}
"""


def chat(stack: Stack, model: str, **extra: object) -> httpx.Response:
    return stack.chat({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_reload_during_a_slow_stream(providers: dict[str, MockProvider], tmp_path: Path) -> None:
    port = free_port()
    values = {"port": port, "a": providers["a"].url, "b": providers["b"].url, "c": providers["c"].url}
    stack = start_stack(tmp_path, BASE.format(b_key="sk-b-old-0123456789", **values), port)
    config = tmp_path / "sidestep.yaml"
    try:
        before = stack.status()
        # a block on a target the new config keeps
        providers["a"].script(Reply(429, retry_after="60"), Reply(200, stream=8, interval=0.3))
        assert chat(stack, "a/primary").headers["x-sidestep-model"] == "b/fallback"
        wait_for(lambda: any(b["name"] == "a/primary" for b in stack.status()["blocks"]), "the block")
        assert chat(stack, "c/new").status_code == 404  # not configured yet
        # a slow stream (8 chunks, 0.3 s apart), reloaded under
        streamed: dict[str, object] = {}

        def stream() -> None:
            with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=30, json={
                    "model": "a/slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
                streamed["status"] = response.status_code
                streamed["body"] = b"".join(response.iter_bytes())

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(0.8)  # a few chunks in
        assert reader.is_alive()
        # a new model, a new key, and a listener setting: the listener the stream came in on is replaced
        config.write_text(BASE.replace("attempt_timeout: 10s", "attempt_timeout: 10s, request_timeout: 61s")
                          .format(b_key="sk-b-new-0123456789", **values) + ADDED.format(**values))
        reloaded = stack.sidestep("reload")  # the file the stack was started from, read again
        assert "sidestep reloaded" in reloaded.stdout, reloaded.stdout + reloaded.stderr
        assert reader.is_alive()  # the stream is still going
        listeners = json.loads((stack.home / "run" / "xds" / "lds.json").read_text())["resources"]
        model_listener = next(x for x in listeners if x["name"] == "model_listener")
        hcm = model_listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["request_timeout"] == "61.000s"  # the replaced listener's
        reader.join(30)
        assert streamed["status"] == 200
        body = streamed["body"]
        assert isinstance(body, bytes) and body.count(b"data: ") == 9 and body.rstrip().endswith(b"data: [DONE]")
        # new requests use the new config
        after = stack.status()
        assert after["config_hash"] != before["config_hash"] and "c/new" in after["models"]
        assert all(w["config_hash"] == after["config_hash"] for w in after["workers"])
        assert chat(stack, "c/new").status_code == 200
        # the unchanged target's block survived; its fallback now uses the new key
        assert any(b["name"] == "a/primary" for b in after["blocks"])
        served = chat(stack, "a/primary")
        assert served.headers["x-sidestep-model"] == "b/fallback" and served.headers["x-sidestep-attempts"] == "1"
        assert providers["b"].requests[-1].headers["authorization"] == "Bearer sk-b-new-0123456789"

        # a bad config is refused with every error, and the running one keeps serving
        bad = tmp_path / "bad.yaml"
        bad.write_text(BASE.format(b_key="sk-b-new-0123456789", **values)
                       + "  - {model: nope, retry_policy: {oops: 1}}\n")
        refused = stack.sidestep("reload", str(bad), check=False)
        assert refused.returncode == 2
        assert "model_providers[3] (nope).model" in refused.stderr and "retry_policy.oops" in refused.stderr
        assert stack.status()["config_hash"] == after["config_hash"]
        assert chat(stack, "c/new").status_code == 200
        # a change only a restart can make is refused too
        restart = tmp_path / "restart.yaml"
        restart.write_text(BASE.replace("attempt_timeout: 10s", "attempt_timeout: 10s, max_request_body_bytes: 4096")
                           .format(b_key="sk-b-new-0123456789", **values))
        refused = stack.sidestep("reload", str(restart), check=False)
        assert refused.returncode == 1 and "max_request_body_bytes" in refused.stderr
        assert "sidestep up" in refused.stderr
        assert stack.status()["config_hash"] == after["config_hash"]

        # SIGHUP to the supervisor reloads the file the stack runs from
        config.write_text(BASE.format(b_key="sk-b-new-0123456789", **values))  # c/new removed again
        supervisor = int((stack.home / "run" / "supervisor.pid").read_text())
        os.kill(supervisor, signal.SIGHUP)
        wait_for(lambda: "c/new" not in stack.status()["models"], "the SIGHUP reload", timeout=15)
        wait_for(lambda: chat(stack, "c/new").status_code == 404, "workers on the SIGHUP config")
        assert chat(stack, "a/primary").headers["x-sidestep-model"] == "b/fallback"  # the block is still there
        log = (stack.home / "logs" / "supervisor.log").read_text()
        assert "SIGHUP: reloading" in log and "reloaded: config" in log
        access = [json.loads(line) for line in (stack.home / "logs" / "access.log").read_text().splitlines()]
        assert access and not [e for e in access if int(e["status"]) >= 500], "a request failed during the reloads"
    finally:
        stack.client.close()
        stack.sidestep("down", check=False)


def test_a_listener_moved_by_up_listen_stays_moved_across_reloads(providers, tmp_path: Path) -> None:
    configured, moved = free_port(), free_port()
    config = tmp_path / "sidestep.yaml"
    config.write_text(BASE.format(port=configured, a=providers["a"].url, b=providers["b"].url,
                                  b_key="sk-b-old-0123456789"))
    home = tmp_path / "home"
    stack = Stack(home=home, url=f"http://127.0.0.1:{moved}", client=httpx.Client())
    try:
        stack.sidestep("up", "--listen", f"127.0.0.1:{moved}", str(config))
        assert chat(stack, "b/fallback").status_code == 200
        config.write_text(config.read_text() + ADDED.format(c=providers["c"].url))
        stack.sidestep("reload")
        response = chat(stack, "c/new")
        assert response.status_code == 200, response.text  # the new config, on the moved listener
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{configured}/healthz", timeout=2)
    finally:
        stack.client.close()
        stack.sidestep("down", check=False)

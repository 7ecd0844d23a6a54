"""The CLI as a user runs it: up, status, logs, down, validate, schema; and a Plano file unchanged."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

from controlplane.rundir import free_port
from tests.e2e.conftest import run_cli
from tests.mockprovider import Reply

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def test_plano_config_with_host_docker_internal_runs_unchanged(make_stack, providers, monkeypatch) -> None:
    """configs/plano_v0.3.0.yaml, with only its ports pointed at the mocks."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-test-0123456789")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    text = (REPO / "configs" / "plano_v0.3.0.yaml").read_text().replace("{", "{{").replace("}", "}}")
    text = text.replace("port: 12000", "port: {port}")
    text = re.sub(r"(- model: openai/gpt-4o\n)", r"\1    base_url: http://host.docker.internal:{a}\n", text)
    text = re.sub(r"(- model: anthropic/claude-sonnet-4-5\n)", r"\1    base_url: http://host.docker.internal:{b}\n",
                  text)
    text = text.replace("host.docker.internal:11434", "host.docker.internal:{c}")
    stack = make_stack(text, a=providers["a"].port, b=providers["b"].port, c=providers["c"].port)
    providers["a"].script(Reply(429))
    response = stack.chat({"model": "openai/gpt-4o", "messages": []})
    assert response.status_code == 200
    assert response.headers["x-sidestep-model"] == "anthropic/claude-sonnet-4-5"
    seen = providers["b"].requests[0]
    assert seen.json["model"] == "claude-sonnet-4-5"
    # an Anthropic provider gets its key as x-api-key, with a version, never the OpenAI bearer
    assert seen.headers["x-api-key"] == "sk-ant-test-0123456789"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen.headers
    assert stack.chat({"model": "ollama/llama3.1"}).headers["x-sidestep-model"] == "ollama/llama3.1"


def test_up_status_logs_down_lifecycle(tmp_path: Path, providers) -> None:
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(f"""
listeners: [{{type: model, port: {port}}}]
model_providers:
  - {{model: a/x, base_url: "{providers['a'].url}", access_key: sk-live-abcdefghijklmnop, default: true}}
""")
    home = ["--home", str(tmp_path / "home")]
    try:
        up = run_cli(*home, "up", str(config))
        assert f"http://127.0.0.1:{port}" in up.stdout and "logs" in up.stdout
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # up returned only once healthy

        status = json.loads(run_cli(*home, "status", "--json").stdout)
        assert status["running"] and status["healthy"]
        assert status["models"] == ["a/x"]
        assert all(child["pid"] for child in status["processes"].values())
        assert "running" in run_cli(*home, "status").stdout

        httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b'{"model": "a/x"}')
        deadline = time.monotonic() + 5
        while '"status":200' not in (logs := run_cli(*home, "logs", "access").stdout) and time.monotonic() < deadline:
            time.sleep(0.3)  # Envoy flushes its access log every second
        entry = json.loads(logs.strip().splitlines()[-1])
        assert (entry["status"], entry["model"], entry["attempts"]) == (200, "a/x", "1")
        assert "healthz" not in logs
        assert "serving" in run_cli(*home, "logs", "extproc").stdout

        # a second `up` restarts with the new config
        config.write_text(config.read_text().replace("a/x", "a/y"))
        again = run_cli(*home, "up", str(config))
        assert "restarting" in again.stdout
        assert json.loads(run_cli(*home, "status", "--json").stdout)["models"] == ["a/y"]

        everything = (tmp_path / "home").rglob("*")
        for path in everything:  # the key never lands in logs or state, only in the config copy
            if path.is_file() and path.name not in ("config.yaml", "compiled.pickle"):
                assert "sk-live-abcdefghijklmnop" not in path.read_text(errors="replace"), path
    finally:
        down = run_cli(*home, "down")
    assert "stopped" in down.stdout
    assert "not running" in run_cli(*home, "down").stdout  # safe twice
    assert run_cli(*home, "status", check=False).returncode == 3
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_up_refuses_a_bad_config_with_every_error_and_its_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("""
listeners: [{type: model, port: 70000}]
model_providers:
  - model: gpt-4o
  - model: openai/gpt-4o
    access_key: $SIDESTEP_TEST_UNSET_VAR
    retry_policy:
      default_strategy: sideways
      backof: {base_ms: 10}
""")
    result = run_cli("--home", str(tmp_path / "home"), "up", str(config), check=False)
    assert result.returncode == 2
    err = result.stderr
    assert "listeners[0].port" in err
    assert "model_providers[0] (gpt-4o).model" in err
    assert "model_providers[1] (openai/gpt-4o).retry_policy.default_strategy" in err
    assert "model_providers[1] (openai/gpt-4o).retry_policy.backof: unknown field" in err
    assert not (tmp_path / "home" / "run" / "supervisor.pid").exists()


def test_validate_reports_semantic_errors_and_warnings(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("""
model_providers:
  - model: openai/gpt-4o
    access_key: $SIDESTEP_TEST_UNSET_VAR
""")
    result = run_cli("validate", str(config), check=False)
    assert result.returncode == 2
    assert "model_providers[0] (openai/gpt-4o).access_key: environment variable SIDESTEP_TEST_UNSET_VAR is not set" \
        in result.stderr
    config.write_text("""
model_providers:
  - model: openai/gpt-4o
    access_key: sk-abcdefghijklmnop
    retry_policy:
      fallback_models: [openai/gpt-4o-mini, mistral/large]
      on_status_codes: [{codes: [429, "500-503"]}, {codes: [503]}]
      backoff: {apply_to: same_model}
  - {model: openai/gpt-4o-mini, access_key: sk-abcdefghijklmnop}
""")
    result = run_cli("validate", str(config))
    assert "OK" in result.stdout
    assert "fallback_models[1]: 'mistral/large' is not a configured" in result.stderr
    assert "fallback_models[0]: same provider" in result.stderr
    assert "on_status_codes[1].codes: 503 already covered by on_status_codes[0]" in result.stderr
    assert "backoff.apply_to: same_model never matches" in result.stderr
    assert "sk-abcdefghijklmnop" not in result.stdout + result.stderr


def test_schema_is_json_schema_for_editors() -> None:
    schema = json.loads(run_cli("schema").stdout)
    provider = schema["$defs"]["ModelProvider"]
    assert provider["additionalProperties"] is False
    assert "retry_policy" in provider["properties"] and "attempt_timeout" in provider["properties"]


def test_up_with_port_in_use_says_so(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "c.yaml"
        config.write_text(f"""
listeners: [{{type: model, port: {port}}}]
model_providers: [{{model: a/x, base_url: "http://127.0.0.1:9", access_key: k-0123456789ab}}]
""")
        result = run_cli("--home", str(tmp_path / "home"), "up", str(config), check=False)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_up_refuses_bad_process_counts_clearly(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text('model_providers: [{model: a/x, base_url: "http://127.0.0.1:9", access_key: k-0123456789ab}]')
    home = ("--home", str(tmp_path / "home"))
    result = run_cli(*home, "up", str(config), "--workers", "0", check=False)
    assert result.returncode == 1 and "--workers must be between 1 and 64, not 0" in result.stderr
    result = run_cli(*home, "up", str(config), check=False, env={"SIDESTEP_WORKERS": "two"})
    assert result.returncode == 1 and "$SIDESTEP_WORKERS must be a whole number, not 'two'" in result.stderr
    result = run_cli(*home, "up", str(config), check=False, env={"SIDESTEP_ENVOY_CONCURRENCY": "0"})
    assert result.returncode == 1 and "$SIDESTEP_ENVOY_CONCURRENCY must be between 1 and 64" in result.stderr
    assert not (tmp_path / "home" / "run" / "supervisor.pid").exists()  # nothing was started


def test_render_prints_envoy_config_without_keys(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text('model_providers: [{model: a/x, base_url: "http://127.0.0.1:9", '
                      'access_key: sk-secret-abcdefghijkl}]')
    bootstrap = json.loads(run_cli("render", str(config)).stdout)
    names = [c["name"] for c in bootstrap["static_resources"]["clusters"]]
    assert "sidestep_attempts_0" in names and "sidestep_extproc_0" in names
    assert "sk-secret" not in json.dumps(bootstrap)


def test_up_foreground_serves_until_interrupted(tmp_path: Path, providers) -> None:
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(f"""
listeners: [{{type: model, port: {port}}}]
model_providers: [{{model: a/x, base_url: "{providers['a'].url}", access_key: k-0123456789ab}}]
""")
    home = tmp_path / "home"
    process = subprocess.Popen([sys.executable, "-m", "controlplane", "--home", str(home), "up", "--foreground",
                                str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b'{"model": "a/x"}').status_code == 200
        children = json.loads(run_cli("--home", str(home), "status", "--json").stdout)["processes"]
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    for child in children.values():  # Envoy and the ext_proc went with it
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(child["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"child {child['pid']} still running")
    assert "not running" in run_cli("--home", str(home), "status", check=False).stdout

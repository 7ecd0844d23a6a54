"""Envoy config rendering: golden file, Envoy's own validation, and the settings that are required."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from controlplane.config import parse_config
from controlplane.render.envoy import Sockets, config_hash, render_envoy
from controlplane.supervisor import envoy_binary

GOLDEN = Path(__file__).parent / "golden" / "envoy_failover.json"
SOCKETS = Sockets.in_dir("/home/u/.sidestep/run", 2)
CONFIG = """
listeners: [{type: model, port: 12000, attempt_timeout: 20s, stream_idle_timeout: 90s}]
model_providers:
  - model: openai/gpt-4o
    access_key: sk-test-not-a-real-key-0000
    default: true
    retry_policy:
      fallback_models: [anthropic/claude-x]
      backoff: {apply_to: same_model, max_ms: 8000}
      retry_after_handling: {max_retry_after_seconds: 60}
  - {model: anthropic/claude-x, access_key: sk-ant-test-0000, attempt_timeout: 5s}
  - {model: local/llama, base_url: "http://host.docker.internal:11434"}
"""


def rendered(log_dir: str = "/var/log/sidestep") -> dict:
    return render_envoy(parse_config(CONFIG, {}).gateway, SOCKETS, log_dir,
                        ca_bundle="/etc/ssl/certs/ca-certificates.crt")


def test_matches_golden_file() -> None:
    """Regenerate with SIDESTEP_UPDATE_GOLDEN=1 after an intended change, and review the diff."""
    text = json.dumps(rendered(), indent=1, sort_keys=True) + "\n"
    if os.environ.get("SIDESTEP_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_envoy_accepts_it(tmp_path: Path) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(rendered(str(tmp_path))))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_settings() -> None:
    bootstrap = rendered()
    listeners = {x["name"]: x for x in bootstrap["static_resources"]["listeners"]}
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    outer = listeners["model_listener"]["filter_chains"][0]["filters"][0]["typed_config"]
    route = next(r["route"] for r in outer["route_config"]["virtual_hosts"][0]["routes"]
                 if r["match"].get("path") == "/v1/chat/completions" and "dynamic_metadata" not in r["match"])
    assert route["timeout"] == "0s"
    retry = route["retry_policy"]
    assert "reset" in retry["retry_on"] and "rate_limited_retry_back_off" not in retry
    assert retry["num_retries"] > 2
    attempts = clusters["sidestep_attempts_0"]
    assert attempts["circuit_breakers"]["thresholds"][0]["max_retries"] >= 100_000
    ext_proc = attempts["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]["typed_config"]
    assert ext_proc["allow_mode_override"] is True
    assert ext_proc["mutation_rules"]["allow_envoy"] is True
    assert ext_proc["processing_mode"]["request_header_mode"] == "SEND"
    assert float(ext_proc["message_timeout"].rstrip("s")) > 60  # longer than the longest Retry-After wait
    dispatch = listeners["sidestep_dispatch"]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = dispatch["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["route"]["retry_policy"]["per_try_timeout"] for r in routes[:3]] == ["20.000s", "5.000s", "20.000s"]
    assert [r["route"]["idle_timeout"] for r in routes[:3]] == ["90.000s"] * 3
    assert routes[-1]["direct_response"]["status"] == 400
    assert "sk-test-not-a-real-key" not in json.dumps(bootstrap)  # keys live in the ext_proc only


def test_hash_is_content_based() -> None:
    one, two = rendered(), rendered()
    assert one["node"]["metadata"]["config_hash"] == two["node"]["metadata"]["config_hash"] == config_hash(one)
    other = render_envoy(parse_config(CONFIG.replace("20s", "21s"), {}).gateway, SOCKETS, "/x")
    assert other["node"]["metadata"]["config_hash"] != config_hash(one)

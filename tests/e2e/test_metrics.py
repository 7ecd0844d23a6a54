"""GET /metrics on the listener, scraped and parsed with Prometheus' own text parser: the counts
after a failover, a block and a resting key; the live gauges; Envoy's own statistics."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.rundir import free_port
from tests.e2e.conftest import Stack, stack_for, wait_for
from tests.mockprovider import MockProvider, Reply

pytestmark = pytest.mark.e2e

GATEWAY_KEY = "sk-gw-metrics-0123456789"
CONFIG = """
listeners: [{{type: model, port: {port}, attempt_timeout: 10s}}]
gateway_keys: [{{name: team-metrics, key: %s}}]
model_providers:
  - {{model: b/fallback, base_url: "{b}", access_key: sk-b-0123456789abcdef}}
  - model: a/metered
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      fallback_models: [b/fallback]
      retry_after_handling: {{scope: model, apply_to: global, max_retry_after_seconds: 5}}
  - {{model: c/pool, base_url: "{c}", access_keys: [sk-c-key0-aaaaaaaa00, sk-c-key1-bbbbbbbb01]}}
  - model: a/patient
    base_url: "{a}"
    access_key: sk-a-0123456789abcdef
    retry_policy:
      default_strategy: same_model
      backoff: {{apply_to: same_model, base_ms: 300, max_ms: 300, jitter: false}}
""" % GATEWAY_KEY

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def stack(providers: dict[str, MockProvider], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, CONFIG, providers)


def scrape(stack: Stack) -> Samples:
    response = httpx.get(stack.url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: Samples, metric: str, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def ask(stack: Stack, model: str) -> httpx.Response:
    return stack.chat({"model": model, "messages": [{"role": "user", "content": "hi"}]},
                      headers={"authorization": f"Bearer {GATEWAY_KEY}"})


def test_a_failover_a_block_and_a_resting_key_are_counted(stack: Stack, providers) -> None:
    before = scrape(stack)
    providers["a"].script(Reply(429, retry_after="60", delay=0.05), Reply(200))
    assert ask(stack, "a/metered").headers["x-sidestep-model"] == "b/fallback"  # 429 → blocked → fallback
    providers["c"].script(Reply(429, retry_after="30"), Reply(200))
    assert ask(stack, "c/pool").headers["x-sidestep-attempts"] == "2"  # key 0 rests, key 1 serves
    chat = "POST /v1/chat/completions"

    def counted() -> bool:
        now = scrape(stack)
        return value(now, "sidestep_requests_total", route=chat, model="c/pool", status="200") > \
            value(before, "sidestep_requests_total", route=chat, model="c/pool", status="200") and \
            value(now, "sidestep_keys", pool="c/pool", state="rate_limited") == 1 and \
            value(now, "sidestep_blocks_active", scope="model") >= 1

    # Envoy sends its log entries in batches; the worker reports the block and the key's rest in the background
    wait_for(counted, "the requests, the block and the key's rest to be counted", timeout=10)
    after = scrape(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sidestep_requests_total", route=chat, model="b/fallback", status="200") == 1
    assert delta("sidestep_attempts_total", target="a/metered", outcome="rate_limited") == 1
    assert delta("sidestep_attempts_total", target="b/fallback", outcome="success") == 1
    assert delta("sidestep_retries_total", target="a/metered", kind="failover", reason="rate_limited") == 1
    assert delta("sidestep_retries_total", target="c/pool", kind="retry", reason="rate_limited") == 1
    assert delta("sidestep_attempt_seconds_count", target="a/metered") == 1
    assert delta("sidestep_attempt_seconds_sum", target="a/metered") >= 0.05  # the provider's 50 ms
    assert delta("sidestep_request_duration_seconds_count", route=chat, model="b/fallback") == 1
    assert delta("sidestep_time_to_first_byte_seconds_count", route=chat, model="c/pool") == 1
    assert delta("sidestep_gateway_key_requests_total", key="team-metrics") == 2
    # live state, from the state service at scrape time
    assert value(after, "sidestep_state_service_up") == 1
    remaining = value(after, "sidestep_block_remaining_seconds", scope="model", name="a/metered",
                      reason="retry_after 429")
    assert 50 < remaining <= 60
    assert value(after, "sidestep_keys", pool="c/pool", state="rate_limited") == 1
    assert value(after, "sidestep_keys", pool="c/pool", state="ok") == 1
    assert value(after, "sidestep_state_service_up") == 1 and value(after, "sidestep_workers_synced") >= 1
    # Envoy's own statistics are in the same scrape
    assert any(name.startswith("envoy_cluster_upstream_rq") for name, _ in after)


def test_waits_are_a_histogram_by_why(stack: Stack, providers) -> None:
    before = scrape(stack)
    providers["a"].script(Reply(503), Reply(200))
    response = ask(stack, "a/patient")
    assert response.status_code == 200
    waited_ms = int(re.search(r";wait_ms=(\d+);wait=backoff;", response.headers["x-sidestep-ledger"]).group(1))
    assert 250 <= waited_ms <= 400  # 300 ms, less Envoy's own time to send the retry

    def waited() -> float:
        return value(scrape(stack), "sidestep_wait_seconds_count", why="backoff") - \
            value(before, "sidestep_wait_seconds_count", why="backoff")

    wait_for(lambda: waited() == 1, "the wait to be counted")
    after = scrape(stack)
    assert 0.29 < value(after, "sidestep_wait_seconds_sum", why="backoff") - \
        value(before, "sidestep_wait_seconds_sum", why="backoff") < 1.0
    assert value(after, "sidestep_wait_seconds_bucket", why="backoff", le="0.25") == \
        value(before, "sidestep_wait_seconds_bucket", why="backoff", le="0.25")  # not under 250 ms
    assert value(after, "sidestep_retries_total", target="a/patient", kind="retry", reason="server_error") >= 1


def test_errors_and_unknown_paths_are_counted_without_exploding_labels(stack: Stack) -> None:
    before = scrape(stack)
    assert ask(stack, "no/such-model").status_code == 404
    assert httpx.get(stack.url + "/v1/models/b%2Ffallback", headers={"authorization": f"Bearer {GATEWAY_KEY}"}
                     ).status_code == 200
    wait_for(lambda: value(scrape(stack), "sidestep_requests_total", route="GET /v1/models/{id}", model="none",
                           status="200") > value(before, "sidestep_requests_total", route="GET /v1/models/{id}",
                                                 model="none", status="200"), "the model lookup to be counted")
    after = scrape(stack)
    assert value(after, "sidestep_requests_total", route="POST /v1/chat/completions", model="none", status="404") > \
        value(before, "sidestep_requests_total", route="POST /v1/chat/completions", model="none", status="404")
    assert not any(name == "sidestep_requests_total" and dict(labels).get("route", "").endswith("fallback")
                   for name, labels in after)


def test_metrics_on_a_port_of_their_own(make_stack, providers) -> None:
    metrics_port = free_port()
    stack = make_stack("listeners: [{{type: model, port: {port}}}]\n"
                       "metrics: {{port: {metrics}}}\n"
                       "model_providers: [{{model: b/fallback, base_url: '{b}', access_key: sk-b-0123456789abcdef}}]\n",
                       metrics=metrics_port, b=providers["b"].url)
    assert stack.chat({"model": "b/fallback", "messages": []}).status_code == 200
    elsewhere = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
    assert elsewhere.status_code == 200 and "sidestep_state_service_up 1.0" in elsewhere.text
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/v1/models").status_code == 404  # nothing else there
    assert httpx.get(stack.url + "/metrics").status_code == 404  # and not on the listener's port


def test_healthz_says_healthy_in_json(stack: Stack) -> None:
    response = httpx.get(stack.url + "/healthz")
    assert response.status_code == 200 and response.json() == {"status": "healthy"}


def test_the_metrics_service_yields_the_cpu(stack: Stack) -> None:
    pid = stack.status()["processes"]["metrics"]["pid"]
    assert os.getpriority(os.PRIO_PROCESS, pid) == 10  # gives way to Envoy and the workers
    assert os.getpriority(os.PRIO_PROCESS, stack.status()["processes"]["extproc-0"]["pid"]) == 0


def test_metrics_turned_off(make_stack, providers) -> None:
    stack = make_stack("listeners: [{{type: model, port: {port}}}]\n"
                       "metrics: {{enabled: false}}\n"
                       "model_providers: [{{model: b/fallback, base_url: '{b}', access_key: sk-b-0123456789abcdef}}]\n",
                       b=providers["b"].url)
    assert stack.chat({"model": "b/fallback", "messages": []}).status_code == 200
    assert httpx.get(stack.url + "/metrics").status_code == 404
    assert "metrics" not in stack.status()["processes"]
    envoy = json.loads((stack.home / "run" / "xds" / "lds.json").read_text())
    assert "http_grpc" not in json.dumps(envoy)  # no access-log stream to pay for

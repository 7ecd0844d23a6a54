from __future__ import annotations

import pytest

from controlplane.config import parse_config
from controlplane.config.runtime import expand_status_codes, mask_secret
from controlplane.config.schema import Strategy, parse_duration
from controlplane.errors import ConfigError

ENV = {"KEY_A": "sk-aaaaaaaaaaaaaaaa", "KEY_B": "sk-bbbbbbbbbbbbbbbb"}


def load(text: str, env: dict[str, str] | None = None):
    return parse_config(text, ENV if env is None else env)


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    return [str(issue) for issue in info.value.issues]


@pytest.mark.parametrize("raw, seconds", [(30, 30.0), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0),
                                          ("1.5s", 1.5), ("1h", 3600.0)])
def test_durations(raw, seconds) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["fast", "-1s", True, "10 parsecs"])
def test_bad_durations(raw) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_status_codes_and_ranges() -> None:
    assert expand_status_codes(429) == [429]
    assert expand_status_codes([429, "500-502"]) == [429, 500, 501, 502]
    for bad in ["5xx", "504-500", 99, "600", True]:
        with pytest.raises(ValueError):
            expand_status_codes(bad)


def test_secrets_are_masked() -> None:
    assert mask_secret("sk-abcdefghijklmnopf9") == "sk-a…f9"
    assert "abcdef" not in mask_secret("abcdefgh")


def test_every_error_has_its_field_path() -> None:
    found = errors("""
listeners: [{type: model, port: 0}]
model_providers:
  - model: openai
  - model: openai/gpt-4o
    access_key: $MISSING
    attempt_timeout: soon
    retry_policy:
      on_status_codes: [{codes: "5xx"}, {codes: [200]}]
      backoff: {base_ms: 100, max_ms: 10}
  - model: openai/gpt-4o
    access_key: x
    default: true
  - {model: openai/gpt-4o-mini, access_key: x, default: true}
  - model: local/llama
""")
    assert "listeners[0].port: Input should be greater than or equal to 1" in found
    assert "model_providers[0] (openai).model: 'openai' must be 'provider/model-id', e.g. 'openai/gpt-4o'" in found
    assert any(e.startswith("model_providers[1] (openai/gpt-4o).attempt_timeout: 'soon' is not a duration")
               for e in found)
    assert len(found) == 3  # schema errors are reported first, together


def test_semantic_errors_come_together() -> None:
    found = errors("""
model_providers:
  - model: openai/gpt-4o
    access_key: $MISSING
    retry_policy:
      on_status_codes: [{codes: "5xx"}, {codes: [200]}]
      backoff: {base_ms: 100, max_ms: 10}
  - {model: openai/gpt-4o, access_key: x, default: true}
  - {model: openai/gpt-4o-mini, access_key: x, default: true}
  - {model: local/llama}
  - {model: local/other, base_url: "ftp://x"}
""")
    assert "model_providers[0] (openai/gpt-4o).access_key: environment variable MISSING is not set" in found
    assert any("on_status_codes[0].codes: '5xx' is not a status code" in e for e in found)
    assert any("on_status_codes[1].codes: only error statuses" in e for e in found)
    assert any("backoff.max_ms: must be at least base_ms" in e for e in found)
    assert any(e.startswith("model_providers[1] (openai/gpt-4o).model: duplicate") for e in found)
    assert any(e.startswith("model_providers[2] (openai/gpt-4o-mini).default: only one") for e in found)
    assert any("model_providers[3] (local/llama).base_url: required" in e for e in found)
    assert any("model_providers[4] (local/other).base_url" in e and "http" in e for e in found)


def test_invalid_yaml_and_wrong_shape() -> None:
    assert "line 2" in errors("a: [1\nb: 2")[0]
    assert "mapping" in errors("- 1\n- 2")[0]
    assert errors("") == ["model_providers: configure at least one model provider"]


def test_one_model_listener() -> None:
    text = """
listeners: [{type: model, port: 1000}, {type: model, name: b, port: 1001}]
model_providers: [{model: a/x, base_url: "http://127.0.0.1:1"}]
"""
    assert errors(text) == ["listeners[1]: sidestep serves one model listener; remove the others"]


def test_compiled_targets_upstreams_and_names() -> None:
    gateway = load("""
listeners: [{type: model, port: 9000, attempt_timeout: 12s}]
model_providers:
  - {model: openai/gpt-4o, access_key: $KEY_A, default: true, name: smart}
  - {model: openai/gpt-4o-mini, access_key: $KEY_A, attempt_timeout: 3s}
  - {model: anthropic/claude-x, access_key: $KEY_B}
  - {model: groq/gpt-4o-mini, access_key: $KEY_B}
  - {model: local/llama, base_url: "http://host.docker.internal:11434/v1", passthrough_auth: true}
""").gateway
    gpt4o, mini, claude, groq, llama = gateway.targets.values()
    assert gpt4o.upstream is mini.upstream  # one cluster per endpoint
    assert gpt4o.upstream.tls and gpt4o.upstream.port == 443 and gpt4o.upstream.authority == "api.openai.com"
    assert [k.headers for k in gpt4o.keys] == [(("authorization", "Bearer sk-aaaaaaaaaaaaaaaa"),)]
    assert [k.headers for k in claude.keys] == [(("x-api-key", "sk-bbbbbbbbbbbbbbbb"),)]
    assert not gpt4o.pooled and "sk-aaaaaaaaaaaaaaaa" not in repr(gpt4o.keys)
    assert ("anthropic-version", "2023-06-01") in claude.extra_headers
    assert llama.upstream.host == "127.0.0.1" and llama.keys == () and llama.key_hint == "passthrough"
    assert gpt4o.key_hint == "sk-a…aa"
    assert (gpt4o.attempt_timeout, mini.attempt_timeout) == (12.0, 3.0)
    assert gateway.resolve("smart") is gpt4o
    assert gateway.resolve("openai/gpt-4o-mini") is mini
    assert gateway.resolve("gpt-4o") is gpt4o  # unique bare id
    assert gateway.resolve("gpt-4o-mini") is gpt4o  # ambiguous bare id → default
    assert gateway.resolve(None) is gpt4o
    assert llama.upstream.path_for("/v1/chat/completions") == "/v1/chat/completions"
    assert groq.upstream.path_for("/v1/chat/completions") == "/openai/v1/chat/completions"
    assert gpt4o.upstream.path_for("/v1/chat/completions?x=1") == "/v1/chat/completions?x=1"


def test_compiled_policy_rules_and_order() -> None:
    gateway = load("""
model_providers:
  - model: a/one
    base_url: http://127.0.0.1:1
    retry_policy:
      fallback_models: [c/three, nope/x, a/one]
      default_max_attempts: 3
      on_status_codes:
        - {codes: [429], strategy: same_model, max_attempts: 5}
        - {codes: ["429-430", 400]}
      on_timeout: {max_attempts: 1}
  - {model: b/two, base_url: "http://127.0.0.1:2"}
  - {model: c/three, base_url: "http://127.0.0.1:3"}
""").gateway
    target = gateway.targets["a/one"]
    policy = target.policy
    assert [t.key for t in gateway.order(target)] == ["c/three", "b/two"]
    assert policy.status_rules[429].strategy is Strategy.SAME_MODEL and policy.status_rules[429].max_attempts == 5
    assert policy.status_rules[400].label == "status 429-430,400"
    assert policy.status_rules[503].label == "default" and policy.status_rules[503].max_attempts == 3
    assert 401 not in policy.status_rules and 404 not in policy.status_rules
    assert policy.timeout_rule.max_attempts == 1
    assert policy.max_retries == 5 + 3 + 3 + 1 + 3  # 429 rule, 429-430/400 rule, default, timeout, connection
    assert gateway.max_retries == policy.max_retries
    assert gateway.targets["b/two"].policy is None


def test_lint_warnings() -> None:
    loaded = load("""
listeners: [{type: model, port: 1}, {type: prompt, name: p}]
prompt_targets: []
model_providers:
  - model: a/one
    base_url: http://127.0.0.1:1
    retry_policy:
      fallback_models: [a/two, z/none]
      on_status_codes: [{codes: ["500-504"]}, {codes: [502, 503]}]
      backoff: {apply_to: same_provider}
      on_high_latency: {threshold_ms: 1000, apply_to: request, strategy: same_model}
  - {model: a/two, base_url: "http://127.0.0.1:1"}
""")
    warnings = [str(w) for w in loaded.warnings]
    assert "prompt_targets: Plano setting accepted but ignored by sidestep" in warnings
    assert "listeners[1]: `type: prompt` listeners are ignored" in warnings
    here = "model_providers[0] (a/one).retry_policy"
    assert f"{here}.on_status_codes[1].codes: 502-503 already covered by on_status_codes[0], which wins for them" \
        in warnings
    assert any(w.startswith(f"{here}.fallback_models[0]: same provider") for w in warnings)
    assert any(w.startswith(f"{here}.fallback_models[1]: 'z/none' is not a configured") for w in warnings)
    assert any(w.startswith(f"{here}.backoff.apply_to: same_provider never matches") for w in warnings)
    assert any(w.startswith(f"{here}.on_high_latency.apply_to: request has no effect") for w in warnings)
    assert any(w.startswith(f"{here}.on_high_latency.strategy: ignored") for w in warnings)


def test_plano_legacy_llm_providers() -> None:
    loaded = load("llm_providers: [{model: a/x, base_url: 'http://127.0.0.1:1'}]")
    assert list(loaded.gateway.targets) == ["a/x"]
    assert any("llm_providers" in str(w) for w in loaded.warnings)


def test_timers_default_and_compose() -> None:
    loaded = load("""
listeners: [{type: model, attempt_timeout: 10s, stream_idle_timeout: 5s}]
model_providers:
  - {model: a/x, base_url: "http://127.0.0.1:1", first_token_timeout: 4s}
  - {model: a/y, base_url: "http://127.0.0.1:1", attempt_timeout: 20s, stream_idle_timeout: 60s}
""")
    x, y = loaded.gateway.targets.values()
    assert (x.attempt_timeout, x.first_token_timeout, x.stream_idle_timeout) == (10.0, 4.0, 5.0)
    assert (y.attempt_timeout, y.first_token_timeout, y.stream_idle_timeout) == (20.0, 20.0, 60.0)
    warnings = [str(w) for w in loaded.warnings]
    assert any(w.startswith("listeners[0].stream_idle_timeout: 5s is shorter than attempt_timeout (10s)")
               for w in warnings)
    assert any(w.startswith("model_providers[0] (a/x).first_token_timeout: 4s is shorter than attempt_timeout")
               for w in warnings)
    assert not any(w.startswith("model_providers[1]") for w in warnings)


# ---- shared_state (Redis)

SHARED = "model_providers: [{{model: openai/gpt-4o, access_key: sk-0123456789abcdef}}]\nshared_state: {0}\n"


@pytest.mark.parametrize("url, hint", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://:pa55word@redis.internal:6380/2", "rediss://:****@redis.internal:6380/2"),
    ("redis://user:pa55word@10.0.0.5:6379", "redis://user:****@10.0.0.5:6379"),
    ("unix:///run/redis/redis.sock?db=1", "unix:///run/redis/redis.sock?db=1"),
])
def test_shared_state_urls(url: str, hint: str) -> None:
    shared = load(SHARED.format(f"{{redis_url: '{url}', namespace: team-a}}")).gateway.shared_state
    assert shared is not None and shared.url == url and shared.hint == hint and shared.namespace == "team-a"


def test_shared_state_url_from_the_environment_and_host_docker_internal() -> None:
    env = {"REDIS_URL": "redis://:pw@host.docker.internal:6379/0"}
    shared = load(SHARED.format("{redis_url: $REDIS_URL}"), env).gateway.shared_state
    assert shared is not None and shared.url == "redis://:pw@127.0.0.1:6379/0" and "pw" not in shared.hint
    assert load(SHARED.format("{redis_url: 'redis://127.0.0.1:1/0'}")).gateway.shared_state.namespace == "sidestep"
    assert load(SHARED.format("null")).gateway.shared_state is None


@pytest.mark.parametrize("value, message", [
    ("{redis_url: 'http://127.0.0.1:6379'}", "shared_state.redis_url: 'http://127.0.0.1:6379' must be a redis://"),
    ("{redis_url: 'redis://:secretpw@h:1/zero'}", "the database after the host must be a number"),
    ("{redis_url: 'redis://127.0.0.1:99999/0'}", "shared_state.redis_url: 'redis://127.0.0.1:99999/0' is not a valid URL"),
    ("{redis_url: 'redis:///0'}", "names no host"),
    ("{redis_url: $NO_SUCH_VAR}", "shared_state.redis_url: environment variable NO_SUCH_VAR is not set"),
    ("{redis_url: 'redis://h:1/0', namespace: 'a b'}", "shared_state.namespace"),
    ("{redis_url: 'redis://h:1/0', ttl: 3}", "shared_state.ttl"),
    ("{}", "shared_state.redis_url"),
])
def test_shared_state_errors(value: str, message: str) -> None:
    found = errors(SHARED.format(value), {})
    assert any(message in e for e in found), found
    assert not any("secretpw" in e for e in found)  # a password in the URL is never repeated


def test_metrics_port_errors() -> None:
    base = "listeners: [{port: 12000}]\nmodel_providers: [{model: openai/gpt-4o, access_key: sk-0123456789abcdef}]\n"
    assert load(base + "metrics: {port: 9090}").gateway.metrics_listener == ("127.0.0.1", 9090)
    assert load(base).gateway.metrics_listener is None
    assert any("metrics.port: 12000 is the model listener's port" in e for e in errors(base + "metrics: {port: 12000}"))
    assert any("metrics.address" in e for e in errors(base + "metrics: {port: 9090, address: example.com}"))

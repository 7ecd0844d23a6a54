"""Hardening as pure functions: config validation that catches what would break every request,
gateway-key authentication, and a body parser that never raises on client bytes."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.apierrors import Api, ApiError, anthropic_type, api_for_path
from controlplane.config import parse_config
from controlplane.errors import ConfigError
from extproc.auth import authenticate
from extproc.body import BadBody, find_model
from extproc.coordinator import AttemptPlan, Coordinator
from tests.unit.helpers import req

BASE = "model_providers: [{model: a/x, base_url: 'http://127.0.0.1:1', access_key: sk-a-0123456789}]\n"


def errors(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env or {})
    return [str(issue) for issue in info.value.issues]


# ---- validation: what would otherwise break every request


def test_header_names_values_and_keys_with_control_characters_are_errors() -> None:
    found = errors("""
model_providers:
  - model: a/x
    base_url: http://127.0.0.1:1
    access_key: "sk-one\\r\\nx-evil: 1"
    headers: {"X-Ok": "fine", "X-Bad": "a\\r\\nb", "bad name": v, host: h, x-sidestep-target: t0}
  - {model: a/y, base_url: "http://127.0.0.1:1", access_keys: [ok-key-0000, $NL]}
""", {"NL": "sk-from-env\n"})
    here = "model_providers[0] (a/x)"
    assert f"{here}.access_key: contains a space, line break or other control character (check the " \
           f"variable's value for a trailing newline)" in found
    assert f"{here}.headers.X-Bad: the value contains a line break or other control character" in found
    assert f"{here}.headers.bad name: 'bad name' is not a valid HTTP header name" in found
    assert f"{here}.headers.host: host is set by sidestep or Envoy and cannot be configured" in found
    assert any(e.startswith(f"{here}.headers.x-sidestep-target: ") for e in found)
    assert any(e.startswith("model_providers[1] (a/y).access_keys[1]: contains a space") for e in found)
    assert not any("sk-one" in e or "sk-from-env" in e for e in found)  # never echo a key
    assert len(found) == 6


@pytest.mark.parametrize("field", ["attempt_timeout", "stream_idle_timeout", "request_timeout", "timeout"])
def test_zero_timeouts_are_errors(field: str) -> None:
    found = errors(f"listeners: [{{type: model, {field}: 0s}}]\n" + BASE)
    assert found == [f"listeners[0].{field}: must be greater than 0: a zero timeout means no limit, and a "
                     f"provider that never answers could then never be failed over"]
    assert errors(BASE.replace("}]", ", attempt_timeout: 0}]"))[0].startswith(
        "model_providers[0] (a/x).attempt_timeout: must be greater than 0")
    assert errors(f"listeners: [{{type: model, {field}: 25h}}]\n" + BASE) == [
        f"listeners[0].{field}: must be at most 24h"]


def test_absurd_limits_are_errors() -> None:
    found = errors("listeners: [{type: model, max_request_body_bytes: 5e9}]\n" + BASE)
    assert len(found) == 1 and found[0].startswith("listeners[0].max_request_body_bytes: ")


def test_a_name_that_is_another_entrys_model_is_an_error() -> None:
    found = errors("""
model_providers:
  - {model: a/x, base_url: "http://127.0.0.1:1", name: a/y}
  - {model: a/y, base_url: "http://127.0.0.1:1"}
""")
    assert found == ["model_providers[0] (a/x).name: 'a/y' is the model of model_providers[1]; a client "
                     "asking for it would get either"]


@pytest.mark.parametrize("address, message", [
    ("999.1.1.1", "'999.1.1.1' is not an IP address"),
    ("gateway.example", "'gateway.example' is not an IP address"),
    ("0.0.0.0", "0.0.0.0 is reachable from other machines"),
    ("::", ":: is reachable from other machines"),
    ("10.1.2.3", "10.1.2.3 is reachable from other machines"),
])
def test_listener_addresses(address: str, message: str) -> None:
    found = errors(f"listeners: [{{type: model, address: '{address}'}}]\n" + BASE)
    assert len(found) == 1 and found[0].startswith(f"listeners[0].address: {message}")


def test_loopback_localhost_and_explicit_opt_outs_are_fine() -> None:
    for listener in ("{type: model, address: localhost}", "{type: model, address: '::1'}",
                     "{type: model, address: 0.0.0.0, allow_unauthenticated: true}"):
        parse_config(f"listeners: [{listener}]\n" + BASE, {})
    gateway = parse_config("listeners: [{type: model, address: localhost}]\n" + BASE, {}).gateway
    assert gateway.listener.address == "127.0.0.1"  # Envoy binds IPs, not names
    keyed = parse_config("listeners: [{type: model, address: 0.0.0.0}]\n"
                         "gateway_keys: [{name: ops, key: gk-0123456789abcdef}]\n" + BASE, {}).gateway
    assert [k.name for k in keyed.client_keys.values()] == ["ops"]


def test_gateway_key_errors() -> None:
    found = errors("""
gateway_keys:
  - {name: team-a, key: $GK, models: [a/x, nope]}
  - {name: team-a, key: $GK}
""" + BASE, {"GK": "gk-0123456789"})
    assert "gateway_keys[0] (team-a).models[1]: 'nope' is not a configured model or name" in found
    assert "gateway_keys[1] (team-a).name: duplicate of gateway_keys[0]" in found
    assert "gateway_keys[1] (team-a).key: the same key as gateway_keys[0]" in found
    assert errors("gateway_keys: [{name: 'bad name', key: k}]\n" + BASE) == [
        "gateway_keys[0].name: 'bad name': use 1 to 64 letters, digits, '_', '.' or '-'"]


def test_gateway_key_semantic_errors() -> None:
    found = errors("gateway_keys: [{name: c, key: $MISSING}, {name: d, key: ''}]\n" + BASE)
    assert found == ["gateway_keys[0] (c).key: environment variable MISSING is not set",
                     "gateway_keys[1] (d).key: is empty"]


@pytest.mark.parametrize("text, fragment", [
    ("a: " + "{b: " * 100_000 + "1" + "}" * 100_000, "nests deeper than 64 levels"),
    ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
    ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True)),
     "expands to more than 2000000 values"),
    ("x" * (17 << 20), "a config may be at most 16 MiB"),
], ids=["deep-mapping", "deep-list", "alias-bomb", "huge"])
def test_pathological_yaml_is_one_clean_error(text: str, fragment: str) -> None:
    started = time.monotonic()
    found = errors(text)
    assert len(found) == 1 and fragment in found[0]
    assert time.monotonic() - started < 2


def test_validation_is_linear_10k_providers_in_seconds() -> None:
    n = 10_000
    lines = ["model_providers:"]
    for i in range(n):
        lines.append(f"  - {{model: p{i % 50}/m{i}, base_url: 'http://127.0.0.1:{1000 + i % 50}', "
                     f"access_key: sk-{i:020d}, retry_policy: {{fallback_models: [p{(i + 1) % 50}/m{(i + 1) % n}]}}}}")
    started = time.monotonic()
    gateway = parse_config("\n".join(lines), {}).gateway
    assert time.monotonic() - started < 5
    assert len(gateway.targets) == n
    first = gateway.targets["p0/m0"]
    assert [t.key for t in gateway.order(first)[:2]] == ["p1/m1", "p2/m2"]  # the fallback, then config order


# ---- gateway keys

KEYS = parse_config("gateway_keys: [{name: ops, key: gk-ops-0123456789}, {name: ro, key: gk-ro-0123456789, "
                    "models: [a/x]}]\n" + BASE, {}).gateway.client_keys


@pytest.mark.parametrize("credentials, expected, rest", [
    ((("authorization", b"Bearer gk-ops-0123456789"),), "ops", ()),
    ((("x-api-key", b"gk-ro-0123456789"),), "ro", ()),
    ((("authorization", b"bearer   gk-ops-0123456789 "),), "ops", ()),
    # beside the client's own provider key (passthrough_auth): that one stays
    ((("authorization", b"Bearer sk-provider"), ("x-sidestep-key", b"gk-ops-0123456789")), "ops",
     (("authorization", b"Bearer sk-provider"),)),
    ((("x-api-key", b"sk-ant-own"), ("authorization", b"Bearer gk-ro-0123456789")), "ro",
     (("x-api-key", b"sk-ant-own"),)),
])
def test_authenticate_consumes_the_header_that_carried_the_key(credentials, expected, rest) -> None:
    result = authenticate(KEYS, credentials)
    assert not isinstance(result, ApiError)
    client, remaining = result
    assert client.name == expected and remaining == rest


@pytest.mark.parametrize("credentials, fragment", [
    ((), "requires a gateway key"),
    ((("authorization", b"Basic Z2stb3BzLTAxMjM0NTY3ODk="),), "requires a gateway key"),
    ((("authorization", b"Bearer gk-ops-012345678"),), "not valid"),
    ((("x-api-key", b"\xff\xfe\x00"),), "not valid"),
])
def test_authenticate_refuses(credentials, fragment: str) -> None:
    result = authenticate(KEYS, credentials)
    assert isinstance(result, ApiError) and result.status == 401 and fragment in result.message
    assert "gk-ops" not in result.message


def test_key_restricted_to_models() -> None:
    gateway = parse_config("gateway_keys: [{name: ro, key: gk-ro-0123456789, models: [a/x]}]\n"
                           "model_providers: [{model: a/x, base_url: 'http://127.0.0.1:1', default: true},"
                           " {model: b/y, base_url: 'http://127.0.0.1:2'}]", {}).gateway
    ro = next(iter(gateway.client_keys.values()))
    coord = Coordinator(gateway)
    assert isinstance(coord.begin_attempt("r1", 1, req("/v1/x", (), ro), b'{"model": "a/x"}'), AttemptPlan)
    denied = coord.begin_attempt("r2", 1, req("/v1/x", (), ro), b'{"model": "b/y"}')
    assert isinstance(denied, ApiError) and denied.status == 403 and "'ro' may not use model 'b/y'" in denied.message
    unknown = coord.begin_attempt("r3", 1, req("/v1/x", (), ro), b'{"model": "zz"}')
    assert isinstance(unknown, AttemptPlan) and unknown.target.key == "a/x"  # the default, which ro may use


# ---- client bytes never make the ext_proc raise


@pytest.mark.parametrize("body, fragment", [
    (b'{"mod', "Unterminated string"),
    (b'{"mo\\x": 1}', "Invalid \\escape"),
    (b'{"a":' + b"[" * 990 + b"]" * 990 + b"}", "nested too deeply"),
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"model": "a/x", "model": "a/x"}', '"model" appears more than once'),
    (b'{"a": ' + b"9" * 5000 + b"}", "a number is too long"),
    (b'{"model": ["a/x"]}', '"model" must be a string'),
], ids=["truncated-key", "bad-escape", "nested-990", "nested-100k", "duplicate-model", "long-number",
        "model-not-string"])
def test_adversarial_bodies_are_bad_bodies(body: bytes, fragment: str) -> None:
    with pytest.raises(BadBody) as info:
        find_model(body)
    assert fragment in str(info.value)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["model", "messages", "a"]),
                                                                inner, max_size=4), max_leaves=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=64), JSONISH.map(lambda v: json.dumps(v).encode()),
                 JSONISH.map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]),
                 st.text(alphabet='{}[]":,\\ model0123456789truefalsenull', max_size=48).map(str.encode)))
def test_any_body_is_answered_never_raised(body: bytes) -> None:
    coord = Coordinator(parse_config(BASE.replace("}]", ", default: true}]"), {}).gateway)
    result = coord.begin_attempt("r", 1, req("/v1/chat/completions", ()), body)
    assert isinstance(result, AttemptPlan | ApiError)
    if isinstance(result, ApiError):
        assert result.status in (400, 404)
        json.loads(result.body(Api.ANTHROPIC))


# ---- error shapes


def test_errors_take_the_callers_shape() -> None:
    error = ApiError(429, "retry_exhausted", "all failed", 3, {"code": "max_attempts"})
    assert json.loads(error.body(Api.OPENAI)) == {"error": {"type": "retry_exhausted", "message": "all failed",
                                                            "code": "max_attempts"}}
    assert json.loads(error.body(Api.ANTHROPIC)) == {"type": "error", "error": {
        "type": "rate_limit_error", "message": "all failed", "sidestep_type": "retry_exhausted",
        "code": "max_attempts"}}
    assert api_for_path("/v1/messages?beta=true") is Api.ANTHROPIC
    assert api_for_path("/v1/chat/completions") is Api.OPENAI
    assert [anthropic_type(s) for s in (400, 401, 403, 404, 413, 429, 500, 503, 529)] == [
        "invalid_request_error", "authentication_error", "permission_error", "not_found_error",
        "request_too_large", "rate_limit_error", "api_error", "api_error", "overloaded_error"]

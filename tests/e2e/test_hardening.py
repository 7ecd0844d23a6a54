"""Hardening, end to end: gateway keys with the official SDKs, exact API paths, private local control
ports, bad input as the client's error, `up` that never leaves users without a gateway, and strict
config validation.

One shared stack (`gw`) serves sections 1-4; its home lives in a world-traversable directory so the
permission checks mean something. Section 5 starts its own stack; section 6 only runs `validate`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from controlplane.rundir import free_port, pid_alive
from tests.e2e.conftest import Stack, run_cli
from tests.mockprovider import MockProvider

pytestmark = pytest.mark.e2e

GK_A = "gk-team-a-5f0c1e2d3a4b5c6d7e8f9a0b"  # reaches `sidestep up` as $GK_A
GK_B = "gk-literal-team-b-0a1b2c3d4e5f6a7b"  # written in the config file itself
PROVIDER_A_KEY = "sk-provider-a-secret-77aa88bb99cc"
PROVIDER_B_KEY = "sk-ant-provider-secret-11dd22ee33ff"
CLIENT_OWN_KEY = "sk-client-own-provider-key-4242"
WRONG_KEY = "gk-team-a-5f0c1e2d3a4b5c6d7e8f9a0X"  # one character off

GATEWAY = """
listeners: [{{type: model, port: {port}, request_timeout: 2s, max_request_body_bytes: 1048576}}]
gateway_keys:
  - {{name: team-a, key: $GK_A}}
  - {{name: team-b, key: {gk_b}, models: [a/small]}}
model_providers:
  - {{model: a/small, base_url: "{a}", access_key: {key_a}}}
  - {{model: a/large, base_url: "{a}", access_key: {key_a}}}
  - {{model: anthropic/claude-test, base_url: "{b}", access_key: {key_b}}}
  - {{model: c/local, base_url: "{c}"}}
  - {{model: c/mine, base_url: "{c}", passthrough_auth: true}}
"""
ALL_MODELS = ["a/small", "a/large", "anthropic/claude-test", "c/local", "c/mine"]
REQUESTABLE = {*ALL_MODELS, "small", "large", "claude-test", "local", "mine"}


# ---- the shared stack


@pytest.fixture(scope="module")
def gw(providers: dict[str, MockProvider]) -> Iterator[Stack]:
    """The gateway-key stack. Its home is under a 0755 directory (pytest's own tmp dirs are 0700,
    which would hide whether sidestep protects its files itself)."""
    base = Path(tempfile.mkdtemp(prefix="sshard-"))
    os.chmod(base, 0o755)
    port = free_port()
    config = base / "gateway.yaml"
    config.write_text(GATEWAY.format(port=port, gk_b=GK_B, key_a=PROVIDER_A_KEY, key_b=PROVIDER_B_KEY,
                                     a=providers["a"].url, b=providers["b"].url, c=providers["c"].url))
    home = base / "home"
    run_cli("--home", str(home), "up", str(config), "--workers", "1", env={"GK_A": GK_A})
    stack = Stack(home=home, url=f"http://127.0.0.1:{port}", client=httpx.Client())
    try:
        yield stack
    finally:
        stack.client.close()
        stack.sidestep("down", check=False)
        shutil.rmtree(base, ignore_errors=True)


def _port(stack: Stack) -> int:
    return int(stack.url.rsplit(":", 1)[1])


def _oai(stack: Stack, api_key: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=api_key, max_retries=0, timeout=20, **kwargs)


def _ant(stack: Stack, api_key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=api_key, max_retries=0, timeout=20)


def _nothing_received(providers: dict[str, MockProvider]) -> None:
    seen = {name: [r.path for r in p.requests] for name, p in providers.items() if p.requests}
    assert not seen, f"a provider received a request it should never have seen: {seen}"


def _no_gateway_key_in_headers(providers: dict[str, MockProvider]) -> None:
    for name, mock in providers.items():
        for seen in mock.requests:
            for header, value in seen.headers.items():
                for secret in (GK_A, GK_B, WRONG_KEY):
                    assert secret not in value, f"provider {name} received a gateway key in {header}: {value}"
            assert "x-sidestep-key" not in seen.headers, f"provider {name} received x-sidestep-key"


def _json_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"] == "application/json", response.text
    return response.json()["error"]


def _chat(stack: Stack, body: bytes | dict, key: str | None = GK_A, **headers: str) -> httpx.Response:
    if key is not None:
        headers.setdefault("authorization", f"Bearer {key}")
    return stack.chat(body, headers=headers)


# ---- raw HTTP/1.1 (httpx would normalize dot segments and re-encode the path before sending)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a full response: {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    elif headers.get("transfer-encoding") == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    else:
        while chunk := sock.recv(65536):
            body += chunk
    return status, headers, body


def _raw(port: int, method: str, target: str, body: bytes = b"", key: str | None = GK_A,
         extra: str = "") -> tuple[int, dict[str, str], bytes]:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    request = (f"{method} {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{auth}{extra}"
               f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
               ).encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        return _read_response(sock)


# ==== 1. gateway keys, with the official SDKs


def test_openai_sdk_needs_a_valid_gateway_key(gw, providers) -> None:
    # no key at all (the SDK always sends one, so plain HTTP)
    response = gw.client.post(gw.url + "/v1/chat/completions", json={"model": "a/small", "messages": []})
    assert response.status_code == 401
    error = _json_error(response)
    assert error["type"] == "authentication_error" and "gateway key" in error["message"]
    # an empty bearer (the SDK refuses to send one: plain HTTP)
    status, headers, body = _raw(_port(gw), "POST", "/v1/chat/completions", b'{"model": "a/small"}', key=None,
                                 extra="authorization: Bearer \r\n")
    assert status == 401 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["type"] == "authentication_error"
    # a wrong key, with the SDK
    with pytest.raises(openai.AuthenticationError) as info:
        _oai(gw, WRONG_KEY).chat.completions.create(model="a/small", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.response.headers["content-type"] == "application/json"
    assert info.value.body["type"] == "authentication_error"
    assert "not valid" in info.value.body["message"]
    assert WRONG_KEY not in info.value.response.text
    # another auth scheme carrying the right key is not a gateway key
    response = gw.client.post(gw.url + "/v1/chat/completions", json={"model": "a/small"},
                              headers={"authorization": f"Basic {GK_A}"})
    assert response.status_code == 401
    _nothing_received(providers)

    # the right key: served, and the provider gets its own key, never the gateway key
    completion = _oai(gw, GK_A).chat.completions.create(model="a/small",
                                                         messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "hi"
    [seen] = providers["a"].requests
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_A_KEY}"
    assert seen.json["model"] == "small"
    _no_gateway_key_in_headers(providers)


@pytest.mark.parametrize("carrier", ["authorization", "x-api-key", "x-sidestep-key"])
def test_every_key_header_works_and_is_consumed(gw, providers, carrier) -> None:
    value = f"Bearer {GK_B}" if carrier == "authorization" else GK_B
    response = gw.chat({"model": "a/small", "messages": []}, headers={carrier: value})
    assert response.status_code == 200, response.text
    [seen] = providers["a"].requests
    assert seen.headers["authorization"] == f"Bearer {PROVIDER_A_KEY}"
    assert "x-api-key" not in seen.headers
    _no_gateway_key_in_headers(providers)


def test_forged_attempt_count_does_not_skip_authentication(gw, providers) -> None:
    """Later attempts skip authentication (the first one did it): a client claiming to be one must not."""
    response = _chat(gw, {"model": "a/small"}, key=None, **{"x-envoy-attempt-count": "3"})
    assert response.status_code == 401
    response = _chat(gw, {"model": "a/small"}, key=WRONG_KEY, **{"x-envoy-attempt-count": "2"})
    assert response.status_code == 401
    _nothing_received(providers)


def test_anthropic_sdk_gets_anthropic_shaped_auth_errors(gw, providers) -> None:
    message = {"model": "anthropic/claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(anthropic.AuthenticationError) as info:
        _ant(gw, WRONG_KEY).messages.create(**message)
    assert info.value.status_code == 401
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    assert "not valid" in body["error"]["message"]
    # no key at all (the anthropic SDK refuses to send none: plain HTTP)
    response = gw.client.post(gw.url + "/v1/messages", json=message)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
    _nothing_received(providers)

    # the right key, as the anthropic SDK sends it (x-api-key): the provider gets its own x-api-key
    # (the mock answers OpenAI-shaped JSON; the SDK parses it loosely, the status is what counts)
    raw = _ant(gw, GK_A).messages.with_raw_response.create(**message)
    assert raw.status_code == 200
    [seen] = providers["b"].requests
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == PROVIDER_B_KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.json["model"] == "claude-test"
    assert "authorization" not in seen.headers
    _no_gateway_key_in_headers(providers)


def test_key_restricted_to_models(gw, providers) -> None:
    client = _oai(gw, GK_B)
    with pytest.raises(openai.PermissionDeniedError) as info:
        client.chat.completions.create(model="a/large", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 403
    assert info.value.body["type"] == "permission_error"
    assert "team-b" in info.value.body["message"] and "a/large" in info.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):  # the bare id of a model it may not use
        client.chat.completions.create(model="large", messages=[])
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[])
    assert info.value.status_code == 404
    message = info.value.body["message"]
    assert "gpt-9" in message and message.endswith("models: a/small")  # only what this key may use
    for other in ALL_MODELS[1:]:
        assert other not in message
    _nothing_received(providers)
    assert client.chat.completions.create(model="a/small", messages=[]).choices[0].message.content == "hi"
    assert len(providers["a"].requests) == 1
    _no_gateway_key_in_headers(providers)


def test_models_endpoint_lists_only_the_keys_models(gw, providers) -> None:
    assert [m.id for m in _oai(gw, GK_B).models.list()] == ["a/small"]
    assert [m.id for m in _oai(gw, GK_A).models.list()] == ALL_MODELS
    response = gw.client.get(gw.url + "/v1/models")
    assert response.status_code == 401 and _json_error(response)["type"] == "authentication_error"
    response = gw.client.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {WRONG_KEY}"})
    assert response.status_code == 401
    # one model, by its bare id
    response = gw.client.get(gw.url + "/v1/models/small", headers={"authorization": f"Bearer {GK_B}"})
    assert response.status_code == 200 and response.json()["id"] == "a/small"
    response = gw.client.get(gw.url + "/v1/models/large", headers={"authorization": f"Bearer {GK_B}"})
    assert response.status_code == 404 and _json_error(response)["type"] == "model_not_found"
    _nothing_received(providers)


def test_every_listed_model_can_be_retrieved_by_its_id(gw) -> None:
    """`client.models.retrieve(id)` for the ids `client.models.list()` returns. Every id is
    `provider/model`: the SDK sends the slash percent-encoded (`/v1/models/a%2Fsmall`)."""
    client = _oai(gw, GK_A)
    for model in client.models.list():
        assert client.models.retrieve(model.id).id == model.id


def test_passthrough_gets_the_clients_own_key_never_the_gateway_key(gw, providers) -> None:
    client = _oai(gw, CLIENT_OWN_KEY, default_headers={"x-sidestep-key": GK_A})
    assert client.chat.completions.create(model="c/mine", messages=[]).choices[0].message.content == "hi"
    [seen] = providers["c"].requests
    assert seen.headers["authorization"] == f"Bearer {CLIENT_OWN_KEY}"
    _no_gateway_key_in_headers(providers)

    # the anthropic SDK's x-api-key as the client's own key, the gateway key beside it
    providers["c"].script()
    response = gw.chat({"model": "c/mine"}, headers={"x-api-key": CLIENT_OWN_KEY, "x-sidestep-key": GK_A})
    assert response.status_code == 200
    [seen] = providers["c"].requests
    assert seen.headers["x-api-key"] == CLIENT_OWN_KEY and "authorization" not in seen.headers
    _no_gateway_key_in_headers(providers)


def test_passthrough_with_only_the_gateway_key_is_401(gw, providers) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        _oai(gw, GK_A).chat.completions.create(model="c/mine", messages=[])
    assert info.value.status_code == 401
    assert "x-sidestep-key" in info.value.body["message"]
    assert "passthrough_auth" in info.value.body["message"]
    # a restricted key may not reach it either, whatever it carries
    response = gw.chat({"model": "c/mine"}, headers={"authorization": f"Bearer {CLIENT_OWN_KEY}",
                                                     "x-sidestep-key": GK_B})
    assert response.status_code == 403
    _nothing_received(providers)


def test_gateway_key_never_reaches_a_keyless_provider(gw, providers) -> None:
    """`c/local` has a base_url and no access_key (a local model server). The header that carried
    the gateway key must not reach it any more than it reaches a keyed provider."""
    response = _oai(gw, GK_A).chat.completions.with_raw_response.create(model="c/local", messages=[])
    assert response.status_code == 200
    [seen] = providers["c"].requests
    _no_gateway_key_in_headers(providers)
    assert "authorization" not in seen.headers


def test_status_and_logs_show_gateway_keys_only_masked(gw, providers) -> None:
    # some traffic with good and bad keys first, so the logs have something to say
    assert _chat(gw, {"model": "a/small"}).status_code == 200
    assert _chat(gw, {"model": "a/small"}, key=WRONG_KEY).status_code == 401
    assert _chat(gw, {"model": "a/large"}, key=GK_B).status_code == 403
    status = gw.sidestep("status", "--json")
    report = json.loads(status.stdout)
    keys = {k["name"]: k["key"] for k in report["gateway_keys"]}
    assert set(keys) == {"team-a", "team-b"}
    for name, secret in (("team-a", GK_A), ("team-b", GK_B)):
        hint = keys[name]
        assert "…" in hint and len(hint) <= 8 and secret.startswith(hint.split("…")[0])
    text = gw.sidestep("status").stdout
    assert "team-a" in text and "team-b" in text
    time.sleep(1.2)  # Envoy flushes its access log every second
    logs = gw.sidestep("logs", "-n", "100000").stdout + gw.sidestep("logs", "access", "-n", "100000").stdout
    for output in (status.stdout, status.stderr, text, logs):
        for secret in (GK_A, GK_B, WRONG_KEY, PROVIDER_A_KEY, PROVIDER_B_KEY):
            assert secret not in output
    for path in gw.home.rglob("*"):
        if not path.is_file():
            continue
        content = path.read_bytes()
        for secret in (GK_A, WRONG_KEY):  # from the environment, or never valid: nowhere at all
            assert secret.encode() not in content, f"{secret} in {path}"
        if path.name not in ("config.yaml", "compiled.pickle"):  # the stack's copy of the config, and the
            #                                                     compiled form its workers load, hold the keys
            for secret in (GK_B, PROVIDER_A_KEY, PROVIDER_B_KEY):
                assert secret.encode() not in content, f"{secret} in {path}"
    access = (gw.home / "logs" / "access.log").read_text()
    assert '"status":401' in access and '"status":403' in access  # the scan above saw real traffic


# ==== 2. paths: only the served API surface reaches a provider


@pytest.mark.parametrize("target", [
    "/v1/../admin",
    "/v1/%2e%2e/%2e%2e/admin",
    "/v1/%2E%2E/%2E%2E/admin",
    "/v1/chat/completions/../../fine_tuning/jobs",
    "/v1/batches",
    "/v1/fine_tuning/jobs",
    "/v1/chat/completions/",
    "/V1/chat/completions",
    "/v1/chat%2ecompletions",
    "/admin",
    "/",
])
def test_paths_outside_the_api_are_404_json(gw, providers, target) -> None:
    status, headers, body = _raw(_port(gw), "POST", target, b'{"model": "a/small"}')
    assert status == 404, (target, body)
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "not_found" and "POST /v1/chat/completions" in error["message"]
    _nothing_received(providers)


def test_get_on_a_served_path_and_post_on_models_are_404(gw, providers) -> None:
    for method, target in (("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("DELETE", "/v1/models"),
                           ("PUT", "/v1/messages")):
        status, headers, body = _raw(_port(gw), method, target, b'{"model": "a/small"}')
        assert status == 404, (method, target, body)
        assert headers["content-type"] == "application/json"
    _nothing_received(providers)


def test_unserved_anthropic_paths_are_404_in_anthropics_shape(gw, providers) -> None:
    status, headers, body = _raw(_port(gw), "POST", "/v1/messages/batches", b'{"model": "anthropic/claude-test"}')
    assert status == 404 and headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["type"] == "error" and payload["error"]["type"] == "not_found_error"
    _nothing_received(providers)


def test_dot_segments_that_land_on_a_served_path_are_served_there(gw, providers) -> None:
    for target in ("//v1//chat/completions", "/v1/./chat/completions", "/v1/models/../chat/completions",
                   "/v1/%2e/chat/completions"):
        status, headers, body = _raw(_port(gw), "POST", target, b'{"model": "a/small"}')
        assert status == 200, (target, body)
        assert json.loads(body)["model"] == "small"
    assert [r.path for r in providers["a"].requests] == ["/v1/chat/completions"] * 4
    _no_gateway_key_in_headers(providers)


@pytest.mark.parametrize("target", ["/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1%2Fchat/completions",
                                    "/v1/chat%5Ccompletions"])
def test_encoded_slashes_are_decoded_before_routing(gw, providers, target) -> None:
    """An encoded slash (or backslash) is decoded, then the path normalized: it lands on exactly the
    path it spells."""
    status, _, body = _raw(_port(gw), "POST", target, b'{"model": "a/small"}')
    assert status == 200, (target, body)
    assert [r.path for r in providers["a"].requests] == ["/v1/chat/completions"]


@pytest.mark.parametrize("target", ["/v1%2F..%2Fadmin", "/v1/chat%2F..%2F..%2Fadmin", "/v1/messages%2F..%2Ffiles",
                                    "/v1/chat%5C..%5C..%5Cadmin"])
def test_encoded_traversals_never_reach_a_provider(gw, providers, target) -> None:
    status, headers, body = _raw(_port(gw), "POST", target, b'{"model": "a/small"}')
    assert status in (400, 404), (target, body)
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert "error" in payload and payload["error"]["type"] and payload["error"]["message"]
    _nothing_received(providers)


MALFORMED_HTTP = {  # requests Envoy's own HTTP codec refuses: (request, status)
    "space_in_header_name": (b"bad header: 1\r\ncontent-length: 20\r\n", 400),
    "chunked_and_content_length": (b"transfer-encoding: chunked\r\ncontent-length: 20\r\n", 400),
    "non_numeric_content_length": (b"content-length: 2O\r\n", 400),
    "header_too_large": (b"x-big: " + b"a" * 100_000 + b"\r\ncontent-length: 20\r\n", 431),
}


@pytest.mark.parametrize("name", list(MALFORMED_HTTP))
def test_malformed_http_is_a_json_4xx(gw, providers, name) -> None:
    headers, expected = MALFORMED_HTTP[name]
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + GK_A.encode() +
               b"\r\n" + headers + b"\r\n" + b'{"model": "a/small"}')
    with socket.create_connection(("127.0.0.1", _port(gw)), timeout=15) as sock:
        sock.sendall(request)
        status, response_headers, body = _read_response(sock)
    assert status == expected, body
    assert response_headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["type"]
    _nothing_received(providers)


def test_envoys_own_refusals_are_typed_as_the_clients_error(gw, providers) -> None:
    """Every refusal of bad input is the client's error (apierrors: 400 invalid_request, 408
    request_timeout, …), with a message, in the caller's shape, Envoy's own refusals (a NUL in the
    path, a malformed request, headers never finished) included."""
    problems = []

    def check(what: str, status: int, body: bytes, anthropic_shape: bool = False) -> None:
        payload = json.loads(body)
        error = payload["error"]
        wanted = {400: "invalid_request_error", 408: "request_timeout", 431: "invalid_request_error"}[status]
        if anthropic_shape:
            wanted = {400: "invalid_request_error", 408: "timeout_error", 431: "invalid_request_error"}[status]
            if payload.get("type") != "error":
                problems.append(f"{what}: not Anthropic-shaped: {body!r}")
        if error.get("type") != wanted or not error.get("message"):
            problems.append(f"{what} ({status}): {body.decode().strip()}")

    status, _, body = _raw(_port(gw), "POST", "/v1/chat/completions%00", b'{"model": "a/small"}')
    check("NUL in the path", status, body)
    status, _, body = _raw(_port(gw), "POST", "/v1/messages%00", b'{"model": "a/small"}')
    check("NUL in the path on /v1/messages", status, body, anthropic_shape=True)
    with socket.create_connection(("127.0.0.1", _port(gw)), timeout=15) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nbad header: 1\r\ncontent-length: 2\r\n\r\n{}")
        status, _, body = _read_response(sock)
    check("malformed header", status, body)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
    _, status, _, body = _trickle(_port(gw), head, [b"x"] * 12, 0.5)
    check("headers never finished", status, body)
    _nothing_received(providers)
    assert not problems, "\n".join(problems)


def test_query_strings_on_served_paths_still_work(gw, providers) -> None:
    status, _, body = _raw(_port(gw), "POST", "/v1/chat/completions?api-version=2024-01-01&x=%2F..%2F",
                           b'{"model": "a/small"}')
    assert status == 200, body
    assert [r.path for r in providers["a"].requests] == ["/v1/chat/completions?api-version=2024-01-01&x=%2F..%2F"]
    # and through httpx, as an SDK sends them
    response = gw.client.post(gw.url + "/v1/chat/completions", params={"q": "1"}, json={"model": "a/small"},
                              headers={"authorization": f"Bearer {GK_A}"})
    assert response.status_code == 200
    assert providers["a"].requests[-1].path == "/v1/chat/completions?q=1"


# ==== 3. the local control ports give nothing away


def _listening_tcp_inodes() -> dict[int, str]:
    """inode → local address:port of every TCP socket in LISTEN state."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":
                address, port = fields[1].rsplit(":", 1)
                out[int(fields[9])] = f"{address}:{int(port, 16)}"
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


ATTACKER = r'''
import errno, json, os, socket, sys
import encodings.idna, grpc, grpc._channel  # everything imported while the interpreter's files are still readable
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb, external_processor_pb2_grpc as pb_grpc
from envoy.config.core.v3 import base_pb2
from controlplane.state.v1 import state_pb2, state_pb2_grpc

args = json.loads(sys.argv[1])
if args["uid"] is not None:
    os.setgroups([])
    os.setgid(args["uid"])
    os.setuid(args["uid"])
out = {"ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()],
       "files": {}, "listdir": {}, "sockets": {}}

def err(exc):
    return errno.errorcode.get(getattr(exc, "errno", None) or 0, type(exc).__name__)

for path in args["files"]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        out["files"][path] = {"read": len(data), "secrets": [s for s in args["secrets"] if s.encode() in data]}
    except OSError as exc:
        out["files"][path] = err(exc)
for path in args["dirs"]:
    try:
        out["listdir"][path] = sorted(os.listdir(path))
    except OSError as exc:
        out["listdir"][path] = err(exc)
for path in args["sockets"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out["sockets"][path] = "connected"
    except OSError as exc:
        out["sockets"][path] = err(exc)
    finally:
        s.close()

# pretend to be Envoy: one attempt with a valid gateway key, and see what the ext_proc hands out
def envoy_messages():
    headers = [(":method", "POST"), (":path", "/v1/chat/completions"), ("x-request-id", "attacker-1"),
               ("content-length", "22"), ("authorization", "Bearer " + args["gateway_key"])]
    yield pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers]), end_of_stream=False))
    yield pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model": "a/small"}  ', end_of_stream=True))

with grpc.insecure_channel("unix:" + args["extproc"]) as channel:
    try:
        replies = list(pb_grpc.ExternalProcessorStub(channel).Process(envoy_messages(), timeout=5))
        out["extproc"] = {"answered": [str(r) for r in replies],
                          "secrets": [s for s in args["secrets"] if any(s in str(r) for r in replies)]}
    except grpc.RpcError as exc:
        out["extproc"] = {"code": exc.code().name, "details": exc.details()}

# the state service: read its table, and (as nobody only) try to inject a block
with grpc.insecure_channel("unix:" + args["state"]) as channel:
    stub = state_pb2_grpc.StateStub(channel)
    try:
        snapshot = stub.Get(state_pb2.SnapshotRequest(), timeout=5)
        out["state_get"] = {"facts": len(snapshot.facts)}
    except grpc.RpcError as exc:
        out["state_get"] = {"code": exc.code().name, "details": exc.details()}
    if args["inject"]:
        block = state_pb2.Fact(block=state_pb2.Block(scope="model", name="a/small", until=4e9, reason="attacker"))
        reports = [state_pb2.Report(hello=state_pb2.Hello(worker="9", pid=1, config_hash=args["config_hash"])),
                   state_pb2.Report(fact=block)]
        try:
            list(stub.Sync(iter(reports), timeout=3))
            out["state_sync"] = {"code": "OK"}
        except grpc.RpcError as exc:
            out["state_sync"] = {"code": exc.code().name, "details": exc.details()}

# the public listener, which anyone may reach
def http(request):
    with socket.create_connection(("127.0.0.1", args["port"]), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode("latin-1")

out["healthz"] = http(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").split("\r\n")[0]
body = b'{"model": "a/small"}'
public = http(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
              b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
out["public"] = public.split("\r\n")[0]
out["public_secrets"] = [s for s in args["secrets"] if s in public]
print(json.dumps(out))
'''


def _attack(uid: int | None, **args: object) -> dict:
    """Run ATTACKER as `uid` (None: as ourselves, the control). It imports what it needs, then drops
    to `uid` with no supplementary groups before touching anything of the stack's: the interpreter
    lives under /root, which user nobody could not even execute."""
    result = subprocess.run([sys.executable, "-c", ATTACKER, json.dumps({"uid": uid, **args})],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_local_control_ports_give_nothing_away(gw, providers) -> None:
    report = gw.status()
    run, logs = gw.home / "run", gw.home / "logs"
    assert stat.S_IMODE(os.stat(gw.home.parent).st_mode) == 0o755  # the point of this test: a traversable parent
    assert all(w["socket"].startswith(str(run) + "/") for w in report["workers"])  # sockets live in run/

    # permissions: directories 0700, files 0600, sockets without group/other bits
    for directory in (gw.home, run, logs):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    sockets, files, dirs = [], [], [gw.home, run, logs]
    for path in gw.home.rglob("*"):
        mode = os.lstat(path).st_mode
        if stat.S_ISSOCK(mode):
            sockets.append(path)
            assert stat.S_IMODE(mode) & 0o077 == 0, f"{path} is {oct(stat.S_IMODE(mode))}"
        elif stat.S_ISDIR(mode):
            dirs.append(path)
            assert stat.S_IMODE(mode) == 0o700, f"{path} is {oct(stat.S_IMODE(mode))}"
        else:
            files.append(path)
            assert stat.S_IMODE(mode) == 0o600, f"{path} is {oct(stat.S_IMODE(mode))}"
    assert {p.name for p in sockets} == {"admin.sock", "state.sock", "extproc-0.sock", "relay-0.sock", "relayed.sock",
                                         "metrics.sock", "access-log.sock"}
    assert {"stack.json", "config.yaml", "envoy.json", "access.log", "extproc.log"} <= {p.name for p in files}

    # no process of the stack listens on any TCP port but the listener
    listening = _listening_tcp_inodes()
    pids = [report["supervisor_pid"], *(child["pid"] for child in report["processes"].values())]
    assert len(pids) == 5 and all(pids)
    tcp = sorted({listening[i] for pid in pids for i in _socket_inodes(pid) if i in listening})
    assert tcp and all(address.endswith(f":{_port(gw)}") for address in tcp), tcp

    args = {"files": [str(p) for p in files], "dirs": [str(p) for p in dirs], "sockets": [str(p) for p in sockets],
            "extproc": str(run / "extproc-0.sock"), "state": str(run / "state.sock"), "port": _port(gw),
            "gateway_key": GK_A, "config_hash": report["config_hash"], "secrets": [PROVIDER_A_KEY, GK_B]}

    # the control, as the stack's own user: the same script reads everything and is handed the key
    control = _attack(None, **args, inject=False)
    assert all(isinstance(v, dict) for v in control["files"].values()), control["files"]
    assert control["files"][str(run / "config.yaml")]["secrets"] == [PROVIDER_A_KEY, GK_B]
    assert set(control["sockets"].values()) == {"connected"}
    assert control["extproc"].get("secrets") == [PROVIDER_A_KEY], control["extproc"]
    assert "facts" in control["state_get"]

    # the attacker, as user nobody: nothing
    attacker = _attack(65534, **args, inject=True)
    assert attacker["ids"] == [65534, 65534, 65534, 65534, []]
    assert set(attacker["files"].values()) == {"EACCES"}, attacker["files"]
    assert set(attacker["listdir"].values()) == {"EACCES"}, attacker["listdir"]
    assert set(attacker["sockets"].values()) == {"EACCES"}, attacker["sockets"]
    assert attacker["extproc"]["code"] == "UNAVAILABLE", attacker["extproc"]
    assert attacker["state_get"]["code"] == "UNAVAILABLE", attacker["state_get"]
    assert attacker["state_sync"]["code"] == "UNAVAILABLE", attacker["state_sync"]
    # … while the public listener answers it like anyone else (so the attack itself did run)
    assert attacker["healthz"] == "HTTP/1.1 200 OK"
    assert attacker["public"] == "HTTP/1.1 401 Unauthorized"
    assert attacker["public_secrets"] == []

    # no fact was injected: no blocks, and requests still go to a/small
    after = gw.status()
    assert after["blocks"] == [] and after["state_service"] == "up"
    assert _chat(gw, {"model": "a/small"}).status_code == 200
    assert len(providers["a"].requests) == 1


# ==== 4. bad input is the client's error


def _nested(depth: int, model: bool = True) -> bytes:
    head = b'{"model": "a/small", "x": ' if model else b'{"x": '
    return head + b"[" * depth + b"]" * depth + b"}"


BAD_BODIES = {
    "array_nested_990": (b"[" * 990 + b"]" * 990, 400),
    "value_nested_990": (_nested(990), 400),
    "array_nested_100000": (b"[" * 100_000 + b"]" * 100_000, 400),
    "object_nested_100000": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400),
    "value_nested_100000": (_nested(100_000), 400),
    "unclosed_nested_100000": (b'{"model": "a/small", "x": ' + b"[" * 100_000, 400),
    "truncated_key": (b'{"mod', 400),
    "bad_escape_in_key": (b'{"mo\\x": 1}', 400),
    "bad_escape_in_model": (b'{"model": "a/sm\\qall"}', 400),
    "duplicate_model": (b'{"model": "a/small", "messages": [], "model": "a/large"}', 400),
    "duplicate_model_escaped": (b'{"model": "a/small", "m\\u006fdel": "a/large"}', 400),
    "not_utf8": (b'{"model": "a/sm\xffall"}', 400),
    "latin1_body": ('{"model": "a/small", "q": "caf\xe9"}'.encode("latin-1"), 400),
    "utf16_body": ('{"model": "a/small"}'.encode("utf-16"), 400),
    "model_is_number": (b'{"model": 5}', 400),
    "model_is_null": (b'{"model": null}', 400),
    "model_is_object": (b'{"model": {"model": "a/small"}}', 400),
    "empty_array": (b"[]", 400),
    "string": (b'"a/small"', 400),
    "trailing_garbage": (b'{"model": "a/small"} {"model": "a/large"}', 400),
    "huge_number": (b'{"model": "a/small", "n": ' + b"9" * 5000 + b"}", 400),
    "nul_bytes": (b"\x00" * 64, 400),
    "no_model_no_default": (b'{"messages": []}', 400),
    "lone_surrogate_model": (b'{"model": "\\ud800"}', 404),
    "control_chars_model": (b'{"model": "a/small\\r\\nx-evil: 1"}', 404),
    "long_model": (b'{"model": "' + b"m" * 100_000 + b'"}', 404),
    "too_large": (b'{"model": "a/small", "x": "' + b"x" * 2_000_000 + b'"}', 413),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_bodies_are_the_clients_error(gw, providers, name) -> None:
    body, expected = BAD_BODIES[name]
    response = _chat(gw, body)
    assert response.status_code == expected, (name, response.status_code, response.text[:300])
    error = _json_error(response)
    assert error["type"] == {400: "invalid_request_error", 404: "model_not_found", 413: "request_too_large"}[expected]
    assert error["message"]
    _nothing_received(providers)


def test_valid_nested_body_is_served_intact(gw, providers) -> None:
    """Valid JSON nested well within what the parser takes reaches the provider byte for byte (the
    990-level one above is refused: the limit is Python's recursion limit, not a documented one)."""
    body = _nested(200)
    response = _chat(gw, body)
    assert response.status_code == 200, response.text[:300]
    assert providers["a"].requests[0].body == body.replace(b'"a/small"', b'"small"')


def test_bad_bodies_on_the_anthropic_path_are_anthropic_shaped(gw, providers) -> None:
    response = gw.client.post(gw.url + "/v1/messages", content=b'{"model": "anthropic/claude-test"',
                              headers={"x-api-key": GK_A, "content-type": "application/json"})
    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    _nothing_received(providers)


_JSONISH = st.lists(st.sampled_from(list('{}[]":,\\ \t\n0123456789.eE+-truefalsnmod/u') +
                                     ["\\u", "\\ud800", "\x00", "\xe9", "\u2028", '"model"', "a/small"]),
                    max_size=60).map("".join)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25)
_VALID = b'{"model": "a/small", "messages": [{"role": "user", "content": "hi"}]}'
_BODIES = st.one_of(
    st.binary(max_size=400),
    _JSONISH.map(lambda s: s.encode("utf-8", "surrogatepass")),
    _JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"model": _JSON_VALUES}).map(lambda v: json.dumps(v).encode()),
    st.integers(0, len(_VALID) - 1).map(lambda n: _VALID[:n]),
)


def _routable(body: bytes) -> bool:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(value, dict) and isinstance(value.get("model"), str) and value["model"] in REQUESTABLE


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=_BODIES)
def test_random_bodies_are_never_a_gateway_error(gw, providers, body) -> None:
    assume(not _routable(body))
    response = _chat(gw, body)
    assert response.status_code in (400, 404), (body, response.status_code, response.text[:300])
    error = _json_error(response)
    assert error["type"] in ("invalid_request_error", "model_not_found")
    _nothing_received(providers)


def _trickle(port: int, head: bytes, pieces: list[bytes], interval: float,
             limit: float = 10) -> tuple[float, int, dict[str, str], bytes]:
    """Send `head`, then one piece every `interval` s; the gateway's answer and when it came."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        started = time.monotonic()
        sock.sendall(head)
        for piece in pieces:
            sock.settimeout(interval)
            try:
                first = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                first = None
            if first is not None:
                break  # the gateway answered (or closed)
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(limit)
        status, headers, body = _read_response(sock)
        return time.monotonic() - started, status, headers, body


def test_slow_body_gets_408_json_and_never_reaches_a_provider(gw, providers) -> None:
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {GK_A}\r\n"
            "content-type: application/json\r\ncontent-length: 100\r\n\r\n").encode()
    body = b'{"model": "a/small", "x": "' + b"x" * 100
    elapsed, status, headers, payload = _trickle(_port(gw), head, [bytes([b]) for b in body[:100]], 0.5)
    assert status == 408, payload
    assert 1.8 <= elapsed <= 3.5, elapsed
    assert headers["content-type"] == "application/json"
    error = json.loads(payload)["error"]
    assert error["type"] == "request_timeout" and "2s" in error["message"]
    _nothing_received(providers)


def test_slow_headers_get_408_json_too(gw, providers) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
    pieces = [bytes([b]) for b in f"authorization: Bearer {GK_A}\r\nx-slow: {'y' * 40}\r\n".encode()]
    elapsed, status, headers, payload = _trickle(_port(gw), head, pieces, 0.5)
    assert status == 408, payload
    assert 1.8 <= elapsed <= 3.5, elapsed
    assert headers["content-type"] == "application/json"
    assert json.loads(payload)["error"]["type"]
    _nothing_received(providers)


# ==== 5. `up` never leaves users without a gateway


UP_GOOD = """
listeners: [{{type: model, port: {port}}}]
model_providers:
  - {{model: a/x, base_url: "{a}", access_key: sk-up-0123456789ab}}
"""


def test_up_never_leaves_users_without_a_gateway(make_stack, providers, tmp_path: Path) -> None:
    stack = make_stack(UP_GOOD, a=providers["a"].url)
    port = _port(stack)
    before = stack.status()
    assert before["healthy"] and before["models"] == ["a/x"]

    def serving(expected: dict) -> None:
        assert stack.chat({"model": "a/x"}).status_code == 200
        now = stack.status()
        for field in ("supervisor_pid", "config", "config_hash", "models", "listener"):
            assert now[field] == expected[field], (field, now[field], expected[field])
        assert now["healthy"]

    def up(name: str, text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return stack.sidestep("up", str(path), check=False)

    base = UP_GOOD.format(port=port, a=providers["a"].url)
    with socket.socket() as busy:  # another program holds the new port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = up("taken", base.replace(f"port: {port}", f"port: {taken}"))
        assert result.returncode == 1, result
        assert f"cannot listen on 127.0.0.1:{taken}" in result.stderr
        serving(before)

    for name, text, message in [
        ("bad_address", base.replace("type: model,", "type: model, address: 999.1.1.1,"),
         "listeners[0].address: '999.1.1.1' is not an IP address"),
        ("huge_body", base.replace("type: model,", "type: model, max_request_body_bytes: 5000000000,"),
         "listeners[0].max_request_body_bytes"),
        ("zero_timeout", base.replace("type: model,", "type: model, attempt_timeout: 0s,"),
         "listeners[0].attempt_timeout: must be greater than 0"),
    ]:
        result = up(name, text)
        assert result.returncode == 2, (name, result)
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
        serving(before)

    # `localhost` is a valid address now: it starts (a restart, on the same port)
    result = up("localhost", base.replace("type: model,", "type: model, address: localhost,"))
    assert result.returncode == 0, result.stderr
    assert "restarting" in result.stdout
    assert stack.chat({"model": "a/x"}).status_code == 200
    before = stack.status()
    assert before["config"] == str(tmp_path / "localhost.yaml")
    assert before["listener"] == f"http://127.0.0.1:{port}" and before["healthy"]

    # A config that passes every check but whose stack cannot come up: its port is free when `up`
    # checks it, and taken by another program by the time Envoy binds it. The previous stack comes back.
    new_port = free_port()
    config = tmp_path / "new.yaml"
    config.write_text(base.replace(f"port: {port}", f"port: {new_port}").replace("a/x", "a/renamed"))
    process = subprocess.Popen([sys.executable, "-m", "controlplane", "--home", str(stack.home), "up", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    thief = socket.socket()
    try:
        deadline = time.monotonic() + 60
        while pid_alive(before["supervisor_pid"]):  # `up` stops the running stack only once its checks passed
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        thief.bind(("127.0.0.1", new_port))
        thief.listen()
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        thief.close()
    assert process.returncode == 1, (out, err)
    assert "previous config" in err and "is serving again" in err, err
    assert f"({tmp_path / 'localhost.yaml'}) is serving again on http://127.0.0.1:{port}" in err, err
    assert "Envoy rejected its listeners" in err, err  # what failed, and why: Envoy could not listen there
    assert f"cannot bind '127.0.0.1:{new_port}': Address already in use" in err, err
    assert stack.chat({"model": "a/x"}).status_code == 200
    after = stack.status()
    assert after["running"] and after["healthy"]
    for field in ("config", "config_hash", "models", "listener"):
        assert after[field] == before[field], field


def test_up_can_move_the_running_listener_to_all_interfaces(make_stack, providers, tmp_path: Path) -> None:
    """Same port, address 127.0.0.1 → 0.0.0.0 (with gateway keys, as required). The port is held by
    the running stack itself, which `up` is about to stop: that is not "another gateway"."""
    template = UP_GOOD.replace("model_providers:", "gateway_keys: [{{name: ops, key: gk-ops-0123456789abcdef}}]\n"
                                                   "model_providers:")
    stack = make_stack(template, a=providers["a"].url)
    port = _port(stack)
    config = tmp_path / "public.yaml"
    config.write_text(template.format(port=port, a=providers["a"].url)
                      .replace("type: model,", "type: model, address: 0.0.0.0,"))
    result = stack.sidestep("up", str(config), check=False)
    assert result.returncode == 0, result.stderr
    response = stack.chat({"model": "a/x"}, headers={"authorization": "Bearer gk-ops-0123456789abcdef"})
    assert response.status_code == 200
    assert stack.status()["config"] == str(config)


# ==== 6. config validation: every error with its field path


BASE_PROVIDER = '  - {model: a/x, base_url: "http://127.0.0.1:9", access_key: sk-abcdefghijkl}\n'


def _validate(tmp_path: Path, text: str, name: str = "c.yaml") -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(text)
    return run_cli("validate", str(path), check=False)


@pytest.mark.parametrize("case", [
    "header_crlf", "literal_key_newline", "gateway_key_newline", "env_key_newline", "zero_attempt_timeout",
    "name_is_another_model", "public_address_without_keys", "address_not_ip",
])
def test_validate_refuses_with_field_paths(tmp_path: Path, case: str) -> None:
    configs = {
        "header_crlf": ('model_providers:\n  - model: a/x\n    base_url: "http://127.0.0.1:9"\n'
                        '    access_key: sk-abcdefghijkl\n    headers: {X-Org: "a\\r\\nb"}\n',
                        "model_providers[0] (a/x).headers.X-Org: the value contains a line break"),
        "literal_key_newline": ('model_providers:\n  - model: a/x\n    base_url: "http://127.0.0.1:9"\n'
                                '    access_key: "sk-abcdef\\nghijklmnop"\n',
                                "model_providers[0] (a/x).access_key: contains a space, line break"),
        "gateway_key_newline": ('gateway_keys: [{name: ops, key: "gk-abcdef\\nghijklmnop"}]\nmodel_providers:\n'
                                + BASE_PROVIDER, "gateway_keys[0] (ops).key: contains a space, line break"),
        "env_key_newline": ("gateway_keys: [{name: ops, key: $SSH_TEST_NL_KEY}]\nmodel_providers:\n" + BASE_PROVIDER,
                            "gateway_keys[0] (ops).key: contains a space, line break"),
        "zero_attempt_timeout": ("listeners: [{type: model, attempt_timeout: 0s}]\nmodel_providers:\n"
                                 + BASE_PROVIDER, "listeners[0].attempt_timeout: must be greater than 0"),
        "name_is_another_model": ("model_providers:\n" + BASE_PROVIDER +
                                  '  - {model: a/y, name: a/x, base_url: "http://127.0.0.1:9", '
                                  "access_key: sk-abcdefghijkl}\n",
                                  "model_providers[1] (a/y).name: 'a/x' is the model of model_providers[0]"),
        "public_address_without_keys": ("listeners: [{type: model, address: 0.0.0.0}]\nmodel_providers:\n"
                                        + BASE_PROVIDER, "listeners[0].address: 0.0.0.0 is reachable from other"),
        "address_not_ip": ("listeners: [{type: model, address: example.com}]\nmodel_providers:\n" + BASE_PROVIDER,
                           "listeners[0].address: 'example.com' is not an IP address"),
    }
    text, message = configs[case]
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = run_cli("validate", str(path), check=False, env={"SSH_TEST_NL_KEY": "gk-from-env-0123456789\n"})
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for secret in ("ghijklmnop", "gk-from-env"):  # a key is never echoed back
        assert secret not in result.stdout + result.stderr


def test_public_address_is_fine_with_keys_or_explicitly_unauthenticated(tmp_path: Path) -> None:
    for listener, extra in (("{type: model, address: 0.0.0.0, allow_unauthenticated: true}", ""),
                            ("{type: model, address: 0.0.0.0}", "gateway_keys: [{name: ops, key: gk-0123456789abcdef}]\n"),
                            ("{type: model, address: localhost}", ""),
                            ("{type: model, address: '::1'}", "")):
        result = _validate(tmp_path, f"listeners: [{listener}]\n{extra}model_providers:\n{BASE_PROVIDER}")
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout


@pytest.mark.parametrize("shape", ["flow_sequence", "flow_mapping", "block_sequence"])
def test_100k_levels_of_yaml_is_one_clean_error(tmp_path: Path, shape: str) -> None:
    depth = 100_000
    text = {"flow_sequence": "x: " + "[" * depth + "]" * depth + "\n",
            "flow_mapping": "x: " + "{a: " * depth + "1" + "}" * depth + "\n",
            "block_sequence": "x:\n" + "- " * depth + "1\n"}[shape]
    started = time.monotonic()
    result = _validate(tmp_path, text + "model_providers:\n" + BASE_PROVIDER)
    assert time.monotonic() - started < 10
    assert result.returncode == 2, result
    errors = [line for line in result.stderr.splitlines() if line.strip().startswith("✗")]
    assert len(errors) == 1 and "nests deeper than 64 levels" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    text = "\n".join(lines) + "\nmodel_providers:\n" + BASE_PROVIDER
    started = time.monotonic()
    result = _validate(tmp_path, text)
    assert time.monotonic() - started < 10
    assert result.returncode == 2
    assert "expands to more than 2000000 values" in result.stderr
    assert "Traceback" not in result.stderr
    # aliases hidden inside an ignored Plano section are expanded all the same
    result = _validate(tmp_path, "\n".join(lines[:-1]) + "\ntracing: {x: *a8}\nmodel_providers:\n" + BASE_PROVIDER)
    assert result.returncode == 2 and "expands to more than" in result.stderr, result.stderr


def test_10000_providers_validate_in_under_5s(tmp_path: Path) -> None:
    lines = ["model_providers:"]
    for i in range(10_000):
        nxt = (i + 1) % 10_000
        lines.append(f'  - {{model: p{i}/m{i}, name: n{i}, base_url: "http://127.0.0.1:{1024 + i}", '
                     f"access_key: sk-key-{i:010d}, retry_policy: {{fallback_models: [p{nxt}/m{nxt}], "
                     f"on_status_codes: [{{codes: [429, \"500-504\"], strategy: different_provider}}]}}}}")
    started = time.monotonic()
    result = _validate(tmp_path, "\n".join(lines) + "\n")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert "10000 models (10000 with a retry policy)" in result.stdout
    assert elapsed < 5, f"validating 10,000 providers took {elapsed:.1f}s"

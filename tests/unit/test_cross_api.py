"""Failover across API families, as pure functions: which API an entry speaks, which candidates can
serve a request, translated attempts, the commit point of a stream, the error bodies Envoy renders."""

from __future__ import annotations

import inspect
import json

import pytest

from controlplane import apierrors
from controlplane.apierrors import Api
from controlplane.config import parse_config
from controlplane.config.runtime import model_kind
from controlplane.endpoints import find_endpoint
from controlplane.render.envoy import Sockets, render_envoy
from extproc.commit import CommitPeek, Content, StreamError
from extproc.coordinator import AttemptPlan, Coordinator
from extproc.multipart import boundary_of, find_form_field
from extproc.policy.decide import GiveUp, Retry
from extproc.policy.errors import exhausted
from extproc.policy.state import ProviderError
from extproc.translate import anthropic_to_openai, openai_to_anthropic
from tests.unit.helpers import req

CONFIG = """
model_providers:
  - model: openai/gpt-4o
    base_url: http://127.0.0.1:1
    provider_interface: openai
    access_key: sk-openai-0000000000
    retry_policy: {fallback_models: [anthropic/claude, own/passthrough], default_max_attempts: 3}
  - {model: anthropic/claude, base_url: "http://127.0.0.1:2", provider_interface: claude, access_key: sk-ant-000000000}
  - {model: x/text-embedding-3-small, base_url: "http://127.0.0.1:3", access_key: sk-emb-0000000000}
  - {model: own/passthrough, base_url: "http://127.0.0.1:4", passthrough_auth: true}
  - {model: other/passthrough, base_url: "http://127.0.0.1:5", passthrough_auth: true}
  - {model: anthropic/plano-mock, base_url: "http://127.0.0.1:6", access_key: sk-mock-000000000}
  - model: anthropic/primary
    base_url: http://127.0.0.1:2
    provider_interface: claude
    access_key: sk-ant-000000000
    retry_policy: {fallback_models: [openai/gpt-4o]}
  - {model: openai/whisper-1, base_url: "http://127.0.0.1:1", provider_interface: openai, access_key: sk-openai-0000000000, default: true}
"""


def gateway():
    return parse_config(CONFIG, {}).gateway


# ---- which API an entry speaks, and what it serves


def test_provider_api_kind_and_auth() -> None:
    t = gateway().targets
    assert t["openai/gpt-4o"].api is Api.OPENAI and t["anthropic/claude"].api is Api.ANTHROPIC
    # no provider_interface and an unknown host: it speaks the client's API, as Plano assumes; the
    # anthropic/ prefix still decides its auth headers, as before
    mock = t["anthropic/plano-mock"]
    assert mock.api is None and mock.anthropic and mock.keys[0].headers[0][0] == "x-api-key"
    hosted = parse_config("model_providers: [{model: anthropic/c, access_key: k-0000000000}, "
                          "{model: groq/l, access_key: k-0000000000}, {model: z/q, base_url: 'https://api.openai.com', "
                          "access_key: k-0000000000}]", {}).gateway.targets
    assert [x.api for x in hosted.values()] == [Api.ANTHROPIC, Api.OPENAI, Api.OPENAI]
    assert t["x/text-embedding-3-small"].kind == "embeddings" and t["openai/gpt-4o"].kind == "chat"
    assert [model_kind(m) for m in ("whisper-1", "tts-1-hd", "dall-e-3", "omni-moderation-latest", "o3")] == [
        "audio", "audio", "images", "moderation", "chat"]
    explicit = parse_config("model_providers: [{model: a/odd-embed-name, base_url: 'http://127.0.0.1:1', kind: chat}]",
                            {}).gateway
    assert explicit.targets["a/odd-embed-name"].kind == "chat"


def test_implicit_candidates_never_include_passthrough_entries() -> None:
    gw = gateway()
    order = [t.key for t in gw.order(gw.targets["openai/gpt-4o"])]
    assert order[:2] == ["anthropic/claude", "own/passthrough"]  # listed: allowed
    assert "other/passthrough" not in order  # implicit: the client's key must not go there


# ---- candidates that can serve the request, translated attempts


def coordinator() -> Coordinator:
    return Coordinator(gateway(), clock=lambda: 100.0, wall_clock=lambda: 0.0)


def test_openai_client_fails_over_to_anthropic_translated() -> None:
    coord = coordinator()
    body = json.dumps({"model": "openai/gpt-4o", "messages": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "hi"}]}).encode()
    plan = coord.begin_attempt("r", 1, req("/v1/chat/completions"), body)
    assert isinstance(plan, AttemptPlan) and plan.translation is None and plan.path == "/v1/chat/completions"
    decision = coord.end_attempt("r", 429, "via_upstream", None)
    assert isinstance(decision, Retry) and decision.target.key == "anthropic/claude"
    plan = coord.begin_attempt("r", 2, None, b'{"model": "gpt-4o"}')  # a later attempt's body: not the client's
    assert isinstance(plan, AttemptPlan) and plan.path == "/v1/messages"
    assert plan.translation is not None and plan.translation.module is openai_to_anthropic
    sent = json.loads(plan.body)
    assert sent == {"model": "claude", "max_tokens": 4096, "system": "be brief",
                    "messages": [{"role": "user", "content": "hi"}]}


def test_anthropic_client_fails_over_to_openai_translated() -> None:
    coord = coordinator()
    body = json.dumps({"model": "anthropic/primary", "max_tokens": 50, "system": "s",
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    plan = coord.begin_attempt("r", 1, req("/v1/messages"), body)
    assert isinstance(plan, AttemptPlan) and plan.translation is None
    assert isinstance(coord.end_attempt("r", 529, "via_upstream", None), Retry)
    plan = coord.begin_attempt("r", 2, None, body)
    assert isinstance(plan, AttemptPlan) and plan.translation.module is anthropic_to_openai
    assert plan.path == "/v1/chat/completions" and json.loads(plan.body)["messages"][0] == {
        "role": "system", "content": "s"}


def test_chat_never_fails_over_to_another_kind_or_an_untranslatable_api() -> None:
    coord = coordinator()
    # n=2 cannot be carried to Anthropic: that fallback is skipped, the listed passthrough one is next
    body = b'{"model": "openai/gpt-4o", "n": 2, "messages": [{"role": "user", "content": "hi"}]}'
    coord.begin_attempt("r", 1, req("/v1/chat/completions"), body)
    decision = coord.end_attempt("r", 503, "via_upstream", None)
    assert isinstance(decision, Retry) and decision.target.key == "own/passthrough"
    assert isinstance(coord.begin_attempt("r", 2, None, body), AttemptPlan)
    decision = coord.end_attempt("r", 503, "via_upstream", None)
    # then config order, skipping the Anthropic entry (n=2), the embeddings one and the implicit passthrough
    assert isinstance(decision, Retry) and decision.target.key == "anthropic/plano-mock"
    # /v1/responses cannot be translated at all
    coord.begin_attempt("s", 1, req("/v1/responses"), b'{"model": "openai/gpt-4o", "input": "hi"}')
    decision = coord.end_attempt("s", 503, "via_upstream", None)
    assert isinstance(decision, Retry) and decision.target.key == "own/passthrough"


def test_a_requested_model_that_cannot_carry_the_request_is_a_400_first() -> None:
    coord = coordinator()
    error = coord.begin_attempt("r", 1, req("/v1/chat/completions"),
                                b'{"model": "anthropic/claude", "logprobs": true, "messages": []}')
    assert isinstance(error, apierrors.ApiError) and error.status == 400 and "logprobs" in error.message
    error = coord.begin_attempt("s", 1, req("/v1/responses"), b'{"model": "anthropic/claude", "input": "x"}')
    assert isinstance(error, apierrors.ApiError) and error.status == 400 and "/v1/responses" in error.message
    assert coord.requests == {}


def test_requests_that_refer_to_provider_state_stay_with_the_provider() -> None:
    coord = coordinator()
    coord.begin_attempt("r", 1, req("/v1/responses"),
                        b'{"model": "openai/gpt-4o", "previous_response_id": "resp_1", "input": "go on"}')
    decision = coord.end_attempt("r", 503, "via_upstream", None)
    assert isinstance(decision, GiveUp) and decision.reason == "no_candidates"


def test_multipart_model_is_rewritten_in_place_and_never_fails_over() -> None:
    boundary = b"XyZ"
    body = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\x00\x01\r\n'
            b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nopenai/whisper-1\r\n--XyZ--\r\n')
    assert boundary_of(b"multipart/form-data; boundary=XyZ") == boundary
    assert find_form_field(body, boundary, "model").value == "openai/whisper-1"
    assert find_form_field(body[:40], boundary, "model") is None
    coord = coordinator()
    plan = coord.begin_attempt("r", 1, req("/v1/audio/transcriptions", content_type=b"multipart/form-data; "
                                           b"boundary=XyZ"), body)
    assert isinstance(plan, AttemptPlan) and plan.target.key == "openai/whisper-1"
    assert plan.body == body.replace(b"openai/whisper-1", b"whisper-1")
    decision = coord.end_attempt("r", 503, "via_upstream", None)
    assert not isinstance(decision, Retry | GiveUp)  # delivered as the provider said it: no failover
    missing = coord.begin_attempt("s", 1, req("/v1/audio/transcriptions", content_type=b"text/plain"), b"x")
    assert isinstance(missing, apierrors.ApiError) and missing.status == 400


def test_requests_without_a_model_go_to_the_named_or_default_provider() -> None:
    coord = coordinator()
    plan = coord.begin_attempt("r", 1, req("/v1/files", method="GET"), b"")
    assert isinstance(plan, AttemptPlan) and plan.target.key == "openai/whisper-1" and plan.body == b""
    plan = coord.begin_attempt("s", 1, req("/v1/files", method="GET", model_header="anthropic/claude"), b"")
    assert isinstance(plan, AttemptPlan) and plan.target.key == "anthropic/claude"
    assert find_endpoint("GET", "/v1/files/file-abc/content").body == "none"
    assert find_endpoint("DELETE", "/v1/responses/resp_1").body == "none"
    assert find_endpoint("GET", "/v1/models/openai/gpt-4o").body == "answered"


def test_exhausted_error_keeps_the_last_providers_own_error() -> None:
    coord = coordinator()
    plan = coord.begin_attempt("r", 1, req("/v1/messages"), b'{"model": "anthropic/primary", "max_tokens": 5, '
                                                           b'"messages": [{"role": "user", "content": "x"}]}')
    state = plan.state
    state.attempts[-1].error = ProviderError("overloaded_error", None, "Overloaded, try later")
    error = exhausted(state, GiveUp(529, "max_attempts"))
    assert "Overloaded, try later" in error.message
    assert error.details["provider_error"] == {"status": None, "type": "overloaded_error",
                                               "message": "Overloaded, try later"}
    assert error.details["attempts"][0]["provider_error"]["type"] == "overloaded_error"
    payload = error.payload(Api.ANTHROPIC)
    assert payload["type"] == "error" and payload["error"]["type"] == "overloaded_error"


def test_lint_warns_about_fallbacks_that_can_never_serve() -> None:
    loaded = parse_config("""
model_providers:
  - model: a/chat
    base_url: http://127.0.0.1:1
    retry_policy: {fallback_models: [b/text-embedding-3-small]}
  - {model: b/text-embedding-3-small, base_url: "http://127.0.0.1:2"}
  - model: c/text-embedding-3-large
    base_url: http://127.0.0.1:3
    provider_interface: openai
    retry_policy: {fallback_models: [d/embed-english]}
  - {model: d/embed-english, base_url: "http://127.0.0.1:4", provider_interface: claude}
""", {})
    warnings = [str(w) for w in loaded.warnings]
    assert any("fallback_models[0]: 'b/text-embedding-3-small' serves embeddings" in w for w in warnings)
    assert any("'d/embed-english' speaks the anthropic API and embeddings requests cannot be translated" in w
               for w in warnings)


# ---- the commit point of a stream


ANTHROPIC_OK = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"m"}}\n\n'
                b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
                b'"content_block":{"type":"text","text":""}}\n\n'
                b'event: ping\ndata: {"type":"ping"}\n\n'
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                b'"delta":{"type":"text_delta","text":"Hi"}}\n\n')
OPENAI_OK = (b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
             b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')


@pytest.mark.parametrize("stream, verdict", [
    (ANTHROPIC_OK, Content()),
    (OPENAI_OK, Content()),
    (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n',
     StreamError(529, "overloaded_error", None, "Overloaded")),
    (b'data: {"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}\n\n',
     StreamError(429, "requests", "rate_limit_exceeded", "slow down")),
    (b'data: [DONE]\n\n', Content()),
], ids=["anthropic", "openai", "anthropic-error", "openai-error", "done"])
def test_commit_point_whole_and_split_at_every_byte(stream: bytes, verdict: object) -> None:
    assert CommitPeek().feed(stream) == verdict
    peek = CommitPeek()
    found = None
    for i in range(len(stream)):
        found = peek.feed(stream[i:i + 1])
        if found is not None:
            break
    assert found == verdict


def test_preamble_alone_is_not_a_commit() -> None:
    peek = CommitPeek()
    assert peek.feed(ANTHROPIC_OK.split(b"event: content_block_delta")[0]) is None
    assert peek.feed(b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n') is None
    assert peek.feed(b": keep-alive\n\n") is None


# ---- one home for every error body Envoy renders


def _rendered_errors(node: object, found: list[dict]) -> None:
    if isinstance(node, dict):
        if "json_format" in node and isinstance(node["json_format"], dict):
            found.append(node["json_format"])
        inline = node.get("inline_string")
        if isinstance(inline, str) and inline.startswith("{"):
            found.append(json.loads(inline))
        for value in node.values():
            _rendered_errors(value, found)
    elif isinstance(node, list):
        for value in node:
            _rendered_errors(value, found)


def test_every_error_body_in_the_rendered_config_comes_from_apierrors() -> None:
    bootstrap = render_envoy(gateway(), Sockets.in_dir("/r", 1), "/logs")
    found: list[dict] = []
    _rendered_errors(bootstrap, found)
    constructors = [f for name, f in inspect.getmembers(apierrors, inspect.isfunction)
                    if name in apierrors.__all__ and name not in ("anthropic_type", "api_for_path")]
    known_types = {f(*["x"] * len(inspect.signature(f).parameters)).type if f is not apierrors.request_timeout
                   and f is not apierrors.request_too_large else f(1).type for f in constructors}
    errors = [b for b in found if "error" in b]
    assert len(errors) >= 12
    for body in errors:
        inner = body["error"]
        if body.get("type") == "error":  # Anthropic's shape
            assert inner["type"] == apierrors.anthropic_type(500) or inner["type"] in {
                apierrors.anthropic_type(s) for s in (400, 404, 408, 413, 502, 503)}
            assert inner["sidestep_type"] in known_types, body
        else:
            assert inner["type"] in known_types, body
        assert inner["message"], body


def test_a_later_commit_point_holds_more_content_events() -> None:
    peek = CommitPeek(events=3)
    assert peek.feed(OPENAI_OK) is None  # the role preamble and one content event
    assert peek.feed(b'data: {"choices":[{"delta":{"content":" there"}}]}\n\n') is None
    assert peek.feed(b'data: {"choices":[{"delta":{"content":"!"}}]}\n\n') == Content()
    short = CommitPeek(events=3)  # an answer that ends before the commit point is delivered
    assert short.feed(OPENAI_OK + b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n') == Content()
    assert CommitPeek(events=3).feed(ANTHROPIC_OK + b'event: message_stop\ndata: {"type":"message_stop"}\n\n') \
        == Content()

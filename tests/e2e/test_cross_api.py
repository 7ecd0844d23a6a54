"""Failover across API families, end to end, driven by the official SDKs.

OpenAI Chat Completions ⇄ Anthropic Messages: the request, the JSON response, the SSE stream (chunk
by chunk) and errors are translated when a request fails over to a provider of the other family.
The mock providers (tests/wiremock.py) speak only their own API and refuse anything else the way the
real API would, so a translation that leaks the wrong shape fails here.

Also: candidate hygiene (kinds of model, passthrough keys), sidestep's errors in the caller's API
shape with `x-should-retry: false`, the exhausted error carrying the last provider's own error,
Plano compatibility (an entry without provider_interface is never translated), requests that never
fail over (multipart, no model, stored state) and untranslatable requests.

One stack (`stack`) serves everything but the default-model requests, which need a config with a
`default` entry (`files_stack`). Every test scripts the mocks it uses; the others answer normally.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import openai
import pytest

from controlplane.rundir import free_port
from tests.e2e.conftest import Stack, start_stack
from tests.wiremock import (
    AnthropicMessagesMock,
    AnyPathMock,
    OpenAIChatMock,
    Reply,
    Seen,
    ToolCall,
    multipart_parts,
    serving,
)

pytestmark = pytest.mark.e2e

OA_KEY = "sk-oa-primary-key-0123456789abcdef"
OB_KEY = "sk-ob-fallback-key-0123456789abcdef"
AN_KEY = "sk-ant-an-primary-key-0123456789ab"
AM_KEY = "sk-ant-am-fallback-key-0123456789ab"
EMB_KEY = "sk-emb-key-0123456789abcdef"
PLANO_KEY = "sk-ant-plano-key-0123456789abcd"
G_KEY = "sk-g-files-key-0123456789abcdef"
CLIENT_KEY = "sk-client-own-provider-key-4242-zz"  # what the SDKs send as their api_key

CONFIG = """
version: v0.3.0
listeners:
  - type: model
    name: llm
    address: 127.0.0.1
    port: {port}
    attempt_timeout: 10s
model_providers:
  # first in config order: what an implicit (config-order) failover of a chat request must skip
  - model: emb/text-embedding-3-small     # an embeddings model: never a chat candidate
    base_url: "{emb}"
    access_key: {emb_key}
  - model: pt/gpt-own                     # the client's own key: only when listed by name
    base_url: "{pt}"
    provider_interface: openai
    passthrough_auth: true
  # the fallbacks
  - model: ob/gpt-4o-mini
    base_url: "{ob}"
    provider_interface: openai
    access_key: {ob_key}
  - model: am/claude-haiku
    base_url: "{am}"
    provider_interface: claude
    access_key: {am_key}
  # OpenAI primary -> Anthropic fallback
  - model: oa/gpt-4o
    base_url: "{oa}"
    provider_interface: openai
    access_key: {oa_key}
    retry_policy:
      fallback_models: [am/claude-haiku]
      default_max_attempts: 1
  # Anthropic primary -> OpenAI fallback
  - model: an/claude-sonnet
    base_url: "{an}"
    provider_interface: anthropic
    access_key: {an_key}
    retry_policy:
      fallback_models: [ob/gpt-4o-mini]
      default_max_attempts: 1
  # exhaustion: oa -> am (listed) -> ob (next in config order), then give up
  - model: oa/gpt-4.1
    base_url: "{oa}"
    provider_interface: openai
    access_key: {oa_key}
    retry_policy:
      fallback_models: [am/claude-haiku]
      on_status_codes:
        - codes: [429, 503, 529]
          strategy: different_provider
          max_attempts: 2
  # exhaustion: an -> ob, then give up
  - model: an/claude-opus
    base_url: "{an}"
    provider_interface: claude
    access_key: {an_key}
    retry_policy:
      fallback_models: [ob/gpt-4o-mini]
      on_status_codes:
        - codes: [429, 503, 529]
          strategy: different_provider
          max_attempts: 1
  # across the APIs twice: an -> ob -> am
  - model: an/claude-3x
    base_url: "{an}"
    provider_interface: claude
    access_key: {an_key}
    retry_policy:
      fallback_models: [ob/gpt-4o-mini, am/claude-haiku]
      on_status_codes:
        - codes: [429, 503, 529]
          strategy: different_provider
          max_attempts: 2
  # hygiene: no fallback_models; config order starts with emb (embeddings) and pt (passthrough)
  - model: hy/gpt-4o
    base_url: "{oa}"
    provider_interface: openai
    access_key: {oa_key}
    retry_policy:
      default_max_attempts: 1
  # a passthrough primary failing over to an Anthropic model with its own key
  - model: pp/gpt-mine
    base_url: "{pt}"
    provider_interface: openai
    passthrough_auth: true
    retry_policy:
      fallback_models: [am/claude-haiku]
      default_max_attempts: 1
  # an explicitly listed passthrough fallback
  - model: ox/gpt-4o
    base_url: "{oa}"
    provider_interface: openai
    access_key: {oa_key}
    retry_policy:
      fallback_models: [pt/gpt-own]
      default_max_attempts: 1
  # untranslatable: the only other model of provider `ua` speaks Anthropic
  - model: ua/gpt-4o
    base_url: "{oa}"
    provider_interface: openai
    access_key: {oa_key}
    retry_policy:
      default_strategy: same_provider
      default_max_attempts: 1
  - model: ua/claude-haiku
    base_url: "{am}"
    provider_interface: claude
    access_key: {am_key}
  # requests that never fail over: multipart, stored state
  - model: g1/whisper-1
    base_url: "{g1}"
    provider_interface: openai
    access_key: {g_key}
    retry_policy:
      default_max_attempts: 2
  - model: g2/whisper-large
    base_url: "{g2}"
    provider_interface: openai
    access_key: {g_key}
  - model: r1/gpt-4o-resp
    base_url: "{g3}"
    provider_interface: openai
    access_key: {g_key}
    retry_policy:
      fallback_models: [r2/gpt-4o-resp]
      default_max_attempts: 2
  - model: r2/gpt-4o-resp
    base_url: "{g4}"
    provider_interface: openai
    access_key: {g_key}
  # Plano: no provider_interface, a local base_url: speaks whatever the client speaks, untranslated
  - model: anthropic/claude-plano
    base_url: "{plano}"
    access_key: {plano_key}
"""

FILES_CONFIG = """
version: v0.3.0
listeners:
  - type: model
    port: {port}
    attempt_timeout: 10s
model_providers:
  - model: d1/gpt-4o-mini
    base_url: "{f1}"
    provider_interface: openai
    access_key: sk-d1-default-0123456789abcd
    default: true
    retry_policy:
      default_max_attempts: 2
  - model: d2/gpt-4o
    base_url: "{f2}"
    provider_interface: openai
    access_key: sk-d2-other-0123456789abcdef
"""


# ---- mocks and stacks


@pytest.fixture(scope="module")
def mocks() -> Iterator[dict[str, OpenAIChatMock | AnthropicMessagesMock | AnyPathMock]]:
    made = {
        "oa": OpenAIChatMock("oa"), "ob": OpenAIChatMock("ob"), "pt": OpenAIChatMock("pt"),
        "plano": OpenAIChatMock("plano", check_auth=False),
        "an": AnthropicMessagesMock("an"), "am": AnthropicMessagesMock("am"),
        "emb": AnyPathMock("emb"), "g1": AnyPathMock("g1"), "g2": AnyPathMock("g2"), "g3": AnyPathMock("g3"),
        "g4": AnyPathMock("g4"), "f1": AnyPathMock("f1"), "f2": AnyPathMock("f2"),
    }
    yield from serving(made)


@pytest.fixture(autouse=True)
def _reset_mocks(mocks) -> None:
    _reset_all(mocks)


@pytest.fixture(scope="module")
def stack(mocks, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    config = CONFIG.format(port=port, **{name: m.url for name, m in mocks.items()}, oa_key=OA_KEY, ob_key=OB_KEY,
                           an_key=AN_KEY, am_key=AM_KEY, emb_key=EMB_KEY, plano_key=PLANO_KEY, g_key=G_KEY)
    stack = start_stack(tmp_path_factory.mktemp("crossapi"), config, port, "--workers", "1")
    yield stack
    stack.client.close()
    stack.sidestep("down", check=False)


@pytest.fixture(scope="module")
def files_stack(mocks, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    port = free_port()
    config = FILES_CONFIG.format(port=port, f1=mocks["f1"].url, f2=mocks["f2"].url)
    stack = start_stack(tmp_path_factory.mktemp("crossapi-files"), config, port, "--workers", "1")
    yield stack
    stack.client.close()
    stack.sidestep("down", check=False)


# ---- helpers


def _oai(stack: Stack, *, key: str = CLIENT_KEY, **kwargs: object) -> openai.OpenAI:
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, timeout=30, **kwargs)


def _ant(stack: Stack, *, key: str = CLIENT_KEY, **kwargs: object) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=stack.url, api_key=key, timeout=30, **kwargs)


def _reset_all(mocks) -> None:
    for mock in mocks.values():
        mock.script()


def _counts(mocks) -> dict[str, int]:
    return {name: len(m.requests) for name, m in mocks.items() if m.requests}


def _only(mocks, **expected: int) -> None:
    """Exactly these mocks were called, this many times each."""
    assert _counts(mocks) == expected, f"provider calls: {_counts(mocks)}, expected {expected}"


def _valid(mocks) -> None:
    """Every request the gateway sent was one its provider's real API accepts."""
    rejected = {name: m.rejections for name, m in mocks.items() if m.rejections}
    assert not rejected, f"providers refused what sidestep sent them: {rejected}"


def _client_key_only_at(mocks, *allowed: str) -> None:
    """The client's own key reached no provider but the `allowed` ones."""
    for name, mock in mocks.items():
        if name in allowed:
            continue
        for seen in mock.requests:
            for header, value in seen.headers.items():
                assert CLIENT_KEY not in value, f"the client's key reached {name} in {header}"


def _openai_auth(seen: Seen, key: str) -> None:
    assert seen.headers.get("authorization") == f"Bearer {key}", seen.headers
    assert "x-api-key" not in seen.headers, seen.headers


def _anthropic_request(seen: Seen, key: str) -> dict:
    """A valid Anthropic Messages request with the provider's own key, Anthropic's way; its body."""
    assert seen.method == "POST" and seen.path == "/v1/messages", seen.path
    assert seen.rejected is None, seen.rejected
    assert seen.headers.get("x-api-key") == key, seen.headers
    assert seen.headers.get("anthropic-version"), seen.headers
    assert "authorization" not in seen.headers, seen.headers
    body = seen.json
    assert isinstance(body.get("max_tokens"), int) and body["messages"], body
    assert all(m["role"] in ("user", "assistant") for m in body["messages"]), body
    return body


def _openai_request(seen: Seen, key: str) -> dict:
    assert seen.method == "POST" and seen.path == "/v1/chat/completions", seen.path
    assert seen.rejected is None, seen.rejected
    _openai_auth(seen, key)
    return seen.json


TOOL_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"},
                                                "unit": {"type": "string", "enum": ["c", "f"]}},
               "required": ["city"]}
OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                  "parameters": TOOL_SCHEMA}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "description": "Weather for a city", "input_schema": TOOL_SCHEMA}]


# ==== 1. OpenAI client, OpenAI primary 429 -> Anthropic-only fallback


def test_openai_sdk_fails_over_to_anthropic_non_streamed(stack, mocks) -> None:
    mocks["oa"].script(Reply(429, message="oa: Rate limit reached for gpt-4o"))
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]
    raw = _oai(stack).chat.completions.with_raw_response.create(model="oa/gpt-4o", messages=messages,
                                                                temperature=0.5, user="end-user-7")
    completion = raw.parse()
    assert raw.headers["x-sidestep-model"] == "am/claude-haiku"
    assert raw.headers["x-sidestep-attempts"] == "2"
    assert raw.headers["content-type"].startswith("application/json")
    assert completion.object == "chat.completion"
    assert completion.id == "msg_am_1"  # the provider's id, verbatim
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello from am! How can I help?"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == \
        (12, 7, 19)
    _only(mocks, oa=1, am=1)
    # the OpenAI primary got the client's body, only the model rewritten, with its own key
    primary = mocks["oa"].requests[0]
    assert _openai_request(primary, OA_KEY) == {"messages": messages, "model": "gpt-4o", "temperature": 0.5,
                                                "user": "end-user-7"}
    # the Anthropic fallback got a valid Messages request
    body = _anthropic_request(mocks["am"].requests[0], AM_KEY)
    assert body["model"] == "claude-haiku"
    assert body["system"] == "You are terse."
    assert body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert body["max_tokens"] == 4096  # the documented default when the client gave none
    assert body["temperature"] == 0.5
    assert body.get("metadata") == {"user_id": "end-user-7"}
    assert not body.get("stream")
    _valid(mocks)
    _client_key_only_at(mocks)


def test_openai_sdk_max_tokens_reaches_anthropic(stack, mocks) -> None:
    mocks["oa"].script(Reply(429))
    _oai(stack).chat.completions.create(model="oa/gpt-4o", max_completion_tokens=123, stop="END",
                                        messages=[{"role": "developer", "content": "Rule one."},
                                                  {"role": "user", "content": "Hi"}])
    body = _anthropic_request(mocks["am"].requests[0], AM_KEY)
    assert body["max_tokens"] == 123
    assert body["stop_sequences"] == ["END"]
    assert body["system"] == "Rule one."
    _valid(mocks)


def test_openai_sdk_fails_over_to_anthropic_streamed_chunk_by_chunk(stack, mocks) -> None:
    text = "Streaming across APIs: ünïcode ✓, 東京, and more words to split."
    mocks["oa"].script(Reply(429))
    mocks["am"].script(Reply(text=text, interval=0.25))
    started = time.monotonic()
    raw = _oai(stack).chat.completions.with_raw_response.create(
        model="oa/gpt-4o", messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Go"}],
        stream=True, stream_options={"include_usage": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-sidestep-model"] == "am/claude-haiku"
    chunks, arrivals = [], []
    for chunk in raw.parse():
        chunks.append(chunk)
        arrivals.append(time.monotonic() - started)
    content = [(c.choices[0].delta.content, t) for c, t in zip(chunks, arrivals, strict=True)
               if c.choices and c.choices[0].delta.content]
    assert "".join(piece for piece, _ in content) == text
    assert len(content) >= 3, "the text should come in several deltas"
    # chunk by chunk: the first text arrived well before the stream ended (the provider paces its events)
    assert content[0][1] < arrivals[-1] - 0.5, (content[0][1], arrivals[-1])
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.id for c in chunks} == {"msg_am_1"}
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (12, 7)
    body = _anthropic_request(mocks["am"].requests[0], AM_KEY)
    assert body["stream"] is True
    assert body["system"] == "Be kind."
    assert body["max_tokens"] == 4096
    assert mocks["oa"].requests[0].json["stream_options"] == {"include_usage": True}  # the original body
    _only(mocks, oa=1, am=1)
    _valid(mocks)


def test_openai_sdk_streamed_without_usage_gets_no_usage_chunk(stack, mocks) -> None:
    mocks["oa"].script(Reply(429))
    chunks = list(_oai(stack).chat.completions.create(model="oa/gpt-4o", stream=True,
                                                      messages=[{"role": "user", "content": "Go"}]))
    assert all(c.choices for c in chunks), "a usage chunk the client did not ask for"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from am! How can I help?"
    _valid(mocks)


def test_openai_sdk_streamed_tool_call_from_anthropic(stack, mocks) -> None:
    arguments = {"city": "Paris", "unit": "c", "note": "naïve \"quoted\" {braces}"}
    mocks["oa"].script(Reply(429))
    mocks["am"].script(Reply(text="Let me look that up.", tool_calls=(
        ToolCall("get_weather", arguments, id="toolu_01A"),)))
    stream = _oai(stack).chat.completions.create(
        model="oa/gpt-4o", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=OPENAI_TOOLS,
        tool_choice="auto", stream=True)
    calls: dict[int, dict] = {}
    text, finishes = "", []
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for call in delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                slot["id"] = call.id
            if call.function and call.function.name:
                slot["name"] = call.function.name
            if call.function and call.function.arguments:
                slot["arguments"] += call.function.arguments
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert text == "Let me look that up."
    assert list(calls) == [0]
    assert calls[0]["id"] == "toolu_01A" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == arguments
    assert finishes == ["tool_calls"]
    body = _anthropic_request(mocks["am"].requests[0], AM_KEY)
    assert body["tools"] == ANTHROPIC_TOOLS
    assert body["tool_choice"] == {"type": "auto"}
    # and the SDK's own stream helper assembles the same call
    with _oai(stack).chat.completions.stream(model="oa/gpt-4o", tools=OPENAI_TOOLS,
                                             messages=[{"role": "user", "content": "Weather in Paris?"}]) as helper:
        final = helper.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == ("toolu_01A", "get_weather",
                                                                                  arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    _valid(mocks)


def test_openai_sdk_tool_round_trip_non_streamed(stack, mocks) -> None:
    mocks["oa"].script(Reply(429))
    mocks["am"].script(Reply(tool_calls=(ToolCall("get_weather", {"city": "Oslo"}, id="toolu_02B"),)))
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Rome, then Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C sunny"},
    ]
    completion = _oai(stack).chat.completions.create(model="oa/gpt-4o", messages=messages, tools=OPENAI_TOOLS)
    message = completion.choices[0].message
    assert message.content is None
    assert completion.choices[0].finish_reason == "tool_calls"
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("toolu_02B", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    body = _anthropic_request(mocks["am"].requests[0], AM_KEY)
    assert body["system"] == "Use tools."
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Rome, then Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather",
                                           "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "21C sunny"}]},
    ]
    _valid(mocks)


# ==== 2. Anthropic client, Anthropic primary 529 -> OpenAI-only fallback


def test_anthropic_sdk_fails_over_to_openai_non_streamed(stack, mocks) -> None:
    mocks["an"].script(Reply(529, message="an: Overloaded"))
    raw = _ant(stack).messages.with_raw_response.create(
        model="an/claude-sonnet", max_tokens=300, system="Be brief.", stop_sequences=["END"],
        extra_body={"temperature": 0.3}, messages=[{"role": "user", "content": "Hi"}])
    message = raw.parse()
    assert raw.headers["x-sidestep-model"] == "ob/gpt-4o-mini"
    assert raw.headers["x-sidestep-attempts"] == "2"
    assert message.type == "message" and message.role == "assistant"
    assert message.id == "chatcmpl-ob-1"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hello from ob! How can I help?"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 7)
    _only(mocks, an=1, ob=1)
    # the Anthropic primary got the client's body with its own key
    original = _anthropic_request(mocks["an"].requests[0], AN_KEY)
    assert original == {"max_tokens": 300, "messages": [{"role": "user", "content": "Hi"}], "model": "claude-sonnet",
                        "stop_sequences": ["END"], "system": "Be brief.", "temperature": 0.3}
    # the OpenAI fallback got a valid Chat Completions request
    body = _openai_request(mocks["ob"].requests[0], OB_KEY)
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["max_completion_tokens"] == 300
    assert body["stop"] == ["END"]
    assert body["temperature"] == 0.3
    assert not body.get("stream")
    assert "anthropic-version" not in mocks["ob"].requests[0].headers
    _valid(mocks)
    _client_key_only_at(mocks)


def test_anthropic_sdk_fails_over_to_openai_streamed(stack, mocks) -> None:
    text = "Streamed from OpenAI to an Anthropic client: ✓ ünïcode."
    mocks["an"].script(Reply(529))
    mocks["ob"].script(Reply(text=text, interval=0.2))
    started = time.monotonic()
    arrivals = []
    with _ant(stack).messages.stream(model="an/claude-sonnet", max_tokens=200,
                                     messages=[{"role": "user", "content": "Stream please"}]) as stream:
        pieces = []
        for piece in stream.text_stream:
            pieces.append(piece)
            arrivals.append(time.monotonic() - started)
        final = stream.get_final_message()
    ended = time.monotonic() - started
    assert "".join(pieces) == text
    assert len(pieces) >= 3
    assert arrivals[0] < ended - 0.4, (arrivals, ended)  # not buffered whole
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 7
    assert final.usage.input_tokens == 12
    body = _openai_request(mocks["ob"].requests[0], OB_KEY)
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 200
    _only(mocks, an=1, ob=1)
    _valid(mocks)


def test_anthropic_sdk_tools_from_openai_fallback(stack, mocks) -> None:
    arguments = {"city": "Tokyo", "unit": "c"}
    mocks["an"].script(Reply(529))
    mocks["ob"].script(Reply(text="Checking.", tool_calls=(ToolCall("get_weather", arguments, id="call_abc"),)))
    history = [
        {"role": "user", "content": "Weather in Rome and Tokyo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_r", "name": "get_weather",
                                           "input": {"city": "Rome"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_r", "content": "21C"}]},
    ]
    message = _ant(stack).messages.create(model="an/claude-sonnet", max_tokens=256, tools=ANTHROPIC_TOOLS,
                                          tool_choice={"type": "auto"}, messages=history)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == "Checking."
    block = message.content[1]
    assert (block.id, block.name, block.input) == ("call_abc", "get_weather", arguments)
    assert message.stop_reason == "tool_use"
    body = _openai_request(mocks["ob"].requests[0], OB_KEY)
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                               "description": "Weather for a city",
                                                               "parameters": TOOL_SCHEMA}}]
    assert body["tool_choice"] == "auto"
    assert body["messages"][0] == {"role": "user", "content": "Weather in Rome and Tokyo?"}
    assert body["messages"][1]["role"] == "assistant"
    assert body["messages"][1]["tool_calls"][0]["id"] == "toolu_r"
    assert json.loads(body["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "toolu_r", "content": "21C"}
    # streamed: the tool input reassembles
    with _ant(stack).messages.stream(model="an/claude-sonnet", max_tokens=256, tools=ANTHROPIC_TOOLS,
                                     messages=[{"role": "user", "content": "Weather in Tokyo?"}]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert (final.content[1].id, final.content[1].name, final.content[1].input) == ("call_abc", "get_weather",
                                                                                    arguments)
    assert final.stop_reason == "tool_use"
    _valid(mocks)


def test_requested_model_of_the_other_api_is_translated_without_a_failover(stack, mocks) -> None:
    completion = _oai(stack).chat.completions.create(model="am/claude-haiku", max_tokens=50,
                                                     messages=[{"role": "user", "content": "direct"}])
    assert completion.choices[0].message.content == "Hello from am! How can I help?"
    assert _anthropic_request(mocks["am"].requests[0], AM_KEY)["max_tokens"] == 50
    message = _ant(stack).messages.create(model="ob/gpt-4o-mini", max_tokens=50,
                                          messages=[{"role": "user", "content": "direct"}])
    assert message.content[0].text == "Hello from ob! How can I help?"
    assert _openai_request(mocks["ob"].requests[0], OB_KEY)["max_completion_tokens"] == 50
    _only(mocks, am=1, ob=1)
    _valid(mocks)
    _client_key_only_at(mocks)


# ==== 3. exhausted: the SDKs' own retries must not multiply the failover


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("am_status", "last_status", "error_class"), [
    (529, 429, openai.RateLimitError),
    (429, 503, openai.InternalServerError),
], ids=["last-429", "last-503"])
def test_exhausted_openai_sdk_default_retries(stack, mocks, stream, am_status, last_status, error_class) -> None:
    last_words = f"ob: the last provider's own words ({last_status})"
    mocks["oa"].script(Reply(429, message="oa: Rate limit reached for gpt-4.1"))
    mocks["am"].script(Reply(am_status, message=f"am: anthropic says {am_status}"))
    mocks["ob"].script(Reply(last_status, message=last_words))
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=CLIENT_KEY, timeout=30)  # max_retries: 2
    assert client.max_retries == 2
    started = time.monotonic()
    with pytest.raises(error_class) as info:
        client.chat.completions.create(model="oa/gpt-4.1", messages=[{"role": "user", "content": "hi"}],
                                       stream=stream)
    assert time.monotonic() - started < 5
    # the policy allows 2 retries: 3 attempts, once each; not 3x by the SDK's own retries
    _only(mocks, oa=1, am=1, ob=1)
    error = info.value
    assert error.status_code == last_status
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-sidestep-attempts"] == "3"
    # OpenAI's shape on /v1/chat/completions, whichever API the attempts before the last spoke
    assert set(error.response.json()) == {"error"}, error.response.text
    body = error.body  # the openai SDK gives the "error" object
    assert body["type"] == "retry_exhausted"
    assert body["code"] == "max_attempts"
    assert body["total_attempts"] == 3
    assert [a["model"] for a in body["attempts"]] == ["oa/gpt-4.1", "am/claude-haiku", "ob/gpt-4o-mini"]
    assert [a["status"] for a in body["attempts"]] == [429, am_status, last_status]
    assert last_words in body["message"]
    assert last_words in str(error)
    assert body["provider_error"]["message"] == last_words
    assert body["provider_error"]["status"] == last_status
    assert body["attempts"][1]["provider_error"]["message"] == f"am: anthropic says {am_status}"
    _valid(mocks)


@pytest.mark.parametrize(("an_status", "last_status", "error_class"), [
    (429, 503, anthropic.InternalServerError),
    (529, 429, anthropic.RateLimitError),
], ids=["last-503", "last-429"])
def test_exhausted_anthropic_sdk_default_retries(stack, mocks, an_status, last_status, error_class) -> None:
    last_words = f"ob: the last provider's own words ({last_status})"
    mocks["an"].script(Reply(an_status, message=f"an: anthropic says {an_status}"))
    mocks["ob"].script(Reply(last_status, message=last_words))
    client = anthropic.Anthropic(base_url=stack.url, api_key=CLIENT_KEY, timeout=30)  # max_retries: 2
    assert client.max_retries == 2
    started = time.monotonic()
    with pytest.raises(error_class) as info:
        client.messages.create(model="an/claude-opus", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 5
    _only(mocks, an=1, ob=1)
    error = info.value
    assert error.status_code == last_status
    assert error.response.headers["x-should-retry"] == "false"
    body = error.body
    assert body["type"] == "error"  # Anthropic's shape
    inner = body["error"]
    assert inner["type"] == ("rate_limit_error" if last_status == 429 else inner["type"])
    assert inner["type"] in ("rate_limit_error", "api_error", "overloaded_error")
    assert inner["sidestep_type"] == "retry_exhausted"
    assert last_words in inner["message"]
    assert last_words in str(error)
    assert inner["provider_error"]["message"] == last_words
    assert inner["provider_error"]["status"] == last_status
    assert [a["model"] for a in inner["attempts"]] == ["an/claude-opus", "ob/gpt-4o-mini"]
    _valid(mocks)


def test_exhausted_anthropic_sdk_after_an_openai_attempt_is_anthropic_shaped(stack, mocks) -> None:
    """an -> ob -> am: the last attempt follows one to the other API."""
    mocks["an"].script(Reply(529))
    mocks["ob"].script(Reply(429))
    mocks["am"].script(Reply(429, message="am: the last words"))
    with pytest.raises(anthropic.RateLimitError) as info:
        anthropic.Anthropic(base_url=stack.url, api_key=CLIENT_KEY, timeout=30).messages.create(
            model="an/claude-3x", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    _only(mocks, an=1, ob=1, am=1)
    error = info.value
    assert error.response.headers["x-should-retry"] == "false"
    assert error.body.get("type") == "error", error.response.text  # Anthropic's shape on /v1/messages
    assert error.body["error"]["type"] == "rate_limit_error"
    assert "am: the last words" in error.body["error"]["message"]
    assert error.body["error"]["provider_error"]["message"] == "am: the last words"


def test_back_to_the_clients_api_after_a_translated_attempt(stack, mocks) -> None:
    """oa -> am -> ob: the third attempt gets the client's own body, path and OpenAI auth, untranslated."""
    mocks["oa"].script(Reply(429))
    mocks["am"].script(Reply(529))
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "three"}]
    raw = _oai(stack).chat.completions.with_raw_response.create(model="oa/gpt-4.1", messages=messages, seed=3)
    assert raw.headers["x-sidestep-model"] == "ob/gpt-4o-mini"
    assert raw.headers["x-sidestep-attempts"] == "3"
    completion = raw.parse()
    assert completion.id == "chatcmpl-ob-1"  # the provider's own body
    assert completion.choices[0].message.content == "Hello from ob! How can I help?"
    seen = mocks["ob"].requests[0]
    assert _openai_request(seen, OB_KEY) == {"messages": messages, "model": "gpt-4o-mini", "seed": 3}
    assert "anthropic-version" not in seen.headers
    _only(mocks, oa=1, am=1, ob=1)
    _valid(mocks)
    # and the other way: an -> ob -> am
    _reset_all(mocks)
    mocks["an"].script(Reply(529))
    mocks["ob"].script(Reply(429))
    message = _ant(stack).messages.create(model="an/claude-3x", max_tokens=64, system="S",
                                          messages=[{"role": "user", "content": "three"}])
    assert message.id == "msg_am_1"
    assert message.content[0].text == "Hello from am! How can I help?"
    body = _anthropic_request(mocks["am"].requests[0], AM_KEY)
    assert body == {"max_tokens": 64, "messages": [{"role": "user", "content": "three"}], "model": "claude-haiku",
                    "system": "S"}
    assert "stream_options" not in body
    _only(mocks, an=1, ob=1, am=1)
    _valid(mocks)
    _client_key_only_at(mocks)


# ==== 4. errors in the caller's API


def test_unknown_model_is_anthropic_shaped_on_messages(stack, mocks) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        _ant(stack).messages.create(model="nope/claude-9", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    body = info.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "nope/claude-9" in body["error"]["message"]
    assert info.value.response.headers["x-should-retry"] == "false"
    # the same mistake on the OpenAI API is OpenAI-shaped
    with pytest.raises(openai.NotFoundError) as oinfo:
        _oai(stack).chat.completions.create(model="nope/gpt-9", messages=[{"role": "user", "content": "x"}])
    assert oinfo.value.body["type"] == "model_not_found"
    _only(mocks)


def test_anthropic_request_an_openai_model_cannot_carry_is_400_naming_the_field(stack, mocks) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        _ant(stack).messages.create(model="ob/gpt-4o-mini", max_tokens=10, extra_body={"top_k": 5},
                                    messages=[{"role": "user", "content": "x"}])
    body = info.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "top_k" in body["error"]["message"]
    _only(mocks)


def test_anthropic_error_from_the_fallback_reaches_an_openai_client_in_openai_shape(stack, mocks) -> None:
    mocks["oa"].script(Reply(429))
    mocks["am"].script(Reply(400, message="am: messages.0.content: prompt is too long"))
    with pytest.raises(openai.BadRequestError) as info:
        _oai(stack).chat.completions.create(model="oa/gpt-4o", messages=[{"role": "user", "content": "x"}])
    error = info.value
    assert error.body["message"] == "am: messages.0.content: prompt is too long"
    assert error.body["type"] == "invalid_request_error"
    assert error.response.headers["x-should-retry"] == "false"
    assert error.response.headers["x-sidestep-model"] == "am/claude-haiku"
    assert "request_id" not in error.response.text
    _only(mocks, oa=1, am=1)


def test_openai_error_from_the_fallback_reaches_an_anthropic_client_in_anthropic_shape(stack, mocks) -> None:
    mocks["an"].script(Reply(529))
    mocks["ob"].script(Reply(400, message="ob: Invalid 'messages[0].content': string too long",
                             error_code="string_above_max_length"))
    with pytest.raises(anthropic.BadRequestError) as info:
        _ant(stack).messages.create(model="an/claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    body = info.value.body
    assert body == {"type": "error", "error": {"type": "invalid_request_error",
                                               "message": "ob: Invalid 'messages[0].content': string too long"}}
    assert info.value.response.headers["x-should-retry"] == "false"
    _only(mocks, an=1, ob=1)


# ==== 5. candidate hygiene


def test_chat_failover_skips_embeddings_and_implicit_passthrough_entries(stack, mocks) -> None:
    mocks["oa"].script(Reply(429))
    raw = _oai(stack).chat.completions.with_raw_response.create(model="hy/gpt-4o",
                                                                messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-sidestep-model"] == "ob/gpt-4o-mini"
    assert raw.parse().choices[0].message.content == "Hello from ob! How can I help?"
    _only(mocks, oa=1, ob=1)  # never emb (embeddings) nor pt (passthrough, not listed)
    _client_key_only_at(mocks)


def test_passthrough_primary_key_never_reaches_the_fallback(stack, mocks) -> None:
    mocks["pt"].script(Reply(429))
    completion = _oai(stack).chat.completions.create(model="pp/gpt-mine", messages=[{"role": "user", "content": "x"}])
    assert completion.choices[0].message.content == "Hello from am! How can I help?"
    _only(mocks, pt=1, am=1)
    assert mocks["pt"].requests[0].headers["authorization"] == f"Bearer {CLIENT_KEY}"  # the model it chose
    _anthropic_request(mocks["am"].requests[0], AM_KEY)  # its own key, no authorization header
    _client_key_only_at(mocks, "pt")
    _valid(mocks)


def test_listed_passthrough_fallback_gets_the_clients_key(stack, mocks) -> None:
    mocks["oa"].script(Reply(429))
    raw = _oai(stack).chat.completions.with_raw_response.create(model="ox/gpt-4o",
                                                                messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-sidestep-model"] == "pt/gpt-own"
    _only(mocks, oa=1, pt=1)
    _openai_auth(mocks["oa"].requests[0], OA_KEY)
    _openai_auth(mocks["pt"].requests[0], CLIENT_KEY)
    _client_key_only_at(mocks, "pt")


# ==== 6. Plano compatibility: no provider_interface, a local base_url: never translated


def test_plano_entry_without_provider_interface_is_untranslated(stack, mocks) -> None:
    body = b'{"model": "anthropic/claude-plano",  "messages": [{"role": "user", "content": "hi"}], "seed":7 }'
    mocks["plano"].script(Reply(body={"id": "plano-raw-1", "object": "chat.completion", "choices": []}))
    response = stack.chat(body, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 200, response.text
    assert response.json() == {"id": "plano-raw-1", "object": "chat.completion", "choices": []}  # untouched
    seen = mocks["plano"].requests[0]
    assert seen.path == "/v1/chat/completions"  # the client's path
    assert seen.body == body.replace(b"anthropic/claude-plano", b"claude-plano")  # byte for byte
    assert seen.headers["x-api-key"] == PLANO_KEY  # authenticated as an Anthropic provider, as before
    assert seen.headers.get("anthropic-version")
    assert "authorization" not in seen.headers
    # through the SDK, with a stream
    mocks["plano"].script()
    chunks = list(_oai(stack).chat.completions.create(model="anthropic/claude-plano", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello from plano! How can I help?"
    assert {c.id for c in chunks} == {"chatcmpl-plano-1"}  # the provider's own chunks
    # an Anthropic client goes to the client's path too: no translation to Chat Completions
    mocks["plano"].script()
    with pytest.raises(anthropic.NotFoundError):
        _ant(stack).messages.create(model="anthropic/claude-plano", max_tokens=10,
                                    messages=[{"role": "user", "content": "hi"}])
    seen = mocks["plano"].requests[0]
    assert seen.path == "/v1/messages"
    assert seen.json == {"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "model": "claude-plano"}
    _only(mocks, plano=1)


# ==== 7. an error as the first event of a 200 stream


def test_openai_stream_whose_first_event_is_an_error_fails_over(stack, mocks) -> None:
    mocks["oa"].script(Reply(stream_error=True, message="oa: The server had an error while processing your request"))
    chunks = list(_oai(stack).chat.completions.create(model="oa/gpt-4o", stream=True,
                                                      messages=[{"role": "user", "content": "x"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Hello from am! How can I help?"
    _only(mocks, oa=1, am=1)


def test_anthropic_stream_whose_first_event_is_an_error_fails_over(stack, mocks) -> None:
    mocks["an"].script(Reply(stream_error=True))  # event: error, overloaded_error "Overloaded"
    with _ant(stack).messages.stream(model="an/claude-sonnet", max_tokens=50,
                                     messages=[{"role": "user", "content": "x"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "Hello from ob! How can I help?"
    _only(mocks, an=1, ob=1)


def test_stream_errors_everywhere_end_in_the_callers_shape_with_the_last_words(stack, mocks) -> None:
    mocks["oa"].script(Reply(stream_error=True, message="oa: stream broke"))
    mocks["am"].script(Reply(stream_error=True, message="am: Overloaded right now"))
    with pytest.raises(openai.APIStatusError) as info:
        list(_oai(stack).chat.completions.create(model="oa/gpt-4o", stream=True,
                                                 messages=[{"role": "user", "content": "x"}]))
    error = info.value
    assert error.status_code >= 500
    assert set(error.response.json()) == {"error"}, error.response.text
    assert "am: Overloaded right now" in error.body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    _only(mocks, oa=1, am=1)


# ==== 8. requests that never fail over


AUDIO = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\nmodel g1/whisper-1\r\n\r\n" + bytes(range(255, -1, -1))


def test_multipart_model_is_rewritten_and_file_bytes_unchanged(stack, mocks) -> None:
    mocks["g1"].script(Reply(body={"text": "hello audio"}))
    transcription = _oai(stack).audio.transcriptions.create(model="g1/whisper-1", language="en",
                                                            file=("speech.wav", AUDIO, "audio/wav"))
    assert transcription.text == "hello audio"
    _only(mocks, g1=1)
    seen = mocks["g1"].requests[0]
    assert seen.method == "POST" and seen.path == "/v1/audio/transcriptions"
    _openai_auth(seen, G_KEY)
    parts = {headers["content-disposition"].split('name="')[1].split('"')[0]: (headers, content)
             for headers, content in multipart_parts(seen)}
    file_headers, file_bytes = parts["file"]
    assert file_bytes == AUDIO
    assert 'filename="speech.wav"' in file_headers["content-disposition"]
    assert file_headers["content-type"] == "audio/wav"
    assert parts["language"][1] == b"en"
    assert int(seen.headers["content-length"]) == len(seen.body)
    assert parts["model"][1] == b"whisper-1"  # the form value, as text: no JSON quotes


def test_multipart_is_never_failed_over(stack, mocks) -> None:
    mocks["g1"].script(Reply(503, message="g1: busy"))
    with pytest.raises(openai.InternalServerError) as info:
        _oai(stack).audio.transcriptions.create(model="g1/whisper-1", file=("a.wav", b"RIFF....", "audio/wav"))
    assert "g1: busy" in str(info.value)
    _only(mocks, g1=1)  # never g2/whisper-large


def test_request_without_model_and_no_default_is_400(stack, mocks) -> None:
    response = stack.client.get(stack.url + "/v1/files")
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    _only(mocks)


def test_get_files_goes_to_the_default_provider_unchanged(files_stack, mocks) -> None:
    listing = {"object": "list", "data": [{"id": "file-abc", "object": "file", "bytes": 3, "created_at": 1,
                                          "filename": "a.jsonl", "purpose": "batch", "status": "processed"}],
               "has_more": False, "first_id": "file-abc", "last_id": "file-abc"}
    mocks["f1"].script(Reply(body=listing))
    page = _oai(files_stack).files.list(purpose="batch")
    assert [f.id for f in page.data] == ["file-abc"]
    _only(mocks, f1=1)
    seen = mocks["f1"].requests[0]
    assert seen.method == "GET"
    assert seen.path == "/v1/files?purpose=batch"
    assert seen.body == b""
    _openai_auth(seen, "sk-d1-default-0123456789abcd")
    _client_key_only_at(mocks)


def test_files_go_to_the_model_named_in_x_sidestep_model(files_stack, mocks) -> None:
    content = bytes(range(256)) + b'{"model": "d1/gpt-4o-mini"}'
    mocks["f2"].script(Reply(body=content, content_type="application/octet-stream"))
    response = files_stack.client.get(files_stack.url + "/v1/files/file-xyz/content",
                                      headers={"x-sidestep-model": "d2/gpt-4o",
                                               "authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 200
    assert response.content == content
    assert response.headers["x-sidestep-model"] == "d2/gpt-4o"
    _only(mocks, f2=1)
    seen = mocks["f2"].requests[0]
    assert (seen.method, seen.path) == ("GET", "/v1/files/file-xyz/content")
    _openai_auth(seen, "sk-d2-other-0123456789abcdef")
    assert not any(h.startswith("x-sidestep") for h in seen.headers)
    # DELETE too
    mocks["f2"].script(Reply(body={"id": "file-xyz", "object": "file", "deleted": True}))
    deleted = _oai(files_stack).files.delete("file-xyz", extra_headers={"x-sidestep-model": "d2/gpt-4o"})
    assert deleted.deleted is True
    assert (mocks["f2"].requests[0].method, mocks["f2"].requests[0].path) == ("DELETE", "/v1/files/file-xyz")


def test_files_are_never_failed_over(files_stack, mocks) -> None:
    mocks["f1"].script(Reply(503, message="f1: files backend down"))
    response = files_stack.client.get(files_stack.url + "/v1/files")
    assert response.status_code == 503
    assert "f1: files backend down" in response.text
    _only(mocks, f1=1)


def test_responses_fail_over_without_stored_state(stack, mocks) -> None:
    """The control for the next test: /v1/responses does fail over when nothing pins it."""
    mocks["g3"].script(Reply(429, message="g3: rate limited"))
    response = stack.chat({"model": "r1/gpt-4o-resp", "input": "hi"}, path="/v1/responses",
                          headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 200, response.text
    assert response.headers["x-sidestep-model"] == "r2/gpt-4o-resp"
    _only(mocks, g3=1, g4=1)
    assert mocks["g4"].requests[0].path == "/v1/responses"
    assert mocks["g4"].requests[0].json == {"model": "gpt-4o-resp", "input": "hi"}


def test_previous_response_id_never_fails_over_to_another_provider(stack, mocks) -> None:
    mocks["g3"].script(Reply(429, message="g3: rate limited for this conversation"))
    with pytest.raises(openai.RateLimitError) as info:
        _oai(stack).responses.create(model="r1/gpt-4o-resp", input="and then?", previous_response_id="resp_123")
    _only(mocks, g3=1)  # never g4: it does not know resp_123
    assert mocks["g3"].requests[0].json["previous_response_id"] == "resp_123"
    assert "g3: rate limited for this conversation" in str(info.value)
    assert info.value.response.headers.get("x-should-retry") == "false"


# ==== 9. untranslatable requests


@pytest.mark.parametrize("extra", [{"n": 2}, {"logprobs": True}], ids=["n", "logprobs"])
def test_untranslatable_request_skips_the_anthropic_fallback(stack, mocks, extra) -> None:
    """oa/gpt-4o lists am (Anthropic) first; the request cannot go there, so the next OpenAI model serves."""
    mocks["oa"].script(Reply(429))
    response = stack.chat({"model": "oa/gpt-4o", "messages": [{"role": "user", "content": "x"}], **extra},
                          headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert response.status_code == 200, response.text
    assert response.headers["x-sidestep-model"] == "ob/gpt-4o-mini"
    _only(mocks, oa=1, ob=1)  # am skipped
    assert {k: mocks["ob"].requests[0].json[k] for k in extra} == extra


@pytest.mark.parametrize("extra", [{"n": 2}, {"logprobs": True}], ids=["n", "logprobs"])
def test_untranslatable_request_with_only_an_anthropic_fallback_gets_the_primarys_error(stack, mocks, extra) -> None:
    mocks["oa"].script(Reply(429, message="oa: rate limited, nothing else fits"))
    with pytest.raises(openai.RateLimitError) as info:
        _oai(stack).chat.completions.create(model="ua/gpt-4o", messages=[{"role": "user", "content": "x"}], **extra)
    _only(mocks, oa=1)  # ua/claude-haiku (Anthropic) is never called
    message = str(info.value)
    assert "oa: rate limited, nothing else fits" in message or "translat" in message, message
    assert info.value.response.headers["x-should-retry"] == "false"
    # the control: a translatable request does fail over there
    mocks["oa"].script(Reply(429))
    completion = _oai(stack).chat.completions.create(model="ua/gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert completion.choices[0].message.content == "Hello from am! How can I help?"


@pytest.mark.parametrize(("extra", "field"), [({"n": 2}, "n"), ({"logprobs": True}, "logprobs")],
                         ids=["n", "logprobs"])
def test_untranslatable_request_to_an_anthropic_model_is_400_naming_the_field(stack, mocks, extra, field) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _oai(stack).chat.completions.create(model="am/claude-haiku", messages=[{"role": "user", "content": "x"}],
                                            **extra)
    message = info.value.body["message"]
    assert f"{field}:" in message or f"'{field}'" in message or f"{field} " in message, message
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.response.headers["x-should-retry"] == "false"
    _only(mocks)

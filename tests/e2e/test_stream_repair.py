"""Streams that survive a broken provider (`repair_streams`): a provider that breaks after the client
got part of the answer is continued from a fallback, and the client gets one well-formed stream —
or, when that is impossible, a well-formed error event, never a bare reset.

Driven by the official SDKs against wire-format mocks that can cut a stream after N events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import httpx2
import openai
import pytest

from tests.e2e.conftest import Stack, stack_for
from tests.wiremock import AnthropicMessagesMock, OpenAIChatMock, Reply, serving

pytestmark = pytest.mark.e2e

ANSWER = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
HI = [{"role": "user", "content": "tell me about the fox"}]

CONFIG = """
listeners: [{{type: model, port: {port}, repair_streams: true, stream_idle_timeout: 1s}}]
model_providers:
  - model: p/gpt
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy: {{fallback_models: [b/gpt], default_max_attempts: 1}}
  - {{model: b/gpt, base_url: "{b}", provider_interface: openai, access_key: sk-b-000000000000}}
  - model: q/gpt
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy: {{fallback_models: [an/claude], default_max_attempts: 1}}
  - {{model: an/claude, base_url: "{an}", provider_interface: claude, access_key: sk-an-00000000000}}
  - model: an/primary
    base_url: "{an}"
    provider_interface: claude
    access_key: sk-an-00000000000
    retry_policy: {{fallback_models: [an2/claude], default_max_attempts: 1}}
  - {{model: an2/claude, base_url: "{an2}", provider_interface: claude, access_key: sk-an2-0000000000}}
  - model: p/unrepaired
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    repair_streams: false
    retry_policy: {{fallback_models: [b/gpt], default_max_attempts: 1}}
"""


@pytest.fixture(scope="module")
def mocks() -> Iterator[dict]:
    yield from serving({"p": OpenAIChatMock("p"), "b": OpenAIChatMock("b"),
                        "an": AnthropicMessagesMock("an"), "an2": AnthropicMessagesMock("an2")})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mocks) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, CONFIG, mocks)


@pytest.fixture(autouse=True)
def _fresh(mocks) -> None:
    for mock in mocks.values():
        mock.script(Reply(text=ANSWER, pieces=12))


def oai(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="k", max_retries=0)


def collect(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_a_cut_stream_is_regenerated_and_only_the_rest_delivered(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=12, cut_after=6, interval=0.02))  # role + 5 pieces, then a reset
    text, chunks = collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert text == ANSWER  # exactly the whole answer: nothing lost, nothing repeated
    assert len({c.id for c in chunks}) == 1  # one stream id
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.role) == 1  # one role preamble
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(mocks["p"].requests) == 1 and len(mocks["b"].requests) == 1
    assert mocks["b"].requests[0].json["messages"] == HI  # OpenAI has no prefill: the question again


def test_a_cut_stream_continues_from_an_anthropic_fallback_by_prefill(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=12, cut_after=6, interval=0.02))
    text, chunks = collect(oai(stack).chat.completions.create(model="q/gpt", messages=HI, stream=True))
    assert text == ANSWER
    assert len({c.id for c in chunks}) == 1
    sent = mocks["an"].requests[0].json["messages"]
    assert sent[-1]["role"] == "assistant" and ANSWER.startswith(sent[-1]["content"])  # the text so far
    assert 0 < len(sent[-1]["content"]) < len(ANSWER)


def test_an_anthropic_stream_cut_is_continued_by_prefill(stack, mocks) -> None:
    mocks["an"].script(Reply(text=ANSWER, pieces=12, cut_after=7, interval=0.02))
    client = anthropic.Anthropic(base_url=stack.url, api_key="k", max_retries=0)
    with client.messages.stream(model="an/primary", max_tokens=200, messages=HI) as stream:
        message = stream.get_final_message()
    assert "".join(b.text for b in message.content if b.type == "text") == ANSWER
    assert message.stop_reason == "end_turn"
    assert mocks["an2"].requests[0].json["messages"][-1]["role"] == "assistant"


def test_a_stall_past_the_stall_window_is_repaired(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=4, interval=5))  # the second piece would come after 5 s
    started = time.monotonic()
    text, _ = collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert text == ANSWER and time.monotonic() - started < 4.5  # cut at the 1 s stall window, then continued


def test_when_no_continuation_matches_the_stream_ends_with_an_error_event(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=12, cut_after=6, interval=0.02))
    mocks["b"].script(Reply(text="Something else entirely.", pieces=3))  # a regeneration that differs
    with pytest.raises(openai.APIError) as info:
        collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert "could not be continued" in str(info.value)  # an error event, not a bare reset


def test_when_every_provider_breaks_the_stream_still_ends_well_formed(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=12, cut_after=6, interval=0.02))
    mocks["b"].script(Reply(text=ANSWER, pieces=12, cut_after=3, interval=0.02))
    with pytest.raises(openai.APIError) as info:
        collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert "stream broke" in str(info.value)


def test_answers_that_do_not_break_pass_unchanged(stack, mocks) -> None:
    text, chunks = collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert text == ANSWER and mocks["b"].requests == []
    answer = oai(stack).chat.completions.create(model="p/gpt", messages=HI)  # not streamed: not relayed
    assert answer.choices[0].message.content == ANSWER


def test_an_end_without_its_terminator_is_repaired(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=12, cut_after=8, cut_mode="close", interval=0.02))
    text, chunks = collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert text == ANSWER and chunks[-1].choices[0].finish_reason == "stop"
    assert len(mocks["b"].requests) == 1


def test_an_anthropic_stall_is_repaired(stack, mocks) -> None:
    mocks["an"].script(Reply(text=ANSWER, pieces=6, interval=5))
    client = anthropic.Anthropic(base_url=stack.url, api_key="k", max_retries=0)
    started = time.monotonic()
    with client.messages.stream(model="an/primary", max_tokens=200, messages=HI) as stream:
        message = stream.get_final_message()
    assert "".join(b.text for b in message.content if b.type == "text") == ANSWER
    assert time.monotonic() - started < 4.5


def test_a_provider_that_opts_out_ends_as_it_ended(stack, mocks) -> None:
    mocks["p"].script(Reply(text=ANSWER, pieces=12, cut_after=6, interval=0.02))
    with pytest.raises((openai.APIError, httpx.TransportError, httpx2.TransportError)):
        collect(oai(stack).chat.completions.create(model="p/unrepaired", messages=HI, stream=True))
    assert mocks["b"].requests == []  # not continued elsewhere


def test_a_malformed_event_mid_stream_is_a_break_and_is_repaired(stack, mocks) -> None:
    pieces = [ANSWER[:10], ANSWER[10:25]]
    events = [{"id": "c9", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    events += [{"id": "c9", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b'data: {"choices": [{"delt\n\n'
    mocks["p"].script(Reply(body=raw, content_type="text/event-stream"))
    text, chunks = collect(oai(stack).chat.completions.create(model="p/gpt", messages=HI, stream=True))
    assert text == ANSWER and len({c.id for c in chunks}) == 1
    assert len(mocks["b"].requests) == 1

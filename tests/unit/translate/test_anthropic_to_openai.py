"""Anthropic client, OpenAI provider: goldens, refusals, streams, and the official Anthropic SDK as judge."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

from extproc.translate import Untranslatable
from extproc.translate.anthropic_to_openai import (
    StreamTranslator,
    provider_error,
    translate_error,
    translate_request,
    translate_response,
)
from tests.unit.translate import (
    anthropic_client,
    assert_golden_bytes,
    assert_golden_json,
    feed_in_pieces,
    input_bytes,
    input_json,
    random_cuts,
)

D = "anthropic_to_openai"
CREATED = 1741569952


def req(**extra: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **extra}


def out(body: dict[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(translate_request(body, model="gpt-x").body)
    return parsed


def streamer() -> StreamTranslator:
    return StreamTranslator(model="gpt-4o", created=CREATED, include_usage=True)


def chunks(*objs: dict[str, Any], done: bool = True) -> bytes:
    body = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        **extra,
    }


def events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


MESSAGE_KW: dict[str, Any] = {"model": "x", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}]}

# ---------------------------------------------------------------------------------------------- goldens


def test_golden_request() -> None:
    tr = translate_request(input_json(D, "request.input.json"), model="gpt-4o")
    assert (tr.stream, tr.include_usage) == (True, True)
    assert_golden_json(D, "request", tr.body)


def test_golden_response() -> None:
    body = translate_response(input_bytes(D, "response.input.json"), model="gpt-4o", created=CREATED)
    assert_golden_json(D, "response", body)


def test_golden_stream() -> None:
    st = streamer()
    body = st.feed(input_bytes(D, "stream.input.sse")) + st.close()
    assert_golden_bytes(D, "stream.expected.sse", body)
    assert st.finished and st.content_started and st.tool_call_sent and st.error is None
    assert st.text_sent == "Checking 東京 ☀️ and Paris."


def test_golden_error() -> None:
    assert_golden_json(D, "error_429", translate_error(429, input_bytes(D, "error_429.input.json")))


# ---------------------------------------------------------------------------------------------- request


def test_minimal_request() -> None:
    tr = translate_request(req(), model="gpt-x")
    assert (
        tr.body
        == b'{"model":"gpt-x","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":100}'
    )
    assert (tr.stream, tr.include_usage) == (False, False)


def test_missing_max_tokens_uses_the_default() -> None:
    body = req()
    del body["max_tokens"]
    assert (
        json.loads(translate_request(body, model="m", default_max_tokens=7).body)["max_completion_tokens"]
        == 7
    )


def test_streaming_always_asks_the_provider_for_usage() -> None:
    parsed = out(req(stream=True))
    assert parsed["stream"] is True and parsed["stream_options"] == {"include_usage": True}


def test_dropped_hints_leave_no_trace() -> None:
    body = req(
        service_tier="standard_only",
        cache_control={"type": "ephemeral"},
        speed="fast",
        diagnostics={"previous_message_id": "m"},
        user_profile_id="p",
        workspace_id="w",
        thinking={"type": "disabled"},
        output_config={"effort": "high"},
        mcp_servers=[],
        top_k=None,
        metadata={"user_id": None},
        stop_sequences=[],
    )
    assert out(body) == out(req())


@pytest.mark.parametrize(
    "choice, expected",
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
        ({"type": "any", "disable_parallel_tool_use": False}, {"tool_choice": "required"}),
        (None, {}),
    ],
)
def test_tool_choice(choice: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    parsed = out(req(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice))
    assert {k: parsed[k] for k in ("tool_choice", "parallel_tool_calls") if k in parsed} == expected
    assert parsed["tools"] == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]


def test_tool_without_schema_and_with_strict() -> None:
    parsed = out(
        req(
            tools=[
                {
                    "type": "custom",
                    "name": "f",
                    "input_schema": None,
                    "strict": False,
                    "eager_input_streaming": True,
                    "allowed_callers": ["direct"],
                }
            ]
        )
    )
    assert parsed["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "properties": {}}, "strict": False},
        }
    ]


def test_tool_results_come_before_the_users_text_and_is_error_is_dropped() -> None:
    parsed = out(
        {
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "before"},
                        {"type": "tool_result", "tool_use_id": "t1", "is_error": True},
                        {"type": "text", "text": "after"},
                    ],
                },
            ],
        }
    )
    assert parsed["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "t1", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "before"}, {"type": "text", "text": "after"}]},
    ]


def test_system_string() -> None:
    assert out(req(system="be brief"))["messages"][0] == {"role": "system", "content": "be brief"}
    assert out(req(system=""))["messages"][0]["role"] == "user"


def test_assistant_turn_of_only_thinking_is_dropped() -> None:
    parsed = out(
        {
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
                {"role": "user", "content": "again"},
            ],
        }
    )
    assert parsed["messages"] == [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}]


def test_null_max_tokens_uses_the_default() -> None:
    assert out(req(max_tokens=None))["max_completion_tokens"] == 4096


def user_with(block: dict[str, Any]) -> dict[str, Any]:
    return req(messages=[{"role": "user", "content": [block]}])


@pytest.mark.parametrize(
    "body, field",
    [
        (req(top_k=5), "top_k"),
        (req(thinking={"type": "enabled", "budget_tokens": 2000}), "thinking"),
        (req(thinking={"type": "adaptive"}), "thinking"),
        (req(container="c"), "container"),
        (req(context_management={"edits": []}), "context_management"),
        (req(output_format={"type": "json_schema", "schema": {}}), "output_format"),
        (req(output_config={"format": {"type": "json_schema", "schema": {}}}), "output_config.format"),
        (req(inference_geo="eu"), "inference_geo"),
        (req(mcp_servers=[{"type": "url", "url": "https://mcp", "name": "m"}]), "mcp_servers"),
        (req(brand_new_option=1), "brand_new_option"),
        (req(max_tokens="10"), "max_tokens"),
        (req(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type"),
        (req(tools=[{"name": "f", "input_schema": {}, "defer_loading": True}]), "tools[0].defer_loading"),
        (req(tools=[{"name": "f", "input_schema": {}, "input_examples": [{}]}]), "tools[0].input_examples"),
        (
            req(tools=[{"name": "f", "input_schema": {}}], tool_choice={"type": "some_new_kind"}),
            "tool_choice.type",
        ),
        (req(system=[{"type": "image", "source": {}}]), "system[0].type"),
        (
            req(
                messages=[
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "The answer is ("},
                ]
            ),
            "messages[1]",
        ),
        (req(messages=[{"role": "system", "content": "x"}]), "messages[0].role"),
        (req(messages=[{"role": "user", "content": "x", "extra": 1}]), "messages[0].extra"),
        (
            user_with(
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "d"}}
            ),
            "messages[0].content[0].type",
        ),
        (
            user_with({"type": "search_result", "source": "s", "title": "t", "content": []}),
            "messages[0].content[0].type",
        ),
        (
            user_with({"type": "image", "source": {"type": "file", "file_id": "f"}}),
            "messages[0].content[0].source.type",
        ),
        (
            user_with({"type": "text", "text": "x", "citations": None, "future": True}),
            "messages[0].content[0].future",
        ),
        (
            user_with(
                {
                    "type": "tool_result",
                    "tool_use_id": "t",
                    "content": [{"type": "image", "source": {"type": "url", "url": "https://x"}}],
                }
            ),
            "messages[0].content[0].content[0].type",
        ),
        (
            req(
                messages=[
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}
                        ],
                    },
                    {"role": "user", "content": "x"},
                ]
            ),
            "messages[1].content[0].type",
        ),
        (
            req(
                messages=[
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "tool_use",
                                "id": "t",
                                "name": "f",
                                "input": {},
                                "caller": {"type": "code_execution_20250825"},
                            }
                        ],
                    },
                    {"role": "user", "content": "x"},
                ]
            ),
            "messages[1].content[0].caller",
        ),
    ],
)
def test_untranslatable(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Untranslatable) as info:
        translate_request(body, model="m")
    assert info.value.field == field
    assert info.value.reason and field in str(info.value)


# ---------------------------------------------------------------------------------------------- response


def completion(message: dict[str, Any], finish: str | None, usage: dict[str, Any] | None = None) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": usage,
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    "finish, stop_reason",
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
        ("function_call", "tool_use"),
        (None, "end_turn"),
        ("something_new", "end_turn"),
    ],
)
def test_stop_reasons(finish: str | None, stop_reason: str) -> None:
    parsed = json.loads(translate_response(completion({"content": "x"}, finish), model="m", created=1))
    assert parsed["stop_reason"] == stop_reason and parsed["stop_sequence"] is None


def test_refusal_message() -> None:
    parsed = json.loads(
        translate_response(completion({"content": None, "refusal": "I can't."}, "stop"), model="m", created=1)
    )
    assert parsed["content"] == [{"type": "text", "text": "I can't."}]
    assert parsed["stop_reason"] == "refusal"


def test_missing_usage_reads_as_zero() -> None:
    parsed = json.loads(translate_response(completion({"content": "x"}, "stop"), model="m", created=1))
    assert parsed["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


@pytest.mark.parametrize(
    "body, field",
    [
        (b"<html>", "body"),
        (b'{"choices": []}', "choices"),
        (
            completion(
                {
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{bad"}}
                    ]
                },
                "tool_calls",
            ),
            "choices[0].message.tool_calls[0].function.arguments",
        ),
        (
            completion(
                {
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[]"}}
                    ]
                },
                "tool_calls",
            ),
            "choices[0].message.tool_calls[0].function.arguments",
        ),
    ],
)
def test_unusable_provider_response(body: bytes, field: str) -> None:
    with pytest.raises(Untranslatable) as info:
        translate_response(body, model="m", created=1)
    assert info.value.field == field


def test_sdk_parses_the_json_response() -> None:
    body = translate_response(input_bytes(D, "response.input.json"), model="gpt-4o", created=CREATED)
    message = anthropic_client(200, body).messages.create(**MESSAGE_KW)
    assert message.model == "gpt-4o" and message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].type == "text" and message.content[0].text == "Paris is 18°C ☁️."
    assert message.content[1].type == "tool_use" and message.content[1].input == {"city": "東京"}
    assert (message.usage.input_tokens, message.usage.output_tokens) == (93, 46)
    assert message.usage.cache_read_input_tokens == 1024


# ---------------------------------------------------------------------------------------------- stream


def test_stream_split_anywhere_gives_the_same_bytes() -> None:
    data = input_bytes(D, "stream.input.sse")
    whole = feed_in_pieces(streamer(), data, [])
    assert feed_in_pieces(streamer(), data, range(1, len(data))) == whole
    for seed in range(25):
        assert feed_in_pieces(streamer(), data, random_cuts(data, seed, 40)) == whole
    crlf = data.replace(b"\n", b"\r\n")
    assert feed_in_pieces(streamer(), crlf, random_cuts(crlf, 99, 60)) == whole


def test_sdk_stream_builds_the_final_message() -> None:
    st = streamer()
    body = st.feed(input_bytes(D, "stream.input.sse")) + st.close()
    client = anthropic_client(200, body, "text/event-stream")
    with client.messages.stream(**MESSAGE_KW) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Checking 東京 ☀️ and Paris."
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert [b.input for b in final.content if b.type == "tool_use"] == [{"city": "東京"}, {"city": "Paris"}]
    assert [b.id for b in final.content if b.type == "tool_use"] == ["call_A", "call_B"]
    assert final.stop_reason == "tool_use" and final.id == "chatcmpl-C3stream" and final.model == "gpt-4o"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (
        93,
        46,
        1024,
    )


def test_sdk_raw_stream_events() -> None:
    st = streamer()
    body = st.feed(input_bytes(D, "stream.input.sse")) + st.close()
    client = anthropic_client(200, body, "text/event-stream")
    kinds = [event.type for event in client.messages.create(**MESSAGE_KW, stream=True)]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]


def test_message_delta_waits_for_the_usage_chunk() -> None:
    st = streamer()
    sent = st.feed(chunks(chunk({"content": "hi"}), chunk(finish="stop"), done=False))
    assert [name for name, _ in events(sent)] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
    ]
    usage = {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    sent = st.feed(chunks(usage, done=False))
    assert events(sent) == [
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {
                    "input_tokens": 9,
                    "output_tokens": 2,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        )
    ]
    assert not st.finished
    assert events(st.feed(b"data: [DONE]\n\n")) == [("message_stop", {"type": "message_stop"})]
    assert st.finished and st.close() == b""


def test_done_without_usage_still_ends_cleanly() -> None:
    st = streamer()
    sent = st.feed(chunks(chunk({"content": "hi"}), chunk(finish="length")))
    names = [name for name, _ in events(sent)]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert events(sent)[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events(sent)[-2][1]["usage"] == {"output_tokens": 0}


def test_usage_in_the_finish_chunk_is_used_at_once() -> None:
    st = streamer()
    usage = {"prompt_tokens": 3, "completion_tokens": 1}
    sent = st.feed(chunks(chunk({"content": "x"}, finish="stop", usage=usage), done=False))
    assert [name for name, _ in events(sent)][-1] == "message_delta"


def test_incomplete_stream_is_not_finished_and_nothing_is_fabricated() -> None:
    st = streamer()
    sent = st.feed(chunks(chunk({"content": "Hel"}), chunk(finish="stop"), done=False) + b'data: {"id":"chat')
    assert b"Hel" in sent and st.text_sent == "Hel" and st.content_started
    assert st.close() == b""
    assert not st.finished and st.error is None and b"message_stop" not in sent


def test_in_stream_error_is_recorded_and_forwarded() -> None:
    st = streamer()
    error = {"error": {"message": "The server had an error", "type": "server_error", "code": None}}
    body = st.feed(chunks(chunk({"content": "Hi"}), error, chunk({"content": "ignored"})))
    assert st.error == ("server_error", "The server had an error")
    assert not st.finished and b"ignored" not in body and b"message_stop" not in body
    assert events(body)[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "The server had an error"}},
    )
    client = anthropic_client(200, body, "text/event-stream")
    with pytest.raises(anthropic.APIStatusError) as info, client.messages.stream(**MESSAGE_KW) as stream:
        stream.get_final_message()
    assert info.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The server had an error"},
    }


def test_in_stream_rate_limit_error_keeps_its_meaning() -> None:
    st = streamer()
    body = st.feed(chunks({"error": {"message": "slow", "type": "tokens", "code": "rate_limit_exceeded"}}))
    assert events(body) == [
        ("error", {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}})
    ]
    assert st.error == ("tokens", "slow") and not st.content_started


def test_garbled_event_stops_the_stream_as_an_error() -> None:
    st = streamer()
    body = st.feed(chunks(chunk({"content": "a"})).replace(b"data: [DONE]", b"data: {oops"))
    assert st.error == ("api_error", "provider sent an unparsable stream event")
    assert events(body)[-1][0] == "error"


def test_text_after_a_tool_call_opens_a_new_block_and_ids_are_synthesized() -> None:
    st = streamer()
    body = st.feed(
        chunks(
            chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
            chunk({"content": "done", "reasoning_content": "ignored"}),
            chunk(finish="tool_calls"),
        )
    )
    evs = events(body)
    starts = [data["content_block"] for name, data in evs if name == "content_block_start"]
    assert starts == [
        {"type": "tool_use", "id": f"toolu_{CREATED}_0", "name": "f", "input": {}},
        {"type": "text", "text": ""},
    ]
    assert [data["index"] for name, data in evs if name == "content_block_stop"] == [0, 1]
    assert st.tool_call_sent and st.text_sent == "done"


def test_streamed_refusal_is_text_with_refusal_stop_reason() -> None:
    st = streamer()
    evs = events(st.feed(chunks(chunk({"refusal": "I can't help."}), chunk(finish="content_filter"))))
    assert (
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "I can't help."}},
    ) in evs
    assert evs[-2][1]["delta"]["stop_reason"] == "refusal"


def test_empty_stream_with_done_is_a_clean_empty_message() -> None:
    st = streamer()
    assert [name for name, _ in events(st.feed(b"data: [DONE]\n\n"))] == [
        "message_start",
        "message_delta",
        "message_stop",
    ]
    assert st.finished and not st.content_started


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "status, body, exc, a_type",
    [
        (
            429,
            b'{"error":{"message":"slow","type":"requests","param":null,"code":"rate_limit_exceeded"}}',
            anthropic.RateLimitError,
            "rate_limit_error",
        ),
        (
            429,
            b'{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}',
            anthropic.RateLimitError,
            "rate_limit_error",
        ),
        (
            500,
            b'{"error":{"message":"boom","type":"server_error"}}',
            anthropic.InternalServerError,
            "api_error",
        ),
        (503, b"Service Unavailable", anthropic.ServiceUnavailableError, "overloaded_error"),
        (529, b"{}", anthropic.OverloadedError, "overloaded_error"),
        (
            400,
            b'{"error":{"message":"bad","type":"invalid_request_error","code":"context_length_exceeded"}}',
            anthropic.BadRequestError,
            "invalid_request_error",
        ),
        (
            401,
            b'{"error":{"message":"key","type":"invalid_request_error","code":"invalid_api_key"}}',
            anthropic.AuthenticationError,
            "authentication_error",
        ),
        (403, b'{"error":{"message":"region"}}', anthropic.PermissionDeniedError, "permission_error"),
        (
            404,
            b'{"error":{"message":"no model","code":"model_not_found"}}',
            anthropic.NotFoundError,
            "not_found_error",
        ),
        (413, b"", anthropic.APIStatusError, "request_too_large"),
        (422, b'{"error":"unprocessable"}', anthropic.UnprocessableEntityError, "invalid_request_error"),
        (502, b"<html>bad gateway</html>", anthropic.InternalServerError, "api_error"),
    ],
)
def test_errors_raise_the_right_sdk_exception(
    status: int, body: bytes, exc: type[Exception], a_type: str
) -> None:
    translated = translate_error(status, body)
    parsed = json.loads(translated)
    assert parsed["type"] == "error" and parsed["error"]["type"] == a_type and parsed["error"]["message"]
    with pytest.raises(exc) as info:
        anthropic_client(status, translated).messages.create(**MESSAGE_KW)
    assert isinstance(info.value, anthropic.APIStatusError) and info.value.status_code == status


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            b'{"error":{"message":"m","type":"requests","param":null,"code":"rate_limit_exceeded"}}',
            ("requests", "rate_limit_exceeded", "m"),
        ),
        (b'{"error":{"message":"m","code":400}}', (None, "400", "m")),
        (
            b'[{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}]',
            (None, "429", "Resource exhausted"),
        ),
        (b'{"error":"plain"}', (None, None, "plain")),
        (b'{"detail":"Not Found"}', (None, None, None)),
        (b"upstream timeout", (None, None, None)),
        (b"", (None, None, None)),
        (b"null", (None, None, None)),
    ],
)
def test_provider_error_is_tolerant(body: bytes, expected: tuple[str | None, str | None, str | None]) -> None:
    assert provider_error(body) == expected

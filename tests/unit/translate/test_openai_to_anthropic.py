"""OpenAI client, Anthropic provider: goldens, refusals, streams, and the official OpenAI SDK as judge."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from extproc.translate import Untranslatable
from extproc.translate.openai_to_anthropic import (
    StreamTranslator,
    provider_error,
    translate_error,
    translate_request,
    translate_response,
)
from tests.unit.translate import (
    assert_golden_bytes,
    assert_golden_json,
    feed_in_pieces,
    input_bytes,
    input_json,
    openai_client,
    random_cuts,
)

D = "openai_to_anthropic"
CREATED = 1741569952


def req(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **extra}


def out(body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(translate_request(body, model="claude-x", **kw).body)
    return parsed


def streamer(include_usage: bool = True) -> StreamTranslator:
    return StreamTranslator(model="claude-sonnet-4-5", created=CREATED, include_usage=include_usage)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


# ---------------------------------------------------------------------------------------------- goldens


def test_golden_request() -> None:
    tr = translate_request(input_json(D, "request.input.json"), model="claude-sonnet-4-5")
    assert (tr.stream, tr.include_usage) == (True, True)
    assert_golden_json(D, "request", tr.body)


def test_golden_response() -> None:
    body = translate_response(
        input_bytes(D, "response.input.json"), model="claude-sonnet-4-5", created=CREATED
    )
    assert_golden_json(D, "response", body)


@pytest.mark.parametrize(
    "include_usage, name", [(True, "stream.expected.sse"), (False, "stream_no_usage.expected.sse")]
)
def test_golden_stream(include_usage: bool, name: str) -> None:
    st = streamer(include_usage)
    body = st.feed(input_bytes(D, "stream.input.sse")) + st.close()
    assert_golden_bytes(D, name, body)
    assert st.finished and st.content_started and st.tool_call_sent and st.error is None
    assert st.text_sent == "Okay, let me check 東京 ☀️ and Paris."


def test_golden_error() -> None:
    assert_golden_json(D, "error_529", translate_error(529, input_bytes(D, "error_529.input.json")))


# ---------------------------------------------------------------------------------------------- request


def test_minimal_request_gets_the_default_max_tokens() -> None:
    tr = translate_request(req(), model="claude-x", default_max_tokens=333)
    assert tr.body == b'{"model":"claude-x","max_tokens":333,"messages":[{"role":"user","content":"hi"}]}'
    assert (tr.stream, tr.include_usage) == (False, False)


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert out(req(max_tokens=10, max_completion_tokens=20))["max_tokens"] == 20
    assert out(req(max_tokens=10))["max_tokens"] == 10


def test_stream_without_include_usage() -> None:
    tr = translate_request(req(stream=True, stream_options={"include_usage": False}), model="m")
    assert (tr.stream, tr.include_usage) == (True, False)
    assert json.loads(tr.body)["stream"] is True


@pytest.mark.parametrize(
    "stop, expected", [("END", ["END"]), (["a", "b"], ["a", "b"]), ([], None), (None, None)]
)
def test_stop(stop: Any, expected: list[str] | None) -> None:
    assert out(req(stop=stop)).get("stop_sequences") == expected


def test_dropped_hints_and_null_unknowns_leave_no_trace() -> None:
    body = req(
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        store=True,
        metadata={"a": "b"},
        service_tier="flex",
        prediction={"type": "content", "content": "x"},
        prompt_cache_key="k",
        reasoning_effort="high",
        verbosity="low",
        some_future_field=None,
        n=1,
        logprobs=False,
        top_logprobs=None,
        logit_bias={},
        modalities=["text"],
        response_format={"type": "text"},
    )
    assert out(body) == out(req())


def test_user_and_safety_identifier_become_metadata_user_id() -> None:
    assert out(req(user="u1"))["metadata"] == {"user_id": "u1"}
    assert out(req(user="u1", safety_identifier="s1"))["metadata"] == {"user_id": "s1"}


@pytest.mark.parametrize(
    "choice, parallel, expected",
    [
        ("auto", None, {"type": "auto"}),
        ("none", False, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, True, None),
    ],
)
def test_tool_choice(choice: Any, parallel: Any, expected: dict[str, Any] | None) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = out(req(tools=tools, tool_choice=choice, parallel_tool_calls=parallel))
    assert body.get("tool_choice") == expected
    assert body["tools"] == [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]


def test_tool_choice_without_tools_is_omitted() -> None:
    assert "tool_choice" not in out(req(tool_choice="auto", parallel_tool_calls=False))


def test_system_messages_are_hoisted_in_order() -> None:
    body = out(
        {
            "messages": [
                {"role": "system", "content": "one"},
                {"role": "user", "content": "hi"},
                {"role": "developer", "content": [{"type": "text", "text": "two"}]},
                {"role": "user", "content": "again"},
            ]
        }
    )
    assert body["system"] == [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}
    ]


def test_empty_turns_are_dropped_and_tool_results_lead_a_user_turn() -> None:
    body = out(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
                    ],
                },
                {"role": "user", "content": "also"},
                {"role": "tool", "tool_call_id": "c1", "content": ""},
                {"role": "assistant", "content": None},
                {"role": "user", "content": ""},
            ]
        }
    )
    assert body["messages"] == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "c1"}, {"type": "text", "text": "also"}],
        },
    ]


def test_assistant_parts_and_refusal_become_text() -> None:
    body = out(
        {
            "messages": [
                {"role": "user", "content": "q"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "a"}, {"type": "refusal", "refusal": "no"}],
                },
                {"role": "assistant", "content": None, "refusal": "still no"},
                {"role": "user", "content": "q2"},
            ]
        }
    )
    assert body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "a"},
            {"type": "text", "text": "no"},
            {"type": "text", "text": "still no"},
        ],
    }


@pytest.mark.parametrize(
    "url, source",
    [
        ("data:image/jpeg;base64,AAAA", {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}),
        (
            "data:IMAGE/WEBP;charset=x;base64,QQ==",
            {"type": "base64", "media_type": "image/webp", "data": "QQ=="},
        ),
        ("http://example.com/a.gif", {"type": "url", "url": "http://example.com/a.gif"}),
    ],
)
def test_images(url: str, source: dict[str, Any]) -> None:
    part = {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
    body = out({"messages": [{"role": "user", "content": [part]}]})
    assert body["messages"][0]["content"] == [{"type": "image", "source": source}]


def user_with(part: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [part]}]}


def assistant_call(arguments: Any) -> dict[str, Any]:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c", "content": "r"},
        ]
    }


@pytest.mark.parametrize(
    "body, field",
    [
        (req(n=2), "n"),
        (req(logprobs=True), "logprobs"),
        (req(top_logprobs=3), "top_logprobs"),
        (req(logit_bias={"50256": -100}), "logit_bias"),
        (req(response_format={"type": "json_object"}), "response_format"),
        (
            req(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
            "response_format",
        ),
        (req(modalities=["text", "audio"]), "modalities"),
        (req(audio={"voice": "alloy", "format": "wav"}), "audio"),
        (req(functions=[{"name": "f"}]), "functions"),
        (req(function_call="auto"), "function_call"),
        (req(web_search_options={}), "web_search_options"),
        (req(moderation={"model": "omni"}), "moderation"),
        (req(temperature=1.5), "temperature"),
        (req(brand_new_option=True), "brand_new_option"),
        (req(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools[0].type"),
        (
            req(
                tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "allowed_tools"}
            ),
            "tool_choice",
        ),
        ({"messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]}, "messages[0].audio"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "prefix"},
                    {"role": "system", "content": "s"},
                ]
            },
            "messages[1]",
        ),
        (
            user_with({"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}),
            "messages[0].content[0].type",
        ),
        (user_with({"type": "file", "file": {"file_id": "f"}}), "messages[0].content[0].type"),
        (
            user_with({"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}),
            "messages[0].content[0].image_url.url",
        ),
        (
            user_with({"type": "image_url", "image_url": {"url": "data:image/svg+xml;base64,AA"}}),
            "messages[0].content[0].image_url.url",
        ),
        (
            user_with({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}),
            "messages[0].content[0].image_url.url",
        ),
        (assistant_call("{not json"), "messages[1].tool_calls[0].function.arguments"),
        (assistant_call("[1, 2]"), "messages[1].tool_calls[0].function.arguments"),
        (
            {"messages": [{"role": "tool", "tool_call_id": "c", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_untranslatable(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Untranslatable) as info:
        translate_request(body, model="m")
    assert info.value.field == field
    assert info.value.reason and field in str(info.value)


# ---------------------------------------------------------------------------------------------- response


@pytest.mark.parametrize(
    "stop_reason, finish",
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", "stop"),
        (None, "stop"),
    ],
)
def test_finish_reasons(stop_reason: str | None, finish: str) -> None:
    body = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "x"}],
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 1, "output_tokens": 2},
    }
    parsed = json.loads(translate_response(json.dumps(body).encode(), model="m", created=1))
    assert parsed["choices"][0]["finish_reason"] == finish
    assert parsed["usage"]["total_tokens"] == 3


def test_response_with_only_thinking_and_text() -> None:
    body = {
        "id": "msg_1",
        "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "a"},
            {"type": "text", "text": "b"},
        ],
        "stop_reason": "end_turn",
        "usage": {},
    }
    message = json.loads(translate_response(json.dumps(body).encode(), model="m", created=1))["choices"][0][
        "message"
    ]
    assert message == {"role": "assistant", "content": "ab", "refusal": None}


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"type":"error","error":{}}'])
def test_unusable_provider_response(body: bytes) -> None:
    with pytest.raises(Untranslatable):
        translate_response(body, model="m", created=1)


def test_sdk_parses_the_json_response() -> None:
    body = translate_response(
        input_bytes(D, "response.input.json"), model="claude-sonnet-4-5", created=CREATED
    )
    completion = openai_client(200, body).chat.completions.create(model="x", messages=[])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check both cities ☁️."
    calls = choice.message.tool_calls or []
    assert [json.loads(c.function.arguments) for c in calls if c.type == "function"] == [
        {"city": "Paris"},
        {"city": "東京", "units": {"temp": "C"}},
    ]
    assert completion.usage is not None and completion.usage.prompt_tokens == 412 + 1024
    assert (
        completion.usage.prompt_tokens_details
        and completion.usage.prompt_tokens_details.cached_tokens == 1024
    )


# ---------------------------------------------------------------------------------------------- stream


def test_stream_split_anywhere_gives_the_same_bytes() -> None:
    data = input_bytes(D, "stream.input.sse")
    whole = feed_in_pieces(streamer(), data, [])
    assert feed_in_pieces(streamer(), data, range(1, len(data))) == whole
    for seed in range(25):
        assert feed_in_pieces(streamer(), data, random_cuts(data, seed, 40)) == whole
    crlf = data.replace(b"\n", b"\r\n")
    assert feed_in_pieces(streamer(), crlf, random_cuts(crlf, 99, 60)) == whole


def test_feed_returns_output_as_soon_as_an_event_completes() -> None:
    st = streamer()
    data = input_bytes(D, "stream.input.sse")
    first_event_end = data.index(b"\n\n") + 2
    assert st.feed(data[: first_event_end - 1]) == b""
    assert st.feed(data[first_event_end - 1 : first_event_end]).startswith(b'data: {"id":"msg_01Stream"')


def test_sdk_assembles_the_stream() -> None:
    st = streamer()
    body = st.feed(input_bytes(D, "stream.input.sse")) + st.close()
    client = openai_client(200, body, "text/event-stream")
    text, finish, usage = "", None, None
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="x", messages=[], stream=True):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                args[call.index] = args.get(call.index, "") + (
                    call.function and call.function.arguments or ""
                )
                if call.function and call.function.name:
                    names[call.index] = call.function.name
    assert text == "Okay, let me check 東京 ☀️ and Paris."
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"city": "東京"}, 1: {"city": "Paris"}}
    assert names == {0: "get_weather", 1: "get_weather"}
    assert finish == "tool_calls"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (572, 89)


def test_sdk_stream_helper_builds_the_final_completion() -> None:
    st = streamer()
    body = st.feed(input_bytes(D, "stream.input.sse")) + st.close()
    client = openai_client(200, body, "text/event-stream")
    with client.chat.completions.stream(model="x", messages=[]) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Okay, let me check 東京 ☀️ and Paris."
    assert [c.function.arguments for c in message.tool_calls or []] == [
        '{"city": "東京"}',
        '{"city": "Paris"}',
    ]


START = {
    "type": "message_start",
    "message": {
        "id": "msg_9",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "c",
        "usage": {"input_tokens": 5, "output_tokens": 1},
    },
}
TEXT_START = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def test_incomplete_stream_is_not_finished_and_nothing_is_fabricated() -> None:
    st = streamer()
    sent = st.feed(
        sse(START, TEXT_START, text_delta("Hel")) + b'event: content_block_delta\ndata: {"type":"con'
    )
    assert b"Hel" in sent and st.content_started and st.text_sent == "Hel"
    assert st.close() == b""
    assert not st.finished and st.error is None


def test_in_stream_error_is_recorded_and_forwarded() -> None:
    st = streamer()
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    body = st.feed(sse(START, TEXT_START, text_delta("Hi"), error, text_delta("ignored")))
    assert st.error == ("overloaded_error", "Overloaded")
    assert not st.finished and b"ignored" not in body
    assert body.endswith(
        b'data: {"error":{"message":"Overloaded","type":"server_error","param":null,"code":"overloaded"}}\n\n'
    )
    client = openai_client(200, body + st.close(), "text/event-stream")
    with pytest.raises(openai.APIError, match="Overloaded"):
        for _ in client.chat.completions.create(model="x", messages=[], stream=True):
            pass


def test_garbled_event_stops_the_stream_as_an_error() -> None:
    st = streamer()
    body = st.feed(sse(START) + b"event: content_block_delta\ndata: {oops\n\n" + sse(text_delta("x")))
    assert st.error == ("api_error", "provider sent an unparsable stream event")
    assert body.count(b"data: ") == 2 and b'"x"' not in body


def test_thinking_and_unknown_events_are_skipped() -> None:
    st = streamer(include_usage=False)
    thinking = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "thinking", "thinking": ""},
    }
    body = st.feed(
        sse(
            START,
            thinking,
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hm"},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "s"},
            },
            {"type": "brand_new_event"},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
            {"type": "message_stop"},
        )
    )
    chunks = [json.loads(line[6:]) for line in body.decode().split("\n\n") if line.startswith("data: {")]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {}]
    assert st.finished and not st.content_started and st.text_sent == ""
    assert body.endswith(b"data: [DONE]\n\n")


def test_progress_flags_track_tool_calls() -> None:
    st = streamer()
    tool = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "t", "name": "f", "input": {}},
    }
    st.feed(sse(START))
    assert not st.content_started and not st.tool_call_sent
    st.feed(sse(tool))
    assert st.content_started and st.tool_call_sent and st.text_sent == ""


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "status, body, exc, oa_type, code",
    [
        (
            429,
            b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}',
            openai.RateLimitError,
            "requests",
            "rate_limit_exceeded",
        ),
        (
            529,
            b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            openai.InternalServerError,
            "server_error",
            "overloaded",
        ),
        (
            500,
            b'{"type":"error","error":{"type":"api_error","message":"boom"}}',
            openai.InternalServerError,
            "server_error",
            None,
        ),
        (
            400,
            b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}',
            openai.BadRequestError,
            "invalid_request_error",
            None,
        ),
        (
            401,
            b'{"type":"error","error":{"type":"authentication_error","message":"key"}}',
            openai.AuthenticationError,
            "invalid_request_error",
            "invalid_api_key",
        ),
        (
            403,
            b'{"type":"error","error":{"type":"permission_error","message":"no"}}',
            openai.PermissionDeniedError,
            "invalid_request_error",
            "permission_denied",
        ),
        (
            404,
            b'{"type":"error","error":{"type":"not_found_error","message":"model"}}',
            openai.NotFoundError,
            "invalid_request_error",
            "not_found",
        ),
        (
            413,
            b'{"type":"error","error":{"type":"request_too_large","message":"big"}}',
            openai.APIStatusError,
            "invalid_request_error",
            "request_too_large",
        ),
        (
            503,
            b"<html>upstream connect error</html>",
            openai.InternalServerError,
            "server_error",
            "overloaded",
        ),
        (429, b"", openai.RateLimitError, "requests", "rate_limit_exceeded"),
    ],
)
def test_errors_raise_the_right_sdk_exception(
    status: int, body: bytes, exc: type[Exception], oa_type: str, code: str | None
) -> None:
    translated = translate_error(status, body)
    error = json.loads(translated)["error"]
    assert (error["type"], error["code"], error["param"]) == (oa_type, code, None)
    assert error["message"]
    with pytest.raises(exc) as info:
        openai_client(status, translated).chat.completions.create(model="x", messages=[])
    assert isinstance(info.value, openai.APIStatusError) and info.value.status_code == status


def test_non_json_error_keeps_the_text_or_says_the_status() -> None:
    assert json.loads(translate_error(502, b"Bad Gateway\n"))["error"]["message"] == "Bad Gateway"
    assert json.loads(translate_error(502, b""))["error"]["message"] == "provider returned HTTP 502"


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
            ("overloaded_error", None, "Overloaded"),
        ),
        (b'{"error":{"type":"x","code":429,"message":"m"}}', ("x", "429", "m")),
        (b'[{"error":{"type":"x","message":"m"}}]', ("x", None, "m")),
        (b'{"error":"plain message"}', (None, None, "plain message")),
        (b'{"message":"top-level"}', (None, None, "top-level")),
        (b"<html>", (None, None, None)),
        (b"\xff\xfe", (None, None, None)),
        (b'"string"', (None, None, None)),
        (b'{"error":{"type":{"nested":1}}}', (None, None, None)),
    ],
)
def test_provider_error_is_tolerant(body: bytes, expected: tuple[str | None, str | None, str | None]) -> None:
    assert provider_error(body) == expected

"""The shared SSE parser and serializer: line ends, fields, comments, splits anywhere, end of stream."""

from __future__ import annotations

import pytest

from extproc.translate.sse import SSEEvent, SSEParser, encode_event
from tests.unit.translate import input_bytes, random_cuts


def parse(data: bytes, cuts: list[int] | None = None) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    start = 0
    for cut in sorted(cuts or []):
        events += parser.feed(data[start:cut])
        start = cut
    events += parser.feed(data[start:])
    return events + parser.close()


def test_events_with_and_without_names() -> None:
    data = b'event: message_start\ndata: {"a":1}\n\ndata: [DONE]\n\n'
    assert parse(data) == [SSEEvent("message_start", '{"a":1}'), SSEEvent(None, "[DONE]")]


def test_multiline_data_is_joined_with_newlines() -> None:
    assert parse(b"data: a\ndata:b\ndata:  c\n\n") == [SSEEvent(None, "a\nb\n c")]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(newline: bytes) -> None:
    data = newline.join([b"event: e", b"data: x", b"", b"data: y", b"", b""])
    assert parse(data) == [SSEEvent("e", "x"), SSEEvent(None, "y")]


def test_comments_ids_retry_and_unknown_fields_are_ignored() -> None:
    data = b": keep-alive\n\nid: 7\nretry: 100\nfoo: bar\ndata: x\n\n"
    assert parse(data) == [SSEEvent(None, "x")]


def test_a_blank_line_without_data_dispatches_nothing_and_resets_the_name() -> None:
    assert parse(b"event: ping\n\ndata: x\n\n") == [SSEEvent(None, "x")]


def test_field_without_colon_and_value_without_space() -> None:
    assert parse(b"data\n\ndata:x\n\n") == [SSEEvent(None, ""), SSEEvent(None, "x")]


def test_leading_bom_is_stripped() -> None:
    assert parse(b"\xef\xbb\xbfdata: x\n\n", [1, 2]) == [SSEEvent(None, "x")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse(b"data: \xff\n\n") == [SSEEvent(None, "\ufffd")]


def test_end_of_stream_keeps_complete_lines_and_drops_a_cut_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: [DONE]\n") == []
    assert parser.close() == [SSEEvent(None, "[DONE]")]
    parser = SSEParser()
    assert parser.feed(b'data: {"cut') == []
    assert parser.close() == []


def test_a_trailing_cr_waits_for_a_possible_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r\n\r") == []
    assert parser.feed(b"\n") == [SSEEvent(None, "x")]
    parser = SSEParser()
    assert parser.feed(b"data: x\r\r") == []
    assert parser.close() == [SSEEvent(None, "x")]


@pytest.mark.parametrize(
    "fixture",
    [
        ("openai_to_anthropic", "stream.input.sse"),
        ("anthropic_to_openai", "stream.input.sse"),
    ],
)
def test_every_split_gives_the_same_events(fixture: tuple[str, str]) -> None:
    data = input_bytes(*fixture)
    whole = parse(data)
    assert len(whole) > 5
    assert parse(data, list(range(1, len(data)))) == whole  # one byte at a time
    crlf = data.replace(b"\n", b"\r\n")
    assert parse(crlf, list(range(1, len(crlf)))) == whole
    for seed in range(20):
        assert parse(data, random_cuts(data, seed, 30)) == whole


def test_encode_round_trips() -> None:
    wire = encode_event('{"type":"ping"}', "ping") + encode_event("a\nb\r\nc") + encode_event("[DONE]")
    assert wire.startswith(b'event: ping\ndata: {"type":"ping"}\n\n')
    assert parse(wire) == [
        SSEEvent("ping", '{"type":"ping"}'),
        SSEEvent(None, "a\nb\nc"),
        SSEEvent(None, "[DONE]"),
    ]


def test_encode_without_event_name() -> None:
    assert encode_event('{"a":"☃"}') == 'data: {"a":"☃"}\n\n'.encode()

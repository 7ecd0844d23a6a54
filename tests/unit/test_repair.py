"""Repairing a broken stream, as pure functions: what the client has, and the continuation spliced
into its one stream (regenerated or prefilled), in both APIs."""

from __future__ import annotations

import json

import pytest

from controlplane.apierrors import Api
from extproc.repair import Follower, Mismatch, Splice, events, terminal_error


def oai(content: str | None = None, role: bool = False, finish: str | None = None, ident: str = "c1") -> bytes:
    delta = {"role": "assistant", "content": ""} if role else ({"content": content} if content else {})
    return f"data: {json.dumps({'id': ident, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n".encode()


def ant(kind: str, **data: object) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def text_of(stream: list[bytes]) -> str:
    out = []
    for event in stream:
        data = json.loads(event.split(b"data: ", 1)[1]) if b"[DONE]" not in event else {}
        for choice in data.get("choices", []):
            out.append(choice.get("delta", {}).get("content") or "")
        if data.get("type") == "content_block_delta":
            out.append(data["delta"].get("text", ""))
    return "".join(out)


def test_events_are_taken_whole_and_a_half_event_waits() -> None:
    buffer = bytearray(b"data: 1\n\ndata: 2\n\ndata: 3")
    assert events(buffer) == [b"data: 1\n\n", b"data: 2\n\n"] and buffer == bytearray(b"data: 3")


def test_regenerated_openai_continuation_delivers_only_the_rest_under_one_id() -> None:
    follower = Follower(Api.OPENAI)
    for event in (oai(role=True), oai("The quick "), oai("brown")):
        follower.feed(event)
    assert follower.text == "The quick brown" and follower.id == "c1" and not follower.finished
    splice = Splice(Api.OPENAI, follower, "regenerate")
    out = [splice.feed(e) for e in (oai(role=True, ident="c2"), oai("The ", ident="c2"),
                                    oai("quick bro", ident="c2"), oai("wn fox", ident="c2"),
                                    oai(finish="stop", ident="c2"), b"data: [DONE]\n\n")]
    sent = [e for e in out if e]
    assert text_of(sent) == " fox"  # only what follows what the client has
    assert all(json.loads(e[6:])["id"] == "c1" for e in sent[:-1])  # the client's id
    assert not any(b'"role"' in e for e in sent)  # no second role preamble
    assert sent[-1] == b"data: [DONE]\n\n"


def test_a_regeneration_that_differs_is_a_mismatch() -> None:
    follower = Follower(Api.OPENAI)
    follower.feed(oai("The quick brown"))
    splice = Splice(Api.OPENAI, follower, "regenerate")
    with pytest.raises(Mismatch):
        splice.feed(oai("A slow green"))


def test_prefilled_anthropic_continuation_keeps_the_open_block_and_the_seam() -> None:
    follower = Follower(Api.ANTHROPIC)
    for event in (ant("message_start", message={"id": "msg_1"}),
                  ant("content_block_start", index=0, content_block={"type": "text", "text": ""}),
                  ant("content_block_delta", index=0, delta={"type": "text_delta", "text": "over the "})):
        follower.feed(event)
    splice = Splice(Api.ANTHROPIC, follower, "prefill")
    out = [splice.feed(e) for e in (ant("message_start", message={"id": "msg_2"}), ant("ping"),
                                    ant("content_block_start", index=0, content_block={"type": "text", "text": ""}),
                                    ant("content_block_delta", index=0, delta={"type": "text_delta", "text": " lazy"}),
                                    ant("content_block_delta", index=0, delta={"type": "text_delta", "text": " dog"}),
                                    ant("content_block_stop", index=0), ant("message_stop"))]
    sent = [e for e in out if e]
    assert text_of(sent) == "lazy dog"  # the space the prefill dropped is not sent twice
    assert [json.loads(e.split(b"data: ", 1)[1])["type"] for e in sent] == [
        "content_block_delta", "content_block_delta", "content_block_stop", "message_stop"]


def test_what_counts_as_a_break_and_as_a_tool_call() -> None:
    follower = Follower(Api.ANTHROPIC)
    assert follower.broken(b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}\n\n')
    assert not follower.broken(ant("ping"))
    follower.feed(ant("content_block_start", index=1, content_block={"type": "tool_use", "name": "f"}))
    assert follower.tool_call_sent
    openai_follower = Follower(Api.OPENAI)
    assert openai_follower.broken(b'data: {"error": {"message": "x"}}\n\n')
    assert openai_follower.broken(b'data: {"choices": [{"delta": {"cont\n\n')  # garbage for JSON
    assert not openai_follower.broken(b": keep-alive\n\n")
    openai_follower.feed(b'data: {"id":"c","choices":[{"delta":{"tool_calls":[{"index":0}]}}]}\n\n')
    assert openai_follower.tool_call_sent


def test_terminal_errors_are_well_formed_in_each_api() -> None:
    openai_end = terminal_error(Api.OPENAI, "gone")
    assert openai_end.endswith(b"data: [DONE]\n\n") and json.loads(openai_end.split(b"\n\n")[0][6:])["error"]
    anthropic_end = terminal_error(Api.ANTHROPIC, "gone")
    assert anthropic_end.startswith(b"event: error\n") and b'"type":"api_error"' in anthropic_end

"""The client speaks Anthropic Messages; the provider speaks OpenAI Chat Completions.

Requests go Anthropic -> OpenAI; responses, SSE streams and errors come back OpenAI -> Anthropic.
Every mapping and every dropped or refused field is listed in docs/translation.md.

Usage::

    tr = translate_request(client_body, model="gpt-4o")             # TranslatedRequest
    client_json = translate_response(provider_bytes, model="gpt-4o", created=now)
    st = StreamTranslator(model="gpt-4o", created=now, include_usage=tr.include_usage)
    out = st.feed(provider_chunk); ...; out += st.close()
    client_err = translate_error(429, provider_error_bytes)
"""

from __future__ import annotations

import json
from typing import Any

from extproc.translate import (
    StreamProgress,
    TranslatedRequest,
    Untranslatable,
    anthropic_status_type,
    as_int,
    as_obj,
    check_keys,
    compact_json,
    error_fields,
    require_list,
    require_str,
)
from extproc.translate.sse import SSEParser, encode_event

__all__ = [
    "StreamTranslator",
    "TranslatedRequest",
    "Untranslatable",
    "provider_error",
    "translate_error",
    "translate_request",
    "translate_response",
]

# ---------------------------------------------------------------------------------------------- request

# Top-level Anthropic fields that are hints or Anthropic-account bookkeeping with no effect on what a
# correct answer is; they are dropped. The reason for each is in docs/translation.md.
_DROPPED = frozenset({
    "service_tier", "cache_control", "diagnostics", "speed", "user_profile_id", "workspace_id",
})
_HANDLED = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
    "top_p", "top_k", "tools", "tool_choice", "thinking", "container", "mcp_servers", "context_management",
    "output_config", "output_format", "inference_geo",
})
_TOP_LEVEL = _DROPPED | _HANDLED


def translate_request(
    body: dict[str, Any], *, model: str, default_max_tokens: int = 4096
) -> TranslatedRequest:
    """Translate an Anthropic /v1/messages request into an OpenAI chat.completions request.

    ``default_max_tokens`` only applies when the client omitted max_tokens, which Anthropic requires.
    Raises Untranslatable for any field whose meaning OpenAI cannot carry.

    Usage: ``translate_request({"max_tokens": 100, "messages": [...]}, model="gpt-4o").body``
    """
    check_keys(body, "", _TOP_LEVEL)
    _refuse_unsupported(body)
    messages = _system(body.get("system")) + _messages(body.get("messages"))
    out: dict[str, Any] = {"model": model, "messages": messages}
    max_tokens = body.get("max_tokens")
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise Untranslatable("max_tokens", "must be an integer")
    # max_completion_tokens, not the deprecated max_tokens, which OpenAI's reasoning models reject.
    out["max_completion_tokens"] = max_tokens
    for key in ("temperature", "top_p"):  # Anthropic's ranges (0-1) sit inside OpenAI's
        if body.get(key) is not None:
            out[key] = body[key]
    stops = body.get("stop_sequences")
    if stops:
        out["stop"] = [require_str(s, f"stop_sequences[{i}]") for i, s in enumerate(require_list(stops, "stop_sequences"))]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(require_list(tools, "tools"))]
        out.update(_tool_choice(body.get("tool_choice")))
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and metadata.get("user_id"):
        out["user"] = require_str(metadata["user_id"], "metadata.user_id")
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
        # Anthropic streams always report usage, and OpenAI only sends it when asked.
        out["stream_options"] = {"include_usage": True}
    return TranslatedRequest(compact_json(out).encode(), stream, stream)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields that are fine only at their neutral value; anything else needs an Anthropic-only feature."""
    if body.get("top_k") is not None:
        raise Untranslatable("top_k", "OpenAI has no top-k sampling")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise Untranslatable("thinking", "OpenAI Chat Completions cannot return thinking blocks")
    for key in ("container", "context_management", "output_format", "inference_geo"):
        if body.get(key) is not None:
            raise Untranslatable(key, "an Anthropic-only feature")
    if body.get("mcp_servers"):
        raise Untranslatable("mcp_servers", "MCP servers are connected by Anthropic itself")
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise Untranslatable("output_config", "must be an object")
        # effort is a speed/quality hint; a required output format is a contract we cannot enforce.
        check_keys(config, "output_config", {"effort"})
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise Untranslatable("metadata", "must be an object")


def _system(system: Any) -> list[dict[str, Any]]:
    if system is None or system == "" or system == []:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    parts = []
    for i, block in enumerate(require_list(system, "system")):
        path = f"system[{i}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise Untranslatable(f"{path}.type", "only text blocks can form an OpenAI system message")
        check_keys(block, path, {"type", "text", "cache_control", "citations"})
        parts.append({"type": "text", "text": require_str(block.get("text"), f"{path}.text")})
    return [{"role": "system", "content": _collapse(parts)}]


def _messages(raw: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    msgs = require_list(raw, "messages")
    for i, msg in enumerate(msgs):
        path = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise Untranslatable(path, "must be an object")
        check_keys(msg, path, {"role", "content"})
        role = msg.get("role")
        if role == "user":
            out.extend(_user(msg.get("content"), f"{path}.content"))
        elif role == "assistant":
            if i == len(msgs) - 1:
                reason = "a final assistant message is a prefill: OpenAI would answer, not continue"
                raise Untranslatable(path, reason)
            turn = _assistant(msg.get("content"), f"{path}.content")
            if turn["content"] is not None or "tool_calls" in turn:
                out.append(turn)  # a turn that was only thinking said nothing; OpenAI rejects it empty
        else:
            raise Untranslatable(f"{path}.role", f"role {role!r} is not an Anthropic message role")
    return out


def _user(content: Any, path: str) -> list[dict[str, Any]]:
    """One Anthropic user turn -> OpenAI tool messages (its tool_result blocks) then one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(require_list(content, path)):
        bpath = f"{path}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(_text(block, bpath))
        elif kind == "image":
            parts.append(_image(block, bpath))
        elif kind == "tool_result":
            tools.append(_tool_result(block, bpath))
        else:
            raise Untranslatable(f"{bpath}.type", f"content block {kind!r} has no faithful OpenAI equivalent")
    # OpenAI needs tool results right after the assistant's tool_calls, so they go before the user's text.
    return tools + ([{"role": "user", "content": _collapse(parts)}] if parts else [])


def _text(block: dict[str, Any], path: str) -> dict[str, Any]:
    # cache_control is a caching hint; citations on history text only annotate where it came from.
    check_keys(block, path, {"type", "text", "cache_control", "citations"})
    return {"type": "text", "text": require_str(block.get("text"), f"{path}.text")}


def _image(block: dict[str, Any], path: str) -> dict[str, Any]:
    check_keys(block, path, {"type", "source", "cache_control"})
    source = as_obj(block.get("source"))
    kind = source.get("type")
    if kind == "base64":
        media_type = require_str(source.get("media_type"), f"{path}.source.media_type")
        data = require_str(source.get("data"), f"{path}.source.data")
        return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": require_str(source.get("url"), f"{path}.source.url")}}
    raise Untranslatable(f"{path}.source.type", f"image source {kind!r} has no OpenAI equivalent")


def _tool_result(block: dict[str, Any], path: str) -> dict[str, Any]:
    # is_error is dropped: OpenAI tool messages have no error flag, and the content states the failure.
    check_keys(block, path, {"type", "tool_use_id", "content", "is_error", "cache_control"})
    content = block.get("content")
    if content is None:
        text: str | list[dict[str, Any]] = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for k, item in enumerate(require_list(content, f"{path}.content")):
            ipath = f"{path}.content[{k}]"
            if not isinstance(item, dict) or item.get("type") != "text":
                raise Untranslatable(f"{ipath}.type", "OpenAI tool results can hold text only")
            parts.append(_text(item, ipath))
        text = _collapse(parts) if parts else ""
    call_id = require_str(block.get("tool_use_id"), f"{path}.tool_use_id")
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _assistant(content: Any, path: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(require_list(content, path)):
        bpath = f"{path}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append(_text(block, bpath))
        elif kind == "tool_use":
            calls.append(_tool_call(block, bpath))
        elif kind in ("thinking", "redacted_thinking"):
            continue  # Anthropic itself ignores thinking from earlier turns; OpenAI cannot take it
        else:
            raise Untranslatable(f"{bpath}.type", f"content block {kind!r} has no faithful OpenAI equivalent")
    msg: dict[str, Any] = {"role": "assistant", "content": _collapse(parts) if parts else None}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tool_call(block: dict[str, Any], path: str) -> dict[str, Any]:
    check_keys(block, path, {"type", "id", "name", "input", "cache_control", "caller"})
    caller = block.get("caller")
    if caller is not None and caller != {"type": "direct"}:
        raise Untranslatable(f"{path}.caller", "calls made by Anthropic's code execution have no equivalent")
    args = block.get("input")
    if not isinstance(args, dict):
        raise Untranslatable(f"{path}.input", "must be an object")
    return {
        "id": require_str(block.get("id"), f"{path}.id"),
        "type": "function",
        "function": {"name": require_str(block.get("name"), f"{path}.name"), "arguments": compact_json(args)},
    }


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone text part is sent as a plain string, the form every OpenAI-compatible server accepts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        text: str = parts[0]["text"]
        return text
    return parts


def _tool(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise Untranslatable(f"{path}.type", f"Anthropic-defined tool {kind!r} has no OpenAI equivalent")
    check_keys(tool, path, {
        "type", "name", "description", "input_schema", "strict", "cache_control", "eager_input_streaming",
        "defer_loading", "allowed_callers",
    })
    if tool.get("defer_loading"):
        raise Untranslatable(f"{path}.defer_loading", "deferred tools need Anthropic's tool search")
    callers = tool.get("allowed_callers")
    if callers is not None and list(callers) != ["direct"]:
        raise Untranslatable(f"{path}.allowed_callers", "only direct calls exist on OpenAI")
    fn: dict[str, Any] = {"name": require_str(tool.get("name"), f"{path}.name")}
    if tool.get("description") is not None:
        fn["description"] = require_str(tool["description"], f"{path}.description")
    fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    if tool.get("strict") is not None:
        fn["strict"] = bool(tool["strict"])
    return {"type": "function", "function": fn}


def _tool_choice(choice: Any) -> dict[str, Any]:
    """Anthropic tool_choice -> OpenAI tool_choice and parallel_tool_calls (returned as body fields)."""
    if choice is None:
        return {}
    if not isinstance(choice, dict):
        raise Untranslatable("tool_choice", "must be an object")
    kind = choice.get("type")
    if kind == "none":
        check_keys(choice, "tool_choice", {"type"})
        return {"tool_choice": "none"}
    if kind not in ("auto", "any", "tool"):
        raise Untranslatable("tool_choice.type", f"tool_choice {kind!r} is not auto, any, tool or none")
    check_keys(choice, "tool_choice", {"type", "name", "disable_parallel_tool_use"})
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    else:
        name = require_str(choice.get("name"), "tool_choice.name")
        out = {"tool_choice": {"type": "function", "function": {"name": name}}}
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


# ---------------------------------------------------------------------------------------------- response

_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def _stop_reason(finish: Any) -> str:
    # OpenAI does not say which stop sequence matched, so "stop" is always end_turn; unknown reasons too.
    return _STOP.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def _usage(raw: Any) -> dict[str, int]:
    """OpenAI usage -> Anthropic usage: prompt_tokens includes cached tokens, input_tokens does not."""
    usage = as_obj(raw)
    cached = as_int(as_obj(usage.get("prompt_tokens_details")).get("cached_tokens"))
    return {
        "input_tokens": max(as_int(usage.get("prompt_tokens")) - cached, 0),
        "output_tokens": as_int(usage.get("completion_tokens")),
        "cache_creation_input_tokens": 0,  # OpenAI caches implicitly: no tokens are billed as cache writes
        "cache_read_input_tokens": cached,
    }


def _parse_arguments(arguments: Any, path: str) -> dict[str, Any]:
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else {}
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise Untranslatable(path, "the provider's tool-call arguments are not a JSON object")
    return parsed


def translate_response(body: bytes, *, model: str, created: int) -> bytes:
    """Translate an OpenAI chat.completion (JSON success body) into an Anthropic message body.

    ``created`` is accepted for symmetry; Anthropic messages carry no timestamp. Raises
    Untranslatable (field path into the provider body) when the body is not a usable chat.completion,
    including tool-call arguments that are not a JSON object, so the gateway can treat it as a bad answer.

    Usage: ``translate_response(b'{"object":"chat.completion",...}', model="gpt-4o", created=1700000000)``
    """
    del created
    try:
        obj = json.loads(body)
    except ValueError:
        raise Untranslatable("body", "provider response is not JSON") from None
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Untranslatable("choices", "provider response has no choice")
    choice = choices[0]
    message = as_obj(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # some OpenAI-compatible servers answer with parts
        text = "".join(str(p.get("text", "")) for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "text", "text": refusal})  # the refusal is what the model said
    calls = message.get("tool_calls")
    for k, call in enumerate(calls if isinstance(calls, list) else []):
        fn = as_obj(as_obj(call).get("function"))
        path = f"choices[0].message.tool_calls[{k}]"
        content.append({
            "type": "tool_use",
            "id": as_obj(call).get("id") or f"toolu_{k}",
            "name": fn.get("name") or "",
            "input": _parse_arguments(fn.get("arguments"), f"{path}.function.arguments"),
        })
    stop_reason = "refusal" if refusal else _stop_reason(choice.get("finish_reason"))
    out = {
        "id": obj.get("id") or "msg_sidestep",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(obj.get("usage")),
    }
    return compact_json(out).encode()


# ---------------------------------------------------------------------------------------------- stream


class StreamTranslator(StreamProgress):
    """OpenAI chat.completion.chunk SSE -> Anthropic Messages SSE, event by event as bytes arrive.

    OpenAI reports usage only in a chunk after the finish_reason, so message_delta waits for that chunk
    (or for [DONE]). Read-only progress for stream recovery: ``text_sent``, ``tool_call_sent``,
    ``content_started``, ``finished`` (saw [DONE]) and ``error`` ((type, message) of an in-stream error).

    Usage: ``st = StreamTranslator(model="m", created=0, include_usage=True); send(st.feed(chunk))``
    """

    def __init__(self, *, model: str, created: int, include_usage: bool) -> None:
        # include_usage is accepted for symmetry: an Anthropic stream always carries usage.
        del include_usage
        super().__init__()
        self._parser = SSEParser()
        self._model = model
        self._created = created
        self._started = False
        self._next_block = 0  # index the next Anthropic content block gets
        self._open: int | None = None  # index of the open block, if any
        self._open_is_text = False
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool_calls index -> Anthropic block index
        self._stop_reason: str | None = None
        self._usage: dict[str, int] | None = None
        self._delta_sent = False

    def feed(self, chunk: bytes) -> bytes:
        """Provider bytes in (any split), client SSE bytes out (b"" when nothing is complete yet)."""
        events = self._parser.feed(chunk)
        if not events:
            return b""
        return b"".join(self._event(ev.data) for ev in events)

    def close(self) -> bytes:
        """The provider stream ended. Without [DONE] nothing is fabricated: ``finished`` stays False."""
        return b"".join(self._event(ev.data) for ev in self._parser.close())

    def _event(self, data: str) -> bytes:
        if self._dead or self.finished:
            return b""
        if data.startswith("[DONE]"):
            return self._done()
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            # Forwarding around a garbled event could silently lose part of the answer: stop here instead.
            return self._fail("api_error", "provider sent an unparsable stream event")
        if obj.get("error") is not None:
            kind, code, message = error_fields(obj)
            return self._fail(kind or "api_error", message or "", code)
        out = self._start(obj.get("id"))
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:  # n=1 is all we request
                    out += self._choice(choice)
        if isinstance(obj.get("usage"), dict):
            self._usage = _usage(obj["usage"])
            if self._stop_reason is not None:
                out += self._message_delta()
        return out

    def _start(self, chunk_id: Any) -> bytes:
        if self._started:
            return b""
        self._started = True
        message: dict[str, Any] = {
            "id": chunk_id if isinstance(chunk_id, str) and chunk_id else f"msg_{self._created}",
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # OpenAI reports usage only at the end; message_delta carries the real counts.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _event("message_start", {"type": "message_start", "message": message})

    def _choice(self, choice: dict[str, Any]) -> bytes:
        out = b""
        delta = as_obj(choice.get("delta"))
        for key in ("content", "refusal"):  # a streamed refusal is shown as the text the model said
            text = delta.get(key)
            if isinstance(text, str) and text:
                out += self._text_delta(text)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                if isinstance(call, dict):
                    out += self._tool_delta(call)
        finish = choice.get("finish_reason")
        if finish is not None and self._stop_reason is None:
            out += self._close_block()
            self._stop_reason = _stop_reason(finish)
        return out

    def _text_delta(self, text: str) -> bytes:
        out = b""
        if self._open is None or not self._open_is_text:
            out += self._close_block() + self._open_block({"type": "text", "text": ""}, is_text=True)
        self._text.append(text)
        self.content_started = True
        delta = {"type": "text_delta", "text": text}
        event = {"type": "content_block_delta", "index": self._open, "delta": delta}
        return out + _event("content_block_delta", event)

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        out = b""
        position = as_int(call.get("index"))
        fn = as_obj(call.get("function"))
        block = self._tool_blocks.get(position)
        if block is None:
            # A new call; the id is synthesized only for providers that omit it (tool_use needs one).
            call_id = call.get("id") or f"toolu_{self._created}_{position}"
            name = fn.get("name") or ""
            tool_use: dict[str, Any] = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
            out += self._close_block() + self._open_block(tool_use, is_text=False)
            block = self._tool_blocks[position] = self._next_block - 1
            self.tool_call_sent = self.content_started = True
        arguments = fn.get("arguments")
        if isinstance(arguments, str) and arguments:
            # A fragment for an earlier, already closed call (never seen from OpenAI) keeps that call's index,
            # which is how the SDKs accumulate input.
            delta = {"type": "content_block_delta", "index": block,
                     "delta": {"type": "input_json_delta", "partial_json": arguments}}
            out += _event("content_block_delta", delta)
            self.tool_call_sent = self.content_started = True
        return out

    def _open_block(self, block: dict[str, Any], *, is_text: bool) -> bytes:
        self._open, self._open_is_text = self._next_block, is_text
        self._next_block += 1
        start = {"type": "content_block_start", "index": self._open, "content_block": block}
        return _event("content_block_start", start)

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open = self._open, None
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _message_delta(self) -> bytes:
        if self._delta_sent:
            return b""
        self._delta_sent = True
        # Without a usage chunk (a provider that ignores include_usage) the counts are unknown: 0 is sent.
        usage: dict[str, int] = self._usage or {"output_tokens": 0}
        delta = {"stop_reason": self._stop_reason or "end_turn", "stop_sequence": None}
        return _event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})

    def _done(self) -> bytes:
        out = self._start(None) + self._close_block() + self._message_delta()
        self.finished = True
        return out + _event("message_stop", {"type": "message_stop"})

    def _fail(self, kind: str, message: str, code: str | None = None) -> bytes:
        self._dead = True
        self.error = (kind, message)
        error = {"type": _anthropic_type(None, kind, code), "message": message}
        return _event("error", {"type": "error", "error": error})


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return encode_event(compact_json(payload), name)


# ---------------------------------------------------------------------------------------------- errors

# OpenAI error type or code -> Anthropic error type, for errors without a status (in-stream) or an odd one.
_CODE_TYPES = {
    "rate_limit_exceeded": "rate_limit_error", "requests": "rate_limit_error", "tokens": "rate_limit_error",
    "rate_limit_error": "rate_limit_error", "insufficient_quota": "billing_error",
    "invalid_api_key": "authentication_error", "authentication_error": "authentication_error",
    "permission_error": "permission_error", "not_found_error": "not_found_error",
    "model_not_found": "not_found_error", "invalid_request_error": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error", "server_error": "api_error",
    "overloaded": "overloaded_error", "overloaded_error": "overloaded_error", "timeout": "timeout_error",
}


def _anthropic_type(status: int | None, kind: str | None, code: str | None) -> str:
    by_status = anthropic_status_type(status) if status is not None else None
    if by_status is not None:
        return by_status
    for key in (code, kind):
        if key in _CODE_TYPES:
            return _CODE_TYPES[key]
    if status is not None and 400 <= status < 500:
        return "invalid_request_error"
    return "api_error"


def provider_error(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) of an OpenAI error body; None for each part it does not give. Tolerates junk.

    Usage: ``provider_error(b'{"error":{"message":"slow","type":"requests","code":"rate_limit_exceeded"}}')``
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None, None
    return error_fields(obj)


def translate_error(status: int, body: bytes) -> bytes:
    """OpenAI error body (any shape, maybe not JSON) -> Anthropic ``{"type":"error","error":{...}}``.

    The HTTP status is the gateway's to keep; it also decides the Anthropic error type.

    Usage: ``translate_error(429, b'{"error":{"message":"slow","code":"rate_limit_exceeded"}}')``
    """
    kind, code, message = provider_error(body)
    if message is None:
        text = body.decode("utf-8", "replace").strip()[:2000]
        message = text or f"provider returned HTTP {status}"
    error = {"type": _anthropic_type(status, kind, code), "message": message}
    return compact_json({"type": "error", "error": error}).encode()

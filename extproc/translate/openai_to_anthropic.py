"""The client speaks OpenAI Chat Completions; the provider speaks Anthropic Messages.

Requests go OpenAI -> Anthropic; responses, SSE streams and errors come back Anthropic -> OpenAI.
Every mapping and every dropped or refused field is listed in docs/translation.md.

Usage::

    tr = translate_request(client_body, model="claude-sonnet-4-5")      # TranslatedRequest
    client_json = translate_response(provider_bytes, model="claude-sonnet-4-5", created=now)
    st = StreamTranslator(model="claude-sonnet-4-5", created=now, include_usage=tr.include_usage)
    out = st.feed(provider_chunk); ...; out += st.close()
    client_err = translate_error(529, provider_error_bytes)
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
from extproc.translate.sse import SSEParser

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

# Top-level OpenAI fields that are hints with no Anthropic counterpart and no effect on what a correct
# answer is; they are dropped. The reason for each is in docs/translation.md.
_DROPPED = frozenset({
    "frequency_penalty", "presence_penalty", "seed", "store", "metadata", "service_tier", "prediction",
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "reasoning_effort", "verbosity",
})
# Fields translated below, or checked for a harmless value (n=1, logprobs=false...).
_HANDLED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "user", "safety_identifier",
    "n", "logprobs", "top_logprobs", "logit_bias", "response_format", "modalities", "audio",
    "functions", "function_call", "web_search_options", "moderation",
})
_TOP_LEVEL = _DROPPED | _HANDLED

_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def translate_request(
    body: dict[str, Any], *, model: str, default_max_tokens: int = 4096
) -> TranslatedRequest:
    """Translate an OpenAI chat.completions request into an Anthropic /v1/messages request.

    Raises Untranslatable for any field whose meaning Anthropic cannot carry.

    Usage: ``translate_request({"model": "gpt-4o", "messages": [...]}, model="claude-sonnet-4-5").body``
    """
    check_keys(body, "", _TOP_LEVEL)
    _refuse_unsupported(body)
    system, messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens)}
    if system is not None:
        out["system"] = system
    out["messages"] = messages
    _sampling(body, out)
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t, f"tools[{i}]") for i, t in enumerate(require_list(tools, "tools"))]
        choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if choice is not None:
            out["tool_choice"] = choice
    # safety_identifier is OpenAI's newer name for the end-user id; Anthropic uses it for abuse detection too.
    user_key = "safety_identifier" if body.get("safety_identifier") else "user"
    if body.get(user_key):
        out["metadata"] = {"user_id": require_str(body[user_key], user_key)}
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
    options = body.get("stream_options") or {}
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return TranslatedRequest(compact_json(out).encode(), stream, include_usage)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Fields that are fine only at their neutral value; anything else changes the answer's shape."""
    if body.get("n") not in (None, 1):
        raise Untranslatable("n", "Anthropic returns exactly one choice")
    if body.get("logprobs"):
        raise Untranslatable("logprobs", "Anthropic does not return token log probabilities")
    if body.get("top_logprobs") not in (None, 0):
        raise Untranslatable("top_logprobs", "Anthropic does not return token log probabilities")
    if body.get("logit_bias"):
        raise Untranslatable("logit_bias", "Anthropic has no logit bias")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise Untranslatable("response_format", "Anthropic cannot guarantee a JSON / JSON-schema answer")
    modalities = body.get("modalities")
    if modalities is not None and list(modalities) != ["text"]:
        raise Untranslatable("modalities", "Anthropic answers with text only")
    if body.get("audio") is not None:
        raise Untranslatable("audio", "Anthropic answers with text only")
    if body.get("functions") or body.get("function_call") is not None:
        field = "functions" if body.get("functions") else "function_call"
        raise Untranslatable(field, "legacy function calling is not translated; use tools")
    if body.get("web_search_options") is not None:
        raise Untranslatable("web_search_options", "web search is a provider-side tool")
    if body.get("moderation") is not None:
        raise Untranslatable("moderation", "OpenAI moderation cannot run on an Anthropic provider")


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):  # max_tokens is OpenAI's deprecated name
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise Untranslatable(key, "must be an integer")
            return value
    return default  # Anthropic requires max_tokens; OpenAI's default is "as many as fit"


def _sampling(body: dict[str, Any], out: dict[str, Any]) -> None:
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
            raise Untranslatable("temperature", "must be a number")
        if temperature > 1:
            raise Untranslatable("temperature", "Anthropic accepts 0 to 1; values above 1 have no equal")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif stop:
        out["stop_sequences"] = [require_str(s, f"stop[{i}]") for i, s in enumerate(require_list(stop, "stop"))]


def _messages(raw: Any) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """Split OpenAI messages into Anthropic's top-level system prompt and alternating user/assistant turns."""
    system: list[str] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    last_turn = ""  # path of the last message that reaches Anthropic, for the prefill error
    for i, msg in enumerate(require_list(raw, "messages")):
        path = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise Untranslatable(path, "must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            check_keys(msg, path, {"role", "content", "name"})
            # Anthropic has one system prompt; system messages anywhere are hoisted into it, in order.
            system.extend(_text_parts(msg.get("content"), f"{path}.content"))
            continue
        if role == "user":
            check_keys(msg, path, {"role", "content", "name"})
            turns.append(("user", _user_blocks(msg.get("content"), f"{path}.content")))
        elif role == "assistant":
            turns.append(("assistant", _assistant_blocks(msg, path)))
        elif role == "tool":
            check_keys(msg, path, {"role", "content", "tool_call_id"})
            turns.append(("user", [_tool_result(msg, path)]))
        else:
            raise Untranslatable(f"{path}.role", f"role {role!r} has no Anthropic equivalent")
        if turns[-1][1]:
            last_turn = path
    messages = _merge(turns)
    if not messages:
        raise Untranslatable("messages", "Anthropic needs at least one user or assistant message")
    if messages[-1]["role"] == "assistant":
        raise Untranslatable(
            last_turn, "a final assistant message is a prefill: Anthropic would continue it, not answer"
        )
    system_out: str | list[dict[str, Any]] | None = None
    if len(system) == 1:
        system_out = system[0]
    elif system:
        system_out = [{"type": "text", "text": s} for s in system]
    return system_out, messages


def _merge(turns: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Drop empty turns and merge neighbours of the same role: Anthropic requires alternating roles."""
    out: list[dict[str, Any]] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": list(blocks)})
    for msg in out:
        if msg["role"] == "user":
            # Anthropic wants tool results first in a user turn; they answer the assistant turn just before.
            msg["content"].sort(key=lambda block: block["type"] != "tool_result")
        # A lone text block is sent as the plain-string shorthand, which is what most clients send.
        content = msg["content"]
        if len(content) == 1 and content[0]["type"] == "text" and len(content[0]) == 2:
            msg["content"] = content[0]["text"]
    return out


def _text_parts(content: Any, path: str) -> list[str]:
    """Text of a system/developer/tool content: a string or a list of text parts (empty ones skipped)."""
    if isinstance(content, str):
        return [content] if content else []
    texts = []
    for j, part in enumerate(require_list(content, path)):
        ppath = f"{path}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise Untranslatable(f"{ppath}.type", "only text parts are allowed here")
        check_keys(part, ppath, {"type", "text", "prompt_cache_breakpoint"})
        text = require_str(part.get("text"), f"{ppath}.text")
        if text:
            texts.append(text)
    return texts


def _user_blocks(content: Any, path: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        # Anthropic rejects empty text blocks; an empty user turn carries nothing and is dropped.
        return [{"type": "text", "text": content}] if content else []
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(require_list(content, path)):
        ppath = f"{path}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            check_keys(part, ppath, {"type", "text", "prompt_cache_breakpoint"})
            text = require_str(part.get("text"), f"{ppath}.text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            check_keys(part, ppath, {"type", "image_url", "prompt_cache_breakpoint"})
            blocks.append(_image(part.get("image_url"), f"{ppath}.image_url"))
        else:
            raise Untranslatable(f"{ppath}.type", f"content part {kind!r} has no faithful Anthropic form")
    return blocks


def _image(image: Any, path: str) -> dict[str, Any]:
    """OpenAI image_url (data: URL or http(s) URL) -> Anthropic image block; ``detail`` has no equivalent."""
    if not isinstance(image, dict):
        raise Untranslatable(path, "must be an object with a url")
    check_keys(image, path, {"url", "detail"})
    url = require_str(image.get("url"), f"{path}.url")
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if not url.startswith("data:"):
        raise Untranslatable(f"{path}.url", "only data: and http(s) image URLs are translated")
    header, comma, data = url[5:].partition(",")
    media_type, *params = header.split(";")
    media_type = media_type.strip().lower()
    if not comma or "base64" not in params:
        raise Untranslatable(f"{path}.url", "a data: URL must be base64-encoded")
    if media_type not in _IMAGE_TYPES:
        raise Untranslatable(f"{path}.url", f"Anthropic does not accept images of type {media_type!r}")
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(msg: dict[str, Any], path: str) -> list[dict[str, Any]]:
    check_keys(msg, path, {"role", "content", "name", "refusal", "tool_calls", "annotations"})
    blocks: list[dict[str, Any]] = []
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif content is not None:
        for j, part in enumerate(require_list(content, f"{path}.content")):
            ppath = f"{path}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "refusal"):
                raise Untranslatable(f"{ppath}.type", "assistant content parts must be text or refusal")
            check_keys(part, ppath, {"type", kind, "prompt_cache_breakpoint"})
            text = require_str(part.get(kind), f"{ppath}.{kind}")
            if text:
                blocks.append({"type": "text", "text": text})
    refusal = msg.get("refusal")
    if refusal:
        # A past refusal is what the assistant said; Anthropic has no refusal field in history.
        blocks.append({"type": "text", "text": require_str(refusal, f"{path}.refusal")})
    for k, call in enumerate(require_list(msg.get("tool_calls") or [], f"{path}.tool_calls")):
        blocks.append(_tool_use(call, f"{path}.tool_calls[{k}]"))
    return blocks


def _tool_use(call: Any, path: str) -> dict[str, Any]:
    if not isinstance(call, dict) or call.get("type", "function") != "function":
        raise Untranslatable(f"{path}.type", "only function tool calls are translated")
    check_keys(call, path, {"id", "type", "function"})
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise Untranslatable(f"{path}.function", "must be an object")
    check_keys(fn, f"{path}.function", {"name", "arguments"})
    args = fn.get("arguments")
    args = "" if args is None else require_str(args, f"{path}.function.arguments")
    try:
        # An empty string is how some clients record a call without arguments.
        parsed = json.loads(args) if args.strip() else {}
    except ValueError:
        raise Untranslatable(f"{path}.function.arguments", "not JSON; Anthropic needs an object") from None
    if not isinstance(parsed, dict):
        raise Untranslatable(f"{path}.function.arguments", "must be a JSON object for Anthropic")
    return {
        "type": "tool_use",
        "id": require_str(call.get("id"), f"{path}.id"),
        "name": require_str(fn.get("name"), f"{path}.function.name"),
        "input": parsed,
    }


def _tool_result(msg: dict[str, Any], path: str) -> dict[str, Any]:
    call_id = require_str(msg.get("tool_call_id"), f"{path}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        texts = _text_parts(content, f"{path}.content")
        if texts:
            block["content"] = [{"type": "text", "text": t} for t in texts]
    return block


def _tool(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise Untranslatable(f"{path}.type", "only function tools are translated")
    check_keys(tool, path, {"type", "function"})
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise Untranslatable(f"{path}.function", "must be an object")
    # "strict" is dropped: the schema still goes to Anthropic, which follows it without constrained decoding.
    check_keys(fn, f"{path}.function", {"name", "description", "parameters", "strict"})
    out: dict[str, Any] = {"name": require_str(fn.get("name"), f"{path}.function.name")}
    if fn.get("description") is not None:
        out["description"] = require_str(fn["description"], f"{path}.function.description")
    # OpenAI allows a function without parameters; Anthropic requires an object schema.
    out["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}  # no calls at all, so parallelism is moot (and "none" takes no flag)
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        check_keys(choice, "tool_choice", {"type", "function"})
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        out = {"type": "tool", "name": require_str(name, "tool_choice.function.name")}
    else:
        raise Untranslatable("tool_choice", "only auto, none, required and a named function are translated")
    if parallel is False:
        out = out or {"type": "auto"}
        out["disable_parallel_tool_use"] = True
    return out


# ---------------------------------------------------------------------------------------------- response

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _finish_reason(stop_reason: Any) -> str:
    # pause_turn only follows server tools, which are never requested; unknown reasons read as a plain stop.
    return _FINISH.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _usage(raw: Any) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage: input_tokens excludes cached tokens, prompt_tokens includes them."""
    usage = raw if isinstance(raw, dict) else {}
    uncached = as_int(usage.get("input_tokens"))
    cache_read = as_int(usage.get("cache_read_input_tokens"))
    cache_write = as_int(usage.get("cache_creation_input_tokens"))
    prompt = uncached + cache_read + cache_write
    completion = as_int(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def translate_response(body: bytes, *, model: str, created: int) -> bytes:
    """Translate an Anthropic message (JSON success body) into an OpenAI chat.completion body.

    Raises Untranslatable("body", ...) when the provider body is not an Anthropic message, so the gateway
    can treat it like any other bad provider answer.

    Usage: ``translate_response(b'{"type":"message",...}', model="claude-sonnet-4-5", created=1700000000)``
    """
    try:
        msg = json.loads(body)
    except ValueError:
        raise Untranslatable("body", "provider response is not JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
        raise Untranslatable("body", "provider response is not an Anthropic message")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in msg["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            calls.append({
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": compact_json(block.get("input") or {})},
            })
        # thinking / redacted_thinking (never requested) carry no answer text and are dropped.
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,  # OpenAI: null content beside tool calls
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    out = {
        "id": msg.get("id") or f"chatcmpl-{created}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": _finish_reason(msg.get("stop_reason")),
        }],
        "usage": _usage(msg.get("usage")),
    }
    return compact_json(out).encode()


# ---------------------------------------------------------------------------------------------- stream


class StreamTranslator(StreamProgress):
    """Anthropic Messages SSE -> OpenAI chat.completion.chunk SSE, event by event as bytes arrive.

    Read-only progress for stream recovery: ``text_sent``, ``tool_call_sent``, ``content_started``,
    ``finished`` (saw message_stop) and ``error`` ((type, message) of an in-stream provider error).

    Usage: ``st = StreamTranslator(model="m", created=0, include_usage=True); send(st.feed(chunk))``
    """

    def __init__(self, *, model: str, created: int, include_usage: bool) -> None:
        super().__init__()
        self._parser = SSEParser()
        self._model = model
        self._created = created
        self._include_usage = include_usage
        self._head: dict[str, Any] = {}  # id/object/created/model of every chunk, set at message_start
        self._prefix = b""  # chunk JSON up to the delta, built once: text deltas are the hot path
        self._suffix = b""
        self._started = False
        self._tool_index: dict[int, int] = {}  # Anthropic content block index -> OpenAI tool_calls index
        self._usage: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> bytes:
        """Provider bytes in (any split), client SSE bytes out (b"" when nothing is complete yet)."""
        events = self._parser.feed(chunk)
        if not events:
            return b""
        return b"".join(self._event(ev.event, ev.data) for ev in events)

    def close(self) -> bytes:
        """The provider stream ended. Without message_stop nothing is fabricated: ``finished`` stays False."""
        return b"".join(self._event(ev.event, ev.data) for ev in self._parser.close())

    def _event(self, name: str | None, data: str) -> bytes:
        if self._dead or self.finished:
            return b""
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            # Forwarding around a garbled event could silently lose part of the answer: stop here instead.
            return self._fail("api_error", "provider sent an unparsable stream event")
        # The data's own "type" is authoritative; the event line is only a fallback.
        kind = obj.get("type", name)
        if kind == "content_block_delta":
            return self._delta(obj)
        if kind == "content_block_start":
            return self._block_start(obj)
        if kind == "message_start":
            return self._message_start(obj)
        if kind == "message_delta":
            return self._message_delta(obj)
        if kind == "message_stop":
            self.finished = True
            return b"data: [DONE]\n\n"
        if kind == "error":
            err = as_obj(obj.get("error"))
            return self._fail(str(err.get("type") or "api_error"), str(err.get("message") or ""))
        return b""  # ping, content_block_stop and event types added later carry nothing for the client

    def _message_start(self, obj: dict[str, Any]) -> bytes:
        message = as_obj(obj.get("message"))
        self._usage.update({k: v for k, v in as_obj(message.get("usage")).items() if v is not None})
        return self._ensure_started(message.get("id"))

    def _ensure_started(self, msg_id: Any = None) -> bytes:
        if self._started:
            return b""
        self._started = True
        self._head = {"id": msg_id if isinstance(msg_id, str) and msg_id else f"chatcmpl-{self._created}",
                      "object": "chat.completion.chunk", "created": self._created, "model": self._model}
        self._prefix = f'{compact_json(self._head)[:-1]},"choices":[{{"index":0,"delta":'.encode()
        tail = ',"usage":null' if self._include_usage else ""  # OpenAI's shape when usage is requested
        self._suffix = f',"logprobs":null,"finish_reason":null}}]{tail}}}'.encode()
        return self._chunk({"role": "assistant", "content": ""})

    def _chunk(self, delta: dict[str, Any]) -> bytes:
        return b"data: " + self._prefix + compact_json(delta).encode() + self._suffix + b"\n\n"

    def _block_start(self, obj: dict[str, Any]) -> bytes:
        out = self._ensure_started()
        block = obj.get("content_block")
        if not isinstance(block, dict):
            return out
        if block.get("type") == "text" and block.get("text"):
            return out + self._text_delta(str(block["text"]))
        if block.get("type") != "tool_use":
            return out  # thinking and server-tool blocks are never requested; nothing to show
        index = len(self._tool_index)
        self._tool_index[as_int(obj.get("index"))] = index
        start = block.get("input")
        args = compact_json(start) if start else ""  # the real API starts with {} and streams the input
        self.tool_call_sent = self.content_started = True
        call = {"index": index, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": args}}
        return out + self._chunk({"tool_calls": [call]})

    def _delta(self, obj: dict[str, Any]) -> bytes:
        delta = obj.get("delta")
        if not isinstance(delta, dict):
            return b""
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            return self._ensure_started() + self._text_delta(text) if isinstance(text, str) and text else b""
        if kind == "input_json_delta":
            fragment = delta.get("partial_json")
            index = self._tool_index.get(as_int(obj.get("index")))
            if not fragment or index is None:
                return b""  # the API opens every tool input with an empty fragment
            self.tool_call_sent = self.content_started = True
            return self._chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
        return b""  # thinking, signature and citation deltas have no OpenAI counterpart

    def _text_delta(self, text: str) -> bytes:
        self._text.append(text)
        self.content_started = True
        return self._chunk({"content": text})

    def _message_delta(self, obj: dict[str, Any]) -> bytes:
        out = self._ensure_started()
        # message_delta usage is cumulative; its counts replace those of message_start.
        self._usage.update({k: v for k, v in as_obj(obj.get("usage")).items() if v is not None})
        delta = as_obj(obj.get("delta"))
        reason = _finish_reason(delta.get("stop_reason"))
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        finish: dict[str, Any] = {**self._head, "choices": [choice]}
        if self._include_usage:
            finish["usage"] = None
        out += b"data: " + compact_json(finish).encode() + b"\n\n"
        if self._include_usage:
            # OpenAI's last chunk before [DONE]: no choices, the whole request's usage.
            usage = {**self._head, "choices": [], "usage": _usage(self._usage)}
            out += b"data: " + compact_json(usage).encode() + b"\n\n"
        return out

    def _fail(self, kind: str, message: str) -> bytes:
        self._dead = True
        self.error = (kind, message)
        return b"data: " + compact_json({"error": _openai_error(kind, None, message)}).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------- errors

# Anthropic error type -> OpenAI (type, code), following the shapes OpenAI itself sends where they exist.
_ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
    "timeout_error": ("server_error", "timeout"),
}
def _status_type(status: int) -> str:
    """The Anthropic error type a body that does not say (or is not JSON at all) means, by its status."""
    return anthropic_status_type(status) or ("api_error" if status >= 500 else "invalid_request_error")


def _openai_error(kind: str | None, status: int | None, message: str) -> dict[str, Any]:
    known = kind if kind in _ERROR_TYPES else (_status_type(status) if status is not None else "api_error")
    oa_type, code = _ERROR_TYPES[known]
    return {"message": message, "type": oa_type, "param": None, "code": code}


def provider_error(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) of an Anthropic error body; (None, None, None) parts where it says nothing.

    Anthropic errors carry no code, so code is None unless the body has one. Tolerates junk bodies.

    Usage: ``provider_error(b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')``
    """
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None, None
    return error_fields(obj)


def translate_error(status: int, body: bytes) -> bytes:
    """Anthropic error body (any shape, maybe not JSON) -> OpenAI ``{"error": {...}}`` body; status is kept.

    Usage: ``translate_error(429, b'{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}')``
    """
    kind, _code, message = provider_error(body)
    if message is None:
        text = body.decode("utf-8", "replace").strip()[:2000]
        message = text or f"provider returned HTTP {status}"
    return compact_json({"error": _openai_error(kind, status, message)}).encode()

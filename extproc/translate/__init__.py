"""Pure translators between the OpenAI Chat Completions and Anthropic Messages APIs.

Used when a request fails over to a provider of the other API family. Modules:

- ``sse``: incremental Server-Sent Events parser and serializer, shared by both directions.
- ``openai_to_anthropic``: the client speaks OpenAI Chat Completions, the provider Anthropic Messages.
- ``anthropic_to_openai``: the client speaks Anthropic Messages, the provider OpenAI Chat Completions.

Each direction module exposes the same surface: ``translate_request``, ``translate_response``,
``StreamTranslator``, ``translate_error`` and ``provider_error``. Nothing here does I/O, touches grpc or
protobuf, or keeps global state; docs/translation.md has the field-by-field mapping and every choice.

Usage: ``from extproc.translate import openai_to_anthropic as o2a; o2a.translate_request(body, model="m")``
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "StreamProgress",
    "TranslatedRequest",
    "Untranslatable",
    "anthropic_status_type",
    "as_int",
    "as_obj",
    "check_keys",
    "compact_json",
    "error_fields",
    "require_list",
    "require_str",
]


class Untranslatable(ValueError):
    """A request field whose meaning the other API cannot carry faithfully.

    ``field`` is a JSON path into the client's body (``messages[2].content[0].type``) and ``reason`` says
    why, so the gateway can answer the client (or skip the provider) with a precise message.

    Usage: ``raise Untranslatable("top_k", "OpenAI has no top-k sampling")``
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TranslatedRequest:
    """The provider's request body plus what the client asked for, which the response side needs.

    Usage: ``tr = translate_request(body, model="m"); StreamTranslator(..., include_usage=tr.include_usage)``
    """

    body: bytes  # compact UTF-8 JSON for the provider, "model" set to the provider's model
    stream: bool  # the client asked for an SSE stream
    include_usage: bool  # the client's stream wants usage (always True for a streaming Anthropic client)


def compact_json(obj: Any) -> str:
    """Serialize without spaces and without \\u escapes of non-ASCII (bodies are UTF-8 anyway).

    Usage: ``compact_json({"a": 1}) == '{"a":1}'``
    """
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def check_keys(obj: Mapping[str, Any], path: str, allowed: Iterable[str]) -> None:
    """Raise Untranslatable for the first non-null key of ``obj`` that is not ``allowed``.

    A key whose value is null counts as absent: SDKs often send explicit nulls for unset options.

    Usage: ``check_keys(part, "messages[0].content[1]", {"type", "text"})``
    """
    allowed = allowed if isinstance(allowed, (set, frozenset)) else set(allowed)
    for key, value in obj.items():
        if value is not None and key not in allowed:
            raise Untranslatable(_join(path, key), "unknown field: not known to be safe to translate or drop")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def require_list(value: Any, path: str) -> list[Any]:
    """`value` when it is a list, else Untranslatable at `path` (reading the client's request)."""
    if not isinstance(value, list):
        raise Untranslatable(path, "must be a list")
    return value


def require_str(value: Any, path: str) -> str:
    """`value` when it is a string, else Untranslatable at `path` (reading the client's request)."""
    if not isinstance(value, str):
        raise Untranslatable(path, "must be a string")
    return value


def as_int(value: Any) -> int:
    """An integer of a provider body, else 0: provider bodies are read tolerantly."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def as_obj(value: Any) -> dict[str, Any]:
    """The value when it is a JSON object, else an empty one: provider bodies are read tolerantly."""
    return value if isinstance(value, dict) else {}


def _opt_str(value: Any) -> str | None:
    """A scalar as text (OpenAI-compatible servers sometimes send a numeric code); None otherwise."""
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


def error_fields(obj: Any) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) of a parsed error body of either API, or of an in-stream error event;
    None for each part it does not give. Tolerates the shapes simpler servers use: a list around
    the error, `{"error": "message"}`, or the error object at the top level."""
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if not isinstance(obj, dict):
        return None, None, None
    err = obj.get("error", obj)
    if isinstance(err, str):
        return None, None, err
    if not isinstance(err, dict):
        return None, None, None
    return _opt_str(err.get("type")), _opt_str(err.get("code")), _opt_str(err.get("message"))


# HTTP status -> Anthropic error type, for provider errors that do not say: the status is what the
# Anthropic SDKs and clients key on. (sidestep's own errors: `controlplane.apierrors.anthropic_type`,
# which calls a 503 of the gateway's an api_error, not a provider's overload.)
_ANTHROPIC_STATUS_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error",
}


def anthropic_status_type(status: int) -> str | None:
    """The Anthropic error type of a provider's HTTP status, when the status alone says it."""
    return _ANTHROPIC_STATUS_TYPES.get(status)


class StreamProgress:
    """What a stream translator has delivered to the client so far: the stream relay reads it to
    repair a stream that breaks (`text_sent`, `tool_call_sent`, `content_started`, `finished`: the
    provider's own end was seen, `error`: (type, message) of an in-stream provider error)."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._dead = False  # after an error event nothing more is forwarded
        self.tool_call_sent = False
        self.content_started = False
        self.finished = False
        self.error: tuple[str, str] | None = None

    @property
    def text_sent(self) -> str:
        """All assistant text delivered to the client so far."""
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

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

__all__ = ["TranslatedRequest", "Untranslatable", "check_keys", "compact_json"]


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

"""Find and replace the top-level `model` value of a JSON request body without re-serializing it.

The body reaches every attempt unchanged except the model value, so key order, whitespace and
unknown fields survive (provider prompt caches and signatures depend on exact bytes), and the
hot path never pays for json.dumps of a large prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["BadBody", "ModelField", "find_model", "replace_model"]

_decoder = json.JSONDecoder()
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = " \t\n\r"


class BadBody(ValueError):
    """The body is not a JSON object; the message says what is wrong, for the client."""


@dataclass(frozen=True, slots=True)
class ModelField:
    value: str | None  # None when the body has no string "model"
    start: int  # byte offsets of the value token (quotes included); -1 when absent
    end: int


def find_model(body: bytes) -> ModelField:
    """Walk the top-level object once; nested "model" keys (in messages, tools) are not touched.

    Raises `BadBody` for anything that is not one JSON object with at most one string "model":
    whatever the client sent (any nesting depth, truncation, bad escapes), never another error."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadBody(f"request body is not UTF-8 (byte {exc.start})") from None
    try:
        return _walk(text, body)
    except BadBody:
        raise
    except RecursionError:
        raise BadBody("request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise BadBody(f"request body is not valid JSON: {exc.msg} (character {exc.pos})") from None
    except ValueError:  # int() refuses numbers of more than 4300 digits
        raise BadBody("request body is not valid JSON: a number is too long") from None


def _walk(text: str, body: bytes) -> ModelField:
    n = len(text)
    i = _skip(text, 0)
    if i >= n or text[i] != "{":
        raise BadBody("request body must be a JSON object")
    i = _skip(text, i + 1)
    found: tuple[str | None, int, int] = (None, -1, -1)
    if i < n and text[i] == "}":
        return _check_trailing(text, i + 1, found, body)
    while True:
        if i >= n or text[i] != '"':
            raise BadBody(f"request body is not valid JSON (expected a key at character {i})")
        key, i = _scanstring(text, i + 1)
        i = _skip(text, i)
        if i >= n or text[i] != ":":
            raise BadBody(f"request body is not valid JSON (expected ':' at character {i})")
        i = _skip(text, i + 1)
        value, end = _decoder.raw_decode(text, i)
        if key == "model":
            if not isinstance(value, str):
                raise BadBody('"model" must be a string')
            if found[1] >= 0:
                raise BadBody('"model" appears more than once in the request body')
            found = (value, i, end)
        i = _skip(text, end)
        if i < n and text[i] == ",":
            i = _skip(text, i + 1)
            continue
        if i < n and text[i] == "}":
            return _check_trailing(text, i + 1, found, body)
        raise BadBody(f"request body is not valid JSON (expected ',' or '}}' at character {i})")


def replace_model(body: bytes, field: ModelField, model_id: str) -> bytes:
    """The body with the model value replaced; every other byte unchanged."""
    if field.start < 0:
        return body
    return body[: field.start] + json.dumps(model_id).encode() + body[field.end:]


def _skip(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _check_trailing(text: str, i: int, found: tuple[str | None, int, int], body: bytes) -> ModelField:
    if _skip(text, i) != len(text):
        raise BadBody("request body is not valid JSON (extra data after the object)")
    value, start, end = found
    if start < 0:
        return ModelField(value, -1, -1)
    if len(body) != len(text):  # non-ASCII before or inside the value: map characters to bytes
        start, end = len(text[:start].encode()), len(text[:end].encode())
    return ModelField(value, start, end)

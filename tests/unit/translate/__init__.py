"""Helpers shared by the translator tests: golden files, split feeding and SDK clients on a mock transport.

Golden files live in golden/<direction>/: NAME.input.* is what the translator is given, NAME.expected.*
what it must produce. After a deliberate change, regenerate the expected files with
``SIDESTEP_UPDATE_GOLDEN=1 python3 -m pytest tests/unit/translate -q`` and review the diff.

Usage: ``assert_golden_json("openai_to_anthropic", "request", tr.body)``
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the SDKs are imported where used, so test_sse.py runs without them
    import anthropic
    import httpx2
    import openai

__all__ = [
    "GOLDEN",
    "Streamer",
    "anthropic_client",
    "assert_golden_bytes",
    "assert_golden_json",
    "feed_in_pieces",
    "input_bytes",
    "input_json",
    "openai_client",
    "random_cuts",
]

GOLDEN = Path(__file__).parent / "golden"
_UPDATE = os.environ.get("SIDESTEP_UPDATE_GOLDEN") == "1"


class Streamer(Protocol):
    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...


def input_bytes(direction: str, name: str) -> bytes:
    return (GOLDEN / direction / name).read_bytes()


def input_json(direction: str, name: str) -> Any:
    return json.loads(input_bytes(direction, name))


def assert_golden_json(direction: str, name: str, actual: bytes) -> None:
    """Compare a JSON body with golden/<direction>/<name>.expected.json, parsed (the file is pretty)."""
    path = GOLDEN / direction / f"{name}.expected.json"
    parsed = json.loads(actual)
    if _UPDATE:
        path.write_text(json.dumps(parsed, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert parsed == json.loads(path.read_bytes())
    # Bodies go on the wire compact: no whitespace between tokens.
    assert actual == json.dumps(parsed, separators=(",", ":"), ensure_ascii=False).encode()


def assert_golden_bytes(direction: str, name: str, actual: bytes) -> None:
    """Compare SSE output byte for byte with golden/<direction>/<name>."""
    path = GOLDEN / direction / name
    if _UPDATE:
        path.write_bytes(actual)
    assert actual == path.read_bytes()


def feed_in_pieces(streamer: Streamer, data: bytes, cuts: Iterable[int]) -> bytes:
    """Feed ``data`` cut at the given offsets, then close; return everything the streamer produced."""
    out, start = [], 0
    for cut in sorted(set(cuts)):
        out.append(streamer.feed(data[start:cut]))
        start = cut
    out.append(streamer.feed(data[start:]))
    out.append(streamer.close())
    return b"".join(out)


def random_cuts(data: bytes, seed: int, count: int) -> list[int]:
    """Random cut offsets; byte offsets land inside multi-byte UTF-8 characters too."""
    rng = random.Random(seed)
    return rng.sample(range(1, len(data)), min(count, len(data) - 1))


def _transport(status: int, body: bytes, content_type: str) -> httpx2.MockTransport:
    import httpx2

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, content=body, headers={"content-type": content_type})

    return httpx2.MockTransport(handler)


# The current SDKs (openai 3.x, anthropic 2.x) are built on httpx2, so the mock transport is httpx2's.
def openai_client(status: int, body: bytes, content_type: str = "application/json") -> openai.OpenAI:
    import httpx2
    import openai

    http = httpx2.Client(transport=_transport(status, body, content_type))
    return openai.OpenAI(api_key="test", base_url="http://provider.test/v1", http_client=http, max_retries=0)


def anthropic_client(status: int, body: bytes, content_type: str = "application/json") -> anthropic.Anthropic:
    import anthropic
    import httpx2

    http = httpx2.Client(transport=_transport(status, body, content_type))
    return anthropic.Anthropic(
        api_key="test", base_url="http://provider.test", http_client=http, max_retries=0
    )

"""The API surface sidestep serves: which requests reach a provider, and how each is treated.

Envoy routes exactly these (after normalizing the path); anything else is a 404 from sidestep
itself, so no provider ever sees it, or a key. The ext_proc looks a request up here to know the
caller's API family, what kind of model it needs, and whether it may fail over or be translated.

    body "json"       a JSON object with a "model": routed, retried and failed over by the policy
    body "multipart"  multipart/form-data with a "model" field (audio, image edits): sent to that
                      model's provider with the model value rewritten; never failed over
    body "none"       no model at all (GET /v1/files, /v1/responses/{id}, …): sent unchanged to the
                      default model's provider, or the one named by `x-sidestep-model`; never failed over
    body "answered"   answered by sidestep itself (GET /v1/models: the models the client's key may use)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controlplane.apierrors import Api

__all__ = ["CHAT_COMPLETIONS", "ENDPOINTS", "Endpoint", "find_endpoint"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str  # an exact path, or a regex when `pattern`
    api: Api  # the API family of a client calling it (decides error shapes and translation)
    kind: str  # the kind of model it needs ("chat", "embeddings", …): failover stays within it
    body: str  # "json" | "multipart" | "none" | "answered"
    translatable: bool = False  # an OpenAI Chat ⇄ Anthropic Messages request sidestep can translate
    streams: bool = False  # may ask for an SSE stream (`"stream": true`), held until its commit point
    pattern: bool = False

    @property
    def fails_over(self) -> bool:
        return self.body == "json"

    @property
    def route(self) -> str:
        """A name for metrics: the path, `{id}` for an id (`/v1/files/{id}(/content)?`)."""
        if not self.pattern:
            return self.path
        return self.path.strip("^$").replace(_ID, "{id}").replace("[A-Za-z0-9_.:/-]+", "{id}")


_ID = "[A-Za-z0-9_.:-]+"
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions", Api.OPENAI, "chat", "json", translatable=True, streams=True),
    Endpoint("POST", "/v1/messages", Api.ANTHROPIC, "chat", "json", translatable=True, streams=True),
    Endpoint("POST", "/v1/messages/count_tokens", Api.ANTHROPIC, "chat", "json"),
    Endpoint("POST", "/v1/responses", Api.OPENAI, "chat", "json", streams=True),
    Endpoint("POST", "/v1/completions", Api.OPENAI, "chat", "json", streams=True),
    Endpoint("POST", "/v1/embeddings", Api.OPENAI, "embeddings", "json"),
    Endpoint("POST", "/v1/moderations", Api.OPENAI, "moderation", "json"),
    Endpoint("POST", "/v1/images/generations", Api.OPENAI, "images", "json"),
    Endpoint("POST", "/v1/audio/speech", Api.OPENAI, "audio", "json"),
    Endpoint("POST", "/v1/audio/transcriptions", Api.OPENAI, "audio", "multipart"),
    Endpoint("POST", "/v1/audio/translations", Api.OPENAI, "audio", "multipart"),
    Endpoint("POST", "/v1/images/edits", Api.OPENAI, "images", "multipart"),
    Endpoint("POST", "/v1/images/variations", Api.OPENAI, "images", "multipart"),
    Endpoint("POST", "/v1/files", Api.OPENAI, "files", "none"),
    Endpoint("GET", "/v1/files", Api.OPENAI, "files", "none"),
    Endpoint("GET", f"^/v1/files/{_ID}(/content)?$", Api.OPENAI, "files", "none", pattern=True),
    Endpoint("DELETE", f"^/v1/files/{_ID}$", Api.OPENAI, "files", "none", pattern=True),
    Endpoint("GET", f"^/v1/responses/{_ID}(/input_items)?$", Api.OPENAI, "chat", "none", pattern=True),
    Endpoint("DELETE", f"^/v1/responses/{_ID}$", Api.OPENAI, "chat", "none", pattern=True),
    Endpoint("POST", f"^/v1/responses/{_ID}/cancel$", Api.OPENAI, "chat", "none", pattern=True),
    Endpoint("GET", "/v1/models", Api.OPENAI, "models", "answered"),
    Endpoint("GET", "^/v1/models/[A-Za-z0-9_.:/-]+$", Api.OPENAI, "models", "answered", pattern=True),
)
CHAT_COMPLETIONS = ENDPOINTS[0]
_EXACT = {(e.method, e.path): e for e in ENDPOINTS if not e.pattern}
_PATTERNS = [(e.method, re.compile(e.path), e) for e in ENDPOINTS if e.pattern]


def find_endpoint(method: str, path: str) -> Endpoint | None:
    """The endpoint a request calls (query string ignored), or None for one sidestep does not serve."""
    path = path.partition("?")[0]
    endpoint = _EXACT.get((method, path))
    if endpoint is not None:
        return endpoint
    return next((e for m, regex, e in _PATTERNS if m == method and regex.match(path)), None)

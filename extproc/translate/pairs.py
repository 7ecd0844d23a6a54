"""Which translator a (client API, provider API) pair needs, and where the provider listens for it.

Usage: `d = direction(Api.OPENAI, target.api)`; None when nothing needs translating (same API, or a
provider that speaks whatever the client speaks).
"""

from __future__ import annotations

from types import ModuleType

from controlplane.apierrors import Api
from extproc.translate import anthropic_to_openai, openai_to_anthropic

__all__ = ["PROVIDER_PATHS", "direction", "provider_error"]

_DIRECTIONS: dict[tuple[Api, Api], ModuleType] = {
    (Api.OPENAI, Api.ANTHROPIC): openai_to_anthropic,
    (Api.ANTHROPIC, Api.OPENAI): anthropic_to_openai,
}
# The path a translated request is sent to (a base_url path prefix still applies).
PROVIDER_PATHS = {Api.OPENAI: "/v1/chat/completions", Api.ANTHROPIC: "/v1/messages"}


def direction(client: Api, provider: Api | None) -> ModuleType | None:
    """The translator module from `client`'s API to `provider`'s, or None when none is needed.

    Each module has `translate_request`, `translate_response`, `StreamTranslator`,
    `translate_error` and `provider_error` (see extproc/translate/openai_to_anthropic.py)."""
    if provider is None or provider is client:
        return None
    return _DIRECTIONS[(client, provider)]


def provider_error(provider: Api | None, body: bytes) -> tuple[str | None, str | None, str | None]:
    """(type, code, message) of a provider's error body, in the provider's API (either when unknown)."""
    if provider is Api.ANTHROPIC:
        return openai_to_anthropic.provider_error(body)
    return anthropic_to_openai.provider_error(body)  # OpenAI's shape; reads Anthropic's too

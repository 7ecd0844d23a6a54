"""Small builders the unit tests share."""

from __future__ import annotations

from controlplane.config.runtime import ClientKey
from controlplane.endpoints import CHAT_COMPLETIONS, find_endpoint
from extproc.auth import Credentials
from extproc.coordinator import ClientRequest


def req(path: str = "/v1/chat/completions", credentials: Credentials = (), client: ClientKey | None = None,
        method: str = "POST", **extra: object) -> ClientRequest:
    """A first attempt's `ClientRequest` for `path` (a path sidestep does not serve counts as chat)."""
    endpoint = find_endpoint(method, path) or CHAT_COMPLETIONS
    return ClientRequest(path, endpoint, credentials, client, **extra)  # type: ignore[arg-type]

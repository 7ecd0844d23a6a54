"""Gateway keys: who the client is, from the credential header its SDK sends. Pure; no grpc.

The openai SDK sends its api_key as `Authorization: Bearer …`, the anthropic SDK as `x-api-key`;
`x-sidestep-key` lets a client send a gateway key beside its own provider key (for
`passthrough_auth` entries). The header that carried the gateway key is consumed: it never
reaches a provider. Every other credential header stays with the request, and only a
`passthrough_auth` entry ever receives those.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane import apierrors
from controlplane import internalapi as api
from controlplane.apierrors import ApiError
from controlplane.config.runtime import ClientKey, key_digest

__all__ = ["Credentials", "authenticate"]

Credentials = tuple[tuple[str, bytes], ...]  # (lower-case header name, raw value), as the client sent them

# Where a gateway key may be, in the order they are tried.
_KEY_HEADERS = (api.GATEWAY_KEY_HEADER, "authorization", "x-api-key")


def authenticate(keys: Mapping[bytes, ClientKey], credentials: Credentials) -> tuple[ClientKey, Credentials] | ApiError:
    """The gateway key the client presented, and its credentials without the header that carried it.

    Usage: `client, rest = authenticate(gateway.client_keys, creds)` when `gateway.client_keys` is
    not empty. Keys are looked up by their SHA-256 digest: how long the lookup takes depends on
    the digest, never on how much of a guessed key matches a real one."""
    presented = False
    for name in _KEY_HEADERS:
        for index, (header, value) in enumerate(credentials):
            if header != name:
                continue
            secret = value
            if name == "authorization":
                if value[:7].lower() != b"bearer ":
                    continue  # Basic or another scheme: not a gateway key
                secret = value[7:].strip()
            presented = True
            client = keys.get(key_digest(secret))
            if client is not None:
                return client, credentials[:index] + credentials[index + 1:]
    if not presented:
        return apierrors.unauthenticated(
            "this gateway requires a gateway key: send it as your SDK's api_key (Authorization: Bearer … "
            f"or x-api-key), or in {api.GATEWAY_KEY_HEADER}")
    return apierrors.unauthenticated("the gateway key is not valid (check the key your client sends)")


"""Every error body the gateway writes, in the API shape of the caller.

    ApiError(status, type, message, …)      .body(api) → bytes
    ├── the client's fault: the same request can never succeed
    │   ├── invalid_request   400  malformed body, missing model
    │   ├── unauthenticated   401  no or a wrong gateway key
    │   ├── forbidden         403  the gateway key may not use that model
    │   ├── not_found         404  an endpoint sidestep does not serve
    │   ├── model_not_found   404  a model that is not configured
    │   ├── request_timeout   408  the request was not received in time (rendered into Envoy's config)
    │   └── request_too_large 413
    ├── the providers': retry_exhausted (the last attempt's status; `extproc.policy.errors.exhausted`)
    ├── a provider's answer that is not one: bad_provider_response 502 (an untranslatable response)
    └── sidestep's own: internal_error 500, gateway_failed 502 (its processor died after sending the
        request on, or lost a request's history), gateway_unavailable 503, routing_header_missing 400
        (the dispatch listener reached unrouted: a bug), gateway_error (any other Envoy reply)

The ext_proc writes these as immediate responses; `controlplane.render.envoy` renders the same
bodies (or JSON templates of them, for Envoy's own replies) into Envoy's config. Nothing else
writes an error body.

Shapes: OpenAI paths get `{"error": {"type", "message", …}}`; Anthropic's `/v1/messages` gets
`{"type": "error", "error": {"type", "message", …}}` with Anthropic's error types, which the
anthropic SDK classifies by.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "Api",
    "ApiError",
    "bad_provider_response",
    "gateway_error",
    "routing_header_missing",
    "anthropic_type",
    "api_for_path",
    "forbidden",
    "gateway_failed_after_sending",
    "gateway_unavailable",
    "internal_error",
    "invalid_request",
    "model_not_found",
    "not_found",
    "request_timeout",
    "request_too_large",
    "state_lost",
    "unauthenticated",
]


class Api(StrEnum):
    """The API family a client speaks, which decides the shape of the errors it gets."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


ANTHROPIC_PATH = "/v1/messages"


def api_for_path(path: str) -> Api:
    """The API a client speaks, from its request path (`/v1/messages…` is Anthropic's)."""
    return Api.ANTHROPIC if path.startswith(ANTHROPIC_PATH) else Api.OPENAI


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
                    429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}


def anthropic_type(status: int) -> str:
    """Anthropic's error type for a status (the anthropic SDK and its users switch on it)."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error the gateway answers with. `type` is sidestep's name for it (the OpenAI shape's
    `type`); `details` are extra fields of the error object (attempts, code, …)."""

    status: int
    type: str
    message: str
    retry_after: int | None = None  # seconds; sent as Retry-After
    details: Mapping[str, Any] = field(default_factory=dict)
    retryable: bool = False  # may the client's SDK retry it? (x-should-retry; see Replies.error)
    ledger: str = "none"  # what was tried (`extproc.policy.ledger`), sent as x-sidestep-ledger

    def body(self, api: Api = Api.OPENAI) -> bytes:
        return json.dumps(self.payload(api), separators=(",", ":")).encode()

    def payload(self, api: Api = Api.OPENAI) -> dict[str, Any]:
        if api is Api.ANTHROPIC:
            return {"type": "error", "error": {"type": anthropic_type(self.status), "message": self.message,
                                               "sidestep_type": self.type, **self.details}}
        return {"error": {"type": self.type, "message": self.message, **self.details}}


def invalid_request(message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", message)


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "authentication_error", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "permission_error", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def model_not_found(message: str) -> ApiError:
    return ApiError(404, "model_not_found", message)


def request_timeout(seconds: float) -> ApiError:
    return ApiError(408, "request_timeout", f"the request was not received within {seconds:g}s "
                                            f"(listeners[].request_timeout); it was not sent to any provider",
                    retryable=True)


def request_too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the request body exceeds this listener's limit of {limit} bytes "
                                              f"(listeners[].max_request_body_bytes)")


def bad_provider_response(model: str, reason: str) -> ApiError:
    return ApiError(502, "bad_provider_response", f"{model} answered with something that is not a valid "
                                                  f"response: {reason}")


def routing_header_missing(header: str) -> ApiError:
    return ApiError(400, "routing_header_missing", f"the attempt reached sidestep's dispatch listener without a "
                                                   f"valid {header} header; the ext_proc did not route it")


def gateway_error(message: str) -> ApiError:
    """Any other reply of Envoy's own (rendered as a template: `message` is Envoy's text)."""
    return ApiError(500, "gateway_error", message)


def internal_error() -> ApiError:
    return ApiError(500, "internal_error", "sidestep failed while handling this request (a bug: see "
                                           "`sidestep logs extproc`)", retryable=True)


def gateway_unavailable(message: str) -> ApiError:
    return ApiError(503, "gateway_unavailable", message, retryable=True)


def state_lost() -> ApiError:
    return ApiError(502, "gateway_failed", "sidestep lost this request's history between two attempts (its "
                                          "request processor restarted); an earlier attempt may have reached a "
                                          "provider. Check `sidestep logs extproc` before retrying.")


def gateway_failed_after_sending() -> ApiError:
    return ApiError(502, "gateway_failed", "sidestep's request processor failed while the request was at a "
                                          "provider: the provider may have received it (and may bill it). "
                                          "Check `sidestep logs extproc` before retrying.")

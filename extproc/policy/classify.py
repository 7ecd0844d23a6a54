"""Classify one attempt's response headers into an `Outcome`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum

__all__ = ["ErrorType", "Outcome", "classify", "parse_retry_after"]


class ErrorType(StrEnum):
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection_error"
    AUTH = "auth_error"
    CLIENT_ERROR = "client_error"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int  # the provider's, or 504 (attempt timeout) / 502 (provider unreachable)
    error_type: ErrorType | None  # None: the attempt succeeded
    retry_after: float | None = None  # seconds, when the provider sent Retry-After

    @property
    def ok(self) -> bool:
        return self.error_type is None


def classify(status: int, details: str | None, retry_after: str | None, wall_now: float) -> Outcome:
    """`details` is the dispatch listener's %RESPONSE_CODE_DETAILS%: `via_upstream` when the provider
    answered, `upstream_per_try_timeout` when the attempt timed out, `upstream_reset…` when the
    connection failed. Only a provider's own answer can be a success or carry Retry-After."""
    if details is not None and details != "via_upstream":
        if details == "upstream_per_try_timeout":
            return Outcome(504, ErrorType.TIMEOUT)
        return Outcome(502, ErrorType.CONNECTION)
    if status < 400:
        return Outcome(status, None)
    wait = parse_retry_after(retry_after, wall_now) if retry_after else None
    if status == 429:
        return Outcome(status, ErrorType.RATE_LIMITED, wait)
    if status >= 500:
        return Outcome(status, ErrorType.SERVER_ERROR, wait)
    if status in (401, 403):
        return Outcome(status, ErrorType.AUTH)
    return Outcome(status, ErrorType.CLIENT_ERROR)


def parse_retry_after(value: str, wall_now: float) -> float | None:
    """Seconds from a Retry-After value: delta-seconds or an HTTP date. None when unreadable."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - wall_now
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)

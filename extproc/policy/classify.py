"""Classify one attempt's response (its status, and what the provider's error body said) into an
`Outcome`: what kind of failure, and what it means for where the request may go next."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

__all__ = ["ErrorType", "Meaning", "Outcome", "ProviderError", "classify", "parse_retry_after"]


class ErrorType(StrEnum):
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECTION = "connection_error"
    AUTH = "auth_error"
    CLIENT_ERROR = "client_error"


class Meaning(StrEnum):
    """What a provider's error says beyond its status, when it changes where the request may go."""

    CONTEXT_LENGTH = "context_length"  # the prompt is too long: only a model with a larger window can serve it
    CONTENT_POLICY = "content_policy"  # refused for its content: every model would refuse it; never failed over
    QUOTA = "quota"  # the key or account is out of credit: no use retrying it soon, unlike a burst 429


@dataclass(frozen=True, slots=True)
class ProviderError:
    """A provider's own error, as its body said it (any part may be missing)."""

    type: str | None
    code: str | None
    message: str | None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("type", self.type), ("code", self.code), ("message", self.message)) if v}


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int  # the provider's, or 504 (attempt timeout) / 502 (provider unreachable)
    error_type: ErrorType | None  # None: the attempt succeeded
    retry_after: float | None = None  # seconds, when the provider sent Retry-After
    meaning: Meaning | None = None  # what the provider's error body said, when it matters

    @property
    def ok(self) -> bool:
        return self.error_type is None


def classify(status: int, details: str | None, retry_after: str | None, wall_now: float,
             error: ProviderError | None = None) -> Outcome:
    """`details` is the dispatch listener's %RESPONSE_CODE_DETAILS%: `via_upstream` when the provider
    answered, `upstream_per_try_timeout` when the attempt timed out, `upstream_reset…` when the
    connection failed. Only a provider's own answer can be a success or carry Retry-After. `error`:
    what the provider's error body said (see `meaning`)."""
    if details is not None and details != "via_upstream":
        if details == "upstream_per_try_timeout":
            return Outcome(504, ErrorType.TIMEOUT)
        return Outcome(502, ErrorType.CONNECTION)
    if status < 400:
        return Outcome(status, None)
    wait = parse_retry_after(retry_after, wall_now) if retry_after else None
    said = meaning(status, error)
    if said is Meaning.QUOTA:
        return Outcome(status, ErrorType.RATE_LIMITED, wait, said)
    if said is not None:
        return Outcome(status, ErrorType.CLIENT_ERROR, wait, said)
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


_CONTEXT = re.compile(r"context[ _-]?(length|window)|prompt is too long|maximum context|too many (input )?tokens|"
                      r"reduce the length|input is too long", re.I)
_CONTENT = re.compile(r"content[ _-]?(policy|filter|management)|safety system|flagged", re.I)
_QUOTA = re.compile(r"insufficient[ _-]?quota|exceeded your current quota|credit balance|billing", re.I)


def meaning(status: int, error: ProviderError | None) -> Meaning | None:
    """A provider error's meaning, from its status, code, type and message (OpenAI's codes
    `context_length_exceeded`, `content_policy_violation`, `insufficient_quota`; Anthropic's
    `billing_error` and its "prompt is too long" / "credit balance" messages)."""
    if status == 402:
        return Meaning.QUOTA
    if error is None or status < 400:
        return None
    text = " ".join(part for part in (error.code, error.type, error.message) if part)
    if status in (400, 413, 422) and _CONTEXT.search(text):
        return Meaning.CONTEXT_LENGTH
    if status in (400, 403, 422) and _CONTENT.search(text):
        return Meaning.CONTENT_POLICY
    if status in (400, 403, 429) and _QUOTA.search(text):
        return Meaning.QUOTA
    return None

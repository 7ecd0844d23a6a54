"""The attempt ledger: what happened to one request, compact enough for a response header and the
access log (`x-sidestep-ledger`), so one request can be explained without reading any log.

    a/limited;status=429;error=rate_limited;ms=12;key=sk-a..ef, b/fallback;wait_ms=250;wait=backoff;status=200;ms=830

Each attempt in order, comma-separated (an RFC 8941 list of tokens with parameters): its target;
`wait_ms` and `wait` when it waited before being sent (why: `blocked` for a Retry-After, a latency
block or resting keys, `backoff`, either `+paced` behind other requests retrying that target);
`status` and, for a failure, `error` (the error class); `ms` from sending it to its response
headers (or its failure); `key` (the masked key it used, when the target has keys of its own);
`translated` when it was sent in the other API family. `none` when no attempt was made.
Header values are ASCII: the masked key's ellipsis is written "..".
"""

from __future__ import annotations

from extproc.policy.state import Attempt, RequestState

__all__ = ["NONE", "ledger"]

NONE = "none"


def ledger(state: RequestState | None) -> str:
    if state is None or not state.attempts:
        return NONE
    return ", ".join(_entry(a) for a in state.attempts)


def _entry(attempt: Attempt) -> str:
    target = attempt.target
    parts = [target.key]
    if attempt.waited >= 0.0005:
        parts.append(f"wait_ms={attempt.waited * 1000:.0f}")
        if attempt.wait_why:
            parts.append(f"wait={attempt.wait_why}")
    outcome = attempt.outcome
    if outcome is not None:
        parts.append(f"status={outcome.status}")
        if outcome.error_type is not None:
            parts.append(f"error={outcome.error_type}")
    if attempt.ended is not None:
        parts.append(f"ms={(attempt.ended - attempt.started) * 1000:.0f}")
    if target.keys:
        parts.append("key=" + target.keys[attempt.key].hint.replace("…", ".."))
    if attempt.translated:
        parts.append("translated")
    return ";".join(parts)

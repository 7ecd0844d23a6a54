"""The error of a request that gave up: what was tried, and why it stopped (its body's shape is
`controlplane.apierrors`')."""

from __future__ import annotations

from typing import Any

from controlplane.apierrors import ApiError
from extproc.policy.decide import GiveUp
from extproc.policy.ledger import ledger
from extproc.policy.state import RequestState

__all__ = ["exhausted"]

_REASONS = {
    "max_attempts": "the retry policy allows no more attempts for this failure",
    "no_candidates": "no other configured model is left to try",
    "budget": "the retry time budget would be exceeded",
    "all_blocked": "every configured model is blocked by Retry-After",
    "no_retry_policy": "this model has no retry_policy",
    "keys_rate_limited": "all configured keys are rate-limited",
    "keys_unauthorized": "all configured keys were rejected by the provider (401/403)",
}


def exhausted(state: RequestState, give_up: GiveUp) -> ApiError:
    """The error for a request that gave up: what was tried, and why it stopped."""
    attempts = [
        {
            "attempt": n,
            "model": a.target.key,
            "error_type": str(a.outcome.error_type) if a.outcome and a.outcome.error_type else "unknown",
            "status": a.outcome.status if a.outcome else None,
            **({"provider_error": a.error.as_dict()} if a.error is not None and a.error.as_dict() else {}),
        }
        for n, a in enumerate(state.attempts, start=1)
    ]
    why = _REASONS.get(give_up.reason, give_up.reason)
    if attempts:
        last = attempts[-1]
        message = (f"All {len(attempts)} attempt(s) failed; the last, to {last['model']}, "
                   f"ended with {last['error_type']} ({last['status']})")
        last_said = state.attempts[-1].error
        if last_said is not None and last_said.message:
            message += f": {last_said.message[:500]}"
        message += f". Gave up: {why}."
    else:
        message = f"No attempt was made: {why}."
    if give_up.retry_after is not None:
        message += f" Retry after {give_up.retry_after}s."
    details: dict[str, Any] = {"code": give_up.reason, "attempts": attempts, "total_attempts": len(attempts)}
    said = state.attempts[-1].error if state.attempts else None
    if said is not None and said.as_dict():
        details["provider_error"] = {"status": attempts[-1]["status"], **said.as_dict()}
    if give_up.retry_after is not None:
        details["retry_after"] = give_up.retry_after
    return ApiError(give_up.status, "retry_exhausted", message, give_up.retry_after, details, ledger=ledger(state))

"""Names shared by the rendered Envoy config and the ext_proc: the contract between them."""

from __future__ import annotations

# Request headers the ext_proc sets on each attempt (stripped before the provider sees them).
TARGET_HEADER = "x-sidestep-target"  # the dispatch listener routes the attempt by it
# Response header marking an attempt for retry; the outer route retries on it.
RETRY_HEADER = "x-sidestep-retry"
# Response header the dispatch listener adds: %RESPONSE_CODE_DETAILS% of the attempt, so the
# ext_proc can tell a provider's own 504 from an attempt timeout. Never reaches the client.
UPSTREAM_DETAILS_HEADER = "x-sidestep-upstream"
# Response headers every client sees.
ATTEMPTS_HEADER = "x-sidestep-attempts"
MODEL_HEADER = "x-sidestep-model"
WORKER_HEADER = "x-sidestep-worker"  # which ext_proc worker handled the request (its logs tell more)

# Credential headers a client may send; none of them reach a provider unless passthrough_auth.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")

# Envoy's names.
def extproc_cluster(worker: int) -> str:
    return f"sidestep_extproc_{worker}"


def attempts_cluster(worker: int) -> str:
    return f"sidestep_attempts_{worker}"


DISPATCH_LISTENER = "sidestep_dispatch"
HEALTH_PATH = "/healthz"
REQUEST_ID_HEADER = "x-request-id"
ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"

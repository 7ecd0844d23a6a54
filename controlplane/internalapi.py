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
# A gateway key sent beside the client's own provider key; never reaches a provider.
GATEWAY_KEY_HEADER = "x-sidestep-key"

# The API surface sidestep serves. Only these paths (after Envoy normalized them: dot segments,
# encoded dots, duplicate slashes) reach a provider; everything else is a 404 from sidestep.
PROXIED_ENDPOINTS = (  # POST, a JSON body with a "model"
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/audio/speech",
    "/v1/messages",
    "/v1/messages/count_tokens",
)
MODELS_PATH = "/v1/models"  # GET; answered by sidestep itself (only the models a gateway key may use)

# Dynamic metadata the ext_proc sets on an attempt it sends on to a provider; Envoy's error reply
# after a dead ext_proc reads it to tell "may have reached a provider" from "was not sent".
METADATA_NAMESPACE = "sidestep"
SENT_METADATA = "sent"

# Envoy's names.
def extproc_cluster(worker: int) -> str:
    return f"sidestep_extproc_{worker}"


def attempts_cluster(worker: int) -> str:
    return f"sidestep_attempts_{worker}"


DISPATCH_LISTENER = "sidestep_dispatch"
HEALTH_PATH = "/healthz"
REQUEST_ID_HEADER = "x-request-id"
ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"

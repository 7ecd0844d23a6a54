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
LEDGER_HEADER = "x-sidestep-ledger"  # every attempt: target, status or error class, time, wait, key hint
WORKER_HEADER = "x-sidestep-worker"  # which ext_proc worker handled the request (its logs tell more)
# Read by the openai and anthropic SDKs: "false" stops their own retries of an error sidestep already
# retried (or decided not to), which would otherwise run the whole failover two more times.
SHOULD_RETRY_HEADER = "x-should-retry"
# A client's overall deadline in milliseconds (the SDKs send their timeout as x-stainless-timeout).
DEADLINE_HEADER = "x-sidestep-deadline-ms"
# Envoy's per-attempt time-to-first-byte limit, set when a client's deadline shortens an attempt.
PER_TRY_TIMEOUT_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"
# The model a request without one of its own (GET /v1/files, …) goes to; the default model otherwise.
MODEL_REQUEST_HEADER = "x-sidestep-model"

# Credential headers a client may send; none of them reach a provider unless passthrough_auth.
CLIENT_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
# A gateway key sent beside the client's own provider key; never reaches a provider.
GATEWAY_KEY_HEADER = "x-sidestep-key"

MODELS_PATH = "/v1/models"  # GET; answered by sidestep itself (only the models a gateway key may use)
# (the whole API surface sidestep serves is controlplane/endpoints.py)

# Dynamic metadata the ext_proc sets on an attempt it sends on to a provider; Envoy's error reply
# after a dead ext_proc reads it to tell "may have reached a provider" from "was not sent".
METADATA_NAMESPACE = "sidestep"
SENT_METADATA = "sent"
CLIENT_METADATA = "client"  # the gateway key's name, for the metrics (requests per key)
# Set by Envoy's json_to_metadata from a request's `"stream"`: streamed answers take the attempts
# clusters whose ext_proc holds the response until its commit point.
STREAM_METADATA = "stream"
# gRPC metadata on each ext_proc stream of those clusters' filter: "held".
FILTER_METADATA_KEY = "x-sidestep-filter"

# Streams repaired by the relay (extproc/relay.py): the relay asks for a continuation (base64 JSON:
# the targets to avoid, the text the client has), the ext_proc answers how it continues ("prefill"
# or "regenerate"), and the relayed listener routes by the relay's worker. Clients never set them.
CONTINUE_HEADER = "x-sidestep-continue"
CONTINUED_HEADER = "x-sidestep-continued"
NO_REPAIR_HEADER = "x-sidestep-no-repair"  # on an answer whose provider opted out of stream repair
WORKER_ROUTE_HEADER = "x-sidestep-relay-worker"
RELAYED_LISTENER = "sidestep_relayed"


# Metrics: Envoy streams every request's access-log entry to the metrics service (ALS_CLUSTER) and
# routes GET METRICS_PATH to it (METRICS_CLUSTER); log names tell the client's requests from the relay's.
METRICS_PATH = "/metrics"
ALS_CLUSTER = "sidestep_access_log"
METRICS_CLUSTER = "sidestep_metrics"
MODEL_LOG = "model"
RELAYED_LOG = "relayed"


def relay_cluster(worker: int) -> str:
    return f"sidestep_relay_{worker}"


# Envoy's names.
def extproc_cluster(worker: int) -> str:
    return f"sidestep_extproc_{worker}"


def attempts_cluster(worker: int, *, held: bool = False) -> str:
    return f"sidestep_{'held' if held else 'attempts'}_{worker}"


DISPATCH_LISTENER = "sidestep_dispatch"
HEALTH_PATH = "/healthz"
REQUEST_ID_HEADER = "x-request-id"
ATTEMPT_COUNT_HEADER = "x-envoy-attempt-count"

"""Render Envoy's bootstrap from a compiled `Gateway`: one pure function, versioned by content hash.

Topology (see docs/architecture.md):

    client ─► listener (HCM) ─► route /v1/… ─► cluster sidestep_attempts_<w> ─► internal listener dispatch
                 retries when the ext_proc marks      upstream filters:             routes by x-sidestep-target
                 a response x-sidestep-retry: 1       [ext_proc → worker w, codec]  to one provider cluster

The ext_proc runs once per attempt in the attempts cluster's upstream filter chain; the dispatch
route of each target carries that target's time-to-first-byte limit (per_try_timeout) and stream
idle timeout, and stamps every response with its %RESPONSE_CODE_DETAILS%.

Several ext_proc workers: each has its own port and its own attempts cluster, and the route picks
one per request (weighted_clusters): every attempt of a request, retries included, goes to the
same worker, which holds that request's state, while requests spread evenly over the workers
whatever Envoy's thread count. (One shared SO_REUSEPORT port would not spread them: Envoy
multiplexes all of a thread's ext_proc streams on one HTTP/2 connection, so one worker per Envoy
thread would do all the work.) Worker w's gRPC cluster lists the other workers at lower priorities,
so while w is down or restarting its requests go to the next healthy worker.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from controlplane import apierrors
from controlplane import internalapi as api
from controlplane.apierrors import Api, ApiError
from controlplane.config.runtime import Gateway, Target, Upstream
from controlplane.endpoints import ENDPOINTS

__all__ = ["Sockets", "config_hash", "render_envoy"]

T = "type.googleapis.com/"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BIG = 1_000_000  # circuit-breaker limits we never want to hit before the provider does
REQUEST_HEADERS_TIMEOUT = 10.0  # seconds a client may take to send its request headers

# A CEL condition true for requests in Anthropic's API (their errors take Anthropic's shape).
_ANTHROPIC_CALLER = f"request.path.startsWith('{apierrors.ANTHROPIC_PATH}')"

ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "attempts": "%RESP(X-SIDESTEP-ATTEMPTS)%",
    "model": "%RESP(X-SIDESTEP-MODEL)%",
    "ledger": "%RESP(X-SIDESTEP-LEDGER)%",
    "duration_ms": "%DURATION%",
    "ttfb_ms": "%RESPONSE_DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
}


@dataclass(frozen=True)
class Sockets:
    """The Unix sockets of the stack's local control ports, inside its 0700 run directory: only
    the stack's own user can reach Envoy's admin endpoint or the ext_proc workers."""

    admin: str
    extproc: tuple[str, ...]  # one per ext_proc worker
    relay: tuple[str, ...] = ()  # each worker's stream relay (repair_streams)
    relayed: str = ""  # the listener the relays send their requests to (repair_streams)
    metrics: str = ""  # the metrics service: GET /metrics (HTTP) …
    access_log: str = ""  # … and the access-log entries it counts (gRPC)

    @classmethod
    def in_dir(cls, directory: str, workers: int) -> Sockets:
        """The stack's sockets, named as `sidestep up` names them, in `directory`."""
        return cls(admin=f"{directory}/admin.sock",
                   extproc=tuple(f"{directory}/extproc-{w}.sock" for w in range(workers)),
                   relay=tuple(f"{directory}/relay-{w}.sock" for w in range(workers)),
                   relayed=f"{directory}/relayed.sock", metrics=f"{directory}/metrics.sock",
                   access_log=f"{directory}/access-log.sock")


def render_envoy(gateway: Gateway, sockets: Sockets, log_dir: str, ca_bundle: str | None = None) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (write it as JSON).

    Usage: `render_envoy(gw, Sockets("/run/admin.sock", ("/run/extproc-0.sock",)), "logs")`.

    `ca_bundle`: trusted CAs for https providers; by default the system bundle when it exists.
    """
    if ca_bundle is None and os.path.exists(CA_BUNDLE):
        ca_bundle = CA_BUNDLE
    targets = list(gateway.targets.values())
    message_timeout = _longest_wait(gateway) + 10.0
    bootstrap: dict[str, Any] = {
        "node": {"id": "sidestep", "cluster": "sidestep"},
        "admin": {"address": _pipe(sockets.admin)},
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": T + "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"},
        }],
        "static_resources": {
            "listeners": [_outer_listener(gateway, len(sockets.extproc), log_dir, bool(sockets.metrics)
                                          and gateway.metrics_listener is None),
                          *([_metrics_listener(*gateway.metrics_listener)]
                            if sockets.metrics and gateway.metrics_listener else []),
                          _dispatch_listener(targets, gateway),
                          *([_relayed_listener(gateway, sockets)] if gateway.listener.repair_streams else [])],
            "clusters": [
                *(_attempts_cluster(w, message_timeout, held) for w in range(len(sockets.extproc))
                  for held in (False, True)),
                *(_extproc_cluster(w, sockets.extproc) for w in range(len(sockets.extproc))),
                *((_relay_cluster(w, path) for w, path in enumerate(sockets.relay))
                  if gateway.listener.repair_streams else ()),
                *(_provider_cluster(u, ca_bundle) for u in gateway.upstreams),
                *([_pipe_cluster(api.METRICS_CLUSTER, sockets.metrics, http2=False),
                   _pipe_cluster(api.ALS_CLUSTER, sockets.access_log, http2=True)] if sockets.metrics else []),
            ],
        },
    }
    bootstrap["node"]["metadata"] = {"config_hash": config_hash(bootstrap)}
    return bootstrap


def with_previous(new: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """`new` (a rendered bootstrap), keeping what requests still in flight under `previous` may
    need: its provider clusters and its dispatch routes that `new` lacks. Requests running under
    the previous config keep retrying through them; the reload after this one drops them."""
    merged = copy.deepcopy(new)
    resources = merged["static_resources"]
    clusters = {c["name"] for c in resources["clusters"]}
    resources["clusters"] += [c for c in previous["static_resources"]["clusters"] if c["name"] not in clusters]
    new_routes = _dispatch_routes(merged)
    known = {json.dumps(r["match"], sort_keys=True) for r in new_routes}
    kept = [r for r in _dispatch_routes(previous)[:-1] if json.dumps(r["match"], sort_keys=True) not in known]
    new_routes[-1:-1] = kept  # before the catch-all
    return merged


def _dispatch_routes(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    listener = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == api.DISPATCH_LISTENER)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def file_xds(bootstrap: dict[str, Any], directory: str, version: str) -> dict[str, dict[str, Any]]:
    """A rendered bootstrap split for file-based xDS, as {file name: content}: "envoy.json" (what
    Envoy starts with, kept out of `directory`), then in the order they must be applied "cds.json"
    (its clusters), "rds-NAME.json" (each route config: Envoy reads one per file) and "lds.json"
    (its listeners). Envoy watches `directory` and
    applies a file moved into it. A reload rewrites the three files, and nothing in flight is
    dropped: an unchanged listener or cluster is left as it is, and routes live in route configs of
    their own, which connections already open use at once (a listener with inline routes would
    be replaced, and its open connections, pooled internal ones included, would keep the old
    routes while it drains)."""
    static = copy.deepcopy(bootstrap["static_resources"])
    dynamic = {k: v for k, v in bootstrap.items() if k != "static_resources"}

    def source(name: str) -> dict[str, Any]:
        return {"resource_api_version": "V3", "path_config_source": {
            "path": os.path.join(directory, name), "watched_directory": {"path": directory}}}

    dynamic["dynamic_resources"] = {"lds_config": source("lds.json"), "cds_config": source("cds.json")}
    route_configs = []
    for listener in static["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typed_config"]
                route_config = hcm.pop("route_config", None)
                if route_config is not None:
                    route_configs.append(route_config)
                    hcm["rds"] = {"route_config_name": route_config["name"],
                                  "config_source": source(f"rds-{route_config['name']}.json")}

    def resources(items: list[dict[str, Any]], kind: str) -> dict[str, Any]:
        return {"version_info": version, "resources": [{"@type": T + kind, **item} for item in items]}

    return {"envoy.json": dynamic,
            "cds.json": resources(static["clusters"], "envoy.config.cluster.v3.Cluster"),
            **{f"rds-{r['name']}.json": resources([r], "envoy.config.route.v3.RouteConfiguration")
               for r in route_configs},
            "lds.json": resources(static["listeners"], "envoy.config.listener.v3.Listener")}


def config_hash(bootstrap: dict[str, Any]) -> str:
    """Content hash of a rendered config (the node metadata that carries it excluded)."""
    body = {**bootstrap, "node": {k: v for k, v in bootstrap["node"].items() if k != "metadata"}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _longest_wait(gateway: Gateway) -> float:
    """The longest the ext_proc may hold one message (a Retry-After or backoff sleep)."""
    longest = 0.0
    for target in gateway.targets.values():
        policy = target.policy
        if policy is None:
            continue
        longest = max(longest, policy.retry_after.max_retry_after_seconds)
        if policy.backoff is not None:
            longest = max(longest, policy.backoff.max_ms / 1000)
    return longest


def _retry_policy(gateway: Gateway) -> dict[str, Any]:
    return {
        # resets and connect failures of the internal hop are retried too (the ext_proc sees them
        # as unplanned attempts); provider failures arrive as responses marked x-sidestep-retry.
        "retry_on": "retriable-headers,reset,connect-failure",
        "num_retries": gateway.max_retries + 1,
        "retriable_headers": [{"name": api.RETRY_HEADER, "string_match": {"exact": "1"}}],
        # waits are the ext_proc's to decide; Envoy's own backoff is kept negligible, and
        # rate_limited_retry_back_off is deliberately absent (it would add Retry-After twice).
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
    }


def _outer_listener(gateway: Gateway, workers: int, log_dir: str, metrics: bool) -> dict[str, Any]:
    spec = gateway.listener
    retry_policy = _retry_policy(gateway)
    attempts = {**_worker_choice(workers), "timeout": "0s", "retry_policy": retry_policy}
    held = {**_worker_choice(workers, held=True), "timeout": "0s", "retry_policy": retry_policy}
    # repair_streams: streamed chat answers go to the workers' relays, which own the client's stream
    # (no retry policy: the relay's own requests are retried on the relayed listener)
    relay_choice = ({"weighted_clusters": {"clusters": [{"name": api.relay_cluster(w), "weight": 1}
                                                        for w in range(workers)]}}
                    if workers > 1 else {"cluster": api.relay_cluster(0)})
    # a relay that is restarting with its worker refuses the connection: try again shortly
    relayed = {**relay_choice, "timeout": "0s", "retry_policy": {
        "retry_on": "connect-failure", "num_retries": 10,
        "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"}}}
    served = ", ".join(f"{e.method} {e.path.strip('^$')}" for e in ENDPOINTS)
    unknown = apierrors.not_found(f"sidestep serves {served}, GET {api.HEALTH_PATH}"
                                  + (f" and GET {api.METRICS_PATH}" if metrics else ""))
    virtual_host = {
        "name": "sidestep",
        "domains": ["*"],
        "include_request_attempt_count": True,
        "request_body_buffer_limit": spec.max_request_body_bytes,
        "request_headers_to_remove": [api.TARGET_HEADER, api.RETRY_HEADER, api.UPSTREAM_DETAILS_HEADER,
                                      api.CONTINUE_HEADER, api.WORKER_ROUTE_HEADER],
        "response_headers_to_remove": [api.UPSTREAM_DETAILS_HEADER, api.RETRY_HEADER, api.CONTINUED_HEADER,
                                       api.NO_REPAIR_HEADER],
        # Only the API surface sidestep serves (controlplane/endpoints.py) reaches the ext_proc, and so
        # a provider: exact paths, matched after the HCM normalized them (dot segments, encoded dots,
        # duplicate slashes).
        "routes": [
            # a streamed answer (`"stream": true`, read by json_to_metadata) goes through the attempts
            # clusters whose ext_proc holds the response until its commit point
            *({"match": {"path": e.path, "headers": [_method(e.method)], "dynamic_metadata": [{
                "filter": api.METADATA_NAMESPACE, "path": [{"key": api.STREAM_METADATA}],
                "value": {"bool_match": True}}]},
               "route": relayed if spec.repair_streams and e.translatable else held} for e in ENDPOINTS if e.streams),
            *({"match": {**({"safe_regex": {"regex": e.path}} if e.pattern else {"path": e.path}),
                         "headers": [_method(e.method)]},
               "route": attempts} for e in ENDPOINTS),
            *([{"match": {"path": api.METRICS_PATH, "headers": [_method("GET")]},
                "route": {"cluster": api.METRICS_CLUSTER, "timeout": "10s"}}] if metrics else []),
            *(_json_reply(unknown, caller, prefix) for caller, prefix in (
                (Api.ANTHROPIC, apierrors.ANTHROPIC_PATH), (Api.OPENAI, "/"))),
        ],
    }
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "sidestep",
        "use_remote_address": True,  # Envoy generates x-request-id: request state is keyed by it
        # one spelling per path before routing: /v1/../x, /v1/%2e%2e/x, /v1%2F..%2Fx and //v1//x are
        # resolved before the exact-path routes see them (an SDK encodes the slash of a model id like
        # openai/gpt-4o in /v1/models/{id} as %2F)
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_FORWARD",
        # no idle limit on the client's stream: while attempts fail over nothing flows to the client,
        # and a stall is the attempt's to time (the dispatch route's idle_timeout, per target); the
        # time to a first byte is bounded by attempt timeouts, the budget and the client's deadline
        "stream_idle_timeout": "0s",
        # a client that trickles its request is cut off (408); the timer stops once the request is in,
        # so waits between attempts are not counted
        "request_timeout": _dur(spec.request_timeout),
        "request_headers_timeout": _dur(min(REQUEST_HEADERS_TIMEOUT, spec.request_timeout)),
        "local_reply_config": _local_replies(gateway),
        "access_log": [_file_log(os.path.join(log_dir, "access.log")),
                       *([_grpc_log(api.MODEL_LOG, response_headers=[api.MODEL_HEADER, api.LEDGER_HEADER])]
                         if metrics else [])],
        "route_config": {"name": "sidestep", "virtual_hosts": [virtual_host]},
        "http_filters": [
            {"name": "envoy.filters.http.health_check", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                "pass_through_mode": False,
                "headers": [{"name": ":path", "string_match": {"exact": api.HEALTH_PATH}}],
                # 200 only while Envoy's own health check finds at least one ext_proc worker serving
                # (every worker's cluster lists all workers)
                "cluster_min_healthy_percentages": {api.extproc_cluster(0): {"value": 100 / workers - 0.001}},
            }},
            # `"stream": true` in a JSON body becomes metadata the routes above match on
            {"name": "envoy.filters.http.json_to_metadata", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "request_rules": {"rules": [{"selectors": [{"key": "stream"}], "on_present": {
                    "metadata_namespace": api.METADATA_NAMESPACE, "key": api.STREAM_METADATA}}]},
            }},
            _router(),
        ],
    }
    return {
        "name": spec.name,
        "address": _socket(spec.address, spec.port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _local_replies(gateway: Gateway) -> dict[str, Any]:
    """Envoy's own errors become JSON from `controlplane.apierrors`, in the caller's API shape; the
    ext_proc's errors and direct responses (already JSON) pass through unchanged."""
    spec = gateway.listener
    mappers: list[dict[str, Any]] = [
        {"filter": _cel("response.code_details.startsWith('sidestep_') "
                        "|| response.code_details == 'direct_response'"),
         "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                                  "content_type": "application/json"}},
        # GET /healthz while healthy (the health check filter's 200), not an error
        {"filter": _status_filter(200),
         "body_format_override": {"json_format": {"status": "healthy"}, "content_type": "application/json"}},
    ]
    # (filter, the error, its status when Envoy's differs)
    ext_proc_failed = "response.code_details.startsWith('ext_proc_error')"
    sent = (f"'{api.METADATA_NAMESPACE}' in metadata.filter_metadata && "
            f"metadata.filter_metadata['{api.METADATA_NAMESPACE}']['{api.SENT_METADATA}'] == '1'")
    known: list[tuple[dict[str, Any], ApiError, int | None]] = [
        # the ext_proc died while an attempt it had sent on was in flight: the provider may have it
        (_cel(f"{ext_proc_failed} && {sent}"), apierrors.gateway_failed_after_sending(), 502),
        # the ext_proc is down or restarting (failure_mode_allow is off: never route blind)
        (_cel(ext_proc_failed), apierrors.gateway_unavailable(
            "sidestep's request processor is unavailable; the request was not sent to any provider. Retry "
            "shortly; check `sidestep status` and `sidestep logs extproc`."), 503),
        (_status_filter(413), apierrors.request_too_large(spec.max_request_body_bytes), None),
        (_status_filter(408), apierrors.request_timeout(spec.request_timeout), None),
    ]
    # Envoy's own refusals of what a client sent (a malformed request, a path it cannot normalize):
    # the client's error, with Envoy's reason
    known.append((_and(_status_filter(400, "GE"), _status_filter(499, "LE")), apierrors.invalid_request(
        "the request was refused before reaching sidestep's processor: %RESPONSE_CODE_DETAILS%"), None))
    for status_filter, error, status in known:
        # Anthropic's callers first; the second mapper has no path condition, because a request
        # refused before its headers were complete has no path at all
        for caller, condition in ((Api.ANTHROPIC, _and(status_filter, _caller_filter(Api.ANTHROPIC))),
                                  (Api.OPENAI, status_filter)):
            mapper: dict[str, Any] = {"filter": condition, "body_format_override": _json_format(error, caller)}
            if status is not None:
                mapper["status_code"] = status
            if not error.retryable:  # the client's SDK must not retry what cannot succeed (or was sent)
                mapper["headers_to_add"] = [_header(api.SHOULD_RETRY_HEADER, "false")]
            mappers.append(mapper)
    # any other reply of Envoy's own (an unreachable provider without a policy, …): mostly 5xx, so
    # Anthropic callers see api_error; Envoy's reason goes in `code`
    generic = apierrors.gateway_error("%LOCAL_REPLY_BODY%")
    mappers.append({"filter": _caller_filter(Api.ANTHROPIC), "body_format_override": _json_format(generic, Api.ANTHROPIC)})
    return {"body_format": _json_format(generic, Api.OPENAI), "mappers": mappers}


def _json_format(error: ApiError, caller: Api) -> dict[str, Any]:
    """Envoy's JSON body template for `error`; `code` carries Envoy's own reason."""
    payload = error.payload(caller)
    inner = payload["error"]
    inner.setdefault("code", "%RESPONSE_CODE_DETAILS%")
    return {"json_format": payload, "content_type": "application/json"}


def _caller_filter(caller: Api) -> dict[str, Any]:
    return _cel(_ANTHROPIC_CALLER if caller is Api.ANTHROPIC else f"!{_ANTHROPIC_CALLER}")


def _status_filter(status: int, op: str = "EQ") -> dict[str, Any]:
    return {"status_code_filter": {"comparison": {"op": op, "value": {
        "default_value": status, "runtime_key": "sidestep.unused"}}}}


def _and(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": list(filters)}}


def _json_reply(error: ApiError, caller: Api, prefix: str) -> dict[str, Any]:
    """A route answering `error` itself (no ext_proc, no provider) for paths under `prefix`."""
    headers = [_header("content-type", "application/json")]
    if not error.retryable:
        headers.append(_header(api.SHOULD_RETRY_HEADER, "false"))
    return {"match": {"prefix": prefix},
            "direct_response": {"status": error.status, "body": {"inline_string": error.body(caller).decode()}},
            "response_headers_to_add": headers}


def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
        "@type": T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
        "expression": expression}}}


def _dispatch_listener(targets: list[Target], gateway: Gateway) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {"prefix": "/", "headers": [{"name": api.TARGET_HEADER,
                                                  "string_match": {"exact": target.route_id}}]},
            "route": {
                "cluster": target.upstream.cluster,
                "timeout": "0s",  # a route timeout would cut healthy streams
                "idle_timeout": _dur(target.stream_idle_timeout),
                # per_try_timeout stops counting at response headers: a time-to-first-byte limit
                "retry_policy": {"num_retries": 0, "per_try_timeout": _dur(target.attempt_timeout)},
            },
            "response_headers_to_add": [_header(api.UPSTREAM_DETAILS_HEADER, "%RESPONSE_CODE_DETAILS%")],
        }
        for target in {t.route_id: t for t in targets}.values()  # targets on one route share it
    ]
    routes.append(_json_reply(apierrors.routing_header_missing(api.TARGET_HEADER), Api.OPENAI, "/"))
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "dispatch",
        # an internal hop: closing it late only delays the error reaching the client (default 1s)
        "delayed_close_timeout": "0s",
        "local_reply_config": _local_replies(gateway),
        "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]},
        "route_config": {"name": "dispatch", "virtual_hosts": [{
            "name": "dispatch",
            "domains": ["*"],
            # gateway internals never reach a provider
            "request_headers_to_remove": [
                api.TARGET_HEADER, api.GATEWAY_KEY_HEADER, api.MODEL_REQUEST_HEADER, api.DEADLINE_HEADER,
                api.CONTINUE_HEADER, api.WORKER_ROUTE_HEADER,
                api.PER_TRY_TIMEOUT_HEADER, api.ATTEMPT_COUNT_HEADER, "x-envoy-expected-rq-timeout-ms",
                "x-envoy-internal", "x-forwarded-for", "x-envoy-external-address",
            ],
            "routes": routes,
        }]},
        "http_filters": [_router()],
    }
    return {
        "name": api.DISPATCH_LISTENER,
        "internal_listener": {},
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _relayed_listener(gateway: Gateway, sockets: Sockets) -> dict[str, Any]:
    """Where the stream relays send their requests: the held attempts cluster of the relay's own
    worker (which keeps the request's state), with the model listener's retries. It closes a reset
    stream at once (`delayed_close_timeout: 0s`): the relay must learn of a break without delay."""
    routes = [{"match": {"prefix": "/", "headers": [{"name": api.WORKER_ROUTE_HEADER,
                                                    "string_match": {"exact": str(w)}}]},
               "route": {"cluster": api.attempts_cluster(w, held=True), "timeout": "0s",
                         "retry_policy": _retry_policy(gateway)}}
              for w in range(len(sockets.extproc))]
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "relayed",
        "delayed_close_timeout": "0s",
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "local_reply_config": _local_replies(gateway),
        **({"access_log": [_grpc_log(api.RELAYED_LOG, request_headers=[api.CONTINUE_HEADER])]} if sockets.metrics else {}),
        "route_config": {"name": "relayed", "virtual_hosts": [{
            "name": "relayed", "domains": ["*"], "include_request_attempt_count": True,
            "request_body_buffer_limit": gateway.listener.max_request_body_bytes,
            "request_headers_to_remove": [api.TARGET_HEADER, api.RETRY_HEADER, api.UPSTREAM_DETAILS_HEADER],
            "response_headers_to_remove": [api.UPSTREAM_DETAILS_HEADER, api.RETRY_HEADER],
            "routes": routes}]},
        "http_filters": [_router()],
    }
    return {"name": api.RELAYED_LISTENER, "address": _pipe(sockets.relayed),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _relay_cluster(worker: int, path: str) -> dict[str, Any]:
    return {**_pipe_cluster(api.relay_cluster(worker), path, http2=False), "circuit_breakers": _open_breakers()}


def _worker_choice(workers: int, *, held: bool = False) -> dict[str, Any]:
    """Route to one worker's attempts cluster, chosen once per request (retries stay with it)."""
    if workers == 1:
        return {"cluster": api.attempts_cluster(0, held=held)}
    return {"weighted_clusters": {"clusters": [
        {"name": api.attempts_cluster(w, held=held), "weight": 1} for w in range(workers)]}}


def _attempts_cluster(worker: int, message_timeout: float, held: bool = False) -> dict[str, Any]:
    """Worker `worker`'s attempts; `held`: for streamed answers, whose ext_proc receives the response
    body as it arrives, before it answers the response headers, so it can hold them until the
    stream's commit point (`extproc/commit.py`). Mode overrides do not work in such a filter, so it
    has its own cluster, chosen by the route."""
    name = api.attempts_cluster(worker, held=held)
    processing_mode = {
        "request_header_mode": "SEND",  # SKIP would let headers leave before the target is set
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SEND",
        "response_body_mode": "STREAMED" if held else "NONE",  # NONE: switched per attempt with mode_override
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {
                "envoy_grpc": {"cluster_name": api.extproc_cluster(worker)},
                # tells the ext_proc a stream comes from the held filter (only there: every byte of
                # gRPC metadata costs on every attempt)
                **({"initial_metadata": [{"key": api.FILTER_METADATA_KEY, "value": "held"}]} if held else {}),
                # a worker that just died refuses the stream, or resets it before answering anything:
                # retry it on the next worker in priority order (or, with one worker, on the restarted
                # one) instead of failing the request. A stream the worker already answered is never
                # retried (it may have sent the attempt on).
                "retry_policy": {
                    "retry_on": "connect-failure,reset",
                    # jittered waits of up to 0.05·2^n s: about 2 s in all, time for a restart
                    "num_retries": 10,
                    "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
                    "retry_priority": {"name": "envoy.retry_priorities.previous_priorities", "typed_config": {
                        "@type": T + "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                        "update_frequency": 1}},
                },
            },
            "failure_mode_allow": False,
            # the ext_proc marks an attempt it sent on (`api.SENT_METADATA`), so an error after its
            # death can say whether a provider may have received the request
            "metadata_options": {"receiving_namespaces": {"untyped": [api.METADATA_NAMESPACE]}},
            "processing_mode": processing_mode,
            "allow_mode_override": not held,  # without it mode_override is silently ignored
            "send_body_without_waiting_for_header_response": held,
            "message_timeout": _dur(message_timeout),  # longer than the longest wait the ext_proc sleeps
            "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
        },
    }
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": {"envoy_internal_address": {"server_listener_name": api.DISPATCH_LISTENER}}},
        }]}]},
        "transport_socket": {"name": "envoy.transport_sockets.internal_upstream", "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            "transport_socket": {"name": "envoy.transport_sockets.raw_buffer", "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}},
        }},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
            "http_filters": [ext_proc, {"name": "envoy.filters.http.upstream_codec", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}}],
        }},
        # the default of 3 concurrent retries fails requests in a 429 storm
        "circuit_breakers": _open_breakers(),
    }


def _extproc_cluster(worker: int, sockets: tuple[str, ...]) -> dict[str, Any]:
    """Worker `worker` first; the others, in turn, only while the ones before them are unhealthy."""
    name = api.extproc_cluster(worker)
    rotated = sockets[worker:] + sockets[:worker]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"priority": priority, "lb_endpoints": [{"endpoint": {"address": _pipe(path)}}]}
            for priority, path in enumerate(rotated)]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
        "health_checks": [{
            "timeout": "1s",
            "interval": "0.5s",
            "no_traffic_interval": "0.5s",  # the default 60s would keep a dead ext_proc "healthy" for a minute
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "grpc_health_check": {},
        }],
        "circuit_breakers": _open_breakers(),
    }


def _provider_cluster(upstream: Upstream, ca_bundle: str | None) -> dict[str, Any]:
    is_ip = all(part.isdigit() for part in upstream.host.split(".")) or ":" in upstream.host
    cluster: dict[str, Any] = {
        "name": upstream.cluster,
        "type": "STATIC" if is_ip else "LOGICAL_DNS",
        "connect_timeout": _dur(upstream.connect_timeout),
        "load_assignment": {"cluster_name": upstream.cluster, "endpoints": [{"lb_endpoints": [{
            "endpoint": {"address": _socket(upstream.host, upstream.port)}}]}]},
        "circuit_breakers": _open_breakers(),
    }
    if not is_ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
        cluster["wait_for_warm_on_init"] = False  # start without DNS (offline, or a provider down)
    if upstream.tls:
        tls: dict[str, Any] = {"sni": upstream.host, "common_tls_context": {"alpn_protocols": ["h2", "http/1.1"]}}
        if ca_bundle:
            tls["common_tls_context"]["validation_context"] = {
                "trusted_ca": {"filename": ca_bundle},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": upstream.host}}],
            }
        cluster["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **tls}}
        protocol: dict[str, Any] = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
    else:
        protocol = {"explicit_http_config": {"http_protocol_options": {}}}
    cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", **protocol}}
    return cluster


def _open_breakers() -> dict[str, Any]:
    return {"thresholds": [{"priority": "DEFAULT", "max_connections": BIG, "max_pending_requests": BIG,
                            "max_requests": BIG, "max_retries": BIG}]}


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router",
            "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"}}


def _file_log(path: str) -> dict[str, Any]:
    return {
        "name": "envoy.access_loggers.file",
        "filter": {"not_health_check_filter": {}},
        "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path,
            "log_format": {"json_format": ACCESS_LOG_FORMAT},
        },
    }


def _metrics_listener(address: str, port: int) -> dict[str, Any]:
    """`metrics.port`: GET /metrics on a port of its own, and nothing else."""
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "metrics",
        "route_config": {"name": "metrics", "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": [
            {"match": {"path": api.METRICS_PATH, "headers": [_method("GET")]},
             "route": {"cluster": api.METRICS_CLUSTER, "timeout": "10s"}},
            {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {
                "inline_string": f"this port serves GET {api.METRICS_PATH}\n"}}}]}]},
        "http_filters": [_router()],
    }
    return {"name": "sidestep_metrics", "address": _socket(address, port),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}


def _grpc_log(name: str, *, request_headers: Sequence[str] = (), response_headers: Sequence[str] = ()) -> dict[str, Any]:
    """Every request's access-log entry to the metrics service (batched by Envoy: counts lag up to a
    second; when the service
    is down, entries are dropped and requests are not affected)."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"not_health_check_filter": {}},
        "typed_config": {
            "@type": T + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {"log_name": name, "transport_api_version": "V3",
                              "grpc_service": {"envoy_grpc": {"cluster_name": api.ALS_CLUSTER}},
                              # fewer, larger batches: this stream costs Envoy and the metrics service
                              # CPU per request, the gateway's own budget (see the README's Benchmarks)
                              "buffer_flush_interval": "1s", "buffer_size_bytes": 262144},
            "additional_request_headers_to_log": list(request_headers),
            "additional_response_headers_to_log": list(response_headers),
        },
    }


def _pipe_cluster(name: str, path: str, *, http2: bool) -> dict[str, Any]:
    protocol: dict[str, Any] = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": _pipe(path)}}]}]},
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": protocol}}}


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _pipe(path: str) -> dict[str, Any]:
    return {"pipe": {"path": path, "mode": 0o600}}


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _method(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}


def _dur(seconds: float) -> str:
    return f"{seconds:.3f}s"

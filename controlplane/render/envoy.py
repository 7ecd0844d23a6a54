"""Render Envoy's bootstrap from a compiled `Gateway`: one pure function, versioned by content hash.

Topology (see ARCHITECTURE.md):

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

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from controlplane import internalapi as api
from controlplane.config.runtime import Gateway, Target, Upstream

__all__ = ["Ports", "config_hash", "render_envoy"]

T = "type.googleapis.com/"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BIG = 1_000_000  # circuit-breaker limits we never want to hit before the provider does

# Every Envoy-generated error is JSON in the OpenAI error shape, with Envoy's reason in `code`.
LOCAL_REPLY_FORMAT = {
    "json_format": {
        "error": {
            "type": "gateway_error",
            "message": "%LOCAL_REPLY_BODY%",
            "code": "%RESPONSE_CODE_DETAILS%",
        }
    },
    "content_type": "application/json",
}

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
    "duration_ms": "%DURATION%",
    "ttfb_ms": "%RESPONSE_DURATION%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
}


@dataclass(frozen=True)
class Ports:
    admin: int
    extproc: tuple[int, ...]  # one per ext_proc worker


def render_envoy(gateway: Gateway, ports: Ports, log_dir: str, ca_bundle: str | None = None) -> dict[str, Any]:
    """The Envoy bootstrap as a dict (write it as JSON). Usage: `render_envoy(gw, Ports(9901, 9902), "logs")`.

    `ca_bundle`: trusted CAs for https providers; by default the system bundle when it exists.
    """
    if ca_bundle is None and os.path.exists(CA_BUNDLE):
        ca_bundle = CA_BUNDLE
    targets = list(gateway.targets.values())
    message_timeout = _longest_wait(gateway) + 10.0
    bootstrap: dict[str, Any] = {
        "node": {"id": "sidestep", "cluster": "sidestep"},
        "admin": {"address": _socket("127.0.0.1", ports.admin)},
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": T + "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"},
        }],
        "static_resources": {
            "listeners": [_outer_listener(gateway, len(ports.extproc), log_dir),
                          _dispatch_listener(targets, gateway.listener.max_request_body_bytes)],
            "clusters": [
                *(_attempts_cluster(w, message_timeout) for w in range(len(ports.extproc))),
                *(_extproc_cluster(w, ports.extproc) for w in range(len(ports.extproc))),
                *(_provider_cluster(u, ca_bundle) for u in gateway.upstreams),
            ],
        },
    }
    bootstrap["node"]["metadata"] = {"config_hash": config_hash(bootstrap)}
    return bootstrap


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


def _outer_listener(gateway: Gateway, workers: int, log_dir: str) -> dict[str, Any]:
    spec = gateway.listener
    retry_policy = {
        # resets and connect failures of the internal hop are retried too (the ext_proc sees them
        # as unplanned attempts); provider failures arrive as responses marked x-sidestep-retry.
        "retry_on": "retriable-headers,reset,connect-failure",
        "num_retries": gateway.max_retries + 1,
        "retriable_headers": [{"name": api.RETRY_HEADER, "string_match": {"exact": "1"}}],
        # waits are the ext_proc's to decide; Envoy's own backoff is kept negligible, and
        # rate_limited_retry_back_off is deliberately absent (it would add Retry-After twice).
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
    }
    models = {"object": "list", "data": [
        {"id": t.key, "object": "model", "owned_by": t.provider} for t in gateway.targets.values()
    ]}
    virtual_host = {
        "name": "sidestep",
        "domains": ["*"],
        "include_request_attempt_count": True,
        "request_body_buffer_limit": spec.max_request_body_bytes,
        "request_headers_to_remove": [api.TARGET_HEADER, api.RETRY_HEADER, api.UPSTREAM_DETAILS_HEADER],
        "response_headers_to_remove": [api.UPSTREAM_DETAILS_HEADER, api.RETRY_HEADER],
        "routes": [
            {"match": {"path": "/v1/models", "headers": [_method("GET")]},
             "direct_response": {"status": 200, "body": {"inline_string": json.dumps(models)}},
             "response_headers_to_add": [_header("content-type", "application/json")]},
            {"match": {"prefix": "/v1/", "headers": [_method("POST")]},
             "route": {**_worker_choice(workers), "timeout": "0s", "retry_policy": retry_policy}},
            {"match": {"prefix": "/"},
             "direct_response": {"status": 404, "body": {"inline_string": json.dumps({"error": {
                 "type": "not_found",
                 "message": "sidestep serves POST /v1/… (chat/completions, messages, responses, …), "
                            "GET /v1/models and GET /healthz",
             }})}},
             "response_headers_to_add": [_header("content-type", "application/json")]},
        ],
    }
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "sidestep",
        "use_remote_address": True,  # Envoy generates x-request-id: request state is keyed by it
        "stream_idle_timeout": _dur(spec.stream_idle_timeout),
        "request_timeout": "0s",
        "local_reply_config": _local_replies(spec.max_request_body_bytes),
        "access_log": [_file_log(os.path.join(log_dir, "access.log"))],
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
            _router(),
        ],
    }
    return {
        "name": spec.name,
        "address": _socket(spec.address, spec.port),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": hcm}]}],
    }


def _local_replies(body_limit: int) -> dict[str, Any]:
    """Envoy's own errors become JSON; the ext_proc's errors (already JSON) pass through unchanged."""
    return {
        "body_format": LOCAL_REPLY_FORMAT,
        "mappers": [
            {"filter": _cel("response.code_details.startsWith('sidestep_') "
                            "|| response.code_details == 'direct_response'"),
             "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                                      "content_type": "application/json"}},
            # the ext_proc is down or restarting (failure_mode_allow is off: never route blind)
            {"filter": _cel("response.code_details.startsWith('ext_proc_error')"),
             "status_code": 503,
             "body_format_override": {"json_format": {"error": {
                 "type": "gateway_unavailable",
                 "message": "sidestep's request processor is unavailable; the request was not sent to "
                            "any provider. Retry shortly; check `sidestep status` and `sidestep logs extproc`.",
                 "code": "%RESPONSE_CODE_DETAILS%"}}, "content_type": "application/json"}},
            {"filter": {"status_code_filter": {"comparison": {"op": "EQ", "value": {
                "default_value": 413, "runtime_key": "sidestep.unused"}}}},
             "body_format_override": {"json_format": {"error": {
                 "type": "request_too_large",
                 "message": f"the request body exceeds this listener's limit of {body_limit} bytes "
                            f"(listeners[].max_request_body_bytes)",
                 "code": "%RESPONSE_CODE_DETAILS%"}}, "content_type": "application/json"}},
        ],
    }


def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {"name": "envoy.access_loggers.extension_filters.cel", "typed_config": {
        "@type": T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
        "expression": expression}}}


def _dispatch_listener(targets: list[Target], body_limit: int) -> dict[str, Any]:
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
        for target in targets
    ]
    routes.append({
        "match": {"prefix": "/"},
        "direct_response": {"status": 400, "body": {"inline_string": json.dumps({"error": {
            "type": "routing_header_missing",
            "message": f"the attempt reached sidestep's dispatch listener without a valid "
                       f"{api.TARGET_HEADER} header; the ext_proc did not route it",
        }})}},
        "response_headers_to_add": [_header("content-type", "application/json")],
    })
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "dispatch",
        # an internal hop: closing it late only delays the error reaching the client (default 1s)
        "delayed_close_timeout": "0s",
        "local_reply_config": _local_replies(body_limit),
        "internal_address_config": {"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]},
        "route_config": {"name": "dispatch", "virtual_hosts": [{
            "name": "dispatch",
            "domains": ["*"],
            # gateway internals never reach a provider
            "request_headers_to_remove": [
                api.TARGET_HEADER, api.ATTEMPT_COUNT_HEADER, "x-envoy-expected-rq-timeout-ms",
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


def _worker_choice(workers: int) -> dict[str, Any]:
    """Route to one worker's attempts cluster, chosen once per request (retries stay with it)."""
    if workers == 1:
        return {"cluster": api.attempts_cluster(0)}
    return {"weighted_clusters": {"clusters": [
        {"name": api.attempts_cluster(w), "weight": 1} for w in range(workers)]}}


def _attempts_cluster(worker: int, message_timeout: float) -> dict[str, Any]:
    name = api.attempts_cluster(worker)
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": api.extproc_cluster(worker)}},
            "failure_mode_allow": False,
            "processing_mode": {
                "request_header_mode": "SEND",  # SKIP would let headers leave before the target is set
                "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND",
                "response_body_mode": "NONE",  # switched per attempt with mode_override
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "allow_mode_override": True,  # without it mode_override is silently ignored
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


def _extproc_cluster(worker: int, ports: tuple[int, ...]) -> dict[str, Any]:
    """Worker `worker` first; the others, in turn, only while the ones before them are unhealthy."""
    name = api.extproc_cluster(worker)
    rotated = ports[worker:] + ports[:worker]
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"priority": priority, "lb_endpoints": [{"endpoint": {"address": _socket("127.0.0.1", port)}}]}
            for priority, port in enumerate(rotated)]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
        "health_checks": [{
            "timeout": "1s",
            "interval": "1s",
            "no_traffic_interval": "1s",  # the default 60s would keep a dead ext_proc "healthy" for a minute
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
        protocol = {"auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}}}
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


def _socket(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": address, "port_value": port}}


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _method(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}


def _dur(seconds: float) -> str:
    return f"{seconds:.3f}s"

"""The compiled config: plain, immutable lookups the data path uses.

`compile_config` turns a validated `SidestepConfig` into a `Gateway` once; the ext_proc hot path
only reads it, and a reload swaps the whole object. Nothing here does I/O or imports grpc.
"""

from __future__ import annotations

import functools
import hashlib
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from controlplane.apierrors import Api
from controlplane.config.schema import (
    Backoff,
    BlockApplyTo,
    BlockScope,
    HighLatency,
    ModelProvider,
    RetryAfterHandling,
    RetryPolicy,
    SidestepConfig,
    StatusCodeRule,
    Strategy,
    TimeoutRule,
)

__all__ = [
    "DEFAULT_RETRIABLE",
    "ApiKey",
    "ClientKey",
    "Gateway",
    "LatencyRule",
    "ListenerSpec",
    "Policy",
    "Rule",
    "Target",
    "Upstream",
    "compile_config",
    "expand_status_codes",
    "mask_url",
    "key_digest",
    "listener_ip",
    "mask_secret",
]

# Where well-known providers listen when a config gives no base_url.
WELL_KNOWN_BASE_URLS: Mapping[str, str] = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "claude": "https://api.anthropic.com",
    "mistral": "https://api.mistral.ai",
    "groq": "https://api.groq.com/openai/v1",
    "deepseek": "https://api.deepseek.com",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "xai": "https://api.x.ai",
    "together_ai": "https://api.together.xyz",
    "openrouter": "https://openrouter.ai/api/v1",
    "moonshotai": "https://api.moonshot.ai",
}
ANTHROPIC_INTERFACES = frozenset({"anthropic", "claude"})
ANTHROPIC_VERSION = "2023-06-01"
# The API a well-known base_url host speaks (every host above but Anthropic's is OpenAI-compatible).
KNOWN_HOST_APIS: Mapping[str, Api] = {
    **{urlsplit(url).hostname or "": Api.OPENAI for url in WELL_KNOWN_BASE_URLS.values()},
    "api.anthropic.com": Api.ANTHROPIC,
}
# Model-id families of the non-chat kinds (`ModelProvider.kind` says otherwise when set).
_KIND_PATTERNS = (
    ("embeddings", re.compile(r"(^|[-_/.])(text-embedding|embed)", re.I)),
    ("audio", re.compile(r"(^|[-_/.])(whisper|tts|transcribe)", re.I)),
    ("images", re.compile(r"(^|[-_/.])(dall-e|gpt-image|imagen)", re.I)),
    ("moderation", re.compile(r"moderation", re.I)),
)

# Retried once a policy exists, unless a rule says otherwise: rate limits and server errors.
DEFAULT_RETRIABLE = frozenset({429, *range(500, 600)})


def mask_secret(secret: str) -> str:
    """A hint that identifies a key without revealing it: `sk-a…f9`."""
    if len(secret) < 12:
        return "…" if not secret else f"…{secret[-2:]}" if len(secret) >= 6 else "…"
    return f"{secret[:4]}…{secret[-2:]}"


def expand_status_codes(codes: int | str | list[int | str]) -> list[int]:
    """`429`, `"500-504"` or a list of both → the codes, in order. Raises ValueError when malformed."""
    items = codes if isinstance(codes, list) else [codes]
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{item!r} is not a status code")
        if isinstance(item, int):
            lo = hi = item
        else:
            match = re.fullmatch(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?", item)
            if not match:
                raise ValueError(f"{item!r} is not a status code or a range like '500-504'")
            lo = int(match.group(1))
            hi = int(match.group(2) or lo)
        if not (100 <= lo <= hi <= 599):
            raise ValueError(f"{item!r}: status codes run from 100 to 599, low to high")
        out.extend(range(lo, hi + 1))
    return out


@dataclass(frozen=True, slots=True)
class Upstream:
    """One provider endpoint; targets with the same endpoint share an Envoy cluster."""

    cluster: str
    host: str
    port: int
    tls: bool
    path_prefix: str  # "" or e.g. "/openai/v1"
    authority: str  # Host header sent to the provider
    connect_timeout: float

    def path_for(self, client_path: str) -> str:
        """Provider path for a client path: a base_url path replaces the client's leading `/v1`."""
        if not self.path_prefix:
            return client_path
        if client_path.startswith("/v1/"):
            client_path = client_path[3:]
        return self.path_prefix + client_path


@dataclass(frozen=True, slots=True)
class Rule:
    """A failure class: where its retries go and how many it may have."""

    label: str  # "status 429", "timeout", "default" (shown in logs and errors)
    strategy: Strategy
    max_attempts: int
    then: Strategy | None = None  # once max_attempts are spent: go on with this strategy
    then_max_attempts: int = 0  # retries allowed with `then`


@dataclass(frozen=True, slots=True)
class LatencyRule:
    """`on_high_latency`, compiled: block a target after `min_triggers` slow responses in `window`."""

    threshold: float  # seconds
    measure: str  # "ttfb" | "total" (to the last byte)
    min_triggers: int
    window: float  # seconds
    block_for: float  # seconds
    scope: BlockScope


@dataclass(frozen=True, slots=True)
class Policy:
    """The retry policy of a primary target, compiled."""

    fallbacks: tuple[str, ...]  # fallback_models that are configured, in order (the rest follow in config order)
    status_rules: Mapping[int, Rule]  # explicit on_status_codes and the default retriable set
    timeout_rule: Rule
    connection_rule: Rule  # resets and refused connections
    backoff: Backoff | None
    retry_after: RetryAfterHandling
    max_retry_duration: float | None  # seconds
    max_retries: int  # upper bound on retries one request can make under this policy
    latency: LatencyRule | None  # None also when on_high_latency applies to the request only (no effect)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key of a target: the headers that carry it, and how logs and status name it."""

    id: str  # fingerprint shared with the control plane; the key itself never leaves the worker
    hint: str  # masked, e.g. "sk-a…f9"
    headers: tuple[tuple[str, str], ...] = field(repr=False)  # secret


@dataclass(frozen=True, slots=True)
class Target:
    """One `model_providers` entry: a model at a provider, reachable through one cluster."""

    key: str  # "openai/gpt-4o", as configured
    route_id: str  # value of the routing header that sends an attempt to this target's dispatch route
    provider: str  # "openai"
    model_id: str  # "gpt-4o": what the provider sees in the body
    upstream: Upstream
    api: Api | None  # what the provider speaks; None: whatever the client speaks (never translated)
    kind: str  # "chat", "embeddings", "audio", "images" or "moderation"
    default_max_tokens: int  # for translated OpenAI requests to an Anthropic provider
    max_input_tokens: int | None  # context window, when configured
    repair_streams: bool  # continue its streamed answers elsewhere when they break mid-way
    anthropic: bool  # authenticates Anthropic's way (x-api-key, anthropic-version)
    keys: tuple[ApiKey, ...]  # the access_key, or the access_keys pool in order; empty for passthrough
    pooled: bool  # access_keys: a 429/401/403 moves the request to the next key
    passthrough_auth: bool
    extra_headers: tuple[tuple[str, str], ...]
    attempt_timeout: float  # to the first byte (the response headers)
    first_token_timeout: float  # to the first content of a streamed answer, from the attempt's start
    stream_idle_timeout: float  # the stall window between two chunks
    policy: Policy | None = field(default=None, compare=False)

    @property
    def key_hint(self) -> str:
        """The masked key(s), for logs and status."""
        if self.passthrough_auth:
            return "passthrough"
        return ", ".join(k.hint for k in self.keys) or "none"


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One of `gateway_keys`: who a client is, and which models it may request."""

    name: str
    hint: str  # masked, e.g. "sk-g…9f"
    models: frozenset[str] | None  # target keys it may request; None: every model


@dataclass(frozen=True, slots=True)
class SharedStore:
    """The Redis that gateways share state through (`shared_state`)."""

    url: str  # may hold a password: show `hint`, never this
    namespace: str
    hint: str  # the URL with its password masked


def mask_url(url: str) -> str:
    """`redis://:secret@host:6379/0` → `redis://:****@host:6379/0`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:****@{host}").geturl()


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    name: str
    address: str  # an IP address (`localhost` resolved)
    port: int
    timeout: float | None
    attempt_timeout: float
    first_token_timeout: float | None
    stream_idle_timeout: float
    stream_commit_events: int
    repair_streams: bool
    request_timeout: float
    max_request_body_bytes: int


@dataclass(frozen=True, slots=True)
class Gateway:
    """Everything the data path needs, resolved once."""

    listener: ListenerSpec
    targets: Mapping[str, Target]  # by key, in config order
    names: Mapping[str, Target]  # every name a client may request: key, alias, unique bare model id
    default: Target | None
    # sha256 of each gateway key → who it is; empty: no key required. Looking a key up by its hash
    # makes the lookup's timing independent of how much of a guess matches a real key.
    client_keys: Mapping[bytes, ClientKey] = field(default_factory=dict)
    shared_state: SharedStore | None = None  # used by the control plane's state service, not the data path
    metrics: bool = True  # the metrics service, and Envoy's access-log stream to it
    metrics_listener: tuple[str, int] | None = None  # (address, port) of its own for /metrics
    _orders: dict[str, tuple[Target, ...]] = field(default_factory=dict, compare=False, repr=False)

    def order(self, primary: Target) -> tuple[Target, ...]:
        """Where requests for `primary` fail over to: fallback_models, then the others in config order,
        except `passthrough_auth` entries: the client's own credentials go only to the model it asked
        for or to one its policy lists by name. (Which of them can serve a given request — its API,
        its kind of model — the ext_proc decides per request.)

        Built on first use and kept: compiling every primary's order up front would cost
        n² for n providers with a policy."""
        order = self._orders.get(primary.key)
        if order is None:
            if primary.policy is None:
                return ()
            fallbacks = [self.targets[k] for k in primary.policy.fallbacks]
            skip = {primary.key, *primary.policy.fallbacks}
            order = (*fallbacks, *(t for t in self.targets.values() if t.key not in skip and not t.passthrough_auth))
            self._orders[primary.key] = order
        return order

    def resolve(self, requested: str | None) -> Target | None:
        """The target serving a requested model; the default target when it is missing or unknown."""
        if requested is not None:
            target = self.names.get(requested)
            if target is not None:
                return target
        return self.default

    @property
    def upstreams(self) -> list[Upstream]:
        seen: dict[str, Upstream] = {}
        for target in self.targets.values():
            seen.setdefault(target.upstream.cluster, target.upstream)
        return list(seen.values())

    @property
    def max_retries(self) -> int:
        """The most retries any request may make: Envoy's num_retries must allow it. Moving to the
        next key of a pool is a retry too, and a request may walk every pool it fails over to."""
        policies = max((t.policy.max_retries for t in self.targets.values() if t.policy), default=0)
        return policies + sum(len(t.keys) - 1 for t in self.targets.values() if t.pooled)


def compile_config(config: SidestepConfig, env: Mapping[str, str], *, local: bool = True) -> Gateway:
    """Compile a validated config. `local`: `host.docker.internal` is resolved here (`host_docker_internal`).

    The config must have passed `validate_config` (env vars set, names unique); this step
    does not re-check.
    """
    spec = next(listener for listener in config.listeners if listener.type == "model")
    listener = ListenerSpec(
        name=spec.name,
        address=listener_ip(spec.address),
        port=spec.port,
        timeout=spec.timeout,
        attempt_timeout=spec.attempt_timeout,
        first_token_timeout=spec.first_token_timeout,
        stream_idle_timeout=spec.stream_idle_timeout,
        stream_commit_events=spec.stream_commit_events,
        repair_streams=spec.repair_streams,
        request_timeout=spec.request_timeout,
        max_request_body_bytes=spec.max_request_body_bytes,
    )
    providers = config.providers()
    upstreams: dict[tuple[str, int, bool, str, str], Upstream] = {}
    bare: dict[str, Target] = {}
    targets: dict[str, Target] = {}
    names: dict[str, Target] = {}
    for entry in providers:
        upstream = _upstream(entry, upstreams, local=local)
        target = _target(entry, upstream, listener, env)
        targets[target.key] = target
    for entry in providers:
        if entry.retry_policy is not None:
            policy = _policy(entry.model, entry.retry_policy, targets, listener)
            targets[entry.model] = replace(targets[entry.model], policy=policy)
    ambiguous: set[str] = set()
    for entry in providers:
        target = targets[entry.model]
        names[target.key] = target
        if entry.name:
            names.setdefault(entry.name, target)
        if target.model_id in bare:
            ambiguous.add(target.model_id)
        bare.setdefault(target.model_id, target)
    for model_id, target in bare.items():
        if model_id not in ambiguous:
            names.setdefault(model_id, target)
    default = next((targets[p.model] for p in providers if p.default), None)
    client_keys = {
        key_digest(expand_env(spec.key, env).encode()): ClientKey(
            name=spec.name, hint=mask_secret(expand_env(spec.key, env)),
            models=None if spec.models is None else frozenset(names[m].key for m in spec.models))
        for spec in config.gateway_keys
    }
    shared = None
    if config.shared_state is not None:
        url = expand_env(config.shared_state.redis_url, env)
        if local and urlsplit(url).hostname == "host.docker.internal":
            url = url.replace("host.docker.internal", host_docker_internal(), 1)
        shared = SharedStore(url=url, namespace=config.shared_state.namespace, hint=mask_url(url))
    metrics = config.metrics
    return Gateway(listener=listener, targets=targets, names=names, default=default, client_keys=client_keys,
                   shared_state=shared, metrics=metrics.enabled,
                   metrics_listener=(listener_ip(metrics.address), metrics.port) if metrics.port else None)


def key_digest(secret: bytes) -> bytes:
    """What a gateway key is looked up by (see `Gateway.client_keys`): the SHA-256 of its bytes."""
    return hashlib.sha256(secret).digest()


@functools.cache
def host_docker_internal() -> str:
    """What `host.docker.internal` (in Plano files written for Docker) means where sidestep runs:
    the address this machine resolves it to (inside a container started with
    `extra_hosts: host.docker.internal:host-gateway`, or with Docker Desktop), else this machine
    itself. Resolved once, here, so Envoy is given an address."""
    try:
        return socket.gethostbyname("host.docker.internal")
    except OSError:
        return "127.0.0.1"


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def listener_ip(address: str) -> str:
    """The IP address a listener binds: `localhost` means 127.0.0.1 (Envoy does not resolve names)."""
    return "127.0.0.1" if address == "localhost" else address


def expand_env(value: str, env: Mapping[str, str]) -> str:
    """`$VAR` / `${VAR}` → its value. Missing variables must have been reported by validation."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value
    )


def env_references(value: str) -> list[str]:
    return [a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", value)]


def provider_base_url(entry: ModelProvider) -> str | None:
    if entry.base_url:
        return entry.base_url
    prefix = entry.model.partition("/")[0]
    return WELL_KNOWN_BASE_URLS.get(entry.provider_interface or prefix) or WELL_KNOWN_BASE_URLS.get(prefix)


def _upstream(entry: ModelProvider, seen: dict[tuple[str, int, bool, str, str], Upstream], *, local: bool) -> Upstream:
    url = urlsplit(provider_base_url(entry) or "")
    tls = url.scheme == "https"
    host = url.hostname or ""
    if local and host == "host.docker.internal":
        host = host_docker_internal()
    port = url.port or (443 if tls else 80)
    default_port = (tls and port == 443) or (not tls and port == 80)
    authority = entry.http_host or (host if default_port else f"{host}:{port}")
    prefix = url.path.rstrip("/")
    ident = (host, port, tls, prefix, authority)
    if ident not in seen:
        slug = re.sub(r"[^a-zA-Z0-9]+", "_", f"{entry.model.partition('/')[0]}_{host}_{port}").strip("_")
        seen[ident] = Upstream(
            cluster=f"p_{slug}_{_digest(*ident)}",  # named by what it reaches: stable across reloads
            host=host, port=port, tls=tls, path_prefix=prefix,
            authority=authority, connect_timeout=entry.connect_timeout,
        )
    return seen[ident]


def provider_api(entry: ModelProvider) -> Api | None:
    """Which API a provider speaks: its provider_interface, else its base_url's well-known host, else
    None (it speaks the client's API on the client's path, as Plano assumes)."""
    if entry.provider_interface:
        return Api.ANTHROPIC if entry.provider_interface.lower() in ANTHROPIC_INTERFACES else Api.OPENAI
    return KNOWN_HOST_APIS.get(urlsplit(provider_base_url(entry) or "").hostname or "")


def model_kind(model_id: str) -> str:
    """What a model serves, from its id (see `ModelProvider.kind`)."""
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern.search(model_id)), "chat")


def _target(entry: ModelProvider, upstream: Upstream, listener: ListenerSpec, env: Mapping[str, str]) -> Target:
    prefix, _, model_id = entry.model.partition("/")
    api = provider_api(entry)
    attempt_timeout = entry.attempt_timeout if entry.attempt_timeout is not None else listener.attempt_timeout
    named_anthropic = (entry.provider_interface or prefix) in ANTHROPIC_INTERFACES or prefix in ANTHROPIC_INTERFACES
    anthropic = api is Api.ANTHROPIC or (api is None and named_anthropic)
    secrets = [] if entry.passthrough_auth else entry.access_keys or ([entry.access_key] if entry.access_key else [])
    keys = tuple(_api_key(expand_env(secret, env), anthropic) for secret in secrets)
    extra = {name.lower(): expand_env(value, env) for name, value in entry.headers.items()}
    if anthropic:
        extra.setdefault("anthropic-version", ANTHROPIC_VERSION)
    stream_idle_timeout = (
        entry.stream_idle_timeout if entry.stream_idle_timeout is not None else listener.stream_idle_timeout)
    # what the dispatch route of this id does (cluster, timeouts): the same id is the same route in
    # every config, so a reload never sends an in-flight request's retry somewhere else
    route_id = "t" + _digest(upstream.cluster, attempt_timeout, stream_idle_timeout)
    return Target(
        key=entry.model,
        route_id=route_id,
        provider=prefix,
        model_id=model_id,
        upstream=upstream,
        api=api,
        kind=entry.kind or model_kind(model_id),
        default_max_tokens=entry.default_max_tokens,
        max_input_tokens=entry.max_input_tokens,
        repair_streams=listener.repair_streams if entry.repair_streams is None else entry.repair_streams,
        anthropic=anthropic,
        keys=keys,
        pooled=entry.access_keys is not None and not entry.passthrough_auth,
        passthrough_auth=entry.passthrough_auth,
        extra_headers=tuple(extra.items()),
        attempt_timeout=attempt_timeout,
        first_token_timeout=entry.first_token_timeout or listener.first_token_timeout or attempt_timeout,
        stream_idle_timeout=stream_idle_timeout,
    )


def _api_key(secret: str, anthropic: bool) -> ApiKey:
    headers = (("x-api-key", secret),) if anthropic else (("authorization", f"Bearer {secret}"),)
    return ApiKey(id=hashlib.sha256(secret.encode()).hexdigest()[:16], hint=mask_secret(secret), headers=headers)


def _latency_rule(spec: HighLatency | None) -> LatencyRule | None:
    if spec is None or spec.apply_to is BlockApplyTo.REQUEST:
        return None  # a slow response is delivered, which ends its request: a request-scoped block is moot
    return LatencyRule(threshold=spec.threshold_ms / 1000, measure=spec.measure, min_triggers=spec.min_triggers,
                       window=spec.trigger_window_seconds, block_for=spec.block_duration_seconds, scope=spec.scope)


def _policy(primary: str, spec: RetryPolicy, targets: Mapping[str, Target], listener: ListenerSpec) -> Policy:
    fallbacks = [m for m in dict.fromkeys(spec.fallback_models) if m in targets and m != primary]
    def then(rule: StatusCodeRule | TimeoutRule | None) -> dict[str, Any]:
        strategy = (rule.then if rule is not None and rule.then else None) or spec.default_then
        if strategy is None:
            return {}
        more = rule.then_max_attempts if rule is not None and rule.then_max_attempts else None
        return {"then": strategy, "then_max_attempts": more or spec.default_max_attempts}

    default = Rule("default", spec.default_strategy, spec.default_max_attempts, **then(None))
    status_rules: dict[int, Rule] = {code: default for code in DEFAULT_RETRIABLE}
    explicit: dict[int, Rule] = {}
    for rule in spec.on_status_codes:
        codes = expand_status_codes(rule.codes)
        compiled = Rule(
            label=f"status {_codes_label(rule.codes)}",
            strategy=rule.strategy or spec.default_strategy,
            max_attempts=rule.max_attempts if rule.max_attempts is not None else spec.default_max_attempts,
            **then(rule),
        )
        for code in codes:
            explicit.setdefault(code, compiled)  # the first rule listing a code wins
    status_rules.update(explicit)
    timeout = spec.on_timeout
    timeout_rule = Rule(
        "timeout",
        (timeout.strategy if timeout and timeout.strategy else spec.default_strategy),
        (timeout.max_attempts if timeout and timeout.max_attempts is not None else spec.default_max_attempts),
        **then(timeout),
    )
    connection_rule = Rule("connection", spec.default_strategy, spec.default_max_attempts, **then(None))
    distinct_rules = {id(r): r for r in [*status_rules.values(), timeout_rule, connection_rule]}
    budget = spec.max_retry_duration_ms / 1000 if spec.max_retry_duration_ms else None
    if listener.timeout:
        budget = min(budget, listener.timeout) if budget else listener.timeout
    return Policy(
        fallbacks=tuple(fallbacks),
        status_rules=status_rules,
        timeout_rule=timeout_rule,
        connection_rule=connection_rule,
        backoff=spec.backoff,
        retry_after=spec.retry_after_handling,
        max_retry_duration=budget,
        max_retries=sum(r.max_attempts + r.then_max_attempts for r in distinct_rules.values()),
        latency=_latency_rule(spec.on_high_latency),
    )


def _codes_label(codes: int | str | list[int | str]) -> str:
    return ",".join(str(c) for c in codes) if isinstance(codes, list) else str(codes)

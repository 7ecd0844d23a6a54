"""The config file, as pydantic models: Plano v0.3.0's schema plus what sidestep adds.

Every model forbids unknown keys, so a typo is an error with its field path rather than a
setting that silently does nothing. Plano sections sidestep does not act on (prompt targets,
tracing, …) are accepted so Plano files load unchanged, and `lint` warns that they are ignored.
`sidestep schema` prints the JSON Schema of `SidestepConfig` for editors.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

__all__ = [
    "Backoff",
    "BackoffApplyTo",
    "BlockApplyTo",
    "BlockScope",
    "GatewayKey",
    "HighLatency",
    "Listener",
    "Metrics",
    "ModelProvider",
    "RetryAfterHandling",
    "RetryPolicy",
    "SharedState",
    "SidestepConfig",
    "StatusCodeRule",
    "Strategy",
    "TimeoutRule",
    "parse_duration",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from `30`, `30s`, `500ms`, `2m` or `1h` (a bare number means seconds)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '30s' or '500ms'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration; use e.g. '30s', '500ms' or '2m'")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


MAX_DURATION = 24 * 3600.0


def parse_timeout(value: Any) -> float:
    """A positive duration of at most a day (see `Timeout`)."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be greater than 0: a zero timeout means no limit, and a provider that never "
                         "answers could then never be failed over")
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 24h")
    return seconds


Timeout = Annotated[float, BeforeValidator(parse_timeout)]
"""Seconds, written as `30s`, `500ms`, `2m`, `1h` or a number of seconds; at most a day. Positive: a zero timeout would silently mean "no limit" in Envoy, and a
hung provider could then never be failed over."""

MAX_REQUEST_BODY_BYTES = 1 << 30
"""The largest request body sidestep accepts at all: the whole body travels to the ext_proc in one
gRPC message, whose length is a signed 32-bit number."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Strategy(StrEnum):
    """Which target the next attempt goes to."""

    SAME_MODEL = "same_model"
    SAME_PROVIDER = "same_provider"
    DIFFERENT_PROVIDER = "different_provider"


class BackoffApplyTo(StrEnum):
    SAME_MODEL = "same_model"
    SAME_PROVIDER = "same_provider"
    GLOBAL = "global"


class BlockScope(StrEnum):
    MODEL = "model"
    PROVIDER = "provider"


class BlockApplyTo(StrEnum):
    GLOBAL = "global"
    REQUEST = "request"


StatusCodes = int | str | list[int | str]


class _Then(_Strict):
    then: Strategy | None = None
    """sidestep: once `max_attempts` are spent, go on with this strategy instead of giving up, e.g.
    `strategy: same_model` (wait for its Retry-After), `then: different_provider` (fall back).
    Without it a rule gives up when its attempts are spent, as in Plano."""
    then_max_attempts: Annotated[int, Field(ge=1)] | None = None
    """sidestep: retries allowed after switching to `then`; defaults to `default_max_attempts`."""


class StatusCodeRule(_Then):
    codes: StatusCodes
    """Status codes this rule covers: `429`, `"500-504"`, or a list of both."""
    strategy: Strategy | None = None
    """Where the retry goes; defaults to the policy's `default_strategy`."""
    max_attempts: Annotated[int, Field(ge=0)] | None = None
    """Retries after the first attempt for these codes; defaults to `default_max_attempts`."""


class TimeoutRule(_Then):
    strategy: Strategy | None = None
    """Where the retry after an attempt timeout goes; defaults to `default_strategy`."""
    max_attempts: Annotated[int, Field(ge=0)] | None = None
    """Retries after attempt timeouts; defaults to `default_max_attempts`."""


class Backoff(_Strict):
    apply_to: BackoffApplyTo = BackoffApplyTo.SAME_MODEL
    """Wait only when the next attempt goes to the same model, the same provider, or always."""
    base_ms: Annotated[int, Field(ge=1)] = 100
    """First wait; the n-th retry waits base_ms·2^(n−1), capped at max_ms."""
    max_ms: Annotated[int, Field(ge=1)] = 5000
    """Longest single backoff wait."""
    jitter: bool = True
    """Multiply each wait by a random factor in [0.5, 1.0) so retries of many requests spread out."""


class RetryAfterHandling(_Strict):
    scope: BlockScope = BlockScope.MODEL
    """What a Retry-After blocks: the model that sent it, or every model of its provider."""
    apply_to: BlockApplyTo = BlockApplyTo.GLOBAL
    """Whether the block holds for all requests or only the request that saw it."""
    max_retry_after_seconds: Annotated[float, Field(gt=0)] = 300
    """A longer Retry-After is never waited on: the target is blocked and the request fails over."""


class HighLatency(_Strict):
    threshold_ms: Annotated[int, Field(ge=1)]
    """A response slower than this counts as a trigger."""
    measure: Literal["ttfb", "total"] = "ttfb"
    """Time to first byte, or to the last byte of the response."""
    min_triggers: Annotated[int, Field(ge=1)] = 1
    """Slow responses inside the window before the target is blocked."""
    trigger_window_seconds: Annotated[float, Field(gt=0)] = 60
    block_duration_seconds: Annotated[float, Field(gt=0)] = 300
    scope: BlockScope = BlockScope.MODEL
    apply_to: BlockApplyTo = BlockApplyTo.GLOBAL
    strategy: Strategy | None = None
    max_attempts: Annotated[int, Field(ge=0)] | None = None


class RetryPolicy(_Strict):
    """Retries and failover for requests whose requested model is this provider entry."""

    fallback_models: list[str] = []
    """Models (as configured in `model_providers[].model`) tried first, in this order."""
    default_strategy: Strategy = Strategy.DIFFERENT_PROVIDER
    default_max_attempts: Annotated[int, Field(ge=0)] = 2
    """Retries after the first attempt, per failure class, unless a rule says otherwise."""
    default_then: Strategy | None = None
    """sidestep: `then` for every failure class whose rule sets none (see `on_status_codes[].then`)."""
    on_status_codes: list[StatusCodeRule] = []
    """Per-status rules. Without one: 429 and 5xx are retried, other 4xx pass through."""
    on_timeout: TimeoutRule | None = None
    backoff: Backoff | None = None
    retry_after_handling: RetryAfterHandling = RetryAfterHandling()
    on_high_latency: HighLatency | None = None
    max_retry_duration_ms: Annotated[int, Field(ge=1)] | None = None
    """Upper bound on the time spent on retries and waits; a wait that cannot end inside it is not started."""


class ModelProvider(_Strict):
    model: str
    """`provider/model-id`, e.g. `openai/gpt-4o`. Clients request it by this name (or by `name`)."""
    name: str | None = None
    """Optional alias clients may request instead of `model`."""
    base_url: str | None = None
    """Where the provider listens; well-known providers (openai, anthropic, …) have a default."""
    access_key: str | None = None
    """The provider's API key: a literal, or `$VAR` / `${VAR}` read from the environment."""
    access_keys: Annotated[list[str], Field(min_length=1)] | None = None
    """sidestep: a key pool (instead of `access_key`). Requests use the first usable key in this
    order; a 429 rests a key for its Retry-After (default 60 s), a 401/403 retires it until the
    config is reloaded, and the request moves on to the next key."""
    default: bool = False
    """Serve requests whose model is missing or not configured."""
    provider_interface: str | None = None
    """The API the provider speaks: `claude`/`anthropic` (Anthropic Messages) or any other value
    (`openai`, `groq`, …: OpenAI-compatible). Without it: the API of a well-known `base_url` host
    (api.anthropic.com, api.openai.com, …); without either, the provider is taken to speak whatever
    API the client speaks, on the client's path (nothing is translated)."""
    kind: Literal["chat", "embeddings", "audio", "images", "moderation"] | None = None
    """sidestep: what the model serves; requests only fail over to entries of their own kind. Defaults
    from the model id (`text-embedding-*`/`*embed*` embeddings, `whisper-*`/`tts-*`/`*transcribe*`
    audio, `dall-e-*`/`gpt-image-*` images, `*moderation*` moderation; anything else chat)."""
    max_input_tokens: Annotated[int, Field(ge=1)] | None = None
    """sidestep: the model's context window. A request refused as too long (`context_length_exceeded`)
    fails over only to a fallback with a larger one, never to a model of the same size."""
    repair_streams: bool | None = None
    """sidestep: `false`: a streamed answer of this provider that breaks mid-way is not continued from
    another (it ends as the provider ended it); defaults to the listener's `repair_streams`."""
    default_max_tokens: Annotated[int, Field(ge=1)] = 4096
    """sidestep: `max_tokens` sent to this (Anthropic) provider for a translated OpenAI request that
    set none; Anthropic requires one."""
    http_host: str | None = None
    """Host header sent to the provider; defaults to the base_url host."""
    headers: dict[str, str] = {}
    """Extra headers sent with every request to this provider (values may use `$VAR`)."""
    passthrough_auth: bool = False
    """Forward the client's own credentials instead of `access_key`."""
    retry_policy: RetryPolicy | None = None
    """Without one, the provider's response passes through untouched."""
    routing_preferences: list[dict[str, Any]] | None = None
    """Plano's (deprecated) LLM routing hints; accepted and ignored."""
    attempt_timeout: Timeout | None = None
    """sidestep: time to first response byte for one attempt (defaults to the listener's)."""
    first_token_timeout: Timeout | None = None
    """sidestep: time from the start of one attempt to the first content of a streamed answer
    (defaults to the listener's)."""
    stream_idle_timeout: Timeout | None = None
    """sidestep: the stall window: longest pause between two chunks of a response (defaults to the
    listener's)."""
    connect_timeout: Timeout = 5.0
    """sidestep: TCP/TLS connect timeout to the provider."""

    @field_validator("model")
    @classmethod
    def _provider_slash_model(cls, value: str) -> str:
        prefix, _, model_id = value.partition("/")
        if not prefix or not model_id:
            raise ValueError(f"{value!r} must be 'provider/model-id', e.g. 'openai/gpt-4o'")
        if "*" in value:
            raise ValueError("wildcard models are not supported; list each model")
        return value


class Listener(_Strict):
    name: str = "model_listener"
    type: Literal["model", "prompt", "agent"] = "model"
    """sidestep serves `model` listeners; the others are accepted and ignored."""
    port: Annotated[int, Field(ge=1, le=65535)] = 12000
    address: str = "127.0.0.1"
    """An IP address (`127.0.0.1`, `0.0.0.0`, `::1`) or `localhost`. Any address other than loopback
    needs `gateway_keys`, or `allow_unauthenticated: true`."""
    allow_unauthenticated: bool = False
    """sidestep: serve a non-loopback address without `gateway_keys`: anyone who reaches the port
    spends the provider keys."""
    timeout: Timeout | None = None
    """Plano's listener timeout: the longest a client waits for its response to start, across all
    attempts and waits. Streams that have started are never cut by it."""
    attempt_timeout: Timeout = 30.0
    """sidestep: default time to first response byte for one attempt."""
    first_token_timeout: Timeout | None = None
    """sidestep: default time from the start of one attempt to the first content of a streamed
    answer; a stream that sends headers and then nothing fails over after it (default:
    `attempt_timeout`)."""
    stream_idle_timeout: Timeout = 300.0
    """sidestep: default stall window: longest pause between two chunks of a response."""
    repair_streams: bool = True
    """sidestep: streamed chat answers go through a relay that continues an answer from another
    provider when its provider breaks after the client got part of it (a cut, a stall past the stall
    window, an error event), so the client gets one complete stream, or a well-formed error event
    when that is impossible. `false`: such streams end as their provider ended them."""
    stream_commit_events: Annotated[int, Field(ge=1, le=1000)] = 1
    """sidestep: a streamed answer is held (headers included) until this many content events arrived
    (or it ended): a provider failing before then is failed over invisibly. 1: the first token."""
    request_timeout: Timeout = 60.0
    """sidestep: the longest a client may take to send its whole request (headers and body); slower
    clients get 408."""
    max_request_body_bytes: Annotated[int, Field(ge=1024, le=MAX_REQUEST_BODY_BYTES)] = 32 * 1024 * 1024
    """sidestep: larger request bodies get 413 (at most 1 GiB)."""
    router: str | None = None
    max_retries: int | None = None
    agents: list[dict[str, Any]] | None = None
    input_filters: list[str] | None = None
    output_filters: list[str] | None = None


class GatewayKey(_Strict):
    """A key clients present to use the gateway (as their SDK's api_key)."""

    name: str
    """Shown in logs and status instead of the key: letters, digits, `_`, `.`, `-`."""
    key: str
    """The key: a literal, or `$VAR` / `${VAR}` read from the environment."""
    models: Annotated[list[str], Field(min_length=1)] | None = None
    """The models (as configured `model` or `name`) this key may request; all when absent."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
            raise ValueError(f"{value!r}: use 1 to 64 letters, digits, '_', '.' or '-'")
        return value


class SharedState(_Strict):
    """sidestep: share what this gateway learns about providers (Retry-After and latency blocks,
    slow-response triggers, key states) with every gateway that names the same Redis and namespace."""

    redis_url: str
    """`redis://[:password@]host:port/db`, `rediss://…` (TLS) or `unix:///path/redis.sock?db=0`;
    `$VAR` / `${VAR}` read from the environment."""
    namespace: str = "sidestep"
    """Prefix of the Redis keys and channel: gateways share state only within one namespace."""

    @field_validator("namespace")
    @classmethod
    def _plain_namespace(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", value):
            raise ValueError(f"{value!r}: use 1 to 64 letters, digits, '_', '.', ':' or '-'")
        return value


class Metrics(_Strict):
    """sidestep: Prometheus metrics (`GET /metrics`), and where they are served."""

    enabled: bool = True
    """false: no metrics service, and Envoy streams no access-log entries to one (their cost is
    Envoy's and the metrics service's CPU per request; see the README's Benchmarks)."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """A port of its own for `/metrics` (then the listener's port does not serve it); by default
    the listener's port serves it."""
    address: str = "127.0.0.1"
    """With `port`: the address it binds (an IP, or `localhost`)."""


class SidestepConfig(_Strict):
    """A sidestep (or Plano v0.3.0) config file."""

    version: str = "v0.3.0"
    listeners: list[Listener] = [Listener()]
    gateway_keys: list[GatewayKey] = []
    """sidestep: when set, every request must carry one of these keys (`Authorization: Bearer`,
    `x-api-key` or `x-sidestep-key`); none of them ever reaches a provider."""
    shared_state: SharedState | None = None
    """sidestep: without it, state is shared by this gateway's workers only."""
    metrics: Metrics = Metrics()
    model_providers: list[ModelProvider] = []
    llm_providers: list[ModelProvider] | None = None
    """Plano's older name for `model_providers`."""
    # Plano sections sidestep accepts but does not act on (lint warns about each one present).
    agents: Any = None
    filters: Any = None
    endpoints: Any = None
    model_aliases: Any = None
    overrides: Any = None
    system_prompt: Any = None
    prompt_targets: Any = None
    ratelimits: Any = None
    tracing: Any = None
    mode: Any = None
    routing: Any = None
    state_storage: Any = None
    prompt_guards: Any = None
    routing_preferences: Any = None

    def providers(self) -> list[ModelProvider]:
        """model_providers, or Plano's legacy llm_providers."""
        return self.model_providers or self.llm_providers or []


IGNORED_TOP_LEVEL = (
    "agents", "filters", "endpoints", "model_aliases", "overrides", "system_prompt", "prompt_targets",
    "ratelimits", "tracing", "mode", "routing", "state_storage", "prompt_guards", "routing_preferences",
)

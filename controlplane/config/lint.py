"""Warnings for configs that are legal but probably not what the user meant."""

from __future__ import annotations

from controlplane.config.runtime import expand_status_codes, model_kind, provider_api
from controlplane.config.schema import (
    IGNORED_TOP_LEVEL,
    BackoffApplyTo,
    BlockApplyTo,
    ModelProvider,
    RetryPolicy,
    SidestepConfig,
    Strategy,
)
from controlplane.errors import ConfigIssue

__all__ = ["lint"]


def lint(config: SidestepConfig) -> list[ConfigIssue]:
    """Warnings for a config that already validated. Usage: `for w in lint(cfg): print(w)`."""
    warnings: list[ConfigIssue] = []
    for name in IGNORED_TOP_LEVEL:
        if getattr(config, name) is not None:
            warnings.append(ConfigIssue(name, "Plano setting accepted but ignored by sidestep"))
    if config.llm_providers and not config.model_providers:
        warnings.append(ConfigIssue("llm_providers", "deprecated name; rename it to model_providers"))
    for i, listener in enumerate(config.listeners):
        warnings.extend(_lint_timers(f"listeners[{i}]", listener.attempt_timeout, listener.first_token_timeout,
                                     listener.stream_idle_timeout))
        if listener.type != "model":
            warnings.append(ConfigIssue(f"listeners[{i}]", f"`type: {listener.type}` listeners are ignored"))
        for field in ("router", "max_retries", "agents", "input_filters", "output_filters"):
            if getattr(listener, field) is not None:
                warnings.append(ConfigIssue(f"listeners[{i}].{field}", "Plano setting accepted but ignored"))
    section = "model_providers" if config.model_providers else "llm_providers"
    providers = config.providers()
    by_model = {p.model: p for p in providers}
    configured = set(by_model)
    for i, entry in enumerate(providers):
        here = f"{section}[{i}] ({entry.model})"
        if entry.attempt_timeout or entry.first_token_timeout or entry.stream_idle_timeout:
            model_listener = next((x for x in config.listeners if x.type == "model"), None)
            if model_listener is not None:
                warnings.extend(_lint_timers(
                    here, entry.attempt_timeout or model_listener.attempt_timeout,
                    entry.first_token_timeout or model_listener.first_token_timeout,
                    entry.stream_idle_timeout or model_listener.stream_idle_timeout))
        if entry.routing_preferences is not None:
            warnings.append(ConfigIssue(f"{here}.routing_preferences", "accepted but ignored by sidestep"))
        if entry.passthrough_auth and entry.access_key:
            warnings.append(ConfigIssue(f"{here}.access_key", "ignored: passthrough_auth forwards the client's key"))
        if entry.retry_policy is not None:
            warnings.extend(_lint_policy(f"{here}.retry_policy", entry.model, entry.retry_policy, configured))
            warnings.extend(_lint_fallbacks(f"{here}.retry_policy", entry, by_model))
    return warnings


def _lint_policy(here: str, primary: str, policy: RetryPolicy, configured: set[str]) -> list[ConfigIssue]:
    warnings: list[ConfigIssue] = []
    strategies = {policy.default_strategy}
    strategies |= {r.strategy for r in policy.on_status_codes if r.strategy}
    if policy.on_timeout and policy.on_timeout.strategy:
        strategies.add(policy.on_timeout.strategy)
    owner: dict[int, int] = {}
    for j, rule in enumerate(policy.on_status_codes):
        overlap = sorted({c for c in expand_status_codes(rule.codes) if c in owner})
        if overlap:
            first = owner[overlap[0]]
            warnings.append(ConfigIssue(
                f"{here}.on_status_codes[{j}].codes",
                f"{_ranges(overlap)} already covered by on_status_codes[{first}], which wins for them",
            ))
        for code in expand_status_codes(rule.codes):
            owner.setdefault(code, j)
    provider = primary.partition("/")[0]
    for j, model in enumerate(policy.fallback_models):
        path = f"{here}.fallback_models[{j}]"
        if model not in configured:
            warnings.append(ConfigIssue(path, f"{model!r} is not a configured model_providers entry; it is skipped"))
        elif model == primary:
            warnings.append(ConfigIssue(path, "the primary model itself; it is skipped"))
        elif strategies == {Strategy.DIFFERENT_PROVIDER} and model.partition("/")[0] == provider:
            warnings.append(ConfigIssue(
                path, f"same provider as {primary!r}, but every rule uses different_provider: never chosen"))
    backoff = policy.backoff
    if backoff is not None:
        if backoff.apply_to == BackoffApplyTo.SAME_MODEL and Strategy.SAME_MODEL not in strategies:
            warnings.append(ConfigIssue(f"{here}.backoff.apply_to",
                                        "same_model never matches: no rule retries the same model"))
        if backoff.apply_to == BackoffApplyTo.SAME_PROVIDER and strategies == {Strategy.DIFFERENT_PROVIDER}:
            warnings.append(ConfigIssue(f"{here}.backoff.apply_to",
                                        "same_provider never matches: every rule moves to a different provider"))
    latency = policy.on_high_latency
    if latency is not None:
        if latency.apply_to == BlockApplyTo.REQUEST:
            warnings.append(ConfigIssue(f"{here}.on_high_latency.apply_to",
                                        "request has no effect: a slow response is delivered, which ends its "
                                        "request; use global to steer later requests away"))
        for field in ("strategy", "max_attempts"):
            if getattr(latency, field) is not None:
                warnings.append(ConfigIssue(f"{here}.on_high_latency.{field}",
                                            "ignored: a slow response is delivered, not retried; later requests "
                                            "avoid the blocked target"))
    if policy.default_max_attempts == 0 and not policy.on_status_codes and policy.on_timeout is None:
        warnings.append(ConfigIssue(f"{here}.default_max_attempts", "0 with no rules: this policy never retries"))
    return warnings


def _lint_fallbacks(here: str, primary: ModelProvider, by_model: dict[str, ModelProvider]) -> list[ConfigIssue]:
    """A listed fallback that can never serve the primary's requests: another kind of model, or another
    API family for requests sidestep cannot translate."""
    warnings: list[ConfigIssue] = []
    kind = primary.kind or model_kind(primary.model.partition("/")[2])
    api = provider_api(primary)
    for j, name in enumerate(primary.retry_policy.fallback_models if primary.retry_policy else []):
        fallback = by_model.get(name)
        if fallback is None or fallback is primary:
            continue
        other_kind = fallback.kind or model_kind(fallback.model.partition("/")[2])
        other_api = provider_api(fallback)
        path = f"{here}.fallback_models[{j}]"
        if other_kind != kind:
            warnings.append(ConfigIssue(path, f"{name!r} serves {other_kind}, {primary.model!r} serves {kind}: "
                                              f"requests never fail over to it"))
        elif kind != "chat" and api is not None and other_api is not None and other_api is not api:
            warnings.append(ConfigIssue(path, f"{name!r} speaks the {other_api.value} API and {kind} requests "
                                              f"cannot be translated: requests never fail over to it"))
    return warnings


def _lint_timers(here: str, attempt: float, first_token: float | None, stall: float) -> list[ConfigIssue]:
    """Timer combinations where one can never fire, or fires before the one meant to."""
    warnings: list[ConfigIssue] = []
    if first_token is not None and first_token < attempt:
        warnings.append(ConfigIssue(f"{here}.first_token_timeout", f"{first_token:g}s is shorter than attempt_timeout "
                                                                   f"({attempt:g}s), which can then never fire for "
                                                                   f"streamed answers"))
    if stall < attempt:
        warnings.append(ConfigIssue(f"{here}.stream_idle_timeout",
                                    f"{stall:g}s is shorter than attempt_timeout ({attempt:g}s): a provider that "
                                    f"stays silent is cut by the stall window first (it still fails over, as a "
                                    f"connection failure, so on_timeout does not apply)"))
    return warnings


def _ranges(codes: list[int]) -> str:
    out: list[str] = []
    start = prev = codes[0]
    for code in codes[1:] + [-1]:
        if code != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = code
        prev = code
    return ",".join(out)

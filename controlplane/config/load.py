"""Read a config file: YAML → `SidestepConfig` → semantic checks → compiled `Gateway`.

All problems are collected, each with the field path a user can find in the file
(`model_providers[1].retry_policy.backoff.base_ms`), and raised together as `ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from controlplane.config.lint import lint
from controlplane.config.runtime import (
    Gateway,
    compile_config,
    env_references,
    expand_status_codes,
    provider_base_url,
)
from controlplane.config.schema import SidestepConfig
from controlplane.errors import ConfigError, ConfigIssue

__all__ = ["LoadedConfig", "load_config", "parse_config"]


@dataclass(frozen=True)
class LoadedConfig:
    config: SidestepConfig
    gateway: Gateway
    warnings: list[ConfigIssue]


def load_config(path: str | Path, env: Mapping[str, str] | None = None, *, local: bool = True) -> LoadedConfig:
    """Load, validate and compile a config file. Usage: `load_config("sidestep.yaml").gateway`."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read {path}: {exc.strerror or exc}")]) from None
    return parse_config(text, env, local=local, source=str(path))


def parse_config(text: str, env: Mapping[str, str] | None = None, *, local: bool = True,
                 source: str = "<config>") -> LoadedConfig:
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"{source} is not valid YAML{where}: {problem}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", f"{source} must be a mapping of settings, not {type(raw).__name__}")])
    try:
        config = SidestepConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([_issue_from_pydantic(err, raw) for err in exc.errors()]) from None
    issues = _semantic_issues(config, env)
    if issues:
        raise ConfigError(issues)
    return LoadedConfig(config=config, gateway=compile_config(config, env, local=local), warnings=lint(config))


def _issue_from_pydantic(err: Any, raw: dict[str, Any]) -> ConfigIssue:
    loc = [part for part in err["loc"] if not (isinstance(part, str) and _is_union_tag(part))]
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field (check the spelling; see `sidestep schema`)"
    elif message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return ConfigIssue(_path(loc, raw), message)


def _is_union_tag(part: str) -> bool:
    # pydantic names the union member it tried ("int", "str", "list[union[int,str]]"); users never wrote it
    return part in {"int", "str", "float", "bool"} or part.startswith(("list[", "function-", "constrained-"))


def _path(loc: list[Any], raw: Any) -> str:
    """`model_providers[1] (openai/gpt-4o).retry_policy…` — the model names the entry for humans."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and isinstance(node.get("model"), str):
                out += f" ({node['model']})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


def _semantic_issues(config: SidestepConfig, env: Mapping[str, str]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    section = "model_providers" if config.model_providers else "llm_providers"
    if config.model_providers and config.llm_providers:
        issues.append(ConfigIssue("llm_providers", "use either model_providers or llm_providers, not both"))
    model_listeners = [i for i, listener in enumerate(config.listeners) if listener.type == "model"]
    if not model_listeners:
        issues.append(ConfigIssue("listeners", "needs one listener with `type: model`"))
    elif len(model_listeners) > 1:
        second = model_listeners[1]
        issues.append(ConfigIssue(f"listeners[{second}]", "sidestep serves one model listener; remove the others"))
    providers = config.providers()
    if not providers:
        issues.append(ConfigIssue("model_providers", "configure at least one model provider"))
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    defaults = [i for i, p in enumerate(providers) if p.default]
    if len(defaults) > 1:
        second = defaults[1]
        issues.append(ConfigIssue(f"{section}[{second}] ({providers[second].model}).default",
                                  f"only one provider can be the default ({section}[{defaults[0]}] already is)"))
    for i, entry in enumerate(providers):
        here = f"{section}[{i}] ({entry.model})"
        if entry.model in seen:
            issues.append(ConfigIssue(f"{here}.model", f"duplicate of {section}[{seen[entry.model]}]"))
        seen.setdefault(entry.model, i)
        if entry.name:
            if entry.name in names and providers[names[entry.name]].model != entry.model:
                issues.append(ConfigIssue(f"{here}.name", f"{entry.name!r} is already the name of "
                                                          f"{section}[{names[entry.name]}]"))
            names.setdefault(entry.name, i)
        base_url = provider_base_url(entry)
        if base_url is None:
            issues.append(ConfigIssue(f"{here}.base_url",
                                      f"required: sidestep does not know where provider "
                                      f"{entry.model.partition('/')[0]!r} listens"))
        else:
            issues.extend(_check_url(f"{here}.base_url", base_url))
        pool = [(f"access_keys[{k}]", v) for k, v in enumerate(entry.access_keys or [])]
        for field, value in [("access_key", entry.access_key), *pool, ("base_url", entry.base_url),
                             *((f"headers.{k}", v) for k, v in entry.headers.items())]:
            for var in env_references(value or ""):
                if var not in env:
                    issues.append(ConfigIssue(f"{here}.{field}", f"environment variable {var} is not set"))
        if entry.access_key is not None and entry.access_keys is not None:
            issues.append(ConfigIssue(f"{here}.access_keys", "use either access_key or access_keys, not both"))
        if entry.access_keys is not None and entry.passthrough_auth:
            issues.append(ConfigIssue(f"{here}.access_keys",
                                      "a key pool cannot be combined with passthrough_auth (the client's key)"))
        if entry.access_keys and len(set(entry.access_keys)) != len(entry.access_keys):
            issues.append(ConfigIssue(f"{here}.access_keys", "lists the same key twice"))
        no_key = entry.access_key is None and entry.access_keys is None
        if no_key and not entry.passthrough_auth and entry.base_url is None:
            issues.append(ConfigIssue(f"{here}.access_key",
                                      "required for a hosted provider (or set passthrough_auth: true "
                                      "to forward the client's own key)"))
        if entry.retry_policy:
            for j, rule in enumerate(entry.retry_policy.on_status_codes):
                try:
                    codes = expand_status_codes(rule.codes)
                except ValueError as exc:
                    issues.append(ConfigIssue(f"{here}.retry_policy.on_status_codes[{j}].codes", str(exc)))
                    continue
                ok = [c for c in codes if c < 200 or c >= 400]
                if len(ok) != len(codes):
                    issues.append(ConfigIssue(f"{here}.retry_policy.on_status_codes[{j}].codes",
                                              "only error statuses (4xx, 5xx) can be retried"))
            backoff = entry.retry_policy.backoff
            if backoff and backoff.max_ms < backoff.base_ms:
                issues.append(ConfigIssue(f"{here}.retry_policy.backoff.max_ms",
                                          f"must be at least base_ms ({backoff.base_ms})"))
    return issues


def _check_url(path: str, url: str) -> list[ConfigIssue]:
    if "$" in url:
        return []
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return [ConfigIssue(path, f"{url!r} is not a valid URL: {exc}")]
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return [ConfigIssue(path, f"{url!r} must be an http:// or https:// URL with a host")]
    if parts.query or parts.fragment:
        return [ConfigIssue(path, f"{url!r}: a base_url cannot have a query or fragment")]
    return []

"""Read a config file: YAML → `SidestepConfig` → semantic checks → compiled `Gateway`.

All problems are collected, each with the field path a user can find in the file
(`model_providers[1].retry_policy.backoff.base_ms`), and raised together as `ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
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
    expand_env,
    expand_status_codes,
    listener_ip,
    mask_url,
    provider_base_url,
)
from controlplane.config.schema import SidestepConfig
from controlplane.errors import ConfigError, ConfigIssue

__all__ = ["LoadedConfig", "load_config", "parse_config"]

MAX_CONFIG_BYTES = 16 << 20
MAX_NESTING = 64  # a sidestep config nests about 6 levels; libyaml's composer recurses in C
MAX_NODES = 2_000_000  # after expanding aliases: stops "billion laughs" before pydantic walks them
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: linear and ~10× faster
# An HTTP header name (RFC 9110 token) and a value without line breaks or other control characters.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_KEY = re.compile(r"[\x00-\x20\x7f]")  # keys travel in headers: no spaces or control characters
# Headers a provider entry may not set: sidestep or Envoy own them, and setting them breaks every request.
_RESERVED_HEADERS = ("host", "content-length", "transfer-encoding", "connection", "upgrade", "te",
                     "keep-alive", "proxy-connection")
_RESERVED_PREFIXES = ("x-sidestep-", "x-envoy-", ":")


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
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigIssue("", f"{source} is {len(text)} bytes; a config may be at most "
                                           f"{MAX_CONFIG_BYTES >> 20} MiB")])
    try:
        _check_shape(text, source)
        raw = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
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


def _check_shape(text: str, source: str) -> None:
    """Refuse YAML nested deeper than any config needs, or that expands (through aliases) to more
    nodes than any config has, before building it: both would otherwise crash or hang the loader.
    One pass over libyaml's event stream, which does not recurse."""
    depth = 0
    sizes: list[int] = []  # nodes inside each open collection
    anchored: dict[str, int] = {}  # anchor → expanded size of its node
    anchors: list[str | None] = []
    total = 0
    for event in yaml.parse(text, Loader=_Loader):
        size = 0
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_NESTING:
                line = event.start_mark.line + 1 if event.start_mark else 0
                raise ConfigError([ConfigIssue("", f"{source} nests deeper than {MAX_NESTING} levels "
                                                   f"(line {line}); a sidestep config needs about 6")])
            sizes.append(1)
            anchors.append(event.anchor)
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            size = sizes.pop()
            anchor = anchors.pop()
            if anchor:
                anchored[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = anchored.get(event.anchor or "", 1)
        else:
            continue
        if sizes:
            sizes[-1] += size
        else:
            total += size
        if (sizes[0] if sizes else 0) + total > MAX_NODES:
            raise ConfigError([ConfigIssue("", f"{source} expands to more than {MAX_NODES} values "
                                               f"(through YAML aliases?); refusing to load it")])


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
    else:
        i = model_listeners[0]
        listener = config.listeners[i]
        issues.extend(_check_address(f"listeners[{i}]", listener.address, bool(config.gateway_keys),
                                     listener.allow_unauthenticated))
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
    models = {entry.model: i for i, entry in enumerate(providers)}
    for i, entry in enumerate(providers):
        here = f"{section}[{i}] ({entry.model})"
        if entry.name and entry.name in models and models[entry.name] != i:
            issues.append(ConfigIssue(f"{here}.name", f"{entry.name!r} is the model of {section}[{models[entry.name]}]; "
                                                      f"a client asking for it would get either"))
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
        for field, value in [("access_key", entry.access_key), *pool]:
            if value is not None:
                issues.extend(_check_secret(f"{here}.{field}", value, env))
        for name, value in entry.headers.items():
            issues.extend(_check_header(f"{here}.headers.{name}", name, value, env))
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
    issues.extend(_gateway_key_issues(config, env, {p.model for p in providers} | set(names)))
    if config.shared_state is not None:
        issues.extend(_shared_state_issues(config.shared_state.redis_url, env))
    if config.metrics.port is not None:
        try:
            ipaddress.ip_address(listener_ip(config.metrics.address))
        except ValueError:
            issues.append(ConfigIssue("metrics.address", f"{config.metrics.address!r} is not an IP address; use "
                                                          f"e.g. 127.0.0.1 or 0.0.0.0 (or localhost)"))
        if any(x.port == config.metrics.port for x in config.listeners if x.type == "model"):
            issues.append(ConfigIssue("metrics.port", f"{config.metrics.port} is the model listener's port; leave "
                                                      f"metrics.port out to serve /metrics there"))
    return issues


def _shared_state_issues(url: str, env: Mapping[str, str]) -> list[ConfigIssue]:
    here = "shared_state.redis_url"
    missing = [var for var in env_references(url) if var not in env]
    if missing:
        return [ConfigIssue(here, f"environment variable {var} is not set") for var in missing]
    expanded = expand_env(url, env)
    try:
        parts = urlsplit(expanded)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        return [ConfigIssue(here, f"{mask_url(expanded)!r} is not a valid URL: {exc}")]
    shown = mask_url(expanded)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            return [ConfigIssue(here, f"{shown!r} names no host (e.g. redis://127.0.0.1:6379/0)")]
        db = parts.path.strip("/")
        if db and not db.isdigit():
            return [ConfigIssue(here, f"{shown!r}: the database after the host must be a number, like /0")]
    elif parts.scheme == "unix":
        if not parts.path:
            return [ConfigIssue(here, f"{shown!r} names no socket (e.g. unix:///run/redis/redis.sock)")]
    else:
        return [ConfigIssue(here, f"{shown!r} must be a redis://, rediss:// or unix:// URL")]
    return []


def _gateway_key_issues(config: SidestepConfig, env: Mapping[str, str], requestable: set[str]) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    names: dict[str, int] = {}
    secrets: dict[str, int] = {}
    for i, spec in enumerate(config.gateway_keys):
        here = f"gateway_keys[{i}] ({spec.name})"
        if spec.name in names:
            issues.append(ConfigIssue(f"{here}.name", f"duplicate of gateway_keys[{names[spec.name]}]"))
        names.setdefault(spec.name, i)
        missing = [var for var in env_references(spec.key) if var not in env]
        for var in missing:
            issues.append(ConfigIssue(f"{here}.key", f"environment variable {var} is not set"))
        if not missing:
            issues.extend(_check_secret(f"{here}.key", spec.key, env))
            secret = expand_env(spec.key, env)
            if secret in secrets:
                issues.append(ConfigIssue(f"{here}.key", f"the same key as gateway_keys[{secrets[secret]}]"))
            secrets.setdefault(secret, i)
        for j, model in enumerate(spec.models or []):
            if model not in requestable:
                issues.append(ConfigIssue(f"{here}.models[{j}]", f"{model!r} is not a configured model or name"))
    return issues


def _check_address(here: str, address: str, has_keys: bool, allowed: bool) -> list[ConfigIssue]:
    try:
        ip = ipaddress.ip_address(listener_ip(address))
    except ValueError:
        return [ConfigIssue(f"{here}.address", f"{address!r} is not an IP address; use e.g. 127.0.0.1, "
                                               f"0.0.0.0 or ::1 (or localhost)")]
    if not ip.is_loopback and not has_keys and not allowed:
        return [ConfigIssue(f"{here}.address",
                            f"{address} is reachable from other machines, and without gateway_keys anyone who "
                            f"reaches it spends your provider keys: add gateway_keys, or set "
                            f"allow_unauthenticated: true on the listener")]
    return []


def _check_secret(here: str, value: str, env: Mapping[str, str]) -> list[ConfigIssue]:
    """A key travels in a header: it must be non-empty and free of spaces and control characters.
    The message never repeats the key."""
    secret = expand_env(value, env)
    if not secret:
        return [ConfigIssue(here, "is empty")]
    if _BAD_KEY.search(secret):
        return [ConfigIssue(here, "contains a space, line break or other control character (check the "
                                  "variable's value for a trailing newline)")]
    return []


def _check_header(here: str, name: str, value: str, env: Mapping[str, str]) -> list[ConfigIssue]:
    lower = name.lower()
    if not _TOKEN.match(name):
        return [ConfigIssue(here, f"{name!r} is not a valid HTTP header name")]
    if lower in _RESERVED_HEADERS or lower.startswith(_RESERVED_PREFIXES):
        return [ConfigIssue(here, f"{name} is set by sidestep or Envoy and cannot be configured")]
    if _BAD_VALUE.search(expand_env(value, env)):
        return [ConfigIssue(here, "the value contains a line break or other control character")]
    return []


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

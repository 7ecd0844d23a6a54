"""The compiled config: what the stack's processes run, compiled once by `sidestep up` or `reload`.

The YAML is read, validated and compiled (environment variables expanded) in one place; the
ext_proc workers and the state service load this file, never the YAML, so every process runs the
same compiled config. One content hash covers all of it, the compiled gateway and the Envoy config
rendered from it: it is the stack's config hash (`status`, the metrics, the workers' hellos).

The file is a pickle: it is written and read only by the stack's own user, in its 0700 run
directory (where the YAML with its keys lives too); nothing from outside is ever unpickled.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.config.runtime import Gateway

__all__ = ["Compiled", "content_hash", "dump", "load"]


@dataclass(frozen=True)
class Compiled:
    gateway: Gateway
    envoy: dict[str, Any]  # the Envoy config, as one static bootstrap (`render_envoy`)
    source: str  # the file it came from, or "built-in defaults"


def dump(compiled: Compiled) -> bytes:
    return pickle.dumps(compiled, protocol=pickle.HIGHEST_PROTOCOL)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def load(path: str | Path) -> tuple[Compiled, str]:
    """The compiled config in `path` and its content hash."""
    data = Path(path).read_bytes()
    compiled = pickle.loads(data)  # noqa: S301 - our own file, in the stack's private run directory
    if not isinstance(compiled, Compiled):
        raise ValueError(f"{path} is not a sidestep compiled config")
    return compiled, content_hash(data)

"""One request's history: the attempts made so far and where the next one goes.

The attempt number is derived from the list, never stored beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.config.runtime import Target
from controlplane.state.table import Blocks
from extproc.policy.classify import Outcome

__all__ = ["Attempt", "RequestState"]


@dataclass(slots=True)
class Attempt:
    target: Target
    started: float  # monotonic, when the attempt was sent
    key: int = 0  # index into target.keys
    outcome: Outcome | None = None  # None until its response (or reset) is seen
    retried_by: str | None = None  # label of the rule that retried after it


@dataclass(slots=True)
class RequestState:
    primary: Target
    started: float  # monotonic, when the request reached the ext_proc
    client_path: str  # the client's :path before any attempt rewrote it
    client_credentials: tuple[tuple[str, bytes], ...]  # only forwarded for passthrough_auth targets
    next_target: Target
    not_before: float = 0.0  # the next attempt waits until then (backoff, Retry-After)
    attempts: list[Attempt] = field(default_factory=list)
    blocks: Blocks = field(default_factory=Blocks)  # apply_to: request

    @property
    def attempt_number(self) -> int:
        return len(self.attempts)

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def tried(self) -> list[Target]:
        return [a.target for a in self.attempts]

    def retries_for(self, rule_label: str) -> int:
        return sum(1 for a in self.attempts if a.retried_by == rule_label)

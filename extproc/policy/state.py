"""One request's history: the attempts made so far and where the next one goes.

The attempt number is derived from the list, never stored beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controlplane.config.runtime import Policy, Target
from controlplane.endpoints import CHAT_COMPLETIONS, Endpoint
from controlplane.state.table import Blocks
from extproc.body import ModelField
from extproc.policy.classify import Outcome, ProviderError

__all__ = ["Attempt", "ProviderError", "RequestState"]


@dataclass(slots=True)
class Attempt:
    target: Target
    started: float  # monotonic, when the attempt was sent
    key: int = 0  # index into target.keys
    outcome: Outcome | None = None  # None until its response (or reset) is seen
    retried_by: str | None = None  # label of the rule that retried after it
    error: ProviderError | None = None  # what the provider said, when it answered with an error body
    ended: float | None = None  # monotonic, when its response headers (or its failure) were seen
    waited: float = 0.0  # seconds it waited before it was sent
    wait_why: str = ""  # why (see `Retry.why`)
    translated: bool = False  # sent in another API than the client's


@dataclass(slots=True)
class RequestState:
    primary: Target
    started: float  # monotonic, when the request reached the ext_proc
    client_path: str  # the client's :path before any attempt rewrote it
    client_credentials: tuple[tuple[str, bytes], ...]  # only forwarded for passthrough_auth targets
    next_target: Target
    order: tuple[Target, ...] = ()  # where it may fail over to (`Gateway.order`), fixed when it starts
    endpoint: Endpoint = CHAT_COMPLETIONS  # what the client called: its API family, the kind of model it needs
    body: bytes = b""  # the client's body as it sent it: every attempt is built from it
    model: ModelField | None = None  # where the model value is in `body` (None: no model to rewrite)
    pinned: bool = False  # refers to state its provider keeps: never fail over to another provider
    parsed: Any = None  # `body` as JSON, once a translation needed it
    refused: dict[Any, str] = field(default_factory=dict)  # API → why the body cannot be translated to it ("" : it can)
    not_before: float = 0.0  # the next attempt waits until then (backoff, Retry-After)
    wait_why: str = ""  # why it waits (`Retry.why`)
    deadline: float | None = None  # monotonic: when the client gives up (its SDK's timeout), if it said
    continuation: str | None = None  # the stream relay's: the text the client has of a broken answer
    client: str = ""  # the name of the gateway key it authenticated with (for metrics)
    attempts: list[Attempt] = field(default_factory=list)
    blocks: Blocks = field(default_factory=Blocks)  # apply_to: request

    @property
    def policy(self) -> Policy | None:
        """The policy governing this request: the primary's, unless the request never fails over
        (multipart, or no model of its own: it goes to one provider)."""
        return self.primary.policy if self.endpoint.fails_over else None

    @property
    def attempt_number(self) -> int:
        return len(self.attempts)

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    def tried(self) -> list[Target]:
        return [a.target for a in self.attempts]

    def limit(self, budget: float | None) -> float | None:
        """The latest time a wait may end: the client's deadline, or the policy's budget, whichever is first."""
        ends = [t for t in (self.deadline, self.started + budget if budget is not None else None) if t is not None]
        return min(ends) if ends else None

    def retries_for(self, rule_label: str) -> int:
        return sum(1 for a in self.attempts if a.retried_by == rule_label)

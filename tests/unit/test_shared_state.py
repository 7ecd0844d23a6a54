"""Shared state as pure pieces with a fake clock: block bookkeeping, trigger windows, key pools,
pacing, the wire codec, and the coordinator's latency measurement. No sleeps, no processes."""

from __future__ import annotations

import random

import pytest

from controlplane.config import Gateway, parse_config
from controlplane.config.runtime import LatencyRule
from controlplane.config.schema import BlockScope
from controlplane.errors import ConfigError
from controlplane.state.codec import from_proto, to_proto
from controlplane.state.table import FOREVER, Block, KeyState, SlowResponse, StateTable
from extproc.coordinator import Coordinator
from extproc.policy.classify import ErrorType, Outcome
from extproc.policy.decide import Deliver, GiveUp, Retry, first_target, next_attempt
from extproc.policy.effects import apply
from extproc.policy.errors import exhausted
from extproc.policy.pacing import Pacer
from extproc.policy.state import Attempt, RequestState
from tests.unit.helpers import req
from tests.unit.test_body_and_coordinator import Clock

RULE = LatencyRule(threshold=1.0, measure="ttfb", min_triggers=2, window=10.0, block_for=30.0,
                   scope=BlockScope.MODEL)
POOL = ["sk-pool-key-00000000a0", "sk-pool-key-11111111b1", "sk-pool-key-22222222c2"]


def gateway(extra: str = "") -> Gateway:
    return parse_config(f"""
model_providers:
  - model: p/pooled
    base_url: http://127.0.0.1:1
    access_keys: {POOL}
  - model: p/pooled-policy
    base_url: http://127.0.0.1:1
    access_keys: {POOL[:2]}
    retry_policy: {{fallback_models: [q/other]}}
  - {{model: q/other, base_url: "http://127.0.0.1:2", access_key: sk-q-0123456789ab}}
{extra}""", {}).gateway


def slow(n: int, at: float, rule: LatencyRule = RULE, name: str = "p/pooled") -> SlowResponse:
    return SlowResponse(f"w0.{n}", rule.scope, name, at, 1.5, rule)


# ---- blocks and triggers


def test_blocks_keep_the_latest_end_and_expire() -> None:
    table, target = StateTable(), gateway().targets["q/other"]
    assert table.apply(Block(BlockScope.MODEL, "q/other", 50.0, "retry_after 429"))
    assert not table.apply(Block(BlockScope.MODEL, "q/other", 40.0, "retry_after 429"))  # shorter: no change
    assert table.apply(Block(BlockScope.PROVIDER, "q", 60.0, "retry_after 429"))
    assert table.until(target, 10.0) == 60.0
    assert table.until(target, 60.0) <= 60.0  # expired
    assert table.export(60.0) == []


def test_triggers_block_only_when_enough_fall_inside_the_window() -> None:
    table, target = StateTable(), gateway().targets["p/pooled"]
    table.apply(slow(1, 100.0))
    assert table.until(target, 100.0) == 0.0  # one of two
    table.apply(slow(2, 111.0))  # the first fell out of the 10 s window
    assert table.until(target, 111.0) == 0.0
    table.apply(slow(3, 115.0))
    assert table.until(target, 115.0) == 145.0  # two inside the window: blocked for 30 s
    assert table.blocks.active(115.0)[0].reason == "high_latency ttfb 1500ms"


def test_facts_count_once_however_often_they_arrive() -> None:
    table = StateTable()
    assert table.apply(slow(1, 100.0))
    assert not table.apply(slow(1, 100.0))  # the same observation, relayed back
    assert table.until(gateway().targets["p/pooled"], 100.0) == 0.0
    replica = StateTable()
    assert replica.load(table.export(100.0)) == [slow(1, 100.0)]
    assert replica.load(table.export(100.0)) == []  # a reconnect resends it: nothing changes


def test_record_reports_what_apply_does_not() -> None:
    reported = []
    table = StateTable(on_record=reported.append)
    table.apply(slow(1, 1.0))
    table.add(BlockScope.MODEL, gateway().targets["q/other"], 9.0, "retry_after 429")
    assert reported == [Block(BlockScope.MODEL, "q/other", 9.0, "retry_after 429")]


# ---- key pools


def test_key_states_rest_retire_and_never_come_back_early() -> None:
    table, target = StateTable(), gateway().targets["p/pooled"]
    k0, k1, k2 = target.keys
    assert table.usable_key(target, 0.0) == 0
    table.apply(KeyState(target.key, k0.id, k0.hint, 30.0, False, 429))
    table.apply(KeyState(target.key, k1.id, k1.hint, 0.0, True, 401))
    assert table.usable_key(target, 0.0) == 2
    assert not table.apply(KeyState(target.key, k1.id, k1.hint, 5.0, False, 429))  # retired stays retired
    table.apply(KeyState(target.key, k2.id, k2.hint, 20.0, False, 429))
    assert table.usable_key(target, 0.0) is None
    assert table.until(target, 0.0) == 20.0  # the first key to rest out
    assert table.usable_key(target, 25.0) == 2
    table.apply(KeyState(target.key, k0.id, k0.hint, 0.0, True, 403))
    table.apply(KeyState(target.key, k2.id, k2.hint, 0.0, True, 401))
    assert table.until(target, 0.0) == FOREVER


def test_codec_round_trips_every_fact_in_unix_time() -> None:
    target = gateway().targets["p/pooled"]
    facts = [Block(BlockScope.PROVIDER, "p", 120.0, "retry_after 429"), slow(7, 100.0),
             KeyState(target.key, target.keys[0].id, target.keys[0].hint, 130.0, False, 429),
             KeyState(target.key, target.keys[1].id, target.keys[1].hint, 0.0, True, 401)]
    for fact in facts:
        wire = to_proto(fact, 1_700_000_000.0)
        assert from_proto(wire, 1_700_000_000.0) == fact
    assert to_proto(facts[0], 1_700_000_000.0).block.until == 1_700_000_120.0
    assert POOL[0] not in str([to_proto(f, 0.0) for f in facts])  # keys never travel


class Walk:
    """One request against a pool, with a fake clock."""

    def __init__(self, gw: Gateway, primary: str, table: StateTable | None = None) -> None:
        self.gw, self.now, self.table = gw, 100.0, table or StateTable()
        target = gw.targets[primary]
        self.state = RequestState(primary=target, started=self.now, client_path="/v1/x", client_credentials=(),
                                  next_target=target)
        self.state.attempts.append(Attempt(target, self.now, key=self.table.usable_key(target, self.now) or 0))

    def answer(self, status: int, retry_after: float | None = None):
        error = {429: ErrorType.RATE_LIMITED, 401: ErrorType.AUTH, 403: ErrorType.AUTH}.get(status)
        if status >= 500:
            error = ErrorType.SERVER_ERROR
        outcome = Outcome(status, error, retry_after)
        self.state.current.outcome = outcome
        pacer = Pacer()
        decision, effects = next_attempt(self.state, outcome, self.gw.order(self.state.primary), now=self.now,
                                         table=self.table, pacer=pacer, rng=random.Random(1))
        apply(effects, self.table, pacer, self.state)
        if isinstance(decision, Retry):
            self.state.current.retried_by = decision.rule
            key = self.table.usable_key(decision.target, self.now) or 0 if decision.target.pooled else 0
            self.state.attempts.append(Attempt(decision.target, self.now, key=key))
        return decision

    def keys(self) -> list[int]:
        return [a.key for a in self.state.attempts]


def test_pool_walks_keys_and_ends_with_the_shortest_rest() -> None:
    walk = Walk(gateway(), "p/pooled")
    assert walk.answer(429, 40.0) == Retry(walk.gw.targets["p/pooled"], 0.0, "key")
    assert walk.answer(429, 20.0).rule == "key"
    assert walk.answer(429) == GiveUp(429, "keys_rate_limited", 20)  # key 2 rests the default 60 s
    assert walk.keys() == [0, 1, 2]
    error = exhausted(walk.state, GiveUp(429, "keys_rate_limited", 20))
    assert "all configured keys are rate-limited" in error.message and error.retry_after == 20
    target = walk.gw.targets["p/pooled"]
    assert first_target(target, (), walk.table, 101.0) == GiveUp(429, "keys_rate_limited", 19)


def test_pool_all_unauthorized_is_502_and_500_keeps_the_key() -> None:
    walk = Walk(gateway(), "p/pooled")
    assert walk.answer(500) == Deliver()  # not a key problem, and no policy
    walk = Walk(gateway(), "p/pooled")
    walk.answer(401)
    walk.answer(403)
    assert walk.answer(401) == GiveUp(502, "keys_unauthorized")
    assert first_target(walk.gw.targets["p/pooled"], (), walk.table, 0.0) == GiveUp(502, "keys_unauthorized")


def test_exhausted_pool_hands_over_to_the_retry_policy() -> None:
    walk = Walk(gateway(), "p/pooled-policy")
    assert walk.answer(429, 30.0).rule == "key"
    decision = walk.answer(401)
    assert isinstance(decision, Retry) and decision.target.key == "q/other" and decision.rule == "default"
    assert walk.table.blocks.active(walk.now) == []  # per-key facts, not a Retry-After block on the target
    target = walk.gw.targets["p/pooled-policy"]
    assert first_target(target, walk.gw.order(target), walk.table, 101.0).key == "q/other"
    assert first_target(target, walk.gw.order(target), walk.table, 131.0) is target  # key 0 rested


def test_a_pool_is_its_own_config_field() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config('model_providers: [{model: p/x, base_url: "http://h", access_key: a, access_keys: [b]}]', {})
    assert "model_providers[0] (p/x).access_keys: use either access_key or access_keys" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config('model_providers: [{model: p/x, base_url: "http://h", access_keys: []}]', {})
    assert "access_keys" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config('model_providers: [{model: p/x, base_url: "http://h", access_keys: [$NOPE]}]', {})
    assert "access_keys[0]: environment variable NOPE is not set" in str(err.value)
    assert gateway().targets["p/pooled"].key_hint == "sk-p…a0, sk-p…b1, sk-p…c2"


# ---- pacing


def test_pacing_spreads_delayed_retries_by_at_least_the_base() -> None:
    from controlplane.config.schema import Backoff

    pacer, rng, backoff = Pacer(), random.Random(3), Backoff(base_ms=200, jitter=True)
    starts = []
    for _ in range(5):  # five requests all wanting to retry at t=10
        start = 10.0 + pacer.delay("a/x", 10.0)
        pacer.reserve("a/x", start, Pacer.gap(backoff, rng))
        starts.append(start)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0.2 <= g < 0.3 for g in gaps) and len(set(gaps)) > 1  # at least the base, jittered
    assert pacer.delay("b/y", 10.0) == 0.0  # other targets are not held up
    assert pacer.delay("a/x", 100.0) == 0.0  # nor later retries


def test_concurrent_429s_do_not_retry_together() -> None:
    gw = parse_config("""
model_providers:
  - model: a/x
    base_url: http://127.0.0.1:1
    retry_policy: {default_strategy: same_model, backoff: {apply_to: same_model, base_ms: 100, jitter: false}}
""", {}).gateway
    table, pacer, target = StateTable(), Pacer(), gw.targets["a/x"]
    waits = []
    for _ in range(4):
        state = RequestState(primary=target, started=0.0, client_path="/", client_credentials=(),
                             next_target=target)
        state.attempts.append(Attempt(target, 0.0))
        decision, effects = next_attempt(state, Outcome(429, ErrorType.RATE_LIMITED), (), now=0.0, table=table,
                                         pacer=pacer, rng=random.Random(1))
        apply(effects, table, pacer, state)
        waits.append(round(decision.wait, 3))
    assert waits == [0.1, 0.2, 0.3, 0.4]


# ---- latency measured by the coordinator


def test_coordinator_measures_ttfb_or_the_last_byte() -> None:
    config = """
model_providers:
  - model: a/t
    base_url: http://127.0.0.1:1
    retry_policy: {on_high_latency: {threshold_ms: 1000, measure: MEASURE}}
"""
    for measure in ("ttfb", "total"):
        clock = Clock()
        coord = Coordinator(parse_config(config.replace("MEASURE", measure), {}).gateway, clock=clock)
        plan = coord.begin_attempt("r", 1, req("/v1/x"), b'{"model": "a/t"}')
        clock.now += 0.4  # headers after 0.4 s
        decision = coord.end_attempt("r", 200, "via_upstream", None)
        assert decision == Deliver(until_last_byte=measure == "total")
        clock.now += 1.0  # last byte after 1.4 s
        if decision.until_last_byte:
            coord.response_complete(plan.state)
        blocked = coord.table.until(plan.target, clock.now) > clock.now
        assert blocked is (measure == "total"), measure


# ---- the Redis form of facts (controlplane.state.redis_store)


def test_redis_scores_are_when_a_fact_stops_mattering() -> None:
    from controlplane.state.redis_store import RETIRED_TTL, expires

    offset, now = 1000.0, 1050.0  # Unix = monotonic + 1000
    assert expires(Block(BlockScope.MODEL, "m", 60.0, "r"), now, offset) == 1060.0
    assert expires(SlowResponse("id", BlockScope.MODEL, "m", 40.0, 1.5, RULE), now, offset) == 1050.0  # at + window
    assert expires(KeyState("p", "k", "h", 80.0, False, 429), now, offset) == 1080.0
    assert expires(KeyState("p", "k", "h", 0.0, True, 401), now, offset) == now + RETIRED_TTL


def test_redis_never_holds_a_key_or_its_hint() -> None:
    from controlplane.state.redis_store import stored

    state = KeyState("p/pooled", "3f2a9c0d11e4b5a6", "sk-p…a0", 0.0, True, 401)
    message = stored(state, 0.0)
    assert message.key.key_id == "3f2a9c0d11e4b5a6" and message.key.hint == "" and message.key.unauthorized
    assert b"sk-p" not in message.SerializeToString()
    block = Block(BlockScope.PROVIDER, "p", 10.0, "retry_after 429")
    assert from_proto(stored(block, 5.0), 5.0) == block

"""The retry policy as pure functions: classify, decide, select, wait. A fake clock; no sleeps."""

from __future__ import annotations

import ast
import random
from datetime import datetime, timezone
from email.utils import format_datetime
from pathlib import Path

import pytest

from controlplane.config import Gateway, parse_config
from controlplane.config.schema import BlockScope
from controlplane.state.table import StateTable
from extproc.policy.classify import ErrorType, Outcome, classify, parse_retry_after
from extproc.policy.decide import Deliver, GiveUp, Retry, backoff_delay, first_target, next_attempt
from extproc.policy.effects import apply
from extproc.policy.errors import exhausted
from extproc.policy.pacing import Pacer
from extproc.policy.state import Attempt, RequestState

RNG = random.Random(7)


def gateway(policy: str, extra: str = "") -> Gateway:
    return parse_config(f"""
model_providers:
  - model: a/one
    base_url: http://127.0.0.1:1
    retry_policy:
{policy}
  - {{model: a/two, base_url: "http://127.0.0.1:1"}}
  - {{model: b/three, base_url: "http://127.0.0.1:2"}}
  - {{model: c/four, base_url: "http://127.0.0.1:3"}}
{extra}""", {}).gateway


class Run:
    """One request walked through outcomes with a fake clock."""

    def __init__(self, gw: Gateway, primary: str = "a/one") -> None:
        self.gw = gw
        self.now = 100.0
        self.table = StateTable()
        self.pacer = Pacer()
        target = gw.targets[primary]
        self.state = RequestState(primary=target, started=self.now, client_path="/v1/chat/completions",
                                  client_credentials=(), next_target=target)
        self.state.attempts.append(Attempt(target, self.now))

    def fail(self, outcome: Outcome):
        self.state.current.outcome = outcome
        decision, effects = next_attempt(self.state, outcome, self.gw.order(self.state.primary), now=self.now,
                                         table=self.table, pacer=self.pacer, rng=RNG)
        apply(effects, self.table, self.pacer, self.state)
        if isinstance(decision, Retry):
            self.state.current.retried_by = decision.rule
            self.now += decision.wait
            self.state.attempts.append(Attempt(decision.target, self.now))
        return decision


R429 = Outcome(429, ErrorType.RATE_LIMITED)
R503 = Outcome(503, ErrorType.SERVER_ERROR)
TIMEOUT = Outcome(504, ErrorType.TIMEOUT)


# ---- classify

def test_classify_provider_answers_and_gateway_failures() -> None:
    assert classify(200, "via_upstream", None, 0).ok
    assert classify(429, "via_upstream", "3", 0) == Outcome(429, ErrorType.RATE_LIMITED, 3.0)
    assert classify(503, "via_upstream", None, 0).error_type is ErrorType.SERVER_ERROR
    assert classify(401, "via_upstream", None, 0).error_type is ErrorType.AUTH
    assert classify(400, "via_upstream", None, 0).error_type is ErrorType.CLIENT_ERROR
    # a provider's own 504 is a server error; the attempt timeout is a timeout
    assert classify(504, "via_upstream", None, 0).error_type is ErrorType.SERVER_ERROR
    assert classify(504, "upstream_per_try_timeout", None, 0) == Outcome(504, ErrorType.TIMEOUT)
    assert classify(503, "upstream_reset_before_response_started{connection_failure}", None, 0) == Outcome(
        502, ErrorType.CONNECTION)


def test_retry_after_as_seconds_and_http_date() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc).timestamp()
    later = format_datetime(datetime(2026, 1, 1, 12, 0, 30, tzinfo=timezone.utc), usegmt=True)
    assert parse_retry_after(later, now) == 30.0
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after("-5", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("nan", now) is None


# ---- decide

def test_no_policy_delivers_provider_answers_but_explains_unanswered_attempts() -> None:
    run = Run(gateway("      default_max_attempts: 1"), primary="b/three")
    assert isinstance(run.fail(R429), Deliver)
    decision = run.fail(TIMEOUT)
    assert decision == GiveUp(504, "no_retry_policy")


def test_different_provider_walks_fallbacks_then_config_order() -> None:
    run = Run(gateway("      fallback_models: [c/four]\n      default_max_attempts: 5"))
    first = run.fail(R503)
    assert isinstance(first, Retry) and first.target.key == "c/four" and first.wait == 0
    second = run.fail(R503)
    assert second.target.key == "b/three"  # a/two is the same provider: skipped
    assert run.fail(R503) == GiveUp(503, "no_candidates")


def test_same_provider_and_same_model() -> None:
    run = Run(gateway("      default_strategy: same_provider"))
    assert run.fail(R503).target.key == "a/two"
    assert run.fail(R503) == GiveUp(503, "no_candidates")
    run = Run(gateway("      default_strategy: same_model\n      default_max_attempts: 2"))
    assert run.fail(R503).target.key == "a/one"
    assert run.fail(R503).target.key == "a/one"
    assert run.fail(R503) == GiveUp(503, "max_attempts")


def test_max_attempts_counts_per_failure_class() -> None:
    run = Run(gateway("""      default_strategy: same_model
      default_max_attempts: 1
      on_status_codes: [{codes: [429], max_attempts: 2}]"""))
    assert isinstance(run.fail(R429), Retry)
    assert isinstance(run.fail(R429), Retry)
    assert isinstance(run.fail(R503), Retry)  # its own class still has a retry left
    assert run.fail(R429) == GiveUp(429, "max_attempts")


def test_unlisted_4xx_is_delivered_listed_is_retried() -> None:
    run = Run(gateway("      fallback_models: [b/three]"))
    assert isinstance(run.fail(Outcome(400, ErrorType.CLIENT_ERROR)), Deliver)
    run = Run(gateway("      on_status_codes: [{codes: [400]}]"))
    assert isinstance(run.fail(Outcome(400, ErrorType.CLIENT_ERROR)), Retry)


def test_timeouts_use_on_timeout() -> None:
    run = Run(gateway("      on_timeout: {strategy: same_model, max_attempts: 1}"))
    assert run.fail(TIMEOUT).target.key == "a/one"
    assert run.fail(TIMEOUT) == GiveUp(504, "max_attempts")


def test_backoff_doubles_caps_and_applies_only_where_it_should() -> None:
    backoff_cfg = "      default_strategy: same_model\n      default_max_attempts: 5\n" \
                  "      backoff: {apply_to: same_model, base_ms: 100, max_ms: 350, jitter: false}"
    run = Run(gateway(backoff_cfg))
    assert [run.fail(R503).wait for _ in range(4)] == [0.1, 0.2, 0.35, 0.35]
    run = Run(gateway("      backoff: {apply_to: same_model, base_ms: 100, jitter: false}"))
    assert run.fail(R503).wait == 0  # different provider: same_model backoff does not apply
    run = Run(gateway("      backoff: {apply_to: global, base_ms: 100, jitter: false}"))
    assert run.fail(R503).wait == 0.1


def test_jitter_stays_within_half_to_full() -> None:
    cfg = parse_config("model_providers: [{model: a/x, base_url: 'http://127.0.0.1:1', retry_policy: "
                       "{backoff: {base_ms: 1000, max_ms: 1000, jitter: true}}}]", {}).gateway
    backoff = cfg.targets["a/x"].policy.backoff
    waits = [backoff_delay(backoff, 1, random.Random(seed)) for seed in range(200)]
    assert all(0.5 <= w < 1.0 for w in waits) and max(waits) - min(waits) > 0.3


def test_retry_after_is_waited_on_for_the_sender_only() -> None:
    run = Run(gateway("      default_strategy: same_model"))
    decision = run.fail(Outcome(429, ErrorType.RATE_LIMITED, 2.0))
    assert decision.target.key == "a/one" and decision.wait == 2.0
    run = Run(gateway("      fallback_models: [b/three]"))
    decision = run.fail(Outcome(429, ErrorType.RATE_LIMITED, 2.0))
    assert decision.target.key == "b/three" and decision.wait == 0


def test_retry_after_takes_the_larger_of_backoff_and_retry_after() -> None:
    run = Run(gateway("      default_strategy: same_model\n"
                      "      backoff: {apply_to: same_model, base_ms: 3000, jitter: false}"))
    assert run.fail(Outcome(429, ErrorType.RATE_LIMITED, 1.0)).wait == 3.0


def test_too_long_retry_after_blocks_and_fails_over() -> None:
    run = Run(gateway("      default_strategy: same_model\n"
                      "      retry_after_handling: {max_retry_after_seconds: 10}"))
    decision = run.fail(Outcome(429, ErrorType.RATE_LIMITED, 60.0))
    assert decision.target.key == "a/two" and decision.wait == 0
    assert run.table.blocks.until(run.gw.targets["a/one"], run.now) == pytest.approx(160.0)


def test_request_scoped_blocks_stay_in_the_request() -> None:
    run = Run(gateway("      retry_after_handling: {apply_to: request, scope: provider}"))
    run.fail(Outcome(429, ErrorType.RATE_LIMITED, 30.0))
    assert run.table.blocks.active(run.now) == []
    assert run.state.blocks.until(run.gw.targets["a/two"], run.now) > run.now  # provider scope


def test_budget_refuses_a_wait_it_cannot_finish() -> None:
    run = Run(gateway("      default_strategy: same_model\n      max_retry_duration_ms: 1500\n"
                      "      backoff: {apply_to: same_model, base_ms: 1000, jitter: false}"))
    assert run.fail(R503).wait == 1.0
    assert run.fail(R503) == GiveUp(503, "budget")  # a 2 s wait would end at 3 s > 1.5 s


def test_everything_rate_limited_gives_429_with_the_shortest_block() -> None:
    run = Run(gateway("      default_max_attempts: 5\n"
                      "      retry_after_handling: {max_retry_after_seconds: 5, scope: provider}"))
    run.fail(Outcome(429, ErrorType.RATE_LIMITED, 40.0))
    run.fail(Outcome(429, ErrorType.RATE_LIMITED, 20.0))
    decision = run.fail(Outcome(429, ErrorType.RATE_LIMITED, 30.0))
    assert decision == GiveUp(429, "no_candidates", 20)  # b's block ends first
    error = exhausted(run.state, decision)
    assert error.status == 429 and error.retry_after == 20
    assert error.details["total_attempts"] == 3
    assert [a["model"] for a in error.details["attempts"]] == ["a/one", "b/three", "c/four"]
    # one provider left unblocked: the last Retry-After is what the client should honour
    run = Run(gateway("      default_max_attempts: 5"))
    run.fail(R503)
    assert run.fail(Outcome(429, ErrorType.RATE_LIMITED, 7.0)).target.key == "c/four"
    assert run.fail(Outcome(429, ErrorType.RATE_LIMITED, 9.5)) == GiveUp(429, "no_candidates", 10)


def test_first_attempt_skips_globally_blocked_targets() -> None:
    gw = gateway("      fallback_models: [c/four]")
    blocks = StateTable()
    one, four = gw.targets["a/one"], gw.targets["c/four"]
    assert first_target(one, gw.order(one), blocks, 0) is one
    blocks.add(BlockScope.MODEL, one, 10.0, "retry_after 429")
    assert first_target(one, gw.order(one), blocks, 0) is four
    for target in gw.order(one):
        blocks.add(BlockScope.PROVIDER, target, 25.0, "retry_after 429")
    assert first_target(one, gw.order(one), blocks, 0) == GiveUp(429, "all_blocked", 25)
    assert first_target(one, gw.order(one), blocks, 11.0) == GiveUp(429, "all_blocked", 14)
    assert first_target(one, gw.order(one), blocks, 26.0) is one  # blocks expire


def test_policy_modules_import_neither_grpc_nor_protobuf() -> None:
    for path in (Path(__file__).parents[2] / "extproc" / "policy").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.startswith(("grpc", "google.protobuf", "envoy"))], path


# ---- retry, then fall back (`then`)


def test_retry_the_primary_after_its_retry_after_then_fall_back() -> None:
    gw = gateway("""      on_status_codes:
        - {codes: [429], strategy: same_model, max_attempts: 1, then: different_provider}
      retry_after_handling: {apply_to: request, max_retry_after_seconds: 10}""")
    run = Run(gw)
    first = run.fail(Outcome(429, ErrorType.RATE_LIMITED, 2.0))
    assert isinstance(first, Retry) and first.target.key == "a/one" and first.wait == pytest.approx(2.0, abs=0.2)
    second = run.fail(Outcome(429, ErrorType.RATE_LIMITED, 2.0))
    assert isinstance(second, Retry) and second.target.key == "b/three" and second.wait == 0  # the fallback
    third = run.fail(R429)
    assert isinstance(third, Retry) and third.target.key == "c/four"  # then_max_attempts: default 2
    assert run.fail(R429) == GiveUp(429, "max_attempts")


def test_then_has_its_own_budget_and_a_policy_wide_default() -> None:
    gw = gateway("""      default_strategy: same_model
      default_max_attempts: 1
      default_then: different_provider
      on_timeout: {max_attempts: 0, then: different_provider, then_max_attempts: 1}""")
    run = Run(gw)
    retry = run.fail(R503)
    assert isinstance(retry, Retry) and retry.target.key == "a/one"
    retry = run.fail(R503)
    assert isinstance(retry, Retry) and retry.target.key == "b/three"  # default_then
    assert isinstance(run.fail(R503), GiveUp)  # then_max_attempts defaults to default_max_attempts (1)
    run = Run(gw)
    retry = run.fail(TIMEOUT)
    assert isinstance(retry, Retry) and retry.target.key == "b/three"  # no same-model retry for timeouts
    assert isinstance(run.fail(TIMEOUT), GiveUp)
    assert gw.targets["a/one"].policy.max_retries == (1 + 1) + (0 + 1) + (1 + 1)  # status, timeout, connection


def test_plano_rules_without_then_give_up_as_before() -> None:
    run = Run(gateway("""      default_strategy: same_model
      default_max_attempts: 1"""))
    assert isinstance(run.fail(R503), Retry)
    assert run.fail(R503) == GiveUp(503, "max_attempts")


# ---- what a provider's error means


from extproc.policy.classify import Meaning, ProviderError, meaning  # noqa: E402


@pytest.mark.parametrize("status, error, expected", [
    (400, ProviderError("invalid_request_error", "context_length_exceeded", "This model's maximum context length "
                        "is 128000 tokens"), Meaning.CONTEXT_LENGTH),
    (400, ProviderError("invalid_request_error", None, "prompt is too long: 210000 tokens > 200000 maximum"),
     Meaning.CONTEXT_LENGTH),
    (400, ProviderError("invalid_request_error", "content_policy_violation", "rejected by our safety system"),
     Meaning.CONTENT_POLICY),
    (429, ProviderError("insufficient_quota", "insufficient_quota", "You exceeded your current quota"), Meaning.QUOTA),
    (400, ProviderError("invalid_request_error", None, "Your credit balance is too low"), Meaning.QUOTA),
    (402, None, Meaning.QUOTA),
    (429, ProviderError("rate_limit_error", None, "slow down"), None),
    (400, ProviderError("invalid_request_error", None, "messages: field required"), None),
    (500, ProviderError("api_error", None, "context length"), None),
], ids=["openai-context", "anthropic-context", "content-policy", "openai-quota", "anthropic-credit", "402",
        "burst-429", "plain-400", "500-is-a-500"])
def test_error_meaning(status: int, error: ProviderError | None, expected: Meaning | None) -> None:
    assert meaning(status, error) is expected
    outcome = classify(status, "via_upstream", None, 0, error)
    assert outcome.meaning is expected


MEANINGS = """
model_providers:
  - model: a/small
    base_url: http://127.0.0.1:1
    max_input_tokens: 8000
    retry_policy:
      fallback_models: [b/same, c/large, d/larger]
      on_status_codes: [{codes: [400], strategy: different_provider}]
  - {model: b/same, base_url: "http://127.0.0.1:2", max_input_tokens: 8000}
  - {model: c/large, base_url: "http://127.0.0.1:3", max_input_tokens: 128000}
  - {model: d/larger, base_url: "http://127.0.0.1:4", max_input_tokens: 200000}
"""


def test_context_length_fails_over_only_to_a_larger_window() -> None:
    run = Run(parse_config(MEANINGS, {}).gateway, "a/small")
    too_long = Outcome(400, ErrorType.CLIENT_ERROR, None, Meaning.CONTEXT_LENGTH)
    retry = run.fail(too_long)
    assert isinstance(retry, Retry) and retry.target.key == "c/large" and retry.wait == 0  # not b/same (8000)
    retry = run.fail(too_long)
    assert isinstance(retry, Retry) and retry.target.key == "d/larger"
    assert isinstance(run.fail(too_long), Deliver)  # nothing larger: the provider's own error goes back


def test_content_policy_is_never_failed_over_even_when_400_is_listed() -> None:
    run = Run(parse_config(MEANINGS, {}).gateway, "a/small")
    assert isinstance(run.fail(Outcome(400, ErrorType.CLIENT_ERROR, None, Meaning.CONTENT_POLICY)), Deliver)
    assert isinstance(run.fail(Outcome(400, ErrorType.CLIENT_ERROR)), Retry)  # a plain listed 400 is retried


def test_an_empty_quota_blocks_the_target_for_long_and_fails_over() -> None:
    gw = gateway("""      default_strategy: same_model
      retry_after_handling: {max_retry_after_seconds: 30}""")
    run = Run(gw)
    decision = run.fail(classify(402, "via_upstream", None, 0))
    assert isinstance(decision, Retry) and decision.target.key != "a/one"  # not waited on: failed over
    assert run.table.until(gw.targets["a/one"], run.now) >= run.now + 3500  # blocked for about an hour


# ---- the decision writes nothing: its changes come back as values


def test_next_attempt_returns_its_changes_and_writes_nothing() -> None:
    gw = gateway("""      default_strategy: same_model
      backoff: {apply_to: same_model, base_ms: 200, jitter: false}
      retry_after_handling: {apply_to: global, max_retry_after_seconds: 10}""")
    run = Run(gw)
    outcome = Outcome(429, ErrorType.RATE_LIMITED, 2.0)
    run.state.current.outcome = outcome
    decision, effects = next_attempt(run.state, outcome, gw.order(run.state.primary), now=run.now,
                                     table=run.table, pacer=run.pacer, rng=RNG)
    assert isinstance(decision, Retry) and decision.target.key == "a/one" and decision.wait == pytest.approx(2.0)
    assert run.table.export(run.now) == [] and run.pacer.delay("a/one", run.now) == 0.0  # untouched
    assert [(f.name, f.until) for f in effects.facts] == [("a/one", run.now + 2.0)]  # the block, as a value
    assert effects.pacing is not None and effects.pacing.start == run.now + 2.0 and effects.pacing.gap == 0.2
    apply(effects, run.table, run.pacer, run.state)
    assert run.table.until(gw.targets["a/one"], run.now) == run.now + 2.0
    assert run.pacer.delay("a/one", run.now + 2.0) == pytest.approx(0.2)

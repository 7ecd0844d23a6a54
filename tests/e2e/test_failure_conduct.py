"""Failure conduct end to end, driven by the openai SDK against wire-format mocks: retry the primary
after its Retry-After, then fall back (`then`); what a provider's error means (a context window, a
content policy, an empty quota) decides where the request may go; the client's deadline; timers
that compose (a silent provider, a slow first token).

Providers: p (the primary), same (a fallback with the primary's context window), big (a larger one).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import openai
import pytest

from tests.e2e.conftest import Stack, stack_for
from tests.wiremock import AnthropicMessagesMock, OpenAIChatMock, Reply, serving

pytestmark = pytest.mark.e2e

CONFIG = """
listeners: [{{type: model, port: {port}, attempt_timeout: 10s}}]
model_providers:
  - model: p/then
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    max_input_tokens: 8000
    retry_policy:
      fallback_models: [same/gpt, big/gpt]
      on_status_codes:
        - {{codes: [429], strategy: same_model, max_attempts: 1, then: different_provider, then_max_attempts: 1}}
        - {{codes: [400], strategy: different_provider, max_attempts: 2}}
      retry_after_handling: {{apply_to: request, max_retry_after_seconds: 10}}
  - model: p/quota
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy:
      fallback_models: [big/gpt]
  - {{model: same/gpt, base_url: "{same}", provider_interface: openai, access_key: sk-s-00000000000, max_input_tokens: 8000}}
  - {{model: big/gpt, base_url: "{big}", provider_interface: openai, access_key: sk-b-000000000000, max_input_tokens: 200000}}
"""


@pytest.fixture(scope="module")
def mocks() -> Iterator[dict[str, OpenAIChatMock]]:
    yield from serving({name: OpenAIChatMock(name) for name in ("p", "same", "big")})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mocks) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, CONFIG, mocks)


@pytest.fixture(autouse=True)
def _fresh(mocks) -> None:
    for mock in mocks.values():
        mock.script(Reply())


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="sk-client", max_retries=0)


def ask(stack: Stack, model: str) -> openai.types.chat.ChatCompletion:
    return client(stack).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_a_429_is_retried_after_its_retry_after_and_then_served(stack, mocks) -> None:
    mocks["p"].script(Reply(429, retry_after="2"), Reply())
    started = time.monotonic()
    answer = ask(stack, "p/then")
    assert time.monotonic() - started >= 1.8
    assert answer.choices[0].message.content.startswith("Hello from p")
    assert len(mocks["p"].requests) == 2 and mocks["same"].requests == [] and mocks["big"].requests == []
    gap = mocks["p"].requests[1].at - mocks["p"].requests[0].at
    assert gap >= 1.8


def test_a_persistent_429_is_retried_once_then_falls_back(stack, mocks) -> None:
    mocks["p"].script(Reply(429, retry_after="2"))
    started = time.monotonic()
    answer = ask(stack, "p/then")
    elapsed = time.monotonic() - started
    assert 1.8 <= elapsed < 6
    assert answer.choices[0].message.content.startswith("Hello from same")
    assert answer.model == "gpt" and answer.usage is not None  # the fallback's own model and usage
    assert len(mocks["p"].requests) == 2 and len(mocks["same"].requests) == 1


def test_context_length_goes_to_a_larger_window_only(stack, mocks) -> None:
    mocks["p"].script(Reply(400, error_type="invalid_request_error", error_code="context_length_exceeded",
                            message="This model's maximum context length is 8000 tokens. However, your "
                                    "messages resulted in 9000 tokens."))
    answer = ask(stack, "p/then")
    assert answer.choices[0].message.content.startswith("Hello from big")
    assert mocks["same"].requests == []  # the same window would refuse it the same way


def test_content_policy_is_a_clean_error_without_failover(stack, mocks) -> None:
    mocks["p"].script(Reply(400, error_type="invalid_request_error", error_code="content_policy_violation",
                            message="Your request was rejected as a result of our safety system."))
    with pytest.raises(openai.BadRequestError) as info:
        ask(stack, "p/then")
    assert "safety system" in info.value.message
    assert info.value.response.headers["x-should-retry"] == "false"
    assert len(mocks["p"].requests) == 1 and mocks["same"].requests == [] and mocks["big"].requests == []


def test_an_empty_quota_fails_over_and_keeps_the_target_blocked(stack, mocks) -> None:
    mocks["p"].script(Reply(429, error_type="insufficient_quota", error_code="insufficient_quota",
                            message="You exceeded your current quota, please check your plan and billing details."))
    answer = ask(stack, "p/quota")
    assert answer.choices[0].message.content.startswith("Hello from big")
    again = ask(stack, "p/quota")  # blocked for long: straight to the fallback, the primary is not asked
    assert again.choices[0].message.content.startswith("Hello from big")
    assert len(mocks["p"].requests) == 1 and len(mocks["big"].requests) == 2
    blocks = stack.status()["blocks"]
    assert any(b["name"] == "p/quota" and b["remaining_s"] > 3000 for b in blocks), blocks


HI = [{"role": "user", "content": "hi"}]
DEADLINE = """
listeners: [{{type: model, port: {port}, attempt_timeout: 10s}}]
model_providers:
  - model: p/slow
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy: {{fallback_models: [big/gpt]}}
  - model: p/blocked
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy:
      fallback_models: [same/gpt]
      retry_after_handling: {{scope: provider, max_retry_after_seconds: 30}}
  - {{model: same/gpt, base_url: "{same}", provider_interface: openai, access_key: sk-s-00000000000}}
  - {{model: big/gpt, base_url: "{big}", provider_interface: openai, access_key: sk-b-000000000000}}
"""


@pytest.fixture(scope="module")
def deadline_stack(tmp_path_factory: pytest.TempPathFactory, mocks) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, DEADLINE, mocks)


def test_a_clients_timeout_shortens_the_attempt_so_a_failover_answers_in_time(deadline_stack, mocks) -> None:
    mocks["p"].script(Reply(delay=30))  # the primary never answers within the attempt timeout (10 s)
    sdk = openai.OpenAI(base_url=deadline_stack.url + "/v1", api_key="k", max_retries=0, timeout=4.0)
    started = time.monotonic()
    answer = sdk.chat.completions.create(model="p/slow", messages=[{"role": "user", "content": "hi"}])
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content.startswith("Hello from big")
    assert 1.5 <= elapsed < 3.5  # half the SDK's 4 s for the first attempt, then the fallback
    assert "x-sidestep-deadline-ms" not in mocks["big"].requests[0].headers


def test_a_deadline_header_bounds_every_wait(deadline_stack, mocks) -> None:
    mocks["p"].script(Reply(delay=30))
    started = time.monotonic()
    response = deadline_stack.chat({"model": "p/slow", "messages": HI}, headers={"x-sidestep-deadline-ms": "2000"})
    assert response.status_code == 200 and time.monotonic() - started < 1.8
    assert response.headers["x-sidestep-model"] == "big/gpt"


def test_when_everything_is_blocked_briefly_the_request_waits_instead_of_failing(deadline_stack, mocks) -> None:
    for name, seconds in (("p", "2"), ("same", "3"), ("big", "3")):
        mocks[name].script(Reply(429, retry_after=seconds))
    first = deadline_stack.chat({"model": "p/blocked", "messages": HI})
    assert first.status_code == 429  # every candidate answered 429: all of them are blocked now
    mocks["p"].script(Reply())
    started = time.monotonic()
    second = deadline_stack.chat({"model": "p/blocked", "messages": HI}, headers={"x-sidestep-deadline-ms": "60000"})
    assert second.status_code == 200, second.text
    assert second.headers["x-sidestep-model"] == "p/blocked"
    assert 1.0 <= time.monotonic() - started < 4  # waited for p/blocked's block (2 s) to end
    # without a deadline (and no budget) the old answer stands: 429 at once, with the shortest block
    for name in ("p", "same", "big"):
        mocks[name].script(Reply(429, retry_after="20"))
    deadline_stack.chat({"model": "p/blocked", "messages": HI})
    started = time.monotonic()
    third = deadline_stack.chat({"model": "p/blocked", "messages": HI})
    assert third.status_code == 429 and time.monotonic() - started < 1
    assert third.json()["error"]["code"] == "all_blocked"


TIMERS = """
listeners: [{{type: model, port: {port}, attempt_timeout: 2s, stream_idle_timeout: 2s, first_token_timeout: 2s}}]
model_providers:
  - model: p/timed
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy: {{fallback_models: [big/gpt], default_max_attempts: 1}}
  - {{model: big/gpt, base_url: "{big}", provider_interface: openai, access_key: sk-b-000000000000}}
"""


@pytest.fixture(scope="module")
def timers_stack(tmp_path_factory: pytest.TempPathFactory, mocks) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, TIMERS, mocks)


def test_a_silent_provider_fails_over_after_its_attempt_timeout_whatever_the_idle_timeout(timers_stack, mocks):
    mocks["p"].script(Reply(delay=60))  # never answers; the stall window equals the attempt timeout
    started = time.monotonic()
    answer = client(timers_stack).chat.completions.create(model="p/timed", messages=HI)
    assert answer.choices[0].message.content.startswith("Hello from big")
    assert 1.8 <= time.monotonic() - started < 5


def test_headers_at_once_but_a_slow_first_token_fail_over_before_it_arrives(timers_stack, mocks) -> None:
    mocks["p"].script(Reply(first_event_delay=20))  # a 200 stream whose first token would come after 20 s
    started = time.monotonic()
    stream = client(timers_stack).chat.completions.create(model="p/timed", messages=HI, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    elapsed = time.monotonic() - started
    assert text.startswith("Hello from big") and "Hello from p" not in text  # only the fallback's answer
    assert 1.8 <= elapsed < 6


HELD = """
listeners: [{{type: model, port: {port}, stream_commit_events: 3}}]
model_providers:
  - model: p/held
    base_url: "{p}"
    provider_interface: openai
    access_key: sk-p-000000000000000
    retry_policy: {{fallback_models: [big/gpt], default_max_attempts: 1}}
  - {{model: big/gpt, base_url: "{big}", provider_interface: openai, access_key: sk-b-000000000000}}
"""


@pytest.fixture(scope="module")
def held_stack(tmp_path_factory: pytest.TempPathFactory, mocks) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, HELD, mocks)


def test_a_stream_cut_before_its_commit_point_fails_over_invisibly(held_stack, mocks) -> None:
    # the role preamble and one piece of content, then a reset: still inside the 3 events held back
    mocks["p"].script(Reply(cut_after=2, interval=0.05))
    stream = client(held_stack).chat.completions.create(model="p/held", messages=HI, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from big! How can I help?"  # the fallback's whole answer, nothing of p's
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(mocks["p"].requests) == 1 and len(mocks["big"].requests) == 1


def test_a_stream_that_passes_its_commit_point_is_delivered_whole(held_stack, mocks) -> None:
    mocks["p"].script(Reply(interval=0.02))
    stream = client(held_stack).chat.completions.create(model="p/held", messages=HI, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("Hello from p") and mocks["big"].requests == []


def test_a_flapping_primary_serves_again_once_it_recovers(stack, mocks) -> None:
    mocks["p"].script(Reply(503), Reply(503), Reply())
    served = [ask(stack, "p/then").choices[0].message.content.split("!")[0] for _ in range(4)]
    # while it fails, its fallback answers; once healthy it serves again (503s carry no Retry-After,
    # so nothing blocks it)
    assert served == ["Hello from same", "Hello from same", "Hello from p", "Hello from p"]


# ---- the same faults in Anthropic's stream format, driven by the anthropic SDK

ANTHROPIC = """
listeners: [{{type: model, port: {port}, attempt_timeout: 2s, first_token_timeout: 2s, stream_idle_timeout: 2s}}]
model_providers:
  - model: ap/claude
    base_url: "{ap}"
    provider_interface: claude
    access_key: sk-ap-00000000000000
    max_input_tokens: 8000
    retry_policy:
      fallback_models: [asame/claude, abig/claude]
      on_status_codes:
        - {{codes: [429], strategy: same_model, max_attempts: 1, then: different_provider}}
        - {{codes: [400], strategy: different_provider, max_attempts: 2}}
      retry_after_handling: {{apply_to: request, max_retry_after_seconds: 10}}
  - {{model: asame/claude, base_url: "{asame}", provider_interface: claude, access_key: sk-as-00000000000, max_input_tokens: 8000}}
  - {{model: abig/claude, base_url: "{abig}", provider_interface: claude, access_key: sk-ab-00000000000, max_input_tokens: 200000}}
"""


@pytest.fixture(scope="module")
def amocks() -> Iterator[dict[str, AnthropicMessagesMock]]:
    yield from serving({name: AnthropicMessagesMock(name) for name in ("ap", "asame", "abig")})


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory, amocks) -> Iterator[Stack]:
    yield from stack_for(tmp_path_factory, ANTHROPIC, amocks)


def astream(stack: Stack) -> str:
    sdk = anthropic.Anthropic(base_url=stack.url, api_key="k", max_retries=0)
    with sdk.messages.stream(model="ap/claude", max_tokens=100, messages=HI) as stream:
        message = stream.get_final_message()
    return "".join(b.text for b in message.content if b.type == "text")


@pytest.fixture
def _afresh(amocks) -> None:
    for mock in amocks.values():
        mock.script(Reply())


@pytest.mark.usefixtures("_afresh")
class TestAnthropicFormat:
    def test_429_retried_after_its_retry_after_then_served(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(429, retry_after="2"), Reply())
        started = time.monotonic()
        assert astream(astack).startswith("Hello from ap") and time.monotonic() - started >= 1.8

    def test_persistent_429_falls_back_after_one_retry(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(429, retry_after="2"))
        assert astream(astack).startswith("Hello from asame") and len(amocks["ap"].requests) == 2

    def test_a_silent_provider_fails_over(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(delay=60))
        started = time.monotonic()
        assert astream(astack).startswith("Hello from asame") and time.monotonic() - started < 5

    def test_a_slow_first_token_fails_over_before_it_arrives(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(first_event_delay=20))
        started = time.monotonic()
        assert astream(astack).startswith("Hello from asame") and time.monotonic() - started < 6

    def test_an_error_event_first_fails_over(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(stream_error=True))
        assert astream(astack).startswith("Hello from asame")

    def test_prompt_too_long_goes_to_the_larger_window(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(400, error_type="invalid_request_error",
                                  message="prompt is too long: 9000 tokens > 8000 maximum"))
        assert astream(astack).startswith("Hello from abig") and amocks["asame"].requests == []

    def test_content_policy_is_not_failed_over(self, astack, amocks) -> None:
        amocks["ap"].script(Reply(400, error_type="invalid_request_error",
                                  message="Output blocked by content filtering policy"))
        with pytest.raises(anthropic.BadRequestError) as info:
            astream(astack)
        assert "content filtering policy" in str(info.value)
        assert amocks["asame"].requests == [] and amocks["abig"].requests == []

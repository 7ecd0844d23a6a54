"""The gRPC ExternalProcessor: plumbing between Envoy's messages for one attempt and the Coordinator.

`ExtProcServicer.Process` hands each Envoy stream (one attempt) to an `AttemptProcessor`, which
reads its messages in order and answers each:

- request headers: authenticate the client (first attempt); answer `GET /v1/models` ourselves; send
  a request without a body on at once; otherwise continue (the target is set with the body reply,
  which Envoy applies before the attempt leaves);
- request body (buffered): choose the target, wait if the policy says so, rewrite the model (or
  translate the request to the target's API);
- response headers: deliver, retry, or give up;
- response body, only when asked for: read a failed attempt's error before retrying or giving up,
  translate a response into the client's API, or follow a body to its last byte.

Nothing a client sends can make this raise: bodies and headers are parsed defensively, and any
bug still ends the request with a JSON 500 rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc import aio

from controlplane import apierrors
from controlplane import internalapi as api
from controlplane.apierrors import Api, ApiError, api_for_path
from controlplane.config import Gateway
from controlplane.endpoints import find_endpoint
from extproc.auth import Credentials, authenticate
from extproc.commit import CommitPeek, StreamError
from extproc.coordinator import AttemptPlan, ClientRequest, Continuation, Coordinator
from extproc.mutations import Body, Replies
from extproc.policy.decide import GiveUp, Retry
from extproc.policy.errors import exhausted
from extproc.policy.state import ProviderError
from extproc.translate import Untranslatable
from extproc.translate.pairs import provider_error

__all__ = ["ExtProcServicer"]

log = logging.getLogger("sidestep.extproc")
_SCANNED = frozenset((*api.CLIENT_CREDENTIAL_HEADERS, api.GATEWAY_KEY_HEADER))


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the ext_proc needs from an attempt's request headers."""

    request_id: str
    attempt: int  # Envoy's attempt count, 1 for the first
    method: str
    path: str
    credentials: Credentials
    length: int  # content-length, 0 when absent
    content_type: bytes
    model_header: str | None  # x-sidestep-model
    timeout: float | None  # seconds the client waits in all: its SDK's x-stainless-timeout or x-sidestep-deadline-ms
    continuation: Continuation | None  # the stream relay's x-sidestep-continue
    end_of_stream: bool  # no body follows


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, coordinator: Coordinator, worker: str = "0") -> None:
        self.coordinator = coordinator
        self.worker = worker
        self.gateway = coordinator.gateway
        self.replies = Replies(coordinator.gateway, worker)
        self.body_limit = coordinator.gateway.listener.max_request_body_bytes
        too_large = apierrors.request_too_large(self.body_limit)
        self.too_large = {caller: self.replies.error(too_large, 0, caller) for caller in Api}

    def use(self, gateway: Gateway) -> None:
        """Serve new requests with another compiled config (a reload). Requests in flight keep the
        targets, policies and failover order they started with (`RequestState`)."""
        self.coordinator.gateway = self.gateway = gateway
        self.replies = Replies(gateway, self.worker)

    async def Process(self, request_iterator, context: aio.ServicerContext) -> None:  # noqa: N802 - gRPC name
        held = any(k == api.FILTER_METADATA_KEY and v == "held" for k, v in context.invocation_metadata() or ())
        processor = AttemptProcessor(self, context, held=held)
        try:
            await processor.run()
        except asyncio.CancelledError:
            raise  # Envoy cancels a retried attempt's stream, and the whole stream when the client leaves
        except Exception:
            log.exception("ext_proc stream failed")
            try:
                await context.write(self.replies.error(apierrors.internal_error(), 0, processor.caller))
            except Exception:  # the stream itself is broken: Envoy answers with its own 503
                await context.abort(grpc.StatusCode.INTERNAL, "sidestep ext_proc internal error")


class AttemptProcessor:
    """One Envoy stream: one attempt of one request, from its request headers to its response."""

    def __init__(self, servicer: ExtProcServicer, context: aio.ServicerContext, *, held: bool = False) -> None:
        self.servicer = servicer
        self.coordinator = servicer.coordinator
        self.replies = servicer.replies
        self.context = context
        self.held = held  # from the filter that sends the response body without waiting (streamed answers)
        self.caller = Api.OPENAI  # the client's API family: the shape of any error we answer with

    async def run(self) -> None:
        message = await self.context.read()
        if message is aio.EOF or not message.HasField("request_headers"):
            return
        head = _scan_request(message.request_headers)
        # a later attempt's path is whatever the previous attempt set (perhaps the other API's)
        known = self.coordinator.caller(head.request_id) if head.attempt > 1 else None
        self.caller = known or api_for_path(head.path)
        plan = await self._request(head)
        if plan is None:
            return
        message = await self.context.read()
        if message is aio.EOF or not message.HasField("response_headers"):
            return
        if self.held:
            inbox = _Inbox(self.context)
            try:
                await self._respond_held(head.request_id, plan, message.response_headers, inbox)
            finally:
                inbox.close()
        else:
            await self._respond(head.request_id, plan, message.response_headers)

    async def _request(self, head: RequestHead) -> AttemptPlan | None:
        """Route the attempt (answering the client ourselves where that is all there is to do)."""
        servicer = self.servicer
        request: ClientRequest | None = None
        if head.attempt <= 1:  # later attempts' headers carry what earlier ones set
            first = self._client_request(head)
            if isinstance(first, ApiError):
                await self._error(first, 0)
                return None
            if first.endpoint.body == "answered":
                await self.context.write(self.replies.models(head.path, first.client, self.caller))
                return None
            request = first
        if head.end_of_stream:  # nothing to buffer: route it with the headers
            if request is not None and request.endpoint.body != "none":
                await self._error(apierrors.invalid_request("a request body is required"), 0)
                return None
            return await self._send(head, request, None)
        if head.length > servicer.body_limit:  # refuse before Envoy buffers it all
            await self.context.write(servicer.too_large[self.caller])
            return None
        await self.context.write(Replies.CONTINUE_HEADERS)
        message = await self.context.read()
        if message is aio.EOF or not message.HasField("request_body"):
            return None
        if len(message.request_body.body) > servicer.body_limit:  # chunked: no content-length to check
            await self.context.write(servicer.too_large[self.caller])
            return None
        return await self._send(head, request, message.request_body.body)

    def _client_request(self, head: RequestHead) -> ClientRequest | ApiError:
        endpoint = find_endpoint(head.method, head.path)
        if endpoint is None:  # Envoy routes only what sidestep serves
            return apierrors.not_found(f"sidestep does not serve {head.method} {head.path}")
        credentials = head.credentials
        client = None
        if self.servicer.gateway.client_keys:
            result = authenticate(self.servicer.gateway.client_keys, credentials)
            if isinstance(result, ApiError):
                log.info("refused request=%s path=%s: %s", head.request_id, head.path, result.message)
                return result
            client, credentials = result
        # the client's own provider credentials, for passthrough_auth targets; never a gateway key
        credentials = tuple(c for c in credentials if c[0] != api.GATEWAY_KEY_HEADER)
        return ClientRequest(head.path, endpoint, credentials, client, head.content_type, head.model_header,
                             head.timeout, head.continuation)

    async def _send(self, head: RequestHead, request: ClientRequest | None, body: bytes | None) -> AttemptPlan | None:
        plan = self.coordinator.begin_attempt(head.request_id, head.attempt, request, body or b"")
        if isinstance(plan, ApiError):
            await self._error(plan, head.attempt - 1)
            return None
        delay = plan.state.not_before - self.coordinator.clock()
        if delay > 0:
            await asyncio.sleep(delay)  # before replying: the attempt's timeout has not started yet
        await self.context.write(self.replies.attempt(plan.target, plan.key, plan.path,
                                                      None if body is None else plan.body,
                                                      plan.state.client_credentials,
                                                      plan.attempt_timeout if plan.state.deadline else None,
                                                      plan.state.client))
        return plan

    async def _respond(self, request_id: str, plan: AttemptPlan, headers: pb.HttpHeaders) -> None:
        status, details, retry_after, content_type = _scan_response(headers)
        attempt = plan.state.current
        said: ProviderError | None = None
        body = b""
        # An error under a policy (or a key pool) is read before deciding: what the provider said can
        # change where the request goes (a context window, a content policy, an empty quota), and the
        # failed attempt's body must be read anyway before marking a retry.
        answered = details in (None, "via_upstream")  # else the body is Envoy's own (a timeout, a reset)
        read_first = (status >= 400 and answered and not headers.end_of_stream
                      and self.coordinator.reads_errors(plan.state))
        if read_first:
            await self.context.write(Replies.buffer_response_body())
            read = await self._body()
            if read is None:
                return
            body = read
            said = ProviderError(*provider_error(plan.target.api, body))
        decision = self.coordinator.end_attempt(request_id, status, details, retry_after, said)
        if attempt is not None and said is not None:
            attempt.error = said
        attempts = plan.state.attempt_number
        if isinstance(decision, Retry):
            await self.context.write(self.replies.retry("response_body" if read_first else "response_headers"))
        elif isinstance(decision, GiveUp):
            await self._error(exhausted(plan.state, decision), attempts)
        elif read_first:  # an error delivered as the provider said it (translated into the client's API)
            out = self._translate_whole(plan, status, body) if plan.translation is not None else None
            no_retry = plan.state.policy is not None
            await self.context.write(self.replies.delivered_body(plan.state, no_retry=no_retry, body=out))
        else:
            await self._deliver(plan, headers, status, content_type, decision.until_last_byte)

    async def _deliver(self, plan: AttemptPlan, headers: pb.HttpHeaders, status: int, content_type: str,
                       until_last_byte: bool) -> None:
        """Hand the provider's response to the client: as it is (Envoy streams it), followed to its last
        byte, or translated into the client's API."""
        state = plan.state
        # an error the policy chose not to retry: the client's SDK must not retry it either
        no_retry = status >= 400 and state.policy is not None
        translation = plan.translation
        if translation is None or headers.end_of_stream:
            follow = until_last_byte and not headers.end_of_stream
            await self.context.write(self.replies.delivered(plan.state, no_retry=no_retry,
                                                            body=Body.FOLLOW if follow else Body.PASS))
            if follow:
                await self._follow_to_last_byte(plan)
            elif until_last_byte:
                self.coordinator.response_complete(state)
            return
        if status < 400 and content_type.startswith("text/event-stream"):
            await self.context.write(self.replies.delivered(plan.state, body=Body.TRANSLATE_STREAM))
            await self._translate_stream(plan, self._chunks(), until_last_byte)
            return
        await self.context.write(self.replies.delivered(plan.state, no_retry=no_retry,
                                                        body=Body.TRANSLATE_WHOLE))
        whole = await self._body()
        if whole is None:
            return
        if until_last_byte:
            self.coordinator.response_complete(state)
        await self.context.write(Replies.whole_body(self._translate_whole(plan, status, whole)))

    async def _respond_held(self, request_id: str, plan: AttemptPlan, headers: pb.HttpHeaders,
                            inbox: _Inbox) -> None:
        """A streamed answer: Envoy sends us its body as it arrives while we hold the headers, until the
        commit point — the first content event. A provider that opens a 200 stream and then sends an
        error event, garbage, or nothing within the attempt timeout is failed over before the client
        sees a byte. After the commit point an untranslated stream flows through Envoy alone: we
        answer what we hold and close our side."""
        status, details, retry_after, content_type = _scan_response(headers)
        attempt = plan.state.current
        pending: list[tuple[bytes, bool]] = []
        ended = headers.end_of_stream
        said: ProviderError | None = None
        streaming = status < 400 and content_type.startswith("text/event-stream") and not ended
        can_fail_over = plan.state.policy is not None
        if streaming and not can_fail_over:
            pass  # nothing to fail over to: deliver at once (translated or not), no commit point to wait for
        elif streaming:
            peek = CommitPeek(self.servicer.gateway.listener.stream_commit_events)
            first_token = (attempt.started if attempt else self.coordinator.clock()) + plan.first_token_timeout
            held = 0
            while True:
                item = await inbox.get(first_token - self.coordinator.clock())
                if item is _TIMED_OUT:
                    status, details = 504, "upstream_per_try_timeout"  # no content in time: a timeout
                    break
                if item is None:
                    return  # Envoy ended the stream (the provider reset it; the router retries)
                assert isinstance(item, tuple)
                pending.append(item)
                ended = item[1]
                held += len(item[0])
                verdict = peek.feed(item[0])
                if isinstance(verdict, StreamError):
                    status, details = verdict.status, "via_upstream"
                    said = ProviderError(verdict.type, verdict.code, verdict.message)
                    log.info("error event before any content from %s: %s %s", plan.target.key, verdict.status,
                             verdict.type or verdict.code)
                    break
                if verdict is not None or ended or held > HOLD_LIMIT:
                    break
        else:  # an error or a JSON body: Envoy sends it all without asking; read it whole
            while not ended:
                item = await inbox.get(None)
                if item is None or item is _TIMED_OUT:
                    return
                assert isinstance(item, tuple)
                pending.append(item)
                ended = item[1]
            if status >= 400 and details in (None, "via_upstream"):  # the provider's own words, not Envoy's
                said = ProviderError(*provider_error(plan.target.api, b"".join(c for c, _ in pending)))
        decision = self.coordinator.end_attempt(request_id, status, details, retry_after, said)
        if attempt is not None and said is not None:
            attempt.error = said
        attempts = plan.state.attempt_number
        if isinstance(decision, Retry):
            await self.context.write(self.replies.retry("response_headers"))
            for _ in pending:  # Envoy waits for an answer to every chunk it sent before it retries
                await self.context.write(Replies.CONTINUE_BODY)
        elif isinstance(decision, GiveUp):
            await self._error(exhausted(plan.state, decision), attempts)
        else:
            await self._deliver_held(plan, status, pending, ended, inbox, decision.until_last_byte)

    async def _deliver_held(self, plan: AttemptPlan, status: int, pending: list[tuple[bytes, bool]], ended: bool,
                            inbox: _Inbox, until_last_byte: bool) -> None:
        state = plan.state
        no_retry = status >= 400 and state.policy is not None
        translation = plan.translation
        if translation is not None and ended and not (status < 400 and len(pending) > 1):
            # a whole body (an error, or JSON where a stream was asked for): translate it at once
            whole = b"".join(c for c, _ in pending)
            out = self._translate_whole(plan, status, whole)
            await self.context.write(self.replies.delivered(plan.state, no_retry=no_retry,
                                                            length=len(out)))
            for index, _ in enumerate(pending):
                await self.context.write(Replies.chunk(out if index == 0 else b""))
            if until_last_byte:
                self.coordinator.response_complete(state)
            return
        if translation is None:
            await self.context.write(self.replies.delivered(plan.state, no_retry=no_retry,
                                                            continued=plan.continued))
            for _ in pending:
                await self.context.write(Replies.CONTINUE_BODY)
            if until_last_byte and not ended:
                await self._follow_to_last_byte(plan, inbox)
            elif until_last_byte:
                self.coordinator.response_complete(state)
            return  # the rest of the stream flows through Envoy; closing our side lets it
        await self.context.write(self.replies.delivered(plan.state, body=Body.TRANSLATE_STREAM,
                                                        continued=plan.continued))
        await self._translate_stream(plan, inbox.chunks(pending), until_last_byte)

    async def _translate_stream(self, plan: AttemptPlan, chunks: AsyncIterator[tuple[bytes, bool]],
                                until_last_byte: bool) -> None:
        """Translate a streamed response chunk by chunk, as it arrives (never buffered whole)."""
        assert plan.translation is not None
        stream = plan.translation.module.StreamTranslator(model=plan.target.model_id, created=int(time.time()),
                                                          include_usage=plan.translation.include_usage)
        async for data, last in chunks:
            out = stream.feed(data)
            if last:
                out += stream.close()
                if until_last_byte:
                    self.coordinator.response_complete(plan.state)
            await self.context.write(Replies.chunk(out))
            if last:
                return

    def _translate_whole(self, plan: AttemptPlan, status: int, body: bytes) -> bytes:
        """A provider's whole response body in the client's API (an error keeps its status)."""
        assert plan.translation is not None
        module = plan.translation.module
        if status >= 400:
            return module.translate_error(status, body)  # type: ignore[no-any-return]
        try:
            return module.translate_response(body, model=plan.target.model_id,  # type: ignore[no-any-return]
                                             created=int(time.time()))
        except Untranslatable as exc:  # the provider's answer is not one: say so in the client's shape
            log.warning("untranslatable response from %s: %s", plan.target.key, exc)
            return apierrors.bad_provider_response(plan.target.key, str(exc)).body(self.caller)

    async def _follow_to_last_byte(self, plan: AttemptPlan, inbox: _Inbox | None = None) -> None:
        """Pass the streamed body on chunk by chunk; time the response at its last byte, before the
        client gets it."""
        while (body := (await self._chunk() if inbox is None else await inbox.get(None))) is not None:
            if body is _TIMED_OUT:
                return
            assert isinstance(body, tuple)
            _, last = body
            if last:
                self.coordinator.response_complete(plan.state)
            await self.context.write(Replies.CONTINUE_BODY)
            if last:
                return

    async def _body(self) -> bytes | None:
        """The buffered response body (asked for with a BUFFERED mode override)."""
        message = await self.context.read()
        if message is aio.EOF or not message.HasField("response_body"):
            return None
        return message.response_body.body

    async def _chunks(self) -> AsyncIterator[tuple[bytes, bool]]:
        """The streamed response-body chunks and whether each is the last."""
        while (chunk := await self._chunk()) is not None:
            yield chunk

    async def _chunk(self) -> tuple[bytes, bool] | None:
        """The next streamed response-body chunk and whether it is the last, or None."""
        message = await self.context.read()
        if message is aio.EOF or not message.HasField("response_body"):
            return None
        return message.response_body.body, message.response_body.end_of_stream

    async def _error(self, error: ApiError, attempts: int) -> None:
        await self.context.write(self.replies.error(error, attempts, self.caller))


_TIMED_OUT = object()
HOLD_LIMIT = 1 << 20  # bytes of a stream held without content before it is delivered anyway


class _Inbox:
    """Response-body chunks as Envoy sends them (the held filter does not wait for our answers), read
    by one task so that waiting for the next chunk can time out without cancelling a gRPC read."""

    def __init__(self, context: aio.ServicerContext) -> None:
        self._context = context
        self._queue: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while True:
                message = await self._context.read()
                if message is aio.EOF or not message.HasField("response_body"):
                    break
                body = message.response_body
                await self._queue.put((body.body, body.end_of_stream))
                if body.end_of_stream:
                    return
        except (asyncio.CancelledError, aio.AioRpcError, grpc.RpcError):
            pass
        await self._queue.put(None)

    async def get(self, timeout: float | None) -> tuple[bytes, bool] | None | object:
        """The next chunk, None when there are no more, or `_TIMED_OUT`."""
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0 and self._queue.empty():
            return _TIMED_OUT
        try:
            return await asyncio.wait_for(self._queue.get(), max(timeout, 0))
        except TimeoutError:
            return _TIMED_OUT

    async def chunks(self, held: list[tuple[bytes, bool]]) -> AsyncIterator[tuple[bytes, bool]]:
        """The chunks held so far, then the rest as they arrive."""
        for chunk in held:
            yield chunk
        while isinstance(item := await self.get(None), tuple):
            yield item

    def close(self) -> None:
        self._task.cancel()


def _scan_request(headers: pb.HttpHeaders) -> RequestHead:
    """Header values are bytes a client chose: decoded as latin-1 (never an error) or kept raw."""
    request_id = ""
    attempt = 1
    method = "POST"
    path = "/"
    length = 0
    content_type = b""
    model_header = None
    timeout: float | None = None
    continuation: Continuation | None = None
    credentials: list[tuple[str, bytes]] = []
    for h in headers.headers.headers:
        key = h.key
        if key == ":path":
            path = h.raw_value.decode("latin-1")
        elif key == ":method":
            method = h.raw_value.decode("latin-1")
        elif key == api.REQUEST_ID_HEADER:
            request_id = h.raw_value.decode("latin-1")
        elif key == api.ATTEMPT_COUNT_HEADER:
            attempt = _int(h.raw_value, 1)
        elif key == "content-length":
            length = _int(h.raw_value, 0)
        elif key == "content-type":
            content_type = h.raw_value
        elif key == api.MODEL_REQUEST_HEADER:
            model_header = h.raw_value.decode("latin-1")
        elif key == api.CONTINUE_HEADER:  # Envoy strips it from clients: only the stream relay sets it
            continuation = _continuation(h.raw_value)
        elif key in _DEADLINE_HEADERS:
            seconds = _seconds(h.raw_value, _DEADLINE_HEADERS[key])
            if seconds is not None:
                timeout = seconds if timeout is None else min(timeout, seconds)
        elif key in _SCANNED:
            credentials.append((key, h.raw_value))
    return RequestHead(request_id, attempt, method, path, tuple(credentials), length, content_type, model_header,
                       timeout, continuation, headers.end_of_stream)


def _scan_response(headers: pb.HttpHeaders) -> tuple[int, str | None, str | None, str]:
    status = 0
    details = retry_after = None
    content_type = ""
    for h in headers.headers.headers:
        key = h.key
        if key == ":status":
            status = _int(h.raw_value, 0)
        elif key == api.UPSTREAM_DETAILS_HEADER:
            details = h.raw_value.decode("latin-1")
        elif key == "retry-after":
            retry_after = h.raw_value.decode("latin-1")
        elif key == "content-type":
            content_type = h.raw_value.decode("latin-1").lower()
    return status, details, retry_after, content_type


# The client's own deadline, and the unit of each header: the openai and anthropic SDKs send their
# timeout (seconds) with every request (`x-stainless-read-timeout`: how long they wait for the first
# byte, and between bytes); x-sidestep-deadline-ms is for any other client.
_DEADLINE_HEADERS = {"x-stainless-timeout": 1.0, "x-stainless-read-timeout": 1.0, api.DEADLINE_HEADER: 0.001}


def _continuation(raw: bytes) -> Continuation | None:
    try:
        data = json.loads(base64.b64decode(raw))
        return Continuation(frozenset(str(k) for k in data["avoid"]), str(data["text"]))
    except (ValueError, KeyError, TypeError):
        return None


def _seconds(raw: bytes, unit: float) -> float | None:
    try:
        value = float(raw) * unit
    except ValueError:
        return None
    return value if 0 < value < 86400 * 7 else None


def _int(raw: bytes, default: int) -> int:
    try:
        return int(raw)
    except ValueError:
        return default

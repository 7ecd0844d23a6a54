"""The gRPC ExternalProcessor: reads Envoy's messages for one attempt, asks the Coordinator, replies.

Per attempt Envoy sends: request headers (authenticate the client on its first attempt; answer
`GET /v1/models` ourselves; otherwise continue: the target is set with the body reply, which
Envoy applies before the attempt leaves), the buffered request body (choose the target, wait if
the policy says so, rewrite the model), response headers (deliver, retry, or give up) and, only
when we asked for it, the response body.

Nothing a client sends can make this raise: bodies and headers are parsed defensively, and any
bug still ends the request with a JSON 500 rather than a broken stream.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc import aio

from controlplane import apierrors
from controlplane import internalapi as api
from controlplane.apierrors import Api, ApiError, api_for_path
from controlplane.config.runtime import ClientKey
from extproc.auth import Credentials, authenticate
from extproc.coordinator import AttemptPlan, Coordinator
from extproc.mutations import Replies
from extproc.policy.decide import Deliver, GiveUp, Retry
from extproc.policy.errors import exhausted

__all__ = ["ExtProcServicer"]

log = logging.getLogger("sidestep.extproc")
_CREDENTIALS = frozenset((*api.CLIENT_CREDENTIAL_HEADERS, api.GATEWAY_KEY_HEADER))


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the ext_proc needs from an attempt's request headers."""

    request_id: str
    attempt: int  # Envoy's attempt count, 1 for the first
    method: str
    path: str
    credentials: Credentials
    length: int  # content-length, 0 when absent
    end_of_stream: bool  # no body follows


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, coordinator: Coordinator, worker: str = "0") -> None:
        self.coordinator = coordinator
        self.gateway = coordinator.gateway
        self.replies = Replies(coordinator.gateway, worker)
        self.body_limit = coordinator.gateway.listener.max_request_body_bytes
        too_large = apierrors.request_too_large(self.body_limit)
        self.too_large = {caller: self.replies.error(too_large, 0, caller) for caller in Api}

    async def Process(self, request_iterator, context: aio.ServicerContext) -> None:  # noqa: N802 - gRPC name
        try:
            await self._attempt(context)
        except asyncio.CancelledError:
            raise  # Envoy cancels a retried attempt's stream, and the whole stream when the client leaves
        except Exception:
            log.exception("ext_proc stream failed")
            try:
                await context.write(self.replies.error(apierrors.internal_error(), 0, Api.OPENAI))
            except Exception:  # the stream itself is broken: Envoy answers with its own 503
                await context.abort(grpc.StatusCode.INTERNAL, "sidestep ext_proc internal error")

    async def _attempt(self, context: aio.ServicerContext) -> None:
        message = await context.read()
        if message is aio.EOF or not message.HasField("request_headers"):
            return
        head = _scan_request(message.request_headers)
        caller = api_for_path(head.path)
        credentials = head.credentials
        client: ClientKey | None = None
        if self.gateway.client_keys and head.attempt <= 1:  # later attempts carry what earlier ones set
            result = authenticate(self.gateway.client_keys, credentials)
            if isinstance(result, ApiError):
                log.info("refused request=%s path=%s: %s", head.request_id, head.path, result.message)
                await context.write(self.replies.error(result, 0, caller))
                return
            client, credentials = result
        # the client's own provider credentials, for passthrough_auth targets; never a gateway key
        credentials = tuple(c for c in credentials if c[0] != api.GATEWAY_KEY_HEADER)
        if head.method == "GET":  # the router only lets GET /v1/models… through
            await context.write(self.replies.models(head.path, client, caller))
            return
        if head.end_of_stream:
            await context.write(self.replies.error(apierrors.invalid_request("a JSON request body is required"),
                                                   0, caller))
            return
        if head.length > self.body_limit:  # refuse before Envoy buffers it all
            await context.write(self.too_large[caller])
            return
        await context.write(Replies.CONTINUE_HEADERS)

        message = await context.read()
        if message is aio.EOF or not message.HasField("request_body"):
            return
        if len(message.request_body.body) > self.body_limit:  # chunked: no content-length to check
            await context.write(self.too_large[caller])
            return
        plan = self.coordinator.begin_attempt(head.request_id, head.attempt, head.path, credentials,
                                              message.request_body.body, client)
        if isinstance(plan, ApiError):
            await context.write(self.replies.error(plan, head.attempt - 1, caller))
            return
        delay = plan.state.not_before - self.coordinator.clock()
        if delay > 0:
            await asyncio.sleep(delay)  # before replying: the attempt's timeout has not started yet
        await context.write(self.replies.attempt(plan.target, plan.key, plan.state.client_path, plan.body,
                                                 plan.state.client_credentials))

        message = await context.read()
        if message is aio.EOF or not message.HasField("response_headers"):
            return
        await self._respond(context, head.request_id, plan, message.response_headers, caller)

    async def _respond(self, context: aio.ServicerContext, request_id: str, plan: AttemptPlan,
                       headers: pb.HttpHeaders, caller: Api) -> None:
        status, details, retry_after = _scan_response(headers)
        decision = self.coordinator.end_attempt(request_id, status, details, retry_after)
        attempts = plan.state.attempt_number
        if isinstance(decision, Deliver):
            follow = decision.until_last_byte and not headers.end_of_stream
            await context.write(self.replies.delivered(plan.target, attempts, until_last_byte=follow))
            if decision.until_last_byte:
                await self._follow_to_last_byte(context, plan, ended=headers.end_of_stream)
        elif isinstance(decision, GiveUp):
            await context.write(self.replies.error(exhausted(plan.state, decision), attempts, caller))
        elif isinstance(decision, Retry):
            if headers.end_of_stream:
                await context.write(self.replies.retry("response_headers"))
                return
            await context.write(Replies.buffer_response_body())
            message = await context.read()
            if message is not aio.EOF and message.HasField("response_body"):
                await context.write(self.replies.retry("response_body"))

    async def _follow_to_last_byte(self, context: aio.ServicerContext, plan: AttemptPlan, *, ended: bool) -> None:
        """Pass the streamed body on chunk by chunk; time the response at its last byte, before the
        client gets it."""
        if ended:  # a response without a body
            self.coordinator.response_complete(plan.state)
            return
        while (message := await context.read()) is not aio.EOF and message.HasField("response_body"):
            last = message.response_body.end_of_stream
            if last:
                self.coordinator.response_complete(plan.state)
            await context.write(Replies.CONTINUE_BODY)
            if last:
                return


def _scan_request(headers: pb.HttpHeaders) -> RequestHead:
    """Header values are bytes a client chose: decoded as latin-1 (never an error) or kept raw."""
    request_id = ""
    attempt = 1
    method = "POST"
    path = "/"
    length = 0
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
        elif key in _CREDENTIALS:
            credentials.append((key, h.raw_value))
    return RequestHead(request_id, attempt, method, path, tuple(credentials), length, headers.end_of_stream)


def _scan_response(headers: pb.HttpHeaders) -> tuple[int, str | None, str | None]:
    status = 0
    details = retry_after = None
    for h in headers.headers.headers:
        key = h.key
        if key == ":status":
            status = _int(h.raw_value, 0)
        elif key == api.UPSTREAM_DETAILS_HEADER:
            details = h.raw_value.decode("latin-1")
        elif key == "retry-after":
            retry_after = h.raw_value.decode("latin-1")
    return status, details, retry_after


def _int(raw: bytes, default: int) -> int:
    try:
        return int(raw)
    except ValueError:
        return default

"""The gRPC ExternalProcessor: reads Envoy's messages for one attempt, asks the Coordinator, replies.

Per attempt Envoy sends: request headers (we continue; the target is set with the body reply,
which Envoy applies before the attempt leaves), the buffered request body (choose the target,
wait if the policy says so, rewrite the model), response headers (deliver, retry, or give up)
and, only when we asked for it to mark a retry, the response body.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc import aio

from controlplane import internalapi as api
from extproc.coordinator import AttemptPlan, Coordinator
from extproc.mutations import Replies
from extproc.policy.decide import Deliver, GiveUp, Retry
from extproc.policy.errors import ClientError, exhausted

__all__ = ["ExtProcServicer"]

log = logging.getLogger("sidestep.extproc")
_CREDENTIALS = frozenset(api.CLIENT_CREDENTIAL_HEADERS)


class ExtProcServicer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, coordinator: Coordinator, worker: str = "0") -> None:
        self.coordinator = coordinator
        self.replies = Replies(coordinator.gateway, worker)
        self.body_limit = coordinator.gateway.listener.max_request_body_bytes
        self.too_large = self.replies.error(ClientError(
            413, "request_too_large", f"the request body exceeds this listener's limit of {self.body_limit} "
                                      f"bytes (listeners[].max_request_body_bytes)"), 0)

    async def Process(self, request_iterator, context: aio.ServicerContext) -> None:  # noqa: N802 - gRPC name
        try:
            await self._attempt(context)
        except asyncio.CancelledError:
            raise  # Envoy cancels a retried attempt's stream, and the whole stream when the client leaves
        except Exception:
            log.exception("ext_proc stream failed")
            await context.abort(grpc.StatusCode.INTERNAL, "sidestep ext_proc internal error")

    async def _attempt(self, context: aio.ServicerContext) -> None:
        message = await context.read()
        if message is aio.EOF or not message.HasField("request_headers"):
            return
        request_id, envoy_attempt, path, credentials, length = _scan_request(message.request_headers)
        if message.request_headers.end_of_stream:
            error = ClientError(400, "invalid_request_error", "a JSON request body is required")
            await context.write(self.replies.error(error, 0))
            return
        if length > self.body_limit:  # refuse before Envoy buffers it all
            await context.write(self.too_large)
            return
        await context.write(Replies.CONTINUE_HEADERS)

        message = await context.read()
        if message is aio.EOF or not message.HasField("request_body"):
            return
        if len(message.request_body.body) > self.body_limit:  # chunked: no content-length to check
            await context.write(self.too_large)
            return
        plan = self.coordinator.begin_attempt(request_id, envoy_attempt, path, credentials,
                                              message.request_body.body)
        if isinstance(plan, ClientError):
            await context.write(self.replies.error(plan, envoy_attempt - 1))
            return
        delay = plan.state.not_before - self.coordinator.clock()
        if delay > 0:
            await asyncio.sleep(delay)  # before replying: the attempt's timeout has not started yet
        await context.write(self.replies.attempt(plan.target, plan.key, plan.state.client_path, plan.body,
                                                 plan.state.client_credentials))

        message = await context.read()
        if message is aio.EOF or not message.HasField("response_headers"):
            return
        await self._respond(context, request_id, plan, message.response_headers)

    async def _respond(self, context: aio.ServicerContext, request_id: str, plan: AttemptPlan,
                       headers: pb.HttpHeaders) -> None:
        status, details, retry_after = _scan_response(headers)
        decision = self.coordinator.end_attempt(request_id, status, details, retry_after)
        attempts = plan.state.attempt_number
        if isinstance(decision, Deliver):
            follow = decision.until_last_byte and not headers.end_of_stream
            await context.write(self.replies.delivered(plan.target, attempts, until_last_byte=follow))
            if decision.until_last_byte:
                await self._follow_to_last_byte(context, plan, ended=headers.end_of_stream)
        elif isinstance(decision, GiveUp):
            await context.write(self.replies.error(exhausted(plan.state, decision), attempts))
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


def _scan_request(headers: pb.HttpHeaders) -> tuple[str, int, str, tuple[tuple[str, str], ...], int]:
    request_id = ""
    attempt = 1
    path = "/"
    length = 0
    credentials: list[tuple[str, str]] = []
    for h in headers.headers.headers:
        key = h.key
        if key == ":path":
            path = h.raw_value.decode()
        elif key == api.REQUEST_ID_HEADER:
            request_id = h.raw_value.decode()
        elif key == api.ATTEMPT_COUNT_HEADER:
            attempt = int(h.raw_value or b"1")
        elif key == "content-length":
            length = int(h.raw_value or b"0")
        elif key in _CREDENTIALS:
            credentials.append((key, h.raw_value.decode()))
    return request_id, attempt, path, tuple(credentials), length


def _scan_response(headers: pb.HttpHeaders) -> tuple[int, str | None, str | None]:
    status = 0
    details = retry_after = None
    for h in headers.headers.headers:
        key = h.key
        if key == ":status":
            status = int(h.raw_value)
        elif key == api.UPSTREAM_DETAILS_HEADER:
            details = h.raw_value.decode()
        elif key == "retry-after":
            retry_after = h.raw_value.decode()
    return status, details, retry_after

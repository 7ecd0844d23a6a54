"""Protobuf replies to Envoy, precomputed per target where possible (the hot path only assembles).

Header mutations made by an upstream filter persist into later attempts and into the downstream
request, so every attempt overwrites every per-provider header (target, host, path, credentials)
and removes what another target may have set before it.
"""

from __future__ import annotations

import json
from enum import Enum

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from controlplane import apierrors
from controlplane import internalapi as api
from controlplane.apierrors import Api, ApiError
from controlplane.config.runtime import ClientKey, Gateway, Target
from extproc.auth import Credentials
from extproc.policy.ledger import ledger
from extproc.policy.state import RequestState

__all__ = ["Body", "Replies"]

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_BUFFERED = processing_mode_pb2.ProcessingMode.BUFFERED
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED


class Body(Enum):
    """What happens to a delivered response's body."""

    PASS = "pass"  # it flows through Envoy, not us
    FOLLOW = "follow"  # streamed through us unchanged (to time its last byte)
    TRANSLATE_STREAM = "translate_stream"  # streamed through us, each chunk translated
    TRANSLATE_WHOLE = "translate_whole"  # buffered, then translated whole (JSON bodies, errors)
# marks the request as sent on to a provider (see internalapi.SENT_METADATA)
_SENT = struct_pb2.Struct()
_SENT.update({api.METADATA_NAMESPACE: {api.SENT_METADATA: "1"}})


def header(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode()
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw), append_action=_OVERWRITE)


_NO_RETRY = header(api.SHOULD_RETRY_HEADER, "false")
_INTERNAL = header("x-forwarded-for", "127.0.0.1")  # makes the dispatch listener trust x-envoy-* headers


class Replies:
    """Every ProcessingResponse the servicer sends, built from the compiled config once."""

    CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    CONTINUE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())

    def __init__(self, gateway: Gateway, worker: str = "0") -> None:
        self.gateway = gateway
        self._extra_names = {name for t in gateway.targets.values() for name, _ in t.extra_headers}
        self.worker = header(api.WORKER_HEADER, worker)
        # one reply shape per target and key of its pool; a target's route id changes with what it
        # reaches, so a request from before a reload never takes a changed target's shape
        self._static: dict[tuple[str, str, int], tuple[list[base_pb2.HeaderValueOption], list[str]]] = {}
        for target in gateway.targets.values():
            for index in range(max(1, len(target.keys))):
                self._static[(target.key, target.route_id, index)] = self._shape(target, index)
        self._delivered: dict[tuple[str, int, Body, bool, str | None], pb.ProcessingResponse] = {}
        self._retry_marks = {
            phase: self._retry_mark(phase) for phase in ("response_headers", "response_body")
        }
        self._model_lists: dict[str | None, bytes] = {}  # by gateway key name (None: no key)
        self._sent_by: dict[str, struct_pb2.Struct] = {}  # by gateway key name

    def _shape(self, target: Target, index: int) -> tuple[list[base_pb2.HeaderValueOption], list[str]]:
        """The headers an attempt to `target` with its key `index` sets and removes."""
        sets = [header(api.TARGET_HEADER, target.route_id), header(":authority", target.upstream.authority)]
        sets += [header(k, v) for k, v in target.extra_headers]
        removes = sorted(self._extra_names - {k for k, _ in target.extra_headers})
        if target.passthrough_auth:  # `attempt` sets the client's credentials and removes the rest
            return sets, removes
        if not target.keys:  # a provider without a key still never gets the client's credentials
            return sets, removes + list(api.CLIENT_CREDENTIAL_HEADERS)
        key = target.keys[index]
        sent = {k for k, _ in key.headers}
        return sets + [header(k, v) for k, v in key.headers], removes + [h for h in api.CLIENT_CREDENTIAL_HEADERS
                                                                         if h not in sent]

    def attempt(self, target: Target, key: int, path: str, body: bytes | None,
                client_credentials: Credentials, attempt_timeout: float | None = None,
                client: str = "") -> pb.ProcessingResponse:
        """The reply that sends this attempt to `target` with key `key` and `body`: to the request body,
        or, for a request without one (`body` None), to its headers. `client`: the gateway key's name."""
        shape = self._static.get((target.key, target.route_id, key))
        if shape is None:  # a request from before a reload, to a target since changed or removed
            shape = self._shape(target, key)
        sets, removes = shape
        mutation = pb.HeaderMutation(set_headers=sets, remove_headers=removes)
        if target.passthrough_auth:  # restore the client's own credentials, whatever came before
            sent = {k for k, _ in client_credentials}
            mutation.set_headers.extend(header(k, v) for k, v in client_credentials)
            mutation.remove_headers.extend(h for h in api.CLIENT_CREDENTIAL_HEADERS if h not in sent)
        mutation.set_headers.append(header(":path", target.upstream.path_for(path).encode("latin-1")))
        if attempt_timeout is not None:  # a client's deadline: the dispatch listener honours it from 127.0.0.1
            mutation.set_headers.append(header(api.PER_TRY_TIMEOUT_HEADER, str(max(1, int(attempt_timeout * 1000)))))
            mutation.set_headers.append(_INTERNAL)
        if body is None:
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=pb.CommonResponse(
                header_mutation=mutation)), dynamic_metadata=self._sent(client))
        mutation.set_headers.append(header("content-length", str(len(body))))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=mutation, body_mutation=pb.BodyMutation(body=body))), dynamic_metadata=self._sent(client))

    def _sent(self, client: str) -> struct_pb2.Struct:
        """The attempt's dynamic metadata: sent on (see `api.SENT_METADATA`), and by which gateway key."""
        if not client:
            return _SENT
        sent = self._sent_by.get(client)
        if sent is None:
            sent = self._sent_by[client] = struct_pb2.Struct()
            sent.update({api.METADATA_NAMESPACE: {api.SENT_METADATA: "1", api.CLIENT_METADATA: client}})
        return sent

    def delivered(self, state: RequestState, *, body: Body = Body.PASS, no_retry: bool = False,
                  length: int | None = None, continued: str | None = None) -> pb.ProcessingResponse:
        """Response-headers reply for the response of `state`'s current attempt, which the client
        gets: which model, after how many attempts, and the attempt ledger.

        `body`: what happens to the response body (`Body`). `no_retry`: an error the policy decided
        not to retry, marked so the client's SDK does not run the whole failover again. `length`: a
        body translated whole before the headers leave (the held filter): its JSON and length."""
        assert state.current is not None
        reply = pb.ProcessingResponse()
        reply.CopyFrom(self._delivered_reply(state.current.target, state.attempt_number, body, no_retry, continued))
        sets = reply.response_headers.response.header_mutation.set_headers
        sets.append(header(api.LEDGER_HEADER, ledger(state)))
        if length is not None:
            sets.extend([header("content-type", "application/json"), header("content-length", str(length))])
        return reply

    def _delivered_reply(self, target: Target, attempts: int, body: Body, no_retry: bool,
                         continued: str | None) -> pb.ProcessingResponse:
        """What `delivered` sends but the ledger: built once per kind of answer."""
        key = (target.key, attempts, body, no_retry, continued)
        reply = self._delivered.get(key)
        if reply is None:
            sets = [header(api.ATTEMPTS_HEADER, str(attempts)), header(api.MODEL_HEADER, target.key), self.worker]
            if no_retry:
                sets.append(_NO_RETRY)
            if continued:
                sets.append(header(api.CONTINUED_HEADER, continued))
            if not target.repair_streams:
                sets.append(header(api.NO_REPAIR_HEADER, "1"))
            mutation = pb.HeaderMutation(set_headers=sets)
            if body is Body.TRANSLATE_STREAM:
                mutation.set_headers.append(header("content-type", "text/event-stream"))
                mutation.remove_headers.append("content-length")
            reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=pb.CommonResponse(
                header_mutation=mutation)))
            if body is not Body.PASS:
                reply.mode_override.response_body_mode = _BUFFERED if body is Body.TRANSLATE_WHOLE else _STREAMED
            if len(self._delivered) < 4096:
                self._delivered[key] = reply
        return reply

    def delivered_body(self, state: RequestState, *, no_retry: bool, body: bytes | None) -> pb.ProcessingResponse:
        """`delivered`, as the reply to a buffered body (its headers are still held): which model,
        how many attempts, and `body` (JSON) in place of the provider's when set."""
        assert state.current is not None
        sets = [header(api.ATTEMPTS_HEADER, str(state.attempt_number)), header(api.MODEL_HEADER, state.current.target.key),
                self.worker, header(api.LEDGER_HEADER, ledger(state))]
        if no_retry:
            sets.append(_NO_RETRY)
        common = pb.CommonResponse(header_mutation=pb.HeaderMutation(set_headers=sets))
        if body is not None:
            common.header_mutation.set_headers.extend([header("content-type", "application/json"),
                                                       header("content-length", str(len(body)))])
            common.body_mutation.body = body
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))

    @staticmethod
    def chunk(data: bytes) -> pb.ProcessingResponse:
        """A streamed response-body reply that replaces the chunk with `data` (a translation)."""
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
            body_mutation=pb.BodyMutation(body=data))))

    @staticmethod
    def whole_body(data: bytes) -> pb.ProcessingResponse:
        """A buffered response-body reply that replaces the whole body with the JSON `data`."""
        mutation = pb.HeaderMutation(set_headers=[header("content-type", "application/json"),
                                                  header("content-length", str(len(data)))])
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=mutation, body_mutation=pb.BodyMutation(body=data))))

    def retry(self, phase: str) -> pb.ProcessingResponse:
        """Mark the attempt for retry (Envoy's route retries on the header) and drop Retry-After,
        which is ours to honour, not Envoy's."""
        return self._retry_marks[phase]

    @staticmethod
    def buffer_response_body() -> pb.ProcessingResponse:
        """Hold the failed attempt's response until its body is read, then mark the retry in the body
        reply: marking at headers makes the router reset the provider connection mid-body."""
        reply = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        reply.mode_override.response_body_mode = _BUFFERED
        return reply

    def error(self, error: ApiError, attempts: int, caller: Api) -> pb.ProcessingResponse:
        """A final JSON error in the caller's API shape; from an upstream filter it is never retried.
        Unless retrying could help (`error.retryable`), it tells the client's SDK not to retry: sidestep
        already did whatever retrying the policy allows."""
        sets = [header("content-type", "application/json"), header(api.ATTEMPTS_HEADER, str(attempts)), self.worker,
                header(api.LEDGER_HEADER, error.ledger)]
        if not error.retryable:
            sets.append(_NO_RETRY)
        if error.retry_after is not None:
            sets.append(header("retry-after", str(error.retry_after)))
        return self._immediate(error.status, sets, error.body(caller), f"sidestep_{error.type}")

    def models(self, path: str, client: ClientKey | None, caller: Api) -> pb.ProcessingResponse:
        """`GET /v1/models` (the models this client may use) or `GET /v1/models/{id}`."""
        allowed = client.models if client is not None else None
        visible = [t for t in self.gateway.targets.values() if allowed is None or t.key in allowed]
        path = path.partition("?")[0]
        if path.rstrip("/") == api.MODELS_PATH:
            name = client.name if client is not None else None
            body = self._model_lists.get(name)
            if body is None:
                body = self._model_lists[name] = json.dumps(
                    {"object": "list", "data": [_model_object(t) for t in visible]}).encode()
        else:
            wanted = path[len(api.MODELS_PATH) + 1:]
            target = self.gateway.names.get(wanted)
            if target is None or (allowed is not None and target.key not in allowed):
                return self.error(apierrors.model_not_found(f"model {wanted!r} is not configured"), 0, caller)
            body = json.dumps(_model_object(target)).encode()
        return self._immediate(200, [header("content-type", "application/json"), self.worker], body,
                               "sidestep_models")

    @staticmethod
    def _immediate(status: int, sets: list[base_pb2.HeaderValueOption], body: bytes,
                   details: str) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=pb.HeaderMutation(set_headers=sets), body=body, details=details))

    @staticmethod
    def _retry_mark(phase: str) -> pb.ProcessingResponse:
        mutation = pb.HeaderMutation(set_headers=[header(api.RETRY_HEADER, "1")], remove_headers=["retry-after"])
        common = pb.CommonResponse(header_mutation=mutation)
        if phase == "response_headers":
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))


def _model_object(target: Target) -> dict[str, str]:
    return {"id": target.key, "object": "model", "owned_by": target.provider}

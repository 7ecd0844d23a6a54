"""The metrics service: Prometheus metrics for the whole gateway, in one process.

Usage: `python -m controlplane.metrics --home HOME` (the supervisor starts it; the sockets are the
stack's, from HOME/run/stack.json). It
- receives every request's access-log entry from Envoy (gRPC access log service) and counts it
  (`controlplane.metrics.record`): requests, attempts, retries, failovers, waits, latencies, all
  ext_proc workers included;
- answers `GET /metrics` (Envoy routes it here from the listener) with those counts, the live
  state read from the state service at scrape time (blocks, key states, workers, the shared
  store's health), and Envoy's own statistics (its admin endpoint's Prometheus format).
Counts live as long as this process: a reload keeps them, a restart of the stack starts again at
zero, as Prometheus counters may.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from grpc import aio
from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane import internalapi as api
from controlplane.deploy import admin_get
from controlplane.metrics.record import Entry, Recorder, parse_ledger
from controlplane.rundir import RunDir, StackInfo
from controlplane.state.v1 import state_pb2 as pb
from controlplane.state.v1 import state_pb2_grpc as pb_grpc

__all__ = ["AccessLogReceiver", "main"]

log = logging.getLogger("sidestep.metrics")
MAX_REQUEST = 16 << 10  # an HTTP request to the metrics socket (only Envoy sends one)


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],  # noqa: N802
                               context: aio.ServicerContext) -> als_pb2.StreamAccessLogsResponse:
        log_name = ""
        async for message in request_iterator:
            if message.HasField("identifier"):  # only the first message of a stream names its log
                log_name = message.identifier.log_name
            for raw in message.http_logs.log_entry:
                entry = entry_of(raw, log_name)
                if entry is not None:
                    self.recorder.record(entry)
        return als_pb2.StreamAccessLogsResponse()


def entry_of(raw: accesslog_pb2.HTTPAccessLogEntry, log_name: str) -> Entry | None:
    """The values the metrics need; None for entries that are not requests to count."""
    request, response, common = raw.request, raw.response, raw.common_properties
    if log_name == api.RELAYED_LOG and api.CONTINUE_HEADER not in request.request_headers:
        return None  # the relay's first request: the client's own entry counts it
    if request.path == api.METRICS_PATH:
        return None  # scrapes are not traffic
    sidestep = common.metadata.filter_metadata.get(api.METADATA_NAMESPACE)
    client = sidestep.fields[api.CLIENT_METADATA].string_value if sidestep is not None and \
        api.CLIENT_METADATA in sidestep.fields else ""
    return Entry(
        method=base_pb2.RequestMethod.Name(request.request_method), path=request.path,
        status=response.response_code.value, model=response.response_headers.get(api.MODEL_HEADER, ""),
        ledger=parse_ledger(response.response_headers.get(api.LEDGER_HEADER, "")), client=client,
        duration=_seconds(common, "time_to_last_downstream_tx_byte"),
        first_byte=_seconds(common, "time_to_first_downstream_tx_byte"),
        repair=log_name == api.RELAYED_LOG)


def _seconds(common: accesslog_pb2.AccessLogCommon, name: str) -> float | None:
    if not common.HasField(name):
        return None
    duration = getattr(common, name)
    return duration.seconds + duration.nanos / 1e9


class LiveState(Collector):
    """Gauges read at scrape time: the state service's snapshot and the stack's description."""

    def __init__(self) -> None:
        self.snapshot: pb.Snapshot | None = None
        self.stack: StackInfo | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot, stack = self.snapshot, self.stack
        up = GaugeMetricFamily("sidestep_state_service_up", "1 when the state service answered this scrape")
        up.add_metric([], 1 if snapshot is not None else 0)
        yield up
        if stack is not None:
            info = GaugeMetricFamily("sidestep_config_info", "The running config (its content hash)", labels=["hash"])
            info.add_metric([stack.config_hash], 1)
            yield info
        if snapshot is None:
            return
        now = snapshot.now
        blocks = GaugeMetricFamily("sidestep_blocks_active", "Targets blocked now, by scope", labels=["scope"])
        remaining = GaugeMetricFamily("sidestep_block_remaining_seconds", "Each active block's time left",
                                      labels=["scope", "name", "reason"])
        by_scope = {"model": 0, "provider": 0}
        resting: dict[tuple[str, str], int] = {}
        for fact in snapshot.facts:
            if fact.HasField("block") and fact.block.until > now:
                b = fact.block
                by_scope[b.scope] = by_scope.get(b.scope, 0) + 1
                remaining.add_metric([b.scope, b.name, b.reason], round(b.until - now, 3))
            elif fact.HasField("key"):
                k = fact.key
                state = "unauthorized" if k.unauthorized else "rate_limited" if k.until > now else ""
                if state:
                    resting[(k.pool, state)] = resting.get((k.pool, state), 0) + 1
        for scope, count in by_scope.items():
            blocks.add_metric([scope], count)
        yield blocks
        yield remaining
        keys = GaugeMetricFamily("sidestep_keys", "Keys of each key pool by state", labels=["pool", "state"])
        for pool, members in (stack.key_pools if stack is not None else {}).items():
            limited, retired = resting.get((pool, "rate_limited"), 0), resting.get((pool, "unauthorized"), 0)
            keys.add_metric([pool, "ok"], len(members) - limited - retired)
            keys.add_metric([pool, "rate_limited"], limited)
            keys.add_metric([pool, "unauthorized"], retired)
        yield keys
        workers = GaugeMetricFamily("sidestep_workers_synced", "ext_proc workers synced with the state service")
        workers.add_metric([], len(snapshot.workers))
        yield workers
        if snapshot.HasField("store"):
            store = snapshot.store
            store_up = GaugeMetricFamily("sidestep_shared_store_up", "1 while the shared store (Redis) is connected")
            store_up.add_metric([], 1 if store.state == "connected" else 0)
            yield store_up
            published = CounterMetricFamily("sidestep_shared_store_facts_published",
                                            "Facts this gateway published to the shared store")
            published.add_metric([], store.published)
            yield published
            learned = CounterMetricFamily("sidestep_shared_store_facts_learned",
                                          "Facts learned from other gateways that changed this one's state")
            learned.add_metric([], store.learned)
            yield learned


class MetricsService:
    def __init__(self, rundir: RunDir) -> None:
        disable_created_metrics()  # `_created` series double the output and say little here
        self.rundir = rundir
        self.registry = CollectorRegistry()
        self.recorder = Recorder(self.registry)
        self.live = LiveState()
        self.registry.register(self.live)

    async def scrape(self) -> bytes:
        stack = self.rundir.read_stack()  # read again: a reload changes it
        self.live.stack = stack
        self.live.snapshot = await _snapshot(stack.state_socket) if stack is not None else None
        ours = generate_latest(self.registry)
        envoy = await _envoy_stats(stack.admin_socket) if stack is not None else b""
        return ours + envoy

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection: `GET /metrics` (Envoy routes nothing else here)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, *_ = head.split(b" ", 2) + [b"", b""]
            if method == b"GET" and path.split(b"?")[0] == api.METRICS_PATH.encode():
                status, body = b"200 OK", await self.scrape()
                content_type = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body, content_type = b"404 Not Found", b"not found\n", b"text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: " + content_type +
                         b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:  # noqa: BLE001 - a failed scrape must not end the service
            log.exception("scrape failed")
        finally:
            writer.close()


async def _snapshot(socket_path: str) -> pb.Snapshot | None:
    try:
        async with aio.insecure_channel(f"unix:{socket_path}") as channel:
            return await pb_grpc.StateStub(channel).Get(pb.SnapshotRequest(), timeout=2)
    except grpc.RpcError:
        return None


async def _envoy_stats(admin_socket: str) -> bytes:
    """Envoy's own statistics (only those in use), in Prometheus format, from its admin endpoint."""
    stats = await asyncio.to_thread(admin_get, admin_socket, "/stats/prometheus?usedonly")
    return stats.encode() if stats else b"# Envoy's admin endpoint did not answer\n"


async def serve(rundir: RunDir, stack: StackInfo) -> None:
    service = MetricsService(rundir)
    server = aio.server()
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogReceiver(service.recorder), server)
    for path in (stack.metrics_socket, stack.access_log_socket):
        if os.path.exists(path):  # left behind by a previous process
            os.unlink(path)
    server.add_insecure_port(f"unix:{stack.access_log_socket}")
    await server.start()
    http = await asyncio.start_unix_server(service.handle_http, stack.metrics_socket, limit=MAX_REQUEST)
    log.info("metrics service: GET /metrics on %s, access log on %s", stack.metrics_socket, stack.access_log_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    http.close()
    await server.stop(grace=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.metrics", description=__doc__)
    parser.add_argument("--home", required=True, help="the stack's home (its run/stack.json names the sockets)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    rundir = RunDir(args.home)
    stack = rundir.read_stack()
    if stack is None or not stack.metrics_socket:
        print(f"no metrics sockets in {rundir.stack_file}", file=sys.stderr)
        return 2
    asyncio.run(serve(rundir, stack))
    return 0

"""Build and run one ext_proc worker.

Usage: `python -m extproc --compiled FILE --socket PATH [--worker ID --state PATH]` (or `--config
FILE` to compile a YAML itself, in tests). It listens on a Unix socket (in the stack's private run
directory: whoever can connect to it is handed provider keys). With `--state` the worker keeps its
shared-state replica in sync with the control plane. SIGHUP loads the compiled config again
(`sidestep reload`): new requests use it, requests in flight finish under the one they started with.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.compiled import load as load_compiled
from controlplane.config import Gateway, load_config
from controlplane.errors import ConfigError
from controlplane.state.replica import Replica
from extproc.coordinator import Coordinator
from extproc.relay import Relay
from extproc.servicer import ExtProcServicer

__all__ = ["Worker", "create_server", "main"]

log = logging.getLogger("sidestep.extproc")


@dataclass(frozen=True)
class Worker:
    server: aio.Server
    coordinator: Coordinator
    servicer: ExtProcServicer
    health: health.aio.HealthServicer


def create_server(gateway: Gateway, address: str, worker: str = "0") -> Worker:
    """An unstarted server bound to `address` (`unix:PATH`, or HOST:PORT in tests), serving ext_proc
    and gRPC health."""
    # the whole request body travels in one message: allow the listener's limit plus framing
    limit = gateway.listener.max_request_body_bytes + (1 << 20)
    server = aio.server(options=[
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_concurrent_streams", 100_000),
        ("grpc.so_reuseport", 0),  # each worker has its own port (see controlplane/render/envoy.py)
    ])
    coordinator = Coordinator(gateway, origin=f"w{worker}.{os.getpid()}")
    servicer = ExtProcServicer(coordinator, worker)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bind(server, address)
    return Worker(server, coordinator, servicer, health_servicer)


def bind(server: aio.Server, address: str) -> None:
    """Listen on `address`; a Unix socket left behind by a previous process is replaced."""
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
    server.add_insecure_port(address)


async def serve(gateway: Gateway, address: str, worker_id: str, state: str | None, config_hash: str,
                relay: tuple[str, str] | None = None, compiled_path: str | None = None) -> None:
    worker = create_server(gateway, address, worker_id)
    background: list[asyncio.Task[None]] = []
    if relay is not None and gateway.listener.repair_streams:  # (its socket, the relayed listener's)
        await Relay(relay[0], relay[1], worker_id).start()
    replica = None
    if state:
        replica = Replica(worker.coordinator.table, state, worker=worker_id, config_hash=config_hash)
        background.append(asyncio.create_task(replica.run()))
    await worker.server.start()
    await worker.health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("ext_proc worker %s serving on %s (%d models)", worker_id, address, len(gateway.targets))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        if compiled_path is None:
            return
        try:
            compiled, new_hash = load_compiled(compiled_path)
        except (OSError, ValueError) as exc:
            log.error("could not load the new config (%s); keeping the running one", exc)
            return
        worker.servicer.use(compiled.gateway)
        log.info("worker %s runs config %s (%d models)", worker_id, new_hash, len(compiled.gateway.targets))
        if replica is not None:
            replica.rehello(new_hash)

    loop.add_signal_handler(signal.SIGHUP, reload)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(30)
            worker.coordinator.sweep()

    background.append(asyncio.create_task(sweep()))
    await stop.wait()
    for task in background:
        task.cancel()
    await worker.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await worker.server.stop(grace=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--compiled", help="the stack's compiled config (controlplane.compiled)")
    source.add_argument("--config", help="a sidestep config file, compiled here")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--worker", default="0", help="this worker's id (logs, x-sidestep-worker)")
    parser.add_argument("--state", help="the control plane's state service: its Unix socket")
    parser.add_argument("--relay", help="the stream relay's Unix socket (repair_streams)")
    parser.add_argument("--relayed", help="the Envoy listener the relay sends to (a Unix socket)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker-{args.worker} %(name)s %(message)s")
    try:
        if args.compiled:
            compiled, config_hash = load_compiled(args.compiled)
            gateway = compiled.gateway
        else:
            gateway, config_hash = load_config(args.config).gateway, ""
    except ConfigError as exc:
        print(f"sidestep ext_proc: invalid config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"sidestep ext_proc: cannot load {args.compiled}: {exc}", file=sys.stderr)
        return 2
    # uvloop was measured here and made no difference: gRPC's own C-core and poller dominate
    state = f"unix:{args.state}" if args.state else None
    relay = (args.relay, args.relayed) if args.relay and args.relayed else None
    asyncio.run(serve(gateway, f"unix:{args.socket}", args.worker, state, config_hash, relay, args.compiled))
    return 0

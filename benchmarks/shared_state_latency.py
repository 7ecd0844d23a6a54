"""How long a fact learned by one gateway takes to reach another gateway's table through Redis.

Usage: `python benchmarks/shared_state_latency.py [--redis redis://127.0.0.1:6379/0] [-n 200]`
(without --redis it starts Debian's redis-server on a free port). Two state services with a
`RedisStore` each, in one process: one learns a block, the time until the other's table holds it
is measured. Prints the median, p99 and worst case in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.config.runtime import SharedStore  # noqa: E402
from controlplane.config.schema import BlockScope  # noqa: E402
from controlplane.state.service import StateService  # noqa: E402
from controlplane.state.table import Block  # noqa: E402


async def measure(url: str, count: int) -> list[float]:
    spec = SharedStore(url=url, namespace=f"bench-{uuid.uuid4().hex[:8]}", hint=url)
    a, b = StateService("x", shared=spec), StateService("x", shared=spec)
    assert a.store is not None and b.store is not None
    tasks = [asyncio.create_task(a.store.run()), asyncio.create_task(b.store.run())]
    while a.store.health.state != "connected" or b.store.health.state != "connected":
        await asyncio.sleep(0.01)
    samples = []
    for i in range(count):
        block = Block(BlockScope.MODEL, f"m{i}", time.monotonic() + 60, "retry_after 429")
        started = time.perf_counter()
        if a.table.apply(block):
            a._learned([block], 0.0, source=None)  # what a worker's report does
        while not any(x.name == block.name for x in b.table.blocks.active(time.monotonic())):
            await asyncio.sleep(0.0002)
        samples.append((time.perf_counter() - started) * 1000)
    for task in tasks:
        task.cancel()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", help="a Redis URL (default: start redis-server on a free port)")
    parser.add_argument("-n", type=int, default=200)
    args = parser.parse_args()
    server = None
    url = args.redis
    if url is None:
        from tests.redisserver import RedisServer

        server = RedisServer(Path(tempfile.mkdtemp())).start()
        url = server.url
    try:
        samples = sorted(asyncio.run(measure(url, args.n)))
    finally:
        if server is not None:
            server.kill()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    print(f"gateway → Redis → gateway, {len(samples)} facts: median {statistics.median(samples):.2f} ms, "
          f"p99 {p99:.2f} ms, max {samples[-1]:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

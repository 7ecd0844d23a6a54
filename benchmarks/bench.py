"""sidestep vs plain Envoy, side by side in one run, on a fast local upstream.

    python benchmarks/bench.py [--duration 10] [--connections 16,64] [--workers N] [--gateway-key] [--no-metrics]

Starts (all on 127.0.0.1): a fast upstream (Envoy direct_response behind a buffer filter, so
connections stay alive; one port answers 200, another 429), a plain Envoy proxy to it, and a
sidestep stack (`sidestep up`). wrk posts a 1.1 KB chat body. Printed per scenario: requests/s,
p50/p99 latency, sidestep/plain ratios, and the ext_proc workers' CPU time per attempt (all
workers together; the control plane's state service is listed apart).

Scenarios: `happy` (one attempt per request) and `failover` (the primary answers 429, every
request fails over once: two attempts). `--gateway-key` configures `gateway_keys` and sends the
key with every request (the cost of authenticating clients). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.rundir import free_port  # noqa: E402
from controlplane.supervisor import envoy_binary  # noqa: E402

T = "type.googleapis.com/"
TCK = os.sysconf("SC_CLK_TCK")
BODY = json.dumps({"model": "MODEL", "stream": False, "temperature": 0.2, "messages": [
    {"role": "system", "content": "You are a terse assistant. " * 12},
    {"role": "user", "content": "Summarise the following text in one sentence: " + "lorem ipsum dolor " * 40},
]})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (default 10)")
    parser.add_argument("--connections", default="16,64", help="wrk connections, comma-separated")
    parser.add_argument("--workers", type=int, help="ext_proc workers (default: sidestep's own default)")
    parser.add_argument("--gateway-key", action="store_true", help="require a gateway key (and send it)")
    parser.add_argument("--no-metrics", action="store_true", help="`metrics: {enabled: false}` (no access-log "
                                                                 "stream to the metrics service)")
    args = parser.parse_args()
    key = GATEWAY_KEY if args.gateway_key else None
    wrk = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="sidestep-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    home = work / "home"
    try:
        ok_port, limited_port, plain_port, listen_port = (free_port() for _ in range(4))
        procs.append(start_envoy(upstream_config(ok_port, limited_port), work / "upstream.json", concurrency=1))
        config = work / "sidestep.yaml"
        config.write_text(SIDESTEP_CONFIG.format(port=listen_port, ok=ok_port, limited=limited_port)
                          + (f"gateway_keys: [{{name: bench, key: {key}}}]\n" if key else "")
                          + ("metrics: {enabled: false}\n" if args.no_metrics else ""))
        workers = ["--workers", str(args.workers)] if args.workers else []
        subprocess.run([sys.executable, "-m", "controlplane", "--home", str(home), "up", str(config), *workers],
                       check=True, stdout=subprocess.DEVNULL)
        concurrency = json.loads((home / "run" / "stack.json").read_text())["envoy_concurrency"]
        # plain Envoy gets the same worker count as sidestep's Envoy: the same share of the machine
        procs.append(start_envoy(plain_config(plain_port, ok_port), work / "plain.json", concurrency=concurrency))
        wait_ready(f"http://127.0.0.1:{plain_port}/v1/chat/completions")
        children = json.loads((home / "run" / "children.json").read_text())
        extproc_pids = [c["pid"] for name, c in children.items() if name.startswith("extproc")]
        envoy_pid, state_pid = children["envoy"]["pid"], children["state"]["pid"]

        print(f"sidestep benchmark: {os.cpu_count()} CPUs, Envoy --concurrency {concurrency} (both), "
              f"{len(extproc_pids)} ext_proc worker(s), wrk -t1, {args.duration}s per run, {len(BODY)} B body, "
              f"gateway key {'on' if key else 'off'}, metrics {'off' if args.no_metrics else 'on'}; "
              f"everything shares this machine\n")
        print(f"{'scenario':34s} {'conns':>5s} {'rps':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'non-2xx':>8s}"
              f"  {'ext_proc CPU/attempt':>20s}")
        for conns in [int(c) for c in args.connections.split(",")]:
            plain = run_wrk(wrk, work, f"http://127.0.0.1:{plain_port}/v1/chat/completions", "bench/ok", conns,
                            args.duration)
            report("plain Envoy → upstream", conns, plain)
            for name, model, attempts in (("happy", "bench/ok", 1), ("failover", "bench/limited", 2)):
                cpu0 = sum(map(cpu_seconds, extproc_pids)), cpu_seconds(envoy_pid), cpu_seconds(state_pid)
                result = run_wrk(wrk, work, f"http://127.0.0.1:{listen_port}/v1/chat/completions", model, conns,
                                 args.duration, key)
                cpu1 = sum(map(cpu_seconds, extproc_pids)), cpu_seconds(envoy_pid), cpu_seconds(state_pid)
                per_attempt = (cpu1[0] - cpu0[0]) / max(1, result["requests"] * attempts) * 1e6
                envoy_per_request = (cpu1[1] - cpu0[1]) / max(1, result["requests"]) * 1e6
                report(f"sidestep {name} ({attempts} attempt{'s' * (attempts > 1)})", conns, result,
                       f"{per_attempt:6.0f} µs (Envoy {envoy_per_request:.0f} µs/req, "
                       f"state service {cpu1[2] - cpu0[2]:.2f} s)")
                print(f"{'':34s} {'':>5s} ratio to plain Envoy: rps {result['rps'] / plain['rps']:.2f}, "
                      f"p50 {result['p50'] / plain['p50']:.1f}×, p99 {result['p99'] / plain['p99']:.1f}×")
            print()
    finally:
        subprocess.run([sys.executable, "-m", "controlplane", "--home", str(home), "down"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


GATEWAY_KEY = "gk-bench-0123456789abcdef"
SIDESTEP_CONFIG = """
listeners: [{{type: model, address: 127.0.0.1, port: {port}}}]
model_providers:
  - model: bench/ok
    base_url: http://127.0.0.1:{ok}
    access_key: sk-bench-0000000000000000
    retry_policy: {{default_strategy: same_model}}
  - model: bench/limited
    base_url: http://127.0.0.1:{limited}
    access_key: sk-bench-0000000000000000
    retry_policy:
      fallback_models: [other/ok]
      retry_after_handling: {{apply_to: request}}
  - model: other/ok
    base_url: http://127.0.0.1:{ok}
    access_key: sk-bench-1111111111111111
"""


def ensure_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (Debian package)…", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        if not shutil.which("wrk"):
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
        return shutil.which("wrk") or sys.exit("wrk did not install")
    sys.exit("the benchmark needs wrk: `apt-get install wrk` (or your OS's package)")


def upstream_config(ok_port: int, limited_port: int) -> dict:
    def listener(port: int, status: int, body: str) -> dict:
        hcm = {
            "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": f"up{status}",
            "route_config": {"virtual_hosts": [{"name": "u", "domains": ["*"], "routes": [{
                "match": {"prefix": "/"},
                "direct_response": {"status": status, "body": {"inline_string": body}},
                "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            }]}]},
            # read the whole body before answering, or Envoy closes the connection per request
            "http_filters": [{"name": "envoy.filters.http.buffer", "typed_config": {
                "@type": T + "envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 1 << 20}},
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
        }
        return {"name": f"up{status}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}]}

    ok = json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}}]})
    limited = json.dumps({"error": {"type": "rate_limit", "message": "slow down"}})
    return {"static_resources": {"listeners": [listener(ok_port, 200, ok), listener(limited_port, 429, limited)]}}


def plain_config(port: int, upstream: int) -> dict:
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "plain",
        "route_config": {"virtual_hosts": [{"name": "p", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "0s"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": T + "envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"static_resources": {
        "listeners": [{"name": "plain", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "1s",
                      "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {
                          "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}}],
    }}


def start_envoy(config: dict, path: Path, concurrency: int) -> subprocess.Popen[bytes]:
    path.write_text(json.dumps(config))
    return subprocess.Popen([envoy_binary(), "-c", str(path), "--disable-hot-restart", "-l", "error",
                             "--concurrency", str(concurrency)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str) -> None:
    for _ in range(100):
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{url} never answered")


def run_wrk(wrk: str, work: Path, url: str, model: str, conns: int, duration: int, key: str | None = None) -> dict:
    script = work / f"{model.replace('/', '_')}.lua"
    auth = f'wrk.headers["authorization"] = "Bearer {key}"\n' if key else ""
    script.write_text(f'wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n{auth}'
                      f'wrk.body = {json.dumps(BODY.replace("MODEL", model))}\n')
    out = subprocess.run([wrk, "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", out, re.M) and
                   [(p, _ms(v, u)) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)", out, re.M)])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "p50": latency["50"], "p99": latency["99"], "non2xx": int(non2xx.group(1)) if non2xx else 0}


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def report(label: str, conns: int, r: dict, cpu: str = "") -> None:
    print(f"{label:34s} {conns:5d} {r['rps']:8.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['non2xx']:8d}  {cpu}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TCK


if __name__ == "__main__":
    sys.exit(main())

"""`sidestep status`: the stack's processes, health, and the live shared state (blocks, key pools,
workers) read from the control plane's state service."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import grpc

from controlplane.rundir import RunDir
from controlplane.state.v1 import state_pb2 as pb
from controlplane.state.v1 import state_pb2_grpc as pb_grpc

__all__ = ["collect_status", "format_status", "healthz"]


def healthz(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def collect_status(rundir: RunDir) -> dict[str, Any]:
    """Everything `status` shows, as JSON-ready data (`status --json` prints exactly this)."""
    pid = rundir.supervisor_pid()
    stack = rundir.read_stack()
    running = pid is not None and stack is not None
    report: dict[str, Any] = {
        "running": running,
        "healthy": False,
        "supervisor_pid": pid,
        "listener": stack.listener_url if stack else None,
        "config": stack.config_source if stack else None,
        "config_hash": stack.config_hash if stack else None,
        "models": stack.models if stack else [],
        "gateway_keys": [{"name": n, "key": h} for n, h in stack.gateway_keys] if stack else [],
        "processes": {},
        "workers": [],
        "blocks": [],
        "key_pools": {},
        "state_service": None,
        "shared_state": {"url": stack.shared_state, "state": "unknown"} if stack and stack.shared_state else None,
        "logs": str(rundir.logs),
    }
    if not running or stack is None:
        return report
    report["healthy"] = healthz(stack.listener_url) == 200
    report["processes"] = rundir.read_children()
    snapshot = _snapshot(stack.state_socket)
    report["state_service"] = "up" if snapshot is not None else "unreachable"
    if snapshot is not None and snapshot.HasField("store"):
        store = snapshot.store
        report["shared_state"] = {"url": store.url, "namespace": store.namespace, "state": store.state,
                                  "detail": store.detail, "for_s": round(snapshot.now - store.since, 1),
                                  "published": store.published, "learned": store.learned}
    now = snapshot.now if snapshot is not None else time.time()
    facts = list(snapshot.facts) if snapshot is not None else []
    synced = {w.id: w for w in snapshot.workers} if snapshot is not None else {}
    for w in range(len(stack.extproc_sockets)):
        peer = synced.get(str(w))
        report["workers"].append({
            "id": str(w), "socket": stack.extproc_sockets[w],
            "pid": report["processes"].get(f"extproc-{w}", {}).get("pid"),
            "synced": peer is not None, "facts_reported": peer.reported if peer else 0,
            "config_hash": peer.config_hash if peer else None,
        })
    for fact in facts:
        if fact.HasField("block"):
            b = fact.block
            report["blocks"].append({"scope": b.scope, "name": b.name, "reason": b.reason,
                                     "remaining_s": round(b.until - now, 1)})
    keys = {(f.key.pool, f.key.key_id): f.key for f in facts if f.HasField("key")}
    for pool, members in stack.key_pools.items():
        states = []
        for key_id, hint in members:
            k = keys.get((pool, key_id))
            if k is not None and k.unauthorized:
                states.append({"key": hint, "state": "unauthorized", "status": k.status})
            elif k is not None and k.until > now:
                states.append({"key": hint, "state": "rate_limited", "status": k.status,
                               "remaining_s": round(k.until - now, 1)})
            else:
                states.append({"key": hint, "state": "ok"})
        report["key_pools"][pool] = states
    report["blocks"].sort(key=lambda b: (b["name"], b["scope"]))
    return report


def format_status(report: dict[str, Any]) -> str:
    if not report["running"]:
        return "sidestep is not running (start it with `sidestep up`)"
    health = "healthy" if report["healthy"] else "UNHEALTHY (/healthz does not answer 200)"
    lines = [f"sidestep is running on {report['listener']}: {health}",
             f"  config:  {report['config']} (hash {report['config_hash']})",
             f"  models:  {', '.join(report['models'])}",
             "  gateway keys: " + (", ".join(f"{k['name']} ({k['key']})" for k in report["gateway_keys"])
                                   or "none (no key required)"),
             "  processes:"]
    for name, child in report["processes"].items():
        state = f"pid {child['pid']:<8}" if child["pid"] else "DOWN (restarting)"
        died = f" (last exit {child['last_exit']})" if child.get("last_exit") is not None else ""
        lines.append(f"    {name:10s} {state} restarts {child['restarts']}{died}")
    state = report["state_service"]
    lines.append(f"  workers ({len(report['workers'])}, state service {state}):")
    for w in report["workers"]:
        sync = "synced" if w["synced"] else "NOT synced (serving on local state)"
        lines.append(f"    worker {w['id']}  pid {w['pid'] or '-'}  {sync}, "
                     f"{w['facts_reported']} facts reported")
    shared = report["shared_state"]
    if shared is None:
        lines.append("  shared state: this gateway only (no shared_state in the config)")
    elif shared["state"] == "unknown":
        lines.append(f"  shared state: {shared['url']} (state service unreachable)")
    else:
        detail = f": {shared['detail']}" if shared["detail"] else ""
        lines.append(f"  shared state: {shared['url']} namespace {shared['namespace']}: {shared['state'].upper()} "
                     f"for {shared['for_s']:.0f}s{detail}; {shared['published']} facts published, "
                     f"{shared['learned']} learned from other gateways")
    lines.append("  blocks:" if report["blocks"] else "  blocks:  none")
    for b in report["blocks"]:
        lines.append(f"    {b['scope']:8s} {b['name']:30s} {b['reason']:28s} {b['remaining_s']:.0f}s left")
    if report["key_pools"]:
        lines.append("  key pools:")
    for pool, keys in report["key_pools"].items():
        shown = []
        for k in keys:
            if k["state"] == "rate_limited":
                shown.append(f"{k['key']} rate-limited {k['remaining_s']:.0f}s ({k['status']})")
            elif k["state"] == "unauthorized":
                shown.append(f"{k['key']} unauthorized ({k['status']})")
            else:
                shown.append(f"{k['key']} ok")
        lines.append(f"    {pool}: " + " · ".join(shown))
    lines.append(f"  logs:    {report['logs']}")
    return "\n".join(lines)


def _snapshot(socket_path: str) -> pb.Snapshot | None:
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            return pb_grpc.StateStub(channel).Get(pb.SnapshotRequest(), timeout=2)
    except grpc.RpcError:
        return None

"""From a validated config to the files a stack runs from: for `sidestep up`, and for a live
`sidestep reload` (or SIGHUP to the supervisor) that changes a running stack without dropping a
request or a stream in flight.

A reload
1. validates the new config (every error, with its field path; nothing changes on an error);
2. refuses what only a restart can change (workers, stream repair, the body limit, the shared store);
3. renders Envoy's config, keeping the provider clusters and dispatch routes of the running config
   that the new one lacks (requests in flight may still retry through them), and has Envoy
   validate it;
4. writes the clusters, then the listeners (file-based xDS), each time waiting until Envoy has
   applied them: from then on every target of the new config can be routed;
5. writes the compiled config and the stack description, and tells the workers and the state
   service to load it (`notify`): new requests use the new config; requests in flight finish
   under the one they started with. Blocks and key states are facts about targets and keys by
   name and fingerprint: those of unchanged targets and keys are kept.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from controlplane import compiled as compiled_config
from controlplane.config import Gateway, LoadedConfig, parse_config
from controlplane.errors import StackError
from controlplane.render.envoy import Sockets, file_xds, render_envoy, with_previous
from controlplane.rundir import RunDir, StackInfo, write_private

__all__ = ["BUILTIN", "Plan", "check_port_free", "envoy_rejections", "install", "listener_url", "plan", "read_config",
           "rejected_anything", "rejection_reason", "reload", "validate_with_envoy", "with_listener"]

BUILTIN = "built-in defaults"
ENVOY_APPLY_TIMEOUT = 15.0


@dataclass(frozen=True)
class Plan:
    stack: StackInfo
    compiled: bytes  # `controlplane.compiled`; its hash is stack.config_hash
    envoy: dict[str, Any]  # Envoy's config as one static bootstrap (validated, golden-tested)


def read_config(path: str | None, defaults: tuple[str, ...] = ()) -> tuple[str, str]:
    """(where it came from, its text): `path`, the first of `defaults` that exists, or the built-in
    defaults. Raises ConfigError when the file cannot be read."""
    from controlplane.errors import ConfigError, ConfigIssue

    candidates = [path] if path else [name for name in defaults if Path(name).exists()]
    if candidates:
        try:
            return candidates[0], Path(candidates[0]).read_text()
        except OSError as exc:
            raise ConfigError([ConfigIssue("", f"cannot read {candidates[0]}: {exc.strerror}")]) from None
    return BUILTIN, (resources.files("controlplane") / "defaults" / "sidestep.yaml").read_text()


def with_listener(text: str, address: str, port: int) -> str:
    """The config with its model listener moved (`up --listen`, and each reload of a stack started so). The
    listener is then validated like any other (a public address still needs gateway_keys)."""
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        return text  # parse_config reports it
    listeners = raw.get("listeners")
    if not isinstance(listeners, list) or not listeners:
        listeners = raw["listeners"] = [{"type": "model"}]
    model = next((x for x in listeners if isinstance(x, dict) and x.get("type", "model") == "model"), None)
    if model is None:
        return text
    model["address"], model["port"] = address, port
    return yaml.safe_dump(raw, sort_keys=False)


def listener_url(address: str, port: int) -> str:
    """Where this machine reaches the listener."""
    host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def plan(rundir: RunDir, loaded: LoadedConfig, source: str, workers: int, concurrency: int,
         listen: tuple[str, int] | None = None) -> Plan:
    """`listen`: the listener `up --listen` moved the config's to (kept for reloads)."""
    gateway = loaded.gateway
    listener = gateway.listener
    sockets = Sockets.in_dir(str(rundir.sockets), workers)
    if not listener.repair_streams:
        sockets = replace(sockets, relay=(), relayed="")
    if not gateway.metrics:
        sockets = replace(sockets, metrics="", access_log="")
    envoy = render_envoy(gateway, sockets, str(rundir.logs))
    data = compiled_config.dump(compiled_config.Compiled(gateway, envoy, source))
    stack = StackInfo(
        config_source=source, listener_url=listener_url(listener.address, listener.port),
        listener_address=listener.address, listener_port=listener.port, admin_socket=sockets.admin,
        state_socket=str(rundir.socket("state")), extproc_sockets=list(sockets.extproc),
        config_hash=compiled_config.content_hash(data), models=list(gateway.targets),
        key_pools={t.key: [[k.id, k.hint] for k in t.keys] for t in gateway.targets.values() if t.pooled},
        envoy_concurrency=concurrency, gateway_keys=[[k.name, k.hint] for k in gateway.client_keys.values()],
        relay_sockets=list(sockets.relay), relayed_socket=sockets.relayed,
        shared_state=gateway.shared_state.hint if gateway.shared_state else "",
        metrics_socket=sockets.metrics, access_log_socket=sockets.access_log,
        listen=list(listen) if listen else None,
    )
    return Plan(stack, data, envoy)


def validate_with_envoy(rundir: RunDir, envoy: dict[str, Any], binary: str) -> None:
    """Envoy's own verdict on a rendered config, before anything running is changed."""
    candidate = rundir.run / "envoy.next.json"
    write_private(candidate, json.dumps(envoy, indent=1))
    try:
        result = subprocess.run([binary, "--mode", "validate", "-c", str(candidate), "-l", "error",
                                 "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    finally:
        candidate.unlink(missing_ok=True)
    if result.returncode != 0:
        detail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise StackError(f"Envoy rejects the rendered config (nothing was changed):\n{detail}")


def install(rundir: RunDir, text: str, plan: Plan, envoy: dict[str, Any] | None = None,
            applied: Callable[[str, str], None] | None = None) -> None:
    """Write the files the stack runs from. `envoy`: what Envoy gets, when it is not `plan.envoy`
    (a reload's, with the previous config's clusters kept). `applied(kind, version)`: called after
    each xDS file is written, to wait until a running Envoy has applied it (clusters first, so the
    listeners never name a cluster Envoy does not have yet)."""
    files = file_xds(envoy or plan.envoy, str(rundir.xds), plan.stack.config_hash)
    write_private(rundir.config, text)  # the stack runs this copy; editing the file needs `reload`
    write_private(rundir.envoy_config, json.dumps(files.pop("envoy.json"), indent=1))
    for name, content in files.items():  # in order: what each names exists before it
        write_private(rundir.xds / name, json.dumps(content, indent=1))
        if applied is not None:
            applied(name.removesuffix(".json"), plan.stack.config_hash)
    write_private(rundir.compiled, plan.compiled)
    rundir.write_stack(plan.stack)


def reload(rundir: RunDir, path: str | None, binary: str, notify: Callable[[], None]) -> tuple[Plan, LoadedConfig]:
    """Apply a new config to the running stack (see the module's docstring). `path`: the config
    file; by default the file the stack was started from, read again. Raises ConfigError (every
    problem) or StackError; on either the running stack is unchanged."""
    running = rundir.read_stack()
    if running is None or rundir.supervisor_pid() is None:
        raise StackError("sidestep is not running: start it with `sidestep up`")
    source, text = read_config(path or (None if running.config_source == BUILTIN else running.config_source))
    loaded = parse_config(text, source=source)
    listen = (running.listen[0], int(running.listen[1])) if running.listen else None
    if listen:  # `up --listen` moved the listener: so does every reload
        text = with_listener(text, *listen)
        loaded = parse_config(text, source=source)
    previous, _ = compiled_config.load(rundir.compiled)
    _check_reloadable(previous.gateway, loaded)
    new = plan(rundir, loaded, source, len(running.extproc_sockets), running.envoy_concurrency, listen)
    listener = loaded.gateway.listener
    if (listener.address, listener.port) != (running.listener_address, running.listener_port):
        check_port_free(listener.address, listener.port)
    envoy = with_previous(new.envoy, previous.envoy)
    validate_with_envoy(rundir, envoy, binary)
    kept = {file: file.read_bytes() for file in _stack_files(rundir) if file.exists()}
    rejected = {kind: envoy_rejections(running.admin_socket, kind) for kind in _xds_kinds(previous.envoy)}
    try:
        install(rundir, text, new, envoy, applied=lambda kind, version: wait_applied(
            rundir, running.admin_socket, kind, version, rejected.get(kind)))
    except StackError:
        for file, data in kept.items():  # Envoy kept the running config; so do the files
            write_private(file, data)
        raise
    notify()
    return new, loaded


def _stack_files(rundir: RunDir) -> list[Path]:
    return [rundir.config, rundir.compiled, rundir.envoy_config, *rundir.xds.glob("*.json"), rundir.stack_file]


def _xds_kinds(envoy: dict[str, Any]) -> list[str]:
    """The xDS files (without .json) of a rendered config: "cds", "rds-NAME"…, "lds"."""
    return [name.removesuffix(".json") for name in file_xds(envoy, "", "") if name != "envoy.json"]


def _check_reloadable(running: Gateway, loaded: LoadedConfig) -> None:
    new = loaded.gateway
    changed = []
    if new.listener.repair_streams != running.listener.repair_streams:
        changed.append("listeners[].repair_streams (the workers' stream relays)")
    if new.listener.max_request_body_bytes != running.listener.max_request_body_bytes:
        changed.append("listeners[].max_request_body_bytes (the workers' message limit)")
    if new.shared_state != running.shared_state:
        changed.append("shared_state (the state service's store)")
    if new.metrics != running.metrics:
        changed.append("metrics.enabled (the metrics service)")
    if changed:
        raise StackError("a reload cannot change " + ", ".join(changed) + "; nothing was changed. "
                         "Restart with `sidestep up` to apply it.")


def check_port_free(address: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            raise StackError(f"cannot listen on {address}:{port}: {exc.strerror}. Is another gateway "
                             f"running? Change listeners[].port or stop it.") from None


def _xds_stat(kind: str) -> str:
    """The admin stats prefix of an xDS file: "lds", "cds", or "rds-NAME" (an HCM whose stat
    prefix is its route config's name)."""
    if kind.startswith("rds-"):
        name = kind.removeprefix("rds-")
        return f"http.{name}.rds.{name}"
    return {"lds": "listener_manager.lds", "cds": "cluster_manager.cds"}[kind]


def _xds_name(kind: str) -> str:
    return {"lds": "listeners", "cds": "clusters"}.get(kind, f"routes ({kind.removeprefix('rds-')})")


def wait_applied(rundir: RunDir, admin_socket: str, kind: str, version: str, rejected_before: int | None,
                 timeout: float = ENVOY_APPLY_TIMEOUT) -> None:
    """Until Envoy reports `version` of its listeners (`kind` "lds"), clusters ("cds") or a route
    config ("rds-NAME"); a StackError with Envoy's reason as soon as it rejects them (a port it
    cannot bind). `rejected_before` None: a route config no listener uses yet, which Envoy reads
    when the listener that names it arrives (its warming waits for it)."""
    if rejected_before is None:
        return
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        stats = _xds_stats(admin_socket, kind)
        last = stats.get("version_text", "").strip('"')
        if last == version and _warming(admin_socket, kind) == 0:  # accepted, and serving (not still warming)
            return
        if int(stats.get("update_rejected", "0") or 0) > rejected_before:
            raise StackError(f"Envoy rejected the new {_xds_name(kind)} and keeps running the previous config: "
                             f"{rejection_reason(rundir)}")
        time.sleep(0.05)
    raise StackError(f"Envoy did not apply the new {_xds_name(kind)} within {timeout:.0f}s (it reports version "
                     f"{last or 'none'}); see `sidestep logs envoy`")


_WARMING = {"lds": "listener_manager.total_listeners_warming", "cds": "cluster_manager.warming_clusters"}


def _warming(admin_socket: str, kind: str) -> int:
    """Listeners or clusters Envoy has accepted but does not use yet (still initializing)."""
    stat = _WARMING.get(kind)
    if stat is None:
        return 0  # a route config is used as soon as it is accepted
    for line in admin_get(admin_socket, f"/stats?filter=^{stat}$").splitlines():
        name, _, value = line.partition(": ")
        if name == stat and value.strip().isdigit():
            return int(value)
    return 1  # not answered yet: ask again


def rejected_anything(admin_socket: str) -> bool:
    """Has Envoy rejected any of its listeners or route configs (at start: a port it cannot bind)?"""
    for line in admin_get(admin_socket, "/stats?filter=(lds|rds).*update_rejected$").splitlines():
        _, _, value = line.partition(": ")
        if value.strip().isdigit() and int(value) > 0:
            return True
    return False


def envoy_rejections(admin_socket: str, kind: str) -> int | None:
    """How many updates of an xDS file Envoy has rejected so far; None when it does not read it
    (yet): a route config no listener names."""
    value = _xds_stats(admin_socket, kind).get("update_rejected")
    return int(value) if value is not None and value.isdigit() else None


def rejection_reason(rundir: RunDir) -> str:
    """Envoy's last 'config rejected' log line, e.g. "listener 'model_listener' config rejected:
    cannot bind '127.0.0.1:12000': Address already in use"."""
    try:
        lines = rundir.log("envoy").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    rejected = [line for line in lines if "config rejected" in line]
    return rejected[-1].split("] ")[-1] if rejected else "see `sidestep logs envoy`"


def _xds_stats(admin_socket: str, kind: str) -> dict[str, str]:
    stat = _xds_stat(kind)
    found = {}
    for line in admin_get(admin_socket, f"/stats?filter=^{stat}\\.").splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(stat + "."):
            found[name[len(stat) + 1:]] = value.strip()
    return found


def admin_get(admin_socket: str, path: str) -> str:
    """GET `path` from Envoy's admin endpoint (a Unix socket)."""

    class _Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(admin_socket)

    connection = _Connection("envoy-admin", timeout=5)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode(errors="replace")
    except OSError:
        return ""
    finally:
        connection.close()

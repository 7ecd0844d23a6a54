"""`sidestep`: start, stop and inspect the gateway. `sidestep --help` lists the commands."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque

from controlplane import containers, deploy
from controlplane.config import LoadedConfig, load_config, parse_config
from controlplane.config.schema import SidestepConfig
from controlplane.errors import ConfigError, SidestepError, StackError
from controlplane.render.envoy import Sockets, render_envoy
from controlplane.rundir import RunDir, StackInfo, pid_alive, private_umask, write_private
from controlplane.status import collect_status, format_status, healthz
from controlplane.supervisor import envoy_binary

__all__ = ["main"]

DEFAULT_CONFIG_NAMES = ("sidestep.yaml", "sidestep.yml", "config.yaml")
LOG_NAMES = ("supervisor", "state", "extproc", "metrics", "envoy", "access")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        _err("invalid config:\n" + "\n".join(f"  ✗ {issue}" for issue in exc.issues))
        return 2
    except SidestepError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidestep", description="An LLM gateway that sidesteps provider failures.")
    parser.add_argument("--home", help="state and logs directory (default $SIDESTEP_HOME or ~/.sidestep)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    up = sub.add_parser("up", help="validate a config and start the gateway (restarts it if running)")
    up.add_argument("config", nargs="?", help="config file (default ./sidestep.yaml, else built-in defaults)")
    up.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the gateway")
    up.add_argument("--listen", metavar="ADDRESS:PORT", type=_address_port,
                    help="serve on this address and port instead of the config's model listener "
                         "(e.g. 0.0.0.0:12000 inside a container)")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for /healthz (default 30)")
    up.add_argument("--workers", type=int, help="ext_proc worker processes (default $SIDESTEP_WORKERS, "
                                                "else one per two cores)")
    _docker_options(up)
    up.add_argument("--image", default=os.environ.get("SIDESTEP_IMAGE", containers.DEFAULT_IMAGE),
                    help=f"with --docker: the image (default $SIDESTEP_IMAGE, else {containers.DEFAULT_IMAGE})")
    up.set_defaults(func=cmd_up)

    reload = sub.add_parser("reload", help="apply a changed config to the running gateway; nothing in flight "
                                           "is dropped, blocks and key states are kept")
    reload.add_argument("config", nargs="?", help="config file (default: the one the gateway runs, read again)")
    reload.add_argument("--timeout", type=float, default=15.0,
                        help="seconds to wait for every worker to take the new config (default 15)")
    _docker_options(reload)
    reload.set_defaults(func=cmd_reload)

    down = sub.add_parser("down", help="stop the gateway (safe to run when it is not running)")
    _docker_options(down)
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="is the gateway running, where, and how healthy")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _docker_options(status)
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="show the gateway's logs")
    logs.add_argument("component", nargs="?", choices=LOG_NAMES, help="one log (default: all but access)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines from the end (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    _docker_options(logs)
    logs.set_defaults(func=cmd_logs)

    validate = sub.add_parser("validate", help="check a config file: errors with field paths, warnings")
    validate.add_argument("config")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the config file's JSON Schema (for editors)")
    schema.set_defaults(func=cmd_schema)

    render = sub.add_parser("render", help="print the Envoy config a file renders to")
    render.add_argument("config")
    render.set_defaults(func=cmd_render)
    return parser


def _docker_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--docker", action="store_true",
                         help="the gateway in a container (Docker SDK; $DOCKER_HOST or the default socket)")
    command.add_argument("--name", default=containers.DEFAULT_NAME,
                         help=f"with --docker: the container's name (default {containers.DEFAULT_NAME})")


# ---- commands


def cmd_up(args: argparse.Namespace) -> int:
    """Check that the new config can start before touching a running stack; if the new stack still
    fails to come up, bring the previous one back and say exactly what failed."""
    private_umask()
    rundir = RunDir(args.home)
    source, text = deploy.read_config(args.config, DEFAULT_CONFIG_NAMES)
    loaded = parse_config(text, source=source)
    if args.listen:  # on the file that just validated: its YAML is known to be sane
        text = deploy.with_listener(text, *args.listen)
        loaded = parse_config(text, source=source)
    _print_warnings(loaded)
    if args.docker:
        return _up_docker(args, loaded, source, text)
    workers, concurrency = _workers(args.workers), _envoy_concurrency()  # bad values fail before a restart
    running = rundir.read_stack() if rundir.supervisor_pid() is not None else None
    listener = loaded.gateway.listener
    if running is None or running.listener_port != listener.port:  # the running stack's port will be free
        deploy.check_port_free(listener.address, listener.port)
    rundir.ensure()
    plan = deploy.plan(rundir, loaded, str(source), workers, concurrency, args.listen)
    stack = plan.stack
    deploy.validate_with_envoy(rundir, plan.envoy, envoy_binary())
    if args.foreground:
        if running is not None:
            print("sidestep is running; stopping it to run in the foreground")
            _stop(rundir)
        deploy.install(rundir, text, plan)
        print(f"sidestep starting in the foreground on {stack.listener_url} (Ctrl-C stops it)")
        from controlplane.supervisor import main as supervise

        return supervise([str(rundir.home)])
    if running is not None:
        print("sidestep is running; restarting it with the new config")
        rundir.keep_previous()
        _stop(rundir)
    deploy.install(rundir, text, plan)
    try:
        _start(rundir, stack, args.timeout)
    except StackError as failure:
        if running is None or not rundir.restore_previous():
            raise
        previous = rundir.read_stack()
        assert previous is not None
        try:
            _start(rundir, previous, args.timeout, fresh_logs=False)  # keep what the failed one logged
        except StackError as again:
            raise StackError(f"{failure}\n\nThe previous config did not come back either:\n{again}") from None
        raise StackError(f"{failure}\n\nThe previous config ({previous.config_source}) is serving again on "
                         f"{previous.listener_url}.") from None
    print(f"sidestep is up on {stack.listener_url}  ({len(stack.models)} models: {', '.join(stack.models)}; "
          f"{workers} ext_proc worker{'s' if workers > 1 else ''})")
    print(f"  config: {source}")
    print(f"  logs:   {rundir.logs}  (`sidestep logs`)")
    print("  stop:   sidestep down")
    return 0


def _address_port(value: str) -> tuple[str, int]:
    address, _, port = value.rpartition(":")
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: use ADDRESS:PORT, e.g. 127.0.0.1:12000 or 0.0.0.0:12000")
    return address.strip("[]"), int(port)


def _start(rundir: RunDir, stack: StackInfo, timeout: float, *, fresh_logs: bool = True) -> None:
    """Start the supervisor for the installed stack and wait until it is healthy."""
    rundir.children_file.unlink(missing_ok=True)  # a crashed stack's counts must not judge this one
    for name in LOG_NAMES:
        if fresh_logs or not rundir.log(name).exists():
            write_private(rundir.log(name), "")
    command = [sys.executable, "-m", "controlplane.supervisor", str(rundir.home)]
    with open(rundir.log("supervisor"), "ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    _wait_healthy(rundir, stack, process, timeout)


def _up_docker(args: argparse.Namespace, loaded: LoadedConfig, source: str, text: str) -> int:
    listener = loaded.gateway.listener
    url = deploy.listener_url(listener.address, listener.port)
    workers = _workers(args.workers) if args.workers is not None else None
    containers.up(text, source, url, image=args.image, name=args.name, workers=workers, timeout=args.timeout,
                  check_port=lambda: deploy.check_port_free(listener.address, listener.port))
    print(f"sidestep is up on {url} in container {args.name} ({args.image}; {len(loaded.gateway.targets)} models)")
    print(f"  config: {source} (copied into the container)")
    print("  logs:   sidestep logs --docker")
    print("  stop:   sidestep down --docker")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    if args.docker:  # the container's own `sidestep reload`, with FILE copied in first
        return containers.reload(args.name, deploy.read_config(args.config)[1] if args.config else None)
    private_umask()
    rundir = RunDir(args.home)
    pid = rundir.supervisor_pid()
    if pid is None:
        raise StackError("sidestep is not running: start it with `sidestep up`")
    plan, loaded = deploy.reload(rundir, args.config, envoy_binary(), notify=lambda: os.kill(pid, signal.SIGUSR1))
    _print_warnings(loaded)
    stack = plan.stack
    deadline = time.monotonic() + args.timeout
    while True:
        report = collect_status(rundir)
        behind = [w["id"] for w in report["workers"] if w.get("config_hash") != stack.config_hash]
        if not behind:
            break
        if time.monotonic() > deadline:
            raise StackError(f"Envoy runs the new config, but worker(s) {', '.join(behind)} did not take it within "
                             f"{args.timeout:.0f}s; see `sidestep logs extproc`")
        time.sleep(0.1)
    print(f"sidestep reloaded on {stack.listener_url}: {stack.config_source} (config {stack.config_hash}; "
          f"{len(stack.models)} models: {', '.join(stack.models)})")
    print("  requests in flight finish under the previous config; blocks and key states of unchanged "
          "targets and keys are kept")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.docker:
        print(f"container {args.name} stopped and removed" if containers.down(args.name)
              else f"no sidestep container named {args.name}")
        return 0
    rundir = RunDir(args.home)
    if rundir.supervisor_pid() is None:
        print("sidestep is not running")
        return 0
    _stop(rundir)
    print("sidestep stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.docker:
        return containers.status(args.name, args.json)
    rundir = RunDir(args.home)
    report = collect_status(rundir)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0 if report["running"] else 3


def cmd_logs(args: argparse.Namespace) -> int:
    if args.docker:
        containers.logs(args.name, args.component, args.lines, args.follow)
        return 0
    rundir = RunDir(args.home)
    names = [args.component] if args.component else [n for n in LOG_NAMES if n != "access"]
    paths = [rundir.log(n) for n in names if rundir.log(n).exists()]
    if not paths:
        print(f"no logs in {rundir.logs} yet (start with `sidestep up`)")
        return 0
    for path in paths:
        if len(paths) > 1:
            print(f"==> {path} <==")
        with open(path, errors="replace") as f:
            sys.stdout.writelines(deque(f, maxlen=args.lines))
    if args.follow:
        files = {p: open(p, errors="replace") for p in paths}
        for f in files.values():
            f.seek(0, os.SEEK_END)
        while True:
            for path, f in files.items():
                for line in f:
                    sys.stdout.write(line if len(paths) == 1 else f"{path.stem}: {line}")
            sys.stdout.flush()
            time.sleep(0.3)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    _print_warnings(loaded)
    gateway = loaded.gateway
    with_policy = sum(1 for t in gateway.targets.values() if t.policy)
    print(f"{args.config}: OK — {len(gateway.targets)} models ({with_policy} with a retry policy), "
          f"listener {gateway.listener.address}:{gateway.listener.port}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(SidestepConfig.model_json_schema(), indent=2))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    loaded = load_config(args.config)
    rundir = RunDir(args.home)
    print(json.dumps(render_envoy(loaded.gateway, Sockets.in_dir(str(rundir.sockets), 1), str(rundir.logs)),
                     indent=1))
    return 0


# ---- helpers


def _envoy_concurrency() -> int:
    """Envoy worker threads: the cores the ext_proc does not need. On a 2-core machine two Envoy
    workers fighting the Python ext_proc for CPU halved throughput (benchmarks/bench.py)."""
    return _count("SIDESTEP_ENVOY_CONCURRENCY", None, default=max(1, (os.cpu_count() or 2) - 1))


def _workers(requested: int | None) -> int:
    """ext_proc worker processes: one per two cores by default (each is one Python process, and
    Envoy and the providers' traffic need CPU too); $SIDESTEP_WORKERS or --workers to choose."""
    return _count("SIDESTEP_WORKERS", requested, default=max(1, (os.cpu_count() or 2) // 2), flag="--workers")


def _count(variable: str, given: int | None, *, default: int, flag: str | None = None) -> int:
    """A process count from a flag, else the environment, else `default`; 1 to 64."""
    where = flag or variable
    if given is None and os.environ.get(variable):
        where = f"${variable}"
        try:
            given = int(os.environ[variable])
        except ValueError:
            raise StackError(f"{where} must be a whole number, not {os.environ[variable]!r}") from None
    if given is None:
        return default
    if not 1 <= given <= 64:
        raise StackError(f"{where} must be between 1 and 64, not {given}")
    return given


def _print_warnings(loaded: LoadedConfig) -> None:
    for warning in loaded.warnings:
        _err(f"  ! {warning}")


def _wait_healthy(rundir: RunDir, stack: StackInfo, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"sidestep failed to start:\n{_tails(rundir)}")
        children = rundir.read_children()
        crashing = [name for name, c in children.items() if c["restarts"] > 2]
        if crashing:
            _stop(rundir)
            raise StackError(f"sidestep failed to start: {', '.join(crashing)} keeps crashing:\n{_tails(rundir)}")
        if healthz(stack.listener_url) == 200:
            return
        if deploy.rejected_anything(stack.admin_socket):  # Envoy runs, but could not listen (or route)
            _stop(rundir)
            raise StackError(f"sidestep failed to start: Envoy rejected its listeners: "
                             f"{deploy.rejection_reason(rundir)}\n{_tails(rundir)}")
        time.sleep(0.1)
    _stop(rundir)
    raise StackError(f"sidestep did not become healthy within {timeout:.0f}s:\n{_tails(rundir)}")


def _stop(rundir: RunDir, timeout: float = 15.0) -> None:
    pid = rundir.supervisor_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)  # its children get SIGTERM from the kernel (PR_SET_PDEATHSIG)
    rundir.pid_file.unlink(missing_ok=True)


def _tails(rundir: RunDir, lines: int = 15) -> str:
    out = []
    for name in ("supervisor", "extproc", "envoy"):
        path = rundir.log(name)
        if path.exists() and path.stat().st_size:
            with open(path, errors="replace") as f:
                tail = "".join(deque(f, maxlen=lines))
            out.append(f"--- {path} (last lines)\n{tail}")
    return "\n".join(out) or "(no logs)"


def _err(message: str) -> None:
    print(message, file=sys.stderr)

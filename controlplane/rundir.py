"""Where a running stack keeps its files: `$SIDESTEP_HOME` (default `~/.sidestep`).

    run/config.yaml      the config the stack runs (a copy: editing your file does nothing until `up`)
    run/envoy.json       Envoy's rendered bootstrap
    run/stack.json       ports, listener, config hash; written by `up`
    run/children.json    the supervisor's view of its children (pids, restarts)
    run/supervisor.pid
    logs/{supervisor,state,extproc,envoy,access}.log   (all ext_proc workers write extproc.log)
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["RunDir", "StackInfo", "free_port", "pid_alive"]


@dataclass(frozen=True)
class StackInfo:
    config_source: str  # the file the user passed (or "built-in defaults")
    listener_url: str
    admin_port: int
    state_port: int  # the control plane's state service
    extproc_ports: list[int]  # one per ext_proc worker
    config_hash: str
    models: list[str]
    key_pools: dict[str, list[list[str]]]  # target → [key id, masked hint] in pool order
    envoy_concurrency: int


class RunDir:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home or os.environ.get("SIDESTEP_HOME") or Path.home() / ".sidestep")
        self.run = self.home / "run"
        self.logs = self.home / "logs"

    def ensure(self) -> RunDir:
        self.run.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def config(self) -> Path:
        return self.run / "config.yaml"

    @property
    def envoy_config(self) -> Path:
        return self.run / "envoy.json"

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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

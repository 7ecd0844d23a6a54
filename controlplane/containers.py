"""`sidestep up|down|status|logs --docker`: the same gateway, in a container, through the Docker SDK.

The container runs the image built from the repository's Dockerfile (`scripts/build-image`, or
`docker compose build`) with `sidestep up --foreground /config/config.yaml` as its command. It
shares the host's network: the listener binds exactly the address the config names (127.0.0.1
stays private to the machine), and `host.docker.internal` resolves to the host, so Plano files
written for Docker reach providers and Redis on the host unchanged. The config is copied into the
container (owned by its non-root user, mode 0400) rather than bind-mounted, so a private 0600 file
works; the environment variables it references are passed from the caller's environment.
"""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
from typing import Any

from controlplane.config.runtime import env_references
from controlplane.errors import StackError
from controlplane.status import healthz

__all__ = ["DEFAULT_IMAGE", "DEFAULT_NAME", "down", "logs", "reload", "status", "up"]

DEFAULT_IMAGE = "sidestep:latest"
DEFAULT_NAME = "sidestep"
LABEL = "io.sidestep.gateway"  # marks the containers `up --docker` made: `down --docker` removes only these
CONFIG_DIR = "/config"
CONTAINER_UID = 10001  # the image's `sidestep` user (Dockerfile)


def engine() -> Any:
    """A Docker SDK client for $DOCKER_HOST (or the default socket), or a clear error."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except DockerException as exc:
        where = os.environ.get("DOCKER_HOST") or "the default socket (/var/run/docker.sock)"
        raise StackError(f"no Docker engine is reachable at {where}: {exc}\n"
                         f"Start Docker (or set DOCKER_HOST), or run `sidestep up` without --docker "
                         f"to run local processes.") from None


def up(text: str, source: str, url: str, *, image: str, name: str, workers: int | None,
       timeout: float, check_port: Any) -> None:
    """Start the gateway container for `text` (a validated config) and wait until `url` is healthy.
    A container of the same name that `up --docker` made before is replaced."""
    from docker.errors import ImageNotFound

    client = engine()
    try:
        client.images.get(image)
    except ImageNotFound:
        raise StackError(f"image {image} not found: build it with `scripts/build-image` (or "
                         f"`docker compose build`), or name another with --image") from None
    previous = _ours(client, name)
    if previous is not None:
        print(f"replacing the running container {name}")
        previous.remove(force=True)
    check_port()  # host networking: the listener's port must be free on this machine
    env = {var: os.environ[var] for var in env_references(text) if var in os.environ}
    if workers is not None:
        env["SIDESTEP_WORKERS"] = str(workers)
    container = client.containers.create(
        image, ["up", "--foreground", f"{CONFIG_DIR}/config.yaml"], name=name, detach=True, init=True,
        network_mode="host", extra_hosts={"host.docker.internal": "127.0.0.1"}, environment=env,
        labels={LABEL: source}, restart_policy={"Name": "unless-stopped"})
    container.put_archive(CONFIG_DIR, _config_tar(text))
    container.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead") or container.attrs["State"].get("Restarting"):
            tail = container.logs(tail=20).decode(errors="replace")
            container.remove(force=True)
            raise StackError(f"the container {name} exited during start-up:\n{tail}")
        if healthz(url) == 200:
            return
        time.sleep(0.2)
    tail = container.logs(tail=20).decode(errors="replace")
    raise StackError(f"the container {name} did not become healthy at {url}/healthz within {timeout:.0f}s "
                     f"(it is still running: `sidestep logs --docker`, `sidestep down --docker`):\n{tail}")


def reload(name: str, text: str | None) -> int:
    """`sidestep reload` inside the container; with `text`, that config is copied in first. The
    container validates it with its own environment (the variables passed at `up --docker`)."""
    container = _running(name)
    if text is not None:
        container.put_archive(CONFIG_DIR, _config_tar(text))
    result = container.exec_run(["sidestep", "reload"], stream=False, demux=True)
    out, err = result.output
    sys.stdout.write((out or b"").decode(errors="replace"))
    sys.stderr.write((err or b"").decode(errors="replace"))
    return int(result.exit_code or 0)


def down(name: str) -> bool:
    """Stop and remove the container; False when there was none."""
    client = engine()
    container = _ours(client, name)
    if container is None:
        return False
    container.stop(timeout=10)
    container.remove(force=True)
    return True


def status(name: str, json_output: bool) -> int:
    """`sidestep status` inside the container, plus the container's own state."""
    container = _running(name)
    health = container.attrs["State"].get("Health", {}).get("Status", "no healthcheck")
    result = container.exec_run(["sidestep", "status", *(["--json"] if json_output else [])])
    if not json_output:
        print(f"container {container.name} ({container.image.tags[0] if container.image.tags else container.image.id[:19]})"
              f": {container.status}, docker health {health}")
    sys.stdout.write(result.output.decode(errors="replace"))
    return int(result.exit_code or 0)


def logs(name: str, component: str | None, lines: int, follow: bool) -> None:
    """The supervisor's output (the container's log), then the components' logs inside it."""
    container = _running(name)
    if component in (None, "supervisor"):
        print("==> supervisor (container log) <==")
        sys.stdout.write(container.logs(tail=lines).decode(errors="replace"))
    if component == "supervisor":
        return
    command = ["sidestep", "logs", "-n", str(lines), *([component] if component else []), *(["-f"] if follow else [])]
    result = container.exec_run(command, stream=True)
    for chunk in result.output:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()


def _running(name: str) -> Any:
    container = _ours(engine(), name)
    if container is None or container.status != "running":
        raise StackError(f"no sidestep container named {name} is running (start one with `sidestep up --docker`)")
    return container


def _ours(client: Any, name: str) -> Any:
    """The container `up --docker` made under `name`, if any. One of that name not made by sidestep
    is the user's, and is never touched."""
    for container in client.containers.list(all=True, filters={"name": f"^/{name}$"}):
        if LABEL in container.labels:
            return container
        raise StackError(f"a container named {name} exists and was not started by sidestep; "
                         f"choose another with --name")
    return None


def _config_tar(text: str) -> bytes:
    """config.yaml for the container's user only (the file may hold keys)."""
    data = text.encode()
    info = tarfile.TarInfo("config.yaml")
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o400, CONTAINER_UID, CONTAINER_UID, time.time()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()

"""The gateway in containers, on a real Docker engine: the image, `docker compose up` of the
repository's own compose file (plus the host-network override), and `sidestep up|down --docker`.

The engine is the one running, else one scripts/docker-engine starts (root; stopped again at the
end). The images are built here from this tree: sidestep:latest by scripts/build-image (wheels built
on the host, installed offline), and a Redis image from Debian's redis-server, since no registry
can be pulled from. Providers are the usual mocks on 127.0.0.1: containers share the host network.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from controlplane.rundir import free_port
from tests.e2e.conftest import run_cli, wait_for
from tests.mockprovider import MockProvider, Reply
from tests.wiremock import AnthropicMessagesMock, OpenAIChatMock
from tests.wiremock import Reply as WireReply

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "sidestep:latest"  # the name docker-compose.yaml and `up --docker` use by default
REDIS_IMAGE = "sidestep-redis:test"


def sh(*command: str, env: dict[str, str] | None = None, timeout: float = 600,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    started_here = sh("scripts/docker-engine", "env", check=False).returncode != 0
    host = sh("scripts/docker-engine", "start", timeout=120).stdout.strip()
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = host  # for the CLI, compose and the SDK alike
    try:
        sh("scripts/build-image", IMAGE, timeout=900)
        sh("docker", "build", "--network", "host", "-q", "-t", REDIS_IMAGE, "-f", "tests/docker/redis.Dockerfile",
           "tests/docker", timeout=600)
        yield host
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        if started_here:
            sh("scripts/docker-engine", "stop", check=False, timeout=120)


def test_the_image_runs_as_a_non_root_user_and_is_small(docker_host: str) -> None:
    assert sh("docker", "run", "--rm", "--entrypoint", "id", IMAGE, "-u").stdout.strip() == "10001"
    inspect = json.loads(sh("docker", "image", "inspect", IMAGE).stdout)[0]
    assert inspect["Config"]["Healthcheck"]["Test"][0] == "CMD"
    size_mb = inspect["Size"] / 1e6
    print(f"image {IMAGE}: {size_mb:.0f} MB")
    assert size_mb < 400, size_mb


# ---- docker compose up


COMPOSE_CONFIG = """
listeners: [{type: model, port: 12000, attempt_timeout: 10s}]
shared_state: {redis_url: $SIDESTEP_REDIS_URL}
model_providers:
  - {model: a/limited, base_url: "http://host.docker.internal:%(a)d", access_key: sk-a-0123456789abcdef,
     retry_policy: {fallback_models: [b/fallback]}}
  - {model: b/fallback, base_url: "http://host.docker.internal:%(b)d", access_key: $OPENAI_API_KEY}
"""


@pytest.fixture
def compose(docker_host: str, tmp_path: Path, providers: dict[str, MockProvider]) -> Iterator[dict[str, str]]:
    """`docker compose up` of the repository's compose file with the host-network override and the
    second gateway: the config, ports and images chosen through the variables the file documents."""
    config = tmp_path / "gateway.yaml"
    config.write_text(COMPOSE_CONFIG % {"a": providers["a"].port, "b": providers["b"].port})
    config.chmod(0o644)
    env = {"COMPOSE_PROJECT_NAME": f"sidestep-test-{uuid.uuid4().hex[:6]}", "SIDESTEP_CONFIG": str(config),
           "SIDESTEP_PORT": str(free_port()), "SIDESTEP_PORT_2": str(free_port()),
           "SIDESTEP_REDIS_PORT": str(free_port()), "SIDESTEP_IMAGE": IMAGE, "SIDESTEP_REDIS_IMAGE": REDIS_IMAGE,
           "OPENAI_API_KEY": "sk-b-from-the-environment"}  # compose passes it (see docker-compose.yaml)
    files = ["-f", "docker-compose.yaml", "-f", "docker-compose.host.yaml", "--profile", "replicas"]
    try:
        sh("docker", "compose", *files, "up", "-d", env=env, timeout=180)
        for port in (env["SIDESTEP_PORT"], env["SIDESTEP_PORT_2"]):
            try:
                wait_for(lambda p=port: _healthy(f"http://127.0.0.1:{p}"), f"the gateway on {port}", timeout=60)
            except AssertionError as exc:
                logs = sh("docker", "compose", *files, "logs", "--no-color", env=env, check=False).stdout
                raise AssertionError(f"{exc}\n{logs[-4000:]}") from None
        for service in ("gateway", "gateway-2"):
            wait_for(lambda s=service: _store_state(files, env, s) == "connected", f"{service} to reach Redis", 30)
        yield env
    finally:
        down = sh("docker", "compose", *files, "down", "--remove-orphans", "-t", "10", env=env, check=False)
        assert down.returncode == 0, down.stderr


def _store_state(files: list[str], env: dict[str, str], service: str) -> str:
    """The shared store's state as `sidestep status` inside the service's container reports it
    ("connected" only once its workers are synced with its state service too)."""
    result = sh("docker", "compose", *files, "exec", "-T", service, "sidestep", "status", "--json", env=env,
                check=False)
    try:
        report = json.loads(result.stdout)
        synced = all(w["synced"] for w in report["workers"])
        return report["shared_state"]["state"] if synced else "workers not synced"
    except (ValueError, KeyError, TypeError):
        return ""


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_compose_up_fails_over_and_two_replicas_share_state(compose: dict[str, str], providers) -> None:
    providers["a"].script(Reply(429, retry_after="60"), Reply(200))
    first = openai.OpenAI(base_url=f"http://127.0.0.1:{compose['SIDESTEP_PORT']}/v1", api_key="unused",
                          max_retries=0)
    raw = first.chat.completions.with_raw_response.create(
        model="a/limited", messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-sidestep-model"] == "b/fallback" and raw.headers["x-sidestep-attempts"] == "2"
    assert raw.parse().choices[0].message.content
    assert providers["b"].requests[-1].headers["authorization"] == "Bearer sk-b-from-the-environment"
    # the second replica learned the block through the compose project's Redis
    second = openai.OpenAI(base_url=f"http://127.0.0.1:{compose['SIDESTEP_PORT_2']}/v1", api_key="unused",
                           max_retries=0)
    time.sleep(0.5)
    for _ in range(3):
        raw = second.chat.completions.with_raw_response.create(
            model="a/limited", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-sidestep-model"] == "b/fallback" and raw.headers["x-sidestep-attempts"] == "1"
    assert len(providers["a"].requests) == 1


# ---- sidestep up --docker


PLANO = """
version: v0.3.0
listeners:
  - type: model
    name: model_listener
    port: %(port)d
    timeout: 30s
model_providers:
  - model: openai/gpt-4o
    base_url: http://host.docker.internal:%(a)d
    access_key: ${OPENAI_API_KEY}
    default: true
    retry_policy:
      fallback_models: [anthropic/claude-sonnet-4-5]
      default_strategy: different_provider
      default_max_attempts: 2
      on_status_codes:
        - codes: ["500-504"]
          strategy: different_provider
          max_attempts: 2
  - model: anthropic/claude-sonnet-4-5
    base_url: http://host.docker.internal:%(b)d
    provider_interface: claude
    access_key: ${ANTHROPIC_API_KEY}
tracing:
  random_sampling: 100
"""


def test_up_docker_runs_a_plano_file_and_down_removes_it(docker_host: str, tmp_path: Path, providers) -> None:
    port = free_port()
    name = f"sidestep-test-{uuid.uuid4().hex[:6]}"
    env = {"SIDESTEP_IMAGE": IMAGE, "OPENAI_API_KEY": "sk-openai-0123456789", "ANTHROPIC_API_KEY": "sk-ant-0123456789"}
    home = ["--home", str(tmp_path / "home")]
    primary, fallback = OpenAIChatMock("openai").start(), AnthropicMessagesMock("anthropic").start()
    try:
        config = tmp_path / "plano.yaml"
        config.write_text(PLANO % {"port": port, "a": primary.port, "b": fallback.port})
        config.chmod(0o600)  # a private file is copied in, not mounted: the container's user reads it
        try:
            up = run_cli(*home, "up", "--docker", "--name", name, str(config), env=env)
            assert f"sidestep is up on http://127.0.0.1:{port} in container {name}" in up.stdout
            assert "sk-openai-0123456789" not in up.stdout + up.stderr
            primary.script(WireReply(503))
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["x-sidestep-model"] == "anthropic/claude-sonnet-4-5"  # 503 → Anthropic, translated
            assert raw.parse().choices[0].message.content
            assert fallback.requests[-1].headers["x-api-key"] == "sk-ant-0123456789"
            status = run_cli(*home, "status", "--docker", "--name", name, env=env)
            assert f"container {name}" in status.stdout and "healthy" in status.stdout
            logs = run_cli(*home, "logs", "--docker", "--name", name, "-n", "5", env=env)
            assert "supervisor" in logs.stdout
            # a changed file, reloaded into the running container
            changed = tmp_path / "changed.yaml"
            changed.write_text(config.read_text().replace("tracing:", "  - {model: openai/gpt-4.1, base_url: "
                               f"'http://host.docker.internal:{primary.port}', access_key: $OPENAI_API_KEY}}\ntracing:"))
            reloaded = run_cli(*home, "reload", "--docker", "--name", name, str(changed), env=env)
            assert "sidestep reloaded" in reloaded.stdout, reloaded.stdout + reloaded.stderr
            primary.script(WireReply(200))
            assert client.chat.completions.create(model="openai/gpt-4.1", messages=[
                {"role": "user", "content": "hi"}]).choices[0].message.content
            again = run_cli(*home, "up", "--docker", "--name", name, str(config), env=env)  # replaces it
            assert f"replacing the running container {name}" in again.stdout
        finally:
            down = run_cli(*home, "down", "--docker", "--name", name, env=env, check=False)
        assert down.returncode == 0 and f"container {name} stopped and removed" in down.stdout
        assert not _healthy(f"http://127.0.0.1:{port}")
        gone = run_cli(*home, "down", "--docker", "--name", name, env=env)
        assert f"no sidestep container named {name}" in gone.stdout
    finally:
        primary.stop()
        fallback.stop()


def test_up_docker_refuses_a_container_it_did_not_make(docker_host: str, tmp_path: Path) -> None:
    name = f"not-ours-{uuid.uuid4().hex[:6]}"
    sh("docker", "create", "--name", name, "--entrypoint", "true", IMAGE)
    try:
        result = run_cli("--home", str(tmp_path), "up", "--docker", "--name", name, check=False)
        assert result.returncode == 1 and "was not started by sidestep" in result.stderr
        result = run_cli("--home", str(tmp_path), "down", "--docker", "--name", name, check=False)
        assert result.returncode == 1 and "was not started by sidestep" in result.stderr
        assert sh("docker", "inspect", name).returncode == 0  # untouched
    finally:
        sh("docker", "rm", "-f", name, check=False)


def test_no_engine_is_a_clear_error(tmp_path: Path) -> None:
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    for command in (["up", "--docker"], ["down", "--docker"], ["logs", "--docker"], ["status", "--docker"]):
        result = run_cli("--home", str(tmp_path), *command, env=env, check=False)
        assert result.returncode == 1, result
        assert result.stderr.startswith(f"no Docker engine is reachable at unix://{tmp_path}/no-docker.sock")
        assert "without --docker" in result.stderr and "Traceback" not in result.stderr

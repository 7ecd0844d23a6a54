"""Data-plane test harness: real Envoy, real ext_proc, real supervisor, started by the real CLI.

Only the LLM providers are mocks (tests/mockprovider.py), on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from controlplane.rundir import free_port
from tests.mockprovider import MockProvider

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    home: Path
    url: str
    client: httpx.Client

    def sidestep(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli("--home", str(self.home), *args, check=check)

    def chat(self, body: dict | bytes, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions",
             timeout: float = 30) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.client.post(self.url + path, content=content, timeout=timeout,
                                headers={"content-type": "application/json", **(headers or {})})

    def status(self) -> dict:
        return json.loads(self.sidestep("status", "--json", check=False).stdout)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run_cli(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True,
                            timeout=90, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"sidestep {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def providers() -> Iterator[dict[str, MockProvider]]:
    mocks = {name: MockProvider(name).start() for name in ("a", "b", "c")}
    yield mocks
    for mock in mocks.values():
        mock.stop()


@pytest.fixture(autouse=True)
def _reset_providers(providers: dict[str, MockProvider]) -> None:
    for mock in providers.values():
        mock.script()


def start_stack(tmp: Path, config: str, port: int, *up_args: str) -> Stack:
    path = tmp / "sidestep.yaml"
    path.write_text(config)
    home = tmp / "home"
    run_cli("--home", str(home), "up", str(path), *up_args)
    return Stack(home=home, url=f"http://127.0.0.1:{port}", client=httpx.Client())


def stack_for(tmp_path_factory: pytest.TempPathFactory, template: str, mocks: dict) -> Iterator[Stack]:
    """A stack for a module (`yield from` it in a module-scoped fixture): `{port}` in the template is
    a free listener port, `{name}` each mock's URL."""
    port = free_port()
    config = template.format(port=port, **{name: mock.url for name, mock in mocks.items()})
    stack = start_stack(tmp_path_factory.mktemp("stack"), config, port)
    yield stack
    stack.client.close()
    stack.sidestep("down", check=False)


@pytest.fixture
def make_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """`make_stack(config_template)`: `{port}` in the template becomes a free listener port."""
    stacks: list[Stack] = []

    def make(template: str, *up_args: str, **values: object) -> Stack:
        port = free_port()
        stack = start_stack(tmp_path_factory.mktemp("stack"), template.format(port=port, **values), port, *up_args)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.client.close()
        stack.sidestep("down", check=False)

"""The container mode's pure pieces: the config copied into the container, and `up --listen`."""

from __future__ import annotations

import argparse
import io
import tarfile

import pytest
import yaml

from controlplane.cli import _address_port
from controlplane.config import parse_config
from controlplane.containers import CONTAINER_UID, _config_tar
from controlplane.deploy import with_listener as _with_listener


def test_the_config_is_copied_in_for_the_containers_user_only() -> None:
    with tarfile.open(fileobj=io.BytesIO(_config_tar("listeners: []\n"))) as tar:
        (member,) = tar.getmembers()
        assert member.name == "config.yaml" and member.mode == 0o400
        assert (member.uid, member.gid) == (CONTAINER_UID, CONTAINER_UID)
        assert tar.extractfile(member).read() == b"listeners: []\n"


@pytest.mark.parametrize("value, parsed", [("127.0.0.1:12000", ("127.0.0.1", 12000)),
                                           ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:8080", ("::1", 8080))])
def test_listen_values(value: str, parsed: tuple[str, int]) -> None:
    assert _address_port(value) == parsed


@pytest.mark.parametrize("value", ["12000", ":12000", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "h:x"])
def test_bad_listen_values(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="ADDRESS:PORT"):
        _address_port(value)


def test_listen_moves_only_the_model_listener_and_keeps_everything_else() -> None:
    text = """
listeners:
  - {type: prompt, port: 10000}
  - {type: model, port: 12000, attempt_timeout: 5s}
model_providers: [{model: openai/gpt-4o, access_key: $KEY}]
"""
    moved = yaml.safe_load(_with_listener(text, "127.0.0.1", 13000))
    assert moved["listeners"] == [{"type": "prompt", "port": 10000},
                                  {"type": "model", "port": 13000, "attempt_timeout": "5s", "address": "127.0.0.1"}]
    assert moved["model_providers"][0]["access_key"] == "$KEY"  # expanded later, as always
    no_listeners = _with_listener("model_providers: [{model: openai/gpt-4o, access_key: sk-0123456789abcdef}]",
                                  "0.0.0.0", 12000)
    assert parse_config(no_listeners.replace("address: 0.0.0.0", "address: 127.0.0.1")).gateway.listener.port == 12000

"""Unit tests are pure logic: any attempt to open a network connection fails the test, and no test
depends on (or leaks into another) the environment: main() reads no .env unless a test gives it one,
and os.environ is restored after each test, whatever main() loaded into it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("unit tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def _no_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """main() reads no .env (the checkout's holds whatever its user put there); a test that wants
    one points `main.env_file` at it. The environment as it was is restored afterwards."""
    import main

    nowhere = tmp_path_factory.mktemp("no-env") / ".env"  # never created
    monkeypatch.setattr(main, "env_file", lambda: nowhere)
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.fixture
def env_file_in_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() reads ./.env, as it does outside the tests."""
    import main

    monkeypatch.setattr(main, "env_file", lambda: Path.cwd() / ".env")

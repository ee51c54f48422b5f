"""Fail fast, warn once: misconfiguration that used to be silent now says so.

A startup check (``alkey.check_redis``, ``bind(..., fail_fast=...)``,
``alkey.asyncio.acheck_redis``) that refuses a Redis alkey cannot use; which Redis the
default client uses, logged once; a warning the first time a key is built for an instance
of a session alkey does not watch; ``invalidate()`` bumping where the application's
bindings bump; and ``import alkey`` without zope. Against real Redis servers (the
session's, and private ones with passwords and ACL users) and the test database.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

import alkey
import alkey.asyncio
from alkey import client as alkey_client
from alkey import events
from alkey.embedded import EmbeddedRedis
from alkey.errors import ConfigurationError
from alkey.keys import CacheKeyGenerator
from alkey.tokens import RedisClient, RedisTokenStore, store_for

from .models import User

#: Nothing listens here: a connection is refused at once.
DOWN = "redis://127.0.0.1:1/0"
#: What the least-privilege user of docs/deploying.md is granted, minus what a test drops.
LEAST = ["+eval", "+evalsha", "+mget", "+set", "+ping", "+select", "+info"]


@pytest.fixture(scope="module")
def acl_server() -> Iterator[EmbeddedRedis]:
    """A private Redis with a password, whose users each lack something alkey needs."""
    with EmbeddedRedis(password="adm/n#?pw") as server:
        admin = redis.Redis.from_url(server.url)
        for user, granted in {
            "alkey": LEAST,
            "noinfo": [grant for grant in LEAST if grant != "+info"],
            "noset": [grant for grant in LEAST if grant != "+set"],
            "noeval": [grant for grant in LEAST if grant not in ("+eval", "+evalsha")],
        }.items():
            admin.execute_command(  # type: ignore[no-untyped-call]
                "ACL", "SETUSER", user, "on", ">s3cret", "~alkey:*", "resetchannels", "-@all",
                *granted,
            )  # fmt: skip
        admin.close()
        yield server


def user_url(server: EmbeddedRedis, user: str, password: str = "s3cret") -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.fixture
def clients() -> Iterator[Callable[[str], RedisClient]]:
    made: list[RedisClient] = []

    def make(url: str) -> RedisClient:
        client: RedisClient = redis.Redis.from_url(url, socket_timeout=2, retry=None)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which session classes were warned about, and which session was checked."""
    monkeypatch.setattr(events, "_warned", set())
    monkeypatch.setattr(alkey._canonical, "checked_session", None)


# -- the startup check --------------------------------------------------------------------


def test_check_redis_passes_for_a_redis_alkey_can_use(redis_client: RedisClient) -> None:
    alkey.check_redis(redis_client)
    alkey.check_redis(RedisTokenStore(redis_client, key_prefix="app:", durable=True))


def test_check_redis_passes_for_the_least_privilege_user_of_the_docs(
    acl_server: EmbeddedRedis, clients: Callable[[str], RedisClient]
) -> None:
    alkey.check_redis(clients(user_url(acl_server, "alkey")), timeout=0)


def test_check_redis_refuses_an_unreachable_redis_naming_it(
    clients: Callable[[str], RedisClient],
) -> None:
    with pytest.raises(ConfigurationError, match=r"127\.0\.0\.1:1, db 0: it cannot be reached"):
        alkey.check_redis(clients(DOWN), timeout=0.2)


def test_check_redis_refuses_a_wrong_password_without_showing_it(
    acl_server: EmbeddedRedis, clients: Callable[[str], RedisClient]
) -> None:
    with pytest.raises(ConfigurationError, match="refused alkey's credentials") as error:
        alkey.check_redis(clients(user_url(acl_server, "alkey", "wr%2Fong%23pw")), timeout=5)
    assert "wr%2Fong" not in str(error.value)
    assert "s3cret" not in str(error.value)


@pytest.mark.parametrize("user", ["noset", "noeval"])
def test_check_redis_refuses_an_acl_that_lacks_a_command_alkey_needs(
    user: str, acl_server: EmbeddedRedis, clients: Callable[[str], RedisClient]
) -> None:
    with pytest.raises(
        ConfigurationError, match="ACL denies alkey's user a command or key it needs"
    ) as error:
        alkey.check_redis(clients(user_url(acl_server, user)), timeout=5)
    assert "+eval +evalsha +mget +set +ping +select +info" in str(error.value)


def test_check_redis_refuses_an_acl_whose_keys_miss_the_key_prefix(
    acl_server: EmbeddedRedis, clients: Callable[[str], RedisClient]
) -> None:
    store = RedisTokenStore(clients(user_url(acl_server, "alkey")), key_prefix="app:")
    with pytest.raises(ConfigurationError, match=r"~app:alkey:\*"):
        alkey.check_redis(store, timeout=5)


def test_check_redis_refuses_scripts_that_cannot_read_info_unless_told_not_to(
    acl_server: EmbeddedRedis, clients: Callable[[str], RedisClient]
) -> None:
    client = clients(user_url(acl_server, "noinfo"))
    with pytest.raises(ConfigurationError, match="cannot read INFO replication"):
        alkey.check_redis(client, timeout=5)
    alkey.check_redis(client, timeout=5, require_epoch=False)


def test_check_redis_waits_for_a_redis_that_comes_up_within_the_timeout(
    clients: Callable[[str], RedisClient],
) -> None:
    server = EmbeddedRedis()
    client = clients(f"redis://127.0.0.1:{server.port}/0")
    starter = threading.Timer(0.3, server.start)
    starter.start()
    try:
        alkey.check_redis(client, timeout=10)
    finally:
        starter.join()
        server.close()


def test_check_redis_without_a_target_checks_the_default_store(
    environment_redis: Callable[[str], None], redis_url: str
) -> None:
    environment_redis(DOWN)
    with pytest.raises(
        ConfigurationError,
        match=r"127\.0\.0\.1:1/0 \(from environment variable REDIS_URL\), db 0: it cannot",
    ):
        alkey.check_redis(timeout=0)


def test_binding_with_fail_fast_refuses_to_start_when_redis_is_down(
    tables: Engine, clients: Callable[[str], RedisClient]
) -> None:
    factory = sessionmaker(tables)
    with pytest.raises(ConfigurationError, match="it cannot be reached"):
        alkey.bind(factory, redis_client=clients(DOWN), fail_fast=0.2)
    assert not events.is_bound(factory())  # the binding was undone


def test_binding_with_fail_fast_binds_when_redis_is_usable(
    tables: Engine, redis_client: RedisClient
) -> None:
    factory = sessionmaker(tables)
    try:
        alkey.bind(factory, redis_client=redis_client, fail_fast=True)
        assert events.is_bound(factory())
    finally:
        alkey.unbind(factory)


def test_binding_an_async_sessionmaker_with_fail_fast_checks_through_redis_asyncio(
    tables: Engine, redis_url: str
) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from .conftest import async_database_url

    engine = create_async_engine(async_database_url(tables.url))
    factory = async_sessionmaker(engine)
    try:
        alkey.asyncio.bind(factory, redis_client=redis.asyncio.Redis.from_url(redis_url))
        events.bind(factory, fail_fast=2)  # no loop runs here: checked on one of its own
        down = async_sessionmaker(engine)
        with pytest.raises(ConfigurationError, match="it cannot be reached"):
            alkey.asyncio.bind(down, redis_client=redis.asyncio.Redis.from_url(DOWN), fail_fast=0.2)
        assert not events.is_bound(down().sync_session)
    finally:
        alkey.unbind(factory)
        asyncio.run(engine.dispose())


def test_acheck_redis_refuses_an_unreachable_redis_and_passes_a_usable_one(
    redis_url: str,
) -> None:
    async def check() -> None:
        usable = redis.asyncio.Redis.from_url(redis_url)
        down = redis.asyncio.Redis.from_url(DOWN)
        try:
            await alkey.asyncio.acheck_redis(usable)
            with pytest.raises(ConfigurationError, match="it cannot be reached"):
                await alkey.asyncio.acheck_redis(down, timeout=0.2)
        finally:
            await usable.aclose()
            await down.aclose()

    asyncio.run(check())


# -- which Redis the default client uses ---------------------------------------------------


def test_the_default_client_logs_which_redis_it_uses_once(
    environment_redis: Callable[[str], None], caplog: pytest.LogCaptureFixture
) -> None:
    environment_redis("redis://:pa%2Fss@127.0.0.1:1/3")
    with caplog.at_level(logging.INFO, logger="alkey.client"):
        alkey.get_redis_client()
        alkey.get_redis_client()
        alkey_client.default_store()
    said = [record for record in caplog.records if "default Redis client" in record.message]
    assert len(said) == 1
    assert said[0].levelno == logging.INFO
    assert "redis://:***@127.0.0.1:1/3 (from environment variable REDIS_URL)" in said[0].message
    assert "pa%2Fss" not in caplog.text


def test_the_default_client_warns_when_nothing_configured_it(
    environment_redis: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in alkey_client.PROVIDERS:
        monkeypatch.delenv(f"{name}_URL", raising=False)
    with caplog.at_level(logging.INFO, logger="alkey.client"):
        alkey.get_redis_client()  # builds a client; nothing connects
    (said,) = [record for record in caplog.records if "default Redis" in record.message]
    assert said.levelno == logging.WARNING
    assert "no Redis is configured" in said.message
    assert "redis://localhost:6379/0" in said.message


def test_the_default_asyncio_client_logs_which_redis_it_uses_once_for_all_loops(
    environment_redis: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    environment_redis("redis://127.0.0.1:1/5")
    monkeypatch.setattr(alkey.asyncio, "_logged", set())

    async def use() -> None:
        await alkey.asyncio.get_async_redis_client()
        await alkey.asyncio.get_async_redis_client()

    with caplog.at_level(logging.INFO, logger="alkey.client"):
        asyncio.run(use())
        asyncio.run(use())
    said = [r for r in caplog.records if "default Redis asyncio client" in r.message]
    assert len(said) == 1
    assert "redis://127.0.0.1:1/5" in said[0].message


# -- keys for instances of unbound sessions --------------------------------------------------


@pytest.mark.usefixtures("fresh_warnings")
def test_a_key_for_an_instance_of_an_unbound_session_warns_once(
    ada: Engine, session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    unbound = sessionmaker(ada)
    key = CacheKeyGenerator(redis_client)
    with unbound() as session:
        user = session.get_one(User, 1)
        with pytest.warns(alkey.UnboundSessionWarning, match="User of a .* alkey does not") as w:
            key(user)
        assert w[0].filename == __file__  # points at the code that built the key
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            key(user, "again")
    with unbound() as session, warnings.catch_warnings():
        warnings.simplefilter("error")
        key(session.get_one(User, 1))  # another session of the same class: said already


@pytest.mark.usefixtures("fresh_warnings")
def test_keys_for_bound_detached_and_transient_instances_do_not_warn(
    ada: Engine, session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    key = CacheKeyGenerator(redis_client)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with session_factory() as session:
            user = session.get_one(User, 1)
            key(user)
            key([user, {"nested": user}])
        key(user)  # detached
        key(User(id=2, name="grace"))  # transient
        unbound = Session(ada)
        detached = unbound.get_one(User, 1)
        unbound.close()
        key(detached)


def test_a_process_that_never_binds_never_checks_sessions() -> None:
    script = (
        "import alkey, alkey._canonical as c\n"
        "assert c.check_session is None\n"
        "import sqlalchemy.orm as o\n"
        "alkey.bind(o.sessionmaker())\n"
        "assert c.check_session is not None\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


@pytest.mark.usefixtures("fresh_warnings")
def test_a_nested_instance_of_an_unbound_session_warns_too(
    ada: Engine, session_factory: sessionmaker[Session], redis_client: RedisClient
) -> None:
    with Session(ada) as session:
        user = session.get_one(User, 1)
        with pytest.warns(alkey.UnboundSessionWarning):
            CacheKeyGenerator(redis_client)(["users", user])


# -- invalidate() without tokens= ------------------------------------------------------------


def test_invalidate_without_tokens_uses_the_configured_key_prefix(
    environment_redis: Callable[[str], None],
    redis_url: str,
    redis_client: RedisClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment_redis(redis_url)
    monkeypatch.setenv("ALKEY_KEY_PREFIX", "app1:")
    monkeypatch.setattr(alkey_client, "_default_configuration", None)
    store = alkey_client.default_store()
    before = store.fetch(["alkey:users#1"])
    alkey.invalidate("alkey:users#1")
    assert store.fetch(["alkey:users#1"]) != before
    assert redis_client.exists("app1:alkey:users#1")
    assert not redis_client.exists("alkey:users#1")


def test_invalidate_without_tokens_bumps_in_the_store_the_session_is_bound_to(
    tables: Engine, redis_client: RedisClient
) -> None:
    store = RedisTokenStore(redis_client, key_prefix="bound:")
    factory = sessionmaker(tables)
    alkey.bind(factory, tokens=store)
    try:
        before = store.fetch(["alkey:users#1"])
        alkey.invalidate("alkey:users#1")
        assert store.fetch(["alkey:users#1"]) != before
        after = store.fetch(["alkey:users#1"])
        with factory() as session:
            alkey.invalidate("alkey:users#1", session=session)
        assert store.fetch(["alkey:users#1"]) != after
    finally:
        alkey.unbind(factory)


def test_invalidate_with_an_unbound_session_refuses() -> None:
    with pytest.raises(ValueError, match="needs a session bound"):
        alkey.invalidate("alkey:users#1", session=Session())


def test_invalidate_with_tokens_uses_them_alone(redis_client: RedisClient) -> None:
    store = store_for(redis_client)
    before = store.fetch(["alkey:users#7"])
    alkey.invalidate("alkey:users#7", tokens=store)
    assert store.fetch(["alkey:users#7"]) != before


# -- zope.interface only where it is needed -------------------------------------------------


def test_importing_alkey_does_not_import_zope_interface() -> None:
    script = (
        "import sys, alkey, alkey.keys, alkey.manual, alkey.client\n"
        "assert 'zope.interface' not in sys.modules, 'zope.interface imported'\n"
        "from zope.interface.registry import Components\n"
        "from alkey.interfaces import IRedisClientFactory\n"
        "registry = Components()\n"
        "registry.registerUtility(lambda: 'the client', IRedisClientFactory)\n"
        "assert alkey.get_redis_client(registry=registry) == 'the client'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)

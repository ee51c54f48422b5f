"""A misconfiguration is told apart from an outage, against real servers.

A TLS certificate the client refuses, a wrong or missing password, an ACL that denies
alkey's commands, a database the server lacks, a plain client pointed at a node of a
Redis Cluster and a cluster client pointed at a plain Redis all used to be logged as
"Redis unavailable" and taken for an outage; none of them ends by waiting. Now each is a
:class:`~alkey.errors.TokenStoreConfigurationError` (still a
:class:`~alkey.errors.TokenStoreError`, never a ``TokenStoreUnavailableError``), logged
once per incident as "alkey cannot use Redis at host:port: <what is wrong>: <what to
fix>", while keys still miss and bumps are still kept -- and, once the setting is fixed,
replayed.

TLS spoken to a plain Redis port, or plain text to a TLS port, is no misconfiguration
alkey can tell: the server waits for the rest of a command and the client times out, as
on a hung server -- an outage. Every server here is a private redis-server on a free port
(TLS: with a self-signed certificate made by ``openssl`` for the test); nothing is
mocked.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import EmbeddedRedis, _free_port
from alkey.errors import (
    TokenStoreConfigurationError,
    TokenStoreError,
    TokenStoreUnavailableError,
)
from alkey.observers import LoggingObserver, ObserverGroup, StoreObserver
from alkey.outages import OutageLedger
from alkey.tokens import RedisClient, RedisTokenStore
from alkey.transports import misconfiguration

from .support.cluster import LocalCluster, cluster_capable_server, key_slot

ID = "alkey:users#1"


def quick(url: str, **options: Any) -> RedisClient:
    client: RedisClient = redis.Redis.from_url(
        url,
        socket_timeout=2,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
        **options,
    )
    return client


def lines(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    """The store log lines about the server on ``port`` (a store of an earlier test may
    still replay its kept bumps to another server meanwhile)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "alkey.tokens" and f":{port}" in r.getMessage()
    ]


class Incidents(StoreObserver):
    """The incidents one store reports, to count them exactly."""

    def __init__(self) -> None:
        self.began: list[BaseException] = []

    def outage_began(self, *, error: BaseException, **_: Any) -> None:
        self.began.append(error)


def degrades_as_misconfigured(
    client: RedisClient, caplog: pytest.LogCaptureFixture, *expected: str
) -> RedisTokenStore:
    """The store of ``client`` under the default policy: keys miss, bumps are kept, one
    incident, logged at ERROR as what is wrong (``expected``), never "Redis unavailable"."""
    incidents = Incidents()
    store = RedisTokenStore(client, retry_interval=0, observers=[LoggingObserver(), incidents])
    port = client.connection_pool.connection_kwargs["port"]
    with caplog.at_level(logging.INFO, logger="alkey.tokens"):
        first = store.fetch([ID])
        assert store.fetch([ID]) != first, "every fetch misses"
        store.bump([ID])
        assert store.pending == {ID}, "the bump is kept for replay"
        store.fetch([ID])
    assert len(incidents.began) == 1, f"once per incident: {incidents.began}"
    assert isinstance(incidents.began[0], TokenStoreConfigurationError)
    records = [
        r for r in caplog.records if r.name == "alkey.tokens" and f":{port}" in r.getMessage()
    ]
    [line] = [r.getMessage() for r in records if r.levelno == logging.ERROR]
    assert not [r for r in records if "Redis unavailable" in r.getMessage()]
    assert line.startswith(f"alkey cannot use Redis at 127.0.0.1:{port}: "), line
    assert "Keys miss until this is fixed" in line
    for text in expected:
        assert text in line, (text, line)
    return store


def raises_misconfigured(client: RedisClient, *expected: str) -> TokenStoreConfigurationError:
    store = RedisTokenStore(client, on_error="raise")
    with pytest.raises(TokenStoreConfigurationError) as raised:
        store.fetch([ID])
    error = raised.value
    assert isinstance(error, TokenStoreError)
    assert not isinstance(error, TokenStoreUnavailableError), "waiting will not fix it"
    assert not isinstance(error, redis.ConnectionError)
    assert isinstance(error.__cause__, redis.RedisError)
    assert str(error).startswith(f"alkey cannot use {error.server}: {error.problem}")
    for text in expected:
        assert text in str(error), (text, str(error))
    with pytest.raises(TokenStoreConfigurationError):
        store.bump([ID])
    return error


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_redis(certificate: tuple[Path, Path]) -> Iterator[tuple[EmbeddedRedis, int]]:
    """A private redis-server with a plain port and a TLS port (self-signed certificate)."""
    cert, key = certificate
    port = _free_port()
    extra = (
        "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
    )  # fmt: skip
    server = EmbeddedRedis(extra_args=extra)
    try:
        server.start()
    except RuntimeError:
        pytest.skip(f"{server.executable} does not start with --tls-port: built without TLS")
    try:
        yield server, port
    finally:
        server.close()


def test_a_refused_tls_certificate_is_a_misconfiguration_not_an_outage(
    tls_redis: tuple[EmbeddedRedis, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, port = tls_redis
    client = quick(f"rediss://127.0.0.1:{port}/0")
    try:
        degrades_as_misconfigured(
            client,
            caplog,
            f"Redis at 127.0.0.1:{port}",
            "the server's TLS certificate was not accepted (CERTIFICATE_VERIFY_FAILED",
            "check ssl_ca_certs",
        )
        error = raises_misconfigured(client, "CERTIFICATE_VERIFY_FAILED")
        assert error.server == f"Redis at 127.0.0.1:{port}"
        assert isinstance(error.__cause__, redis.ConnectionError), "redis-py wraps the SSLError"
    finally:
        client.close()


def test_the_fix_the_message_names_works_and_the_kept_bumps_are_replayed(
    tls_redis: tuple[EmbeddedRedis, int],
    certificate: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, port = tls_redis
    refused = quick(f"rediss://127.0.0.1:{port}/0")
    trusted = quick(f"rediss://127.0.0.1:{port}/0", ssl_ca_certs=str(certificate[0]))
    try:
        store = degrades_as_misconfigured(refused, caplog, "CERTIFICATE_VERIFY_FAILED")
        fixed = RedisTokenStore(trusted)
        before = fixed.fetch([ID])
        assert fixed.fetch([ID]) == before, "with ssl_ca_certs, tokens are kept in Redis"
        # The degraded store's pool is rebuilt with the fix: its kept bump is replayed.
        refused.connection_pool.connection_kwargs["ssl_ca_certs"] = str(certificate[0])
        refused.connection_pool.reset()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="alkey.tokens"):
            store.fetch([ID])
        assert store.pending == frozenset()
        assert fixed.fetch([ID]) != before, "the bump kept while misconfigured arrived"
        assert any(
            "Redis answers again; alkey replayed 1 bump" in r.getMessage() for r in caplog.records
        )
    finally:
        refused.close()
        trusted.close()
        admin = quick(server.url)
        admin.flushall()
        admin.close()


def test_the_asyncio_store_classifies_a_refused_certificate_alike(
    tls_redis: tuple[EmbeddedRedis, int],
) -> None:
    _, port = tls_redis

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(
            f"rediss://127.0.0.1:{port}/0", socket_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        store = AsyncRedisTokenStore(client, on_error="raise")
        try:
            with pytest.raises(TokenStoreConfigurationError, match="CERTIFICATE_VERIFY_FAILED"):
                await store.afetch([ID])
        finally:
            await client.aclose()

    asyncio.run(main())


# -- passwords and ACLs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[EmbeddedRedis]:
    """A private redis-server with ``requirepass``, and an ACL user ``reader`` allowed only
    ``PING`` and ``GET``."""
    with EmbeddedRedis(password="Right-pass-1") as server:
        admin = quick(server.url)
        admin.execute_command("ACL", "SETUSER", "reader", "on", ">Reader-pass-1", "~*", "+ping")  # type: ignore[no-untyped-call]
        admin.close()
        yield server


@pytest.mark.parametrize(
    ("credentials", "expected"),
    [
        (":Wrong-pass-1@", ("the server refused alkey's credentials (WRONGPASS", "check")),
        ("", ("the server requires a password and alkey gave none (", "put it in the URL")),
    ],
    ids=["wrong password", "no password"],
)
def test_a_refused_password_is_a_misconfiguration(
    protected_redis: EmbeddedRedis,
    caplog: pytest.LogCaptureFixture,
    credentials: str,
    expected: tuple[str, ...],
) -> None:
    client = quick(f"redis://{credentials}127.0.0.1:{protected_redis.port}/0")
    try:
        degrades_as_misconfigured(client, caplog, *expected)
        raises_misconfigured(client, *expected)
    finally:
        client.close()
    assert "Wrong-pass-1" not in caplog.text


def test_an_acl_refusal_is_a_misconfiguration_and_granting_the_commands_fixes_it(
    protected_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    client = quick(f"redis://reader:Reader-pass-1@127.0.0.1:{protected_redis.port}/0")
    admin = quick(protected_redis.url)
    try:
        store = degrades_as_misconfigured(
            client, caplog, "the server's ACL denies alkey's user", "+eval +evalsha", "NOPERM"
        )
        raises_misconfigured(client, "NOPERM")
        admin.execute_command("ACL", "SETUSER", "reader", "+@scripting", "+info", "+@read")  # type: ignore[no-untyped-call]
        admin.execute_command("ACL", "SETUSER", "reader", "+@write")  # type: ignore[no-untyped-call]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="alkey.tokens"):
            store.fetch([ID])
        assert store.pending == frozenset(), "the kept bump was replayed once allowed"
        assert admin.keys("*"), "the tokens are in Redis now"
    finally:
        admin.execute_command("ACL", "SETUSER", "reader", "resetkeys", "~*", "-@all", "+ping")  # type: ignore[no-untyped-call]
        admin.flushall()
        client.close()
        admin.close()
    assert "Reader-pass-1" not in caplog.text


def test_a_command_denied_inside_alkeys_scripts_is_an_acl_refusal_too(
    protected_redis: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """A user allowed EVAL but not the commands its scripts call (MGET, SET...): Redis
    answers a plain error from inside the script, not NOPERM."""
    admin = quick(protected_redis.url)
    rules = ("on", ">Script-pass-1", "~*", "+eval", "+evalsha", "+ping")
    admin.execute_command("ACL", "SETUSER", "scripter", *rules)  # type: ignore[no-untyped-call]
    client = quick(f"redis://scripter:Script-pass-1@127.0.0.1:{protected_redis.port}/0")
    try:
        degrades_as_misconfigured(
            client, caplog, "the server's ACL denies alkey's user", "can't run this command"
        )
        raises_misconfigured(client, "+mget +set")
    finally:
        client.close()
        admin.execute_command("ACL", "DELUSER", "scripter")  # type: ignore[no-untyped-call]
        admin.close()


def test_an_outage_then_a_restart_with_a_password_alkey_lacks_is_reported_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cause of an open incident changes (down, then up with a new requirepass): the
    log says so, rather than leaving "Redis unavailable" as the last word."""
    with EmbeddedRedis() as server:
        client = quick(server.url)
        store = RedisTokenStore(client, retry_interval=0)
        try:
            with caplog.at_level(logging.INFO, logger="alkey.tokens"):
                store.fetch([ID])
                server.stop()
                store.fetch([ID])
                server.password = "Rotated-pass-1"
                server.start()
                store.fetch([ID])
                store.fetch([ID])
        finally:
            client.close()
    logged = lines(caplog, server.port)
    assert len(logged) == 2, logged
    assert logged[0].startswith("Redis unavailable")
    assert logged[1].startswith(f"alkey cannot use Redis at 127.0.0.1:{server.port}")
    assert "requires a password" in logged[1]


def test_a_database_the_server_lacks_is_a_misconfiguration(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = quick(redis_url.rsplit("/", 1)[0] + "/99")
    try:
        degrades_as_misconfigured(client, caplog, "the server has no such database", "databases")
    finally:
        client.close()


# -- Redis Cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    reason = cluster_capable_server()
    if reason:
        pytest.skip(reason)
    with LocalCluster(3, 0) as started:
        yield started


def _other_slots(cluster: LocalCluster) -> list[str]:
    """Identifiers whose token keys the first node does not serve, on two other nodes."""
    first = cluster.nodes[0].port
    found: dict[int, str] = {}
    for n in range(1, 1000):
        identifier = f"alkey:users#{n}"
        owner = cluster.owner(key_slot(identifier)).port
        if owner != first:
            found.setdefault(owner, identifier)
        if len(found) == 2:
            break
    return list(found.values())


def test_a_plain_client_of_a_cluster_node_is_a_misconfiguration(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A real cluster answers ``CROSSSLOT``/``MOVED`` to a ``redis.Redis`` pointed at one
    node: a :class:`TokenStoreConfigurationError` naming the cluster client to use."""
    plain = quick(cluster.url)
    try:
        store = RedisTokenStore(plain, on_error="raise")
        with pytest.raises(TokenStoreConfigurationError) as raised:
            store.fetch(_other_slots(cluster))
        cause = raised.value.__cause__
        # redis-py 6 and later raise these classes; redis-py 5 a ResponseError("CROSSSLOT...").
        assert type(cause).__name__ in ("ClusterCrossSlotError", "MovedError") or str(
            cause
        ).startswith(("CROSSSLOT", "MOVED"))
        assert "give alkey a redis.cluster.RedisCluster" in str(raised.value)
        assert "this Redis is a node of a Redis Cluster" in str(raised.value)
        degrading = RedisTokenStore(plain, retry_interval=0)
        with caplog.at_level(logging.INFO, logger="alkey.tokens"):
            degrading.fetch(_other_slots(cluster))
            degrading.fetch(_other_slots(cluster))
        [line] = lines(caplog, cluster.nodes[0].port)
        assert line.startswith(f"alkey cannot use Redis at 127.0.0.1:{cluster.nodes[0].port}")
        assert "redis.cluster.RedisCluster" in line
    finally:
        plain.close()


def test_a_cluster_client_of_a_plain_redis_is_a_misconfiguration(redis_url: str) -> None:
    async def main() -> None:
        client = redis.asyncio.cluster.RedisCluster.from_url(redis_url, socket_timeout=2)
        store = AsyncRedisTokenStore(client, on_error="raise")
        try:
            with pytest.raises(
                TokenStoreConfigurationError, match="this Redis is no Redis Cluster"
            ):
                await store.afetch([ID])
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_degrading_store_uses_the_fast_fail_window_while_misconfigured(
    protected_redis: EmbeddedRedis,
) -> None:
    """No connection attempt per call: within ``retry_interval`` after a refusal, calls
    answer without Redis (as in an outage)."""
    client = quick(f"redis://:Wrong-pass-1@127.0.0.1:{protected_redis.port}/0")
    store = RedisTokenStore(client, retry_interval=60)
    try:
        store.fetch([ID])
        assert store.outage.skip(), "the store does not try again for retry_interval"
    finally:
        client.close()


def test_an_incident_that_flaps_between_an_outage_and_a_misconfiguration_reports_each_once() -> (
    None
):
    """A Redis restarting in a loop with a password alkey lacks fails by turns as down
    (refused) and as misconfigured (``WRONGPASS``): the wrong password is reported when it
    first turns up, and nothing more until the incident ends, so that an observer counting
    ``outage_began`` counts one incident."""

    class Began(StoreObserver):
        def __init__(self) -> None:
            self.errors: list[BaseException] = []

        def outage_began(self, **event: Any) -> None:
            self.errors.append(event["error"])

    began = Began()
    ledger = OutageLedger("degrade", 100, 0.0, events=ObserverGroup([began]))
    down = TokenStoreUnavailableError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    wrong = TokenStoreConfigurationError(
        "alkey cannot use Redis", problem="refused alkey's credentials", fix="check the password"
    )
    for error in (down, wrong, down, wrong, down):
        ledger.failed(error, "fetch tokens")
    assert began.errors == [down, wrong]
    ledger.succeeded(ledger.replay())
    ledger.failed(wrong, "fetch tokens")
    assert began.errors == [down, wrong, wrong], "a new incident reports again"


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (
            redis.AuthenticationError("Authentication required."),
            "requires a password and alkey gave none (NOAUTH",
        ),
        (
            redis.AuthenticationError("invalid username-password pair or user is disabled."),
            "refused alkey's credentials (WRONGPASS",
        ),
        (
            redis.exceptions.NoPermissionError(
                "this user has no permissions to run the 'eval' command"
            ),
            "denies alkey's user a command or key it needs (NOPERM",
        ),
    ],
    ids=["no password", "wrong password", "acl"],
)
def test_redis_py_5s_error_texts_without_their_codes_are_read_as_the_codes_redis_sent(
    error: Exception, says: str
) -> None:
    """redis-py 5 raises these classes with the code cut off the server's answer (6 and
    later keep it): each still reads as what it is, with the code named for the operator."""
    found = misconfiguration(error)
    assert found is not None
    assert says in found.problem

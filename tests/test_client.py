"""Redis configuration from the environment, registries and explicit clients."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from zope.interface.registry import Components

from alkey import client as alkey_client
from alkey.client import client_from_config, get_redis_client, get_redis_config, redact_url
from alkey.embedded import EmbeddedRedis, find_redis_server
from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool
from alkey.tokens import RedisClient, RedisTokenStore


def test_nothing_configured_means_localhost() -> None:
    assert get_redis_config({}) == {
        "url": "redis://localhost:6379/0",
        "db": 0,
        "max_connections": None,
    }


def test_redis_url_db_and_max_connections_are_read_from_the_environment() -> None:
    config = get_redis_config(
        {"REDIS_URL": "redis://cache:6380", "REDIS_DB": "4", "REDIS_MAX_CONNECTIONS": "20"}
    )
    assert config == {"url": "redis://cache:6380", "db": 4, "max_connections": 20}


def test_the_database_in_the_url_path_is_used_when_redis_db_is_unset() -> None:
    assert get_redis_config({"REDIS_URL": "redis://cache:6380/7"})["db"] == 7


def test_a_provider_url_is_used_with_its_own_settings_taking_precedence() -> None:
    config = get_redis_config(
        {
            "REDISTOGO_URL": "redis://togo:1",
            "REDISTOGO_DB": "2",
            "REDIS_DB": "9",
            "REDIS_MAX_CONNECTIONS": "5",
        }
    )
    assert config == {"url": "redis://togo:1", "db": 2, "max_connections": 5}
    assert get_redis_config({"OPENREDIS_URL": "redis://open:2"})["url"] == "redis://open:2"


def test_redis_url_wins_over_provider_urls() -> None:
    env = {"REDISTOGO_URL": "redis://togo:1", "REDIS_URL": "redis://mine:2"}
    assert get_redis_config(env)["url"] == "redis://mine:2"


@pytest.mark.parametrize(
    ("url", "db"), [("rediss://user:pw@secure:6380/2", 2), ("unix:///run/redis.sock?db=1", 1)]
)
def test_tls_and_unix_socket_urls_are_accepted_with_their_database(url: str, db: int) -> None:
    assert get_redis_config({"REDIS_URL": url}) == {"url": url, "db": db, "max_connections": None}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_DB": "one"}, "REDIS_DB must be a whole number, not 'one'"),
        ({"REDISTOGO_URL": "redis://h", "REDISTOGO_MAX_CONNECTIONS": "-1"}, "must not be negative"),
        ({"REDIS_URL": "http://user:s3cret@host"}, "REDIS_URL='http://user:\\*\\*\\*@host'"),
    ],
)
def test_malformed_settings_name_the_variable_and_never_the_password(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as error:
        get_redis_config(env)
    assert "s3cret" not in str(error.value)


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("redis://app:s3cret@host:6380/1") == "redis://app:***@host:6380/1"
    assert redact_url("redis://host:6380") == "redis://host:6380"


def test_the_configured_database_number_is_the_one_written_to(redis_url: str) -> None:
    client = client_from_config(get_redis_config({"REDIS_URL": redis_url, "REDIS_DB": "3"}))
    try:
        client.set("alkey:probe#1", "x")
        database_3 = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3")
        assert database_3.get("alkey:probe#1") == b"x"
        database_3.close()
    finally:
        client.delete("alkey:probe#1")
        client.close()


def test_a_unix_socket_url_reaches_the_server() -> None:
    socket_path = Path(tempfile.mkdtemp()) / "redis.sock"
    with EmbeddedRedis(extra_args=("--unixsocket", str(socket_path))):
        client = client_from_config(get_redis_config({"REDIS_URL": f"unix://{socket_path}"}))
        assert client.ping() is True
        client.close()


def test_an_embedded_server_started_twice_refuses_and_leaves_no_second_process() -> None:
    """``with EmbeddedRedis() as server`` starts it: a ``start()`` inside would run a
    second redis-server and lose the first, which then outlived the tests."""
    with EmbeddedRedis() as server:
        first = server.pid
        with pytest.raises(RuntimeError, match="running already"):
            server.start()
        assert server.pid == first
        server.stop()
        server.start()  # a stopped server starts again, on its port
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
        finally:
            client.close()
    assert server.pid is None


def test_the_default_client_is_one_per_process_and_follows_the_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alkey_client, "_default_client", None)
    monkeypatch.setitem(os.environ, "REDIS_URL", redis_url)
    first = get_redis_client()
    assert get_redis_client() is first
    assert first.ping() is True
    first.close()


def test_a_registered_client_factory_replaces_the_default(redis_client: RedisClient) -> None:
    registry = Components()
    registry.registerUtility(lambda: redis_client, IRedisClientFactory)
    assert get_redis_client(registry=registry) is redis_client


def test_a_0_3_style_client_factory_taking_request_still_works(
    redis_client: RedisClient,
) -> None:
    seen: list[object] = []

    def factory_of_0_3(request: object) -> RedisClient:  # a required request, as 0.3 passed
        seen.append(request)
        return redis_client

    class Request:
        registry = Components()

    Request.registry.registerUtility(factory_of_0_3, IRedisClientFactory)
    request = Request()
    assert get_redis_client(request) is redis_client
    assert get_redis_client(registry=Request.registry) is redis_client
    assert seen == [request, None]  # as 0.3: request=, None when there is no request


def test_a_factory_taking_keyword_arguments_is_given_the_request_and_one_taking_none_is_not(
    redis_client: RedisClient,
) -> None:
    given: list[dict[str, object]] = []

    def factory(**kwargs: object) -> RedisClient:
        given.append(kwargs)
        return redis_client

    registry = Components()
    registry.registerUtility(factory, IRedisClientFactory)
    assert get_redis_client(registry=registry) is redis_client
    assert given == [{"request": None}]
    registry.registerUtility(lambda: redis_client, IRedisClientFactory)
    assert get_redis_client(registry=registry) is redis_client


def test_a_registered_connection_pool_is_used_for_the_request(redis_url: str) -> None:
    pool = redis.ConnectionPool.from_url(redis_url)

    class Request:
        registry = Components()

    Request.registry.registerUtility(pool, IRedisConnectionPool)
    client = get_redis_client(Request())
    assert client.connection_pool is pool
    assert client.ping() is True
    pool.disconnect()


def test_a_rediss_url_reaches_a_tls_server(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    certificate, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(certificate), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(certificate), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(certificate), "--tls-auth-clients", "no", "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certificate}"
    try:
        client = client_from_config(get_redis_config({"REDIS_URL": url}))
        deadline = time.monotonic() + 10
        while True:
            if server.poll() is not None:
                pytest.skip("this redis-server was built without TLS")
            try:
                assert client.ping() is True
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        store = RedisTokenStore(client, on_error="raise")  # a failure over TLS shows
        token = store.fetch(["alkey:users#1"])[0]
        assert store.fetch(["alkey:users#1"])[0] == token, "stored, over TLS"
        store.bump(["alkey:users#1"])
        assert store.fetch(["alkey:users#1"])[0] != token
        client.close()
    finally:
        server.terminate()
        server.wait(timeout=10)

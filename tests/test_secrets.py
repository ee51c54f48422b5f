"""No password reaches any output of alkey: one sweep over every place a URL or a
password can appear, with passwords holding every reserved character.

The places: alkey's log records (outage lines, misconfiguration lines, warnings, on every
``alkey`` logger), its errors (:class:`~alkey.errors.ConfigurationError` of a bad URL,
option, setting or database; :class:`~alkey.errors.TokenStoreError` and its kinds, and
their ``__cause__`` as logged), ``repr()``/``str()``/``describe()`` of a
:class:`~alkey.settings.Configuration`, Pyramid's ``ConfigurationError`` from
``config.include('alkey')``, and the command line (``python -m alkey``). The passwords
are percent-encoded in URLs (``urllib.parse.quote(password, safe='')``, as the docs say)
and raw where given as a keyword; a raw one in a URL must be refused, unshown.

How a leak is found: each password is built of markers (``Zq00x``, ``Zq01x``...) between
its reserved characters, so any piece of it that shows -- raw, encoded, or cut at a
delimiter -- holds a marker, and the check is one search for ``Zq\\d\\dx`` in the output.
Real servers only: a port nothing listens on (refused), and private redis-servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio
from pyramid.config import Configurator  # type: ignore[import-untyped]
from pyramid.exceptions import ConfigurationError as PyramidConfigurationError  # type: ignore[import-untyped]
from redis.backoff import NoBackoff
from redis.retry import Retry

from alkey.asyncio import AsyncRedisTokenStore
from alkey.embedded import EmbeddedRedis
from alkey.errors import AlkeyError, ConfigurationError, TokenStoreError, redacted
from alkey.settings import SentinelURL, configure, redact_url
from alkey.tokens import RedisClient, RedisTokenStore

#: The reserved characters of a URL (RFC 3986's delimiters), the space and ``%``.
RESERVED = list("/#?@:%&=+,; !$'()*[]")
#: Any piece of any password below.
LEAK = re.compile(r"Zq\d\dx")


def _password(characters: list[str], start: int = 0) -> str:
    return "".join(f"Zq{start + i:02d}x{c}" for i, c in enumerate(characters)) + "Zq99x"


#: One password with every reserved character, and one per character (its first and
#: last piece around it, e.g. ``Zq40x/Zq99x``).
PASSWORDS = {"all": _password(RESERVED)} | {
    f"{c!r}": _password([c], start=40 + i) for i, c in enumerate(RESERVED)
}
#: Another password (the wrong one, a sentinel's own), every reserved character too.
OTHER = _password(list(reversed(RESERVED)), start=70)


def no_password_in(*outputs: object) -> None:
    for output in outputs:
        text = str(output)
        found = LEAK.search(text)
        assert found is None, f"a password shows in: {text!r}"


def encoded(password: str) -> str:
    return quote(password, safe="")


@pytest.fixture(params=list(PASSWORDS.values()), ids=list(PASSWORDS))
def password(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def refused_port() -> int:
    """A local port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], str]]:
    """Every record of every ``alkey`` logger (DEBUG and up), as text, with tracebacks."""
    with caplog.at_level(logging.DEBUG, logger="alkey"):
        yield (
            lambda: (
                "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
                + caplog.text
            )
        )


def error_texts(error: BaseException) -> list[str]:
    """What a message or a log shows of ``error``: its text, its repr, and its causes'."""
    texts = []
    seen: BaseException | None = error
    while seen is not None:
        texts += [str(seen), repr(seen), redacted(str(seen))]
        seen = seen.__cause__
    return texts


# -- URLs: redact_url and the Configuration ----------------------------------------------------


def urls_of(password: str) -> list[str]:
    """Valid URLs carrying ``password`` (percent-encoded) in every place a URL can."""
    pw, other = encoded(password), encoded(OTHER)
    return [
        f"redis://:{pw}@127.0.0.1:6380/1",
        f"redis://app:{pw}@cache.example.com:6379/0?client_name=me@x",
        f"rediss://default:{pw}@[::1]:6380/0?ssl_cert_reqs=none",
        f"unix://:{pw}@/tmp/redis.sock?db=2",
        f"redis://cache.example.com:6379/0?password={pw}&socket_timeout=3",
        f"redis://cache.example.com/0?username=app&password={pw}",
        f"redis+sentinel://:{pw}@s1:26379,s2:26379/svc/0?sentinel_password={other}",
        f"rediss+sentinel://app:{pw}@s1/svc?sentinel_password={other}&socket_timeout=2",
        f"redis://h:1/0?alkey_ttl=60&password={pw}",
    ]


def test_every_url_is_shown_with_its_passwords_masked_and_its_server_kept(password: str) -> None:
    for url in urls_of(password):
        shown = redact_url(url)
        no_password_in(shown)
        server = url.rpartition("@")[2] if "@" in url.split("?")[0] else url.partition("://")[2]
        host = re.split(r"[/?]", server)[0] if not url.startswith("unix") else "/tmp/redis.sock"
        assert host in shown, (host, shown)
        configuration = configure(url=url, env={})
        no_password_in(
            repr(configuration),
            str(configuration),
            configuration.describe(),
            configuration.redacted_url,
        )
        if url.startswith(("redis+", "rediss+")):
            no_password_in(repr(SentinelURL.parse(configuration.url)))


def test_a_percent_encoded_password_reaches_redis_py_whole(password: str) -> None:
    """The encoding the messages recommend is the one redis-py decodes: what is masked is
    exactly the password, and the client gets all of it."""
    configuration = configure(url=f"redis://app:{encoded(password)}@h:1/0", env={})
    pool = redis.ConnectionPool.from_url(configuration.url)
    assert pool.connection_kwargs["password"] == password
    assert redact_url(configuration.url) == "redis://app:***@h:1/0"
    query = configure(url=f"redis://h:1/0?password={encoded(password)}", env={})
    assert redis.ConnectionPool.from_url(query.url).connection_kwargs["password"] == password
    assert redact_url(query.url) == "redis://h:1/0?password=***"


# -- configuration errors ------------------------------------------------------------------------


def bad_configurations(password: str) -> list[tuple[dict[str, Any], bool]]:
    """Arguments of configure() with ``password`` somewhere, and whether they must fail (a
    raw password in a URL may happen to parse -- ``Zq40x@Zq99x`` -- and is then masked)."""
    pw, raw = encoded(password), password
    return [
        ({"url": f"http://app:{pw}@h/0"}, True),  # not a Redis URL
        ({"env": {"REDIS_URL": f"redis://:{pw}@h/one"}}, True),  # the database is no number
        ({"env": {"REDIS_TLS_URL": f"rediss://:{pw}@h/0?foo=1"}}, True),  # an unknown option
        ({"settings": {"alkey.redis_url": f"redis://:{pw}@h/0?alkey_ttl=soon"}}, True),
        ({"settings": {"redis.url": f"redis://:{pw}@h/0?alkey_tll=1"}}, True),  # did you mean
        ({"url": f"redis://h/0?password={pw}&socket_timout=1"}, True),
        ({"url": f"redis://h/0?pasword={pw}"}, True),  # a misspelt secret option
        ({"url": f"redis+sentinel://:{pw}@s1:notaport/svc?sentinel_password={pw}"}, True),
        ({"url": f"redis+sentinel://:{pw}@s1:26379/?sentinel_password={pw}"}, True),
        ({"url": f"redis+sentinel://s1/svc?sentinel_password={pw}&min_other_sentinels=x"}, True),
        ({"url": f"redis://h/0?alkey_password={pw}"}, True),  # not an alkey option
        ({"settings": {"alkey.redis_password": raw}}, True),  # not an alkey setting
        ({"settings": {"alkey.ttl": "x"}, "env": {"REDIS_URL": f"redis://:{pw}@h/0"}}, True),
        ({"url": f"redis://:{raw}@h:6379/0"}, False),  # not encoded: refused, or masked
        ({"url": f"redis://u:{raw}@h:6379/0?client_name=me@x"}, False),
        ({"url": f"redis://h:6379/0?password={raw}"}, False),
        ({"url": f"redis://h:6379/0?password={pw}#{pw}"}, True),  # a cut-off password
        ({"env": {"REDIS_URL": f"rediss://u:{raw}@h/0"}}, False),
    ]


def test_no_configuration_error_shows_a_password(password: str) -> None:
    for arguments, fails in bad_configurations(password):
        arguments.setdefault("env", {})
        try:
            configuration = configure(**arguments)
        except ConfigurationError as error:
            no_password_in(*error_texts(error))
        else:
            assert not fails, arguments
            no_password_in(repr(configuration), configuration.describe())


SESSION_CLS = "tests.test_pyramid.PyramidTestSession"


def test_pyramids_configuration_error_shows_no_password(password: str) -> None:
    for settings in (
        {"alkey.redis_url": f"http://u:{encoded(password)}@host/"},
        {"alkey.redis_url": f"redis://u:{password}@host/0"},
        {"redis.url": f"redis://u:{encoded(password)}@host/0?foo=bar"},
        {"alkey.redis_url": f"redis://u:{encoded(password)}@host/0", "alkey.ttl": "x"},
        {"alkey.redis_pasword": password},
    ):
        config = Configurator(settings={"alkey.session_cls": SESSION_CLS, **settings})
        try:
            config.include("alkey")
        except PyramidConfigurationError as error:
            no_password_in(*error_texts(error))
        else:  # a raw password that happens to make a valid URL: nothing to show
            assert settings == {"alkey.redis_url": f"redis://u:{password}@host/0"}


# -- the stores: log lines and errors, against real servers ---------------------------------


def quick(url: str | None = None, **options: Any) -> RedisClient:
    defaults: dict[str, Any] = {
        "socket_timeout": 1,
        "socket_connect_timeout": 1,
        "retry": Retry(NoBackoff(), 0),
    }
    options = defaults | options
    if url is None:
        client: RedisClient = redis.Redis(**options)
    else:
        client = redis.Redis.from_url(url, **options)
    return client


def exercise(client: RedisClient, logs: Callable[[], str]) -> list[str]:
    """Fetch and bump through ``client`` under both policies; every text produced."""
    shown: list[str] = []
    degrading = RedisTokenStore(client, retry_interval=0)
    degrading.fetch(["alkey:users#1"])
    degrading.bump(["alkey:users#1"])
    degrading.fetch(["alkey:users#1"])
    raising = RedisTokenStore(client, on_error="raise", retry_interval=0)
    for call in (lambda: raising.fetch(["alkey:users#1"]), lambda: raising.bump(["alkey:users#1"])):
        try:
            call()
        except TokenStoreError as error:
            shown += error_texts(error)
    shown.append(logs())
    return shown


def test_a_down_redis_logs_and_raises_no_password(password: str, logs: Callable[[], str]) -> None:
    port = refused_port()
    for url in (
        f"redis://app:{encoded(password)}@127.0.0.1:{port}/0",
        f"redis://127.0.0.1:{port}/0?password={encoded(password)}",
    ):
        configuration = configure(url=url, env={}, client_options={"socket_timeout": 1})
        store = configuration.store()
        assert isinstance(store, RedisTokenStore)
        client = store.client
        try:
            shown = exercise(client, logs)
        finally:
            client.close()
        assert "Redis unavailable" in shown[-1]
        no_password_in(*shown)
    keyword = quick(host="127.0.0.1", port=port, username="app", password=password)
    try:
        no_password_in(*exercise(keyword, logs))
    finally:
        keyword.close()


@pytest.fixture(scope="module")
def protected_redis() -> Iterator[EmbeddedRedis]:
    """A private redis-server whose password holds every reserved character (set by
    ``CONFIG SET``, which takes it as it is, unlike a command line)."""
    with EmbeddedRedis() as server:
        admin = quick(server.url)
        admin.config_set("requirepass", PASSWORDS["all"])
        admin.close()
        server.password = PASSWORDS["all"]
        yield server


def test_the_right_password_percent_encoded_works_and_a_wrong_one_shows_neither(
    protected_redis: EmbeddedRedis, logs: Callable[[], str]
) -> None:
    right, port = PASSWORDS["all"], protected_redis.port
    client = quick(f"redis://:{encoded(right)}@127.0.0.1:{port}/0")
    try:
        assert client.ping()
        store = RedisTokenStore(client, on_error="raise")
        assert store.fetch(["alkey:users#1"]) == store.fetch(["alkey:users#1"])
    finally:
        client.close()
    for wrong in (
        quick(f"redis://:{encoded(OTHER)}@127.0.0.1:{port}/0"),
        quick(host="127.0.0.1", port=port, password=OTHER),
        quick(f"redis://127.0.0.1:{port}/0"),
    ):
        try:
            shown = exercise(wrong, logs)
        finally:
            wrong.close()
        assert "alkey cannot use Redis at 127.0.0.1" in shown[-1]
        no_password_in(*shown)


def test_a_sentinel_url_whose_sentinels_are_down_shows_no_password(
    password: str, logs: Callable[[], str]
) -> None:
    url = (
        f"redis+sentinel://:{encoded(password)}@127.0.0.1:{refused_port()}/svc/0"
        f"?sentinel_password={encoded(OTHER)}&socket_timeout=1&socket_connect_timeout=1"
    )
    store = configure(url=url, env={}).store()
    assert isinstance(store, RedisTokenStore)
    client = store.client
    try:
        no_password_in(*exercise(client, logs))
    finally:
        client.close()


def test_the_asyncio_store_shows_no_password(password: str, logs: Callable[[], str]) -> None:
    async def main() -> list[str]:
        client = redis.asyncio.Redis.from_url(
            f"redis://app:{encoded(password)}@127.0.0.1:{refused_port()}/0",
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        shown: list[str] = []
        try:
            await AsyncRedisTokenStore(client, retry_interval=0).afetch(["alkey:users#1"])
            with pytest.raises(TokenStoreError) as raised:
                await AsyncRedisTokenStore(client, on_error="raise").afetch(["alkey:users#1"])
            shown += error_texts(raised.value)
        finally:
            await client.aclose()
        return shown

    shown = asyncio.run(main())
    no_password_in(*shown, logs())


def test_redacted_masks_a_password_whatever_delimiter_it_holds(password: str) -> None:
    """What redis-py and other libraries print -- a connection's repr, a dict of options,
    a URL -- with the password raw: :func:`alkey.errors.redacted` masks all of it."""
    for text in (
        f"<redis.connection.Connection(host=h,port=1,password={password},db=0)>)>",
        f"Connection(host=h,password={password})>)>, <Connection(host=i)>",
        f"sentinel_password={password},socket_timeout=2",
        f"password={password}",
        repr({"host": "h", "password": password, "db": 0}),
        repr({"sentinel_password": password.encode()}),
        f"redis://app:{encoded(password)}@h:1/0 is down",
    ):
        no_password_in(redacted(text))
    assert redacted("password=Se,cr,et9") == "password=***"


# -- the command line -----------------------------------------------------------------------------


def _commands() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "alkey", "--help"], capture_output=True, text=True, timeout=60
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cli_help() -> str:
    return _commands()


@pytest.mark.parametrize(
    "command", [["token", "alkey:users#1"], ["inspect", "alkey:users#1"], ["check"]], ids=" ".join
)
@pytest.mark.parametrize("given", ["--url", "REDIS_URL", "malformed --url"])
def test_the_command_line_shows_no_password(command: list[str], given: str, cli_help: str) -> None:
    if not re.search(rf"^\s+{command[0]}\b", cli_help, re.MULTILINE):
        pytest.skip(f"python -m alkey has no {command[0]!r} command (yet)")
    password = PASSWORDS["all"]
    url = f"redis://app:{encoded(password)}@127.0.0.1:{refused_port()}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "ALKEY_"))}
    arguments = [sys.executable, "-m", "alkey"]
    if given == "--url":
        arguments += ["--url", url]
    elif given == "REDIS_URL":
        env["REDIS_URL"] = url
    else:
        arguments += ["--url", f"redis://app:{password}@127.0.0.1:1/0"]
    done = subprocess.run(
        [*arguments, *command], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode != 0, "Redis is down: the command fails"
    assert "127.0.0.1" in done.stdout + done.stderr, "the server is named"
    no_password_in(done.stdout, done.stderr)


@pytest.mark.parametrize("command", [["inspect", "alkey:users#1"], ["check"]], ids=" ".join)
def test_the_command_line_refused_by_redis_shows_no_password(
    command: list[str], cli_help: str, protected_redis: EmbeddedRedis
) -> None:
    if not re.search(rf"^\s+{command[0]}\b", cli_help, re.MULTILINE):
        pytest.skip(f"python -m alkey has no {command[0]!r} command (yet)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS", "ALKEY_"))}
    for password in (OTHER, PASSWORDS["all"]):  # wrong, then right
        url = f"redis://:{encoded(password)}@127.0.0.1:{protected_redis.port}/0"
        done = subprocess.run(
            [sys.executable, "-m", "alkey", "--url", url, *command],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        if password == OTHER:
            assert done.returncode != 0, "a refused password fails the command"
            assert "127.0.0.1" in done.stdout + done.stderr, "the server is named"
        no_password_in(done.stdout, done.stderr)


def test_the_audits_cases_each_show_no_password_and_the_whole_host() -> None:
    """The three leaks an audit found, each fixed."""
    assert redacted("password=Se,cr,et9") == "password=***"  # the rest after ","
    assert redact_url("redis://h:6379/0?client_name=me@x") == (
        "redis://h:6379/0?client_name=me@x"  # was redis://h:***@x: the host hidden
    )
    assert redact_url("redis://h:6379/0?password=Se&cr") == "redis://h:6379/0?password=***"
    with pytest.raises(ConfigurationError, match="percent-encoded") as raised:
        configure(url="redis://h:6379/0?password=Se&cr", env={})
    assert "cr" not in str(raised.value).replace("encoded", "").replace("urllib", "")
    assert issubclass(ConfigurationError, AlkeyError)

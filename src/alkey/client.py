"""Redis configuration from the environment, and the client and store alkey use by default.

Configuration follows alkey 0.3: ``REDIS_URL``, ``REDIS_DB`` and
``REDIS_MAX_CONNECTIONS``, plus the variables that hosting add-ons set
(``REDISTOGO_URL``, ``OPENREDIS_URL``, ``REDISCLOUD_URL``, ``REDISGREEN_URL``), and now
the token store's options, ``ALKEY_TTL``, ``ALKEY_DURABLE``... All of it is read by
:func:`alkey.settings.configure`, the one configuration path; this module keeps alkey
0.3's names on top of it (see :func:`get_redis_config` for the precedence).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Final, TypedDict

import redis
from redis.cluster import RedisCluster

from alkey.errors import ConfigurationError, TokenStoreError, redacted
from alkey.scripts import Call, ScriptCalls, new_token
from alkey.settings import (
    DEFAULT_CLIENT_OPTIONS,
    PROVIDERS,
    Configuration,
    configure,
    redact_url,
    redis_client,
)
from alkey.tokens import RedisClient, RedisTokenStore, ScriptStore, TokenStore, _where, store_for
from alkey.transports import errors_of, misconfiguration

# alkey.interfaces (and with it zope.interface, which only Pyramid and registries need) is
# imported by get_redis_client() when it is given a registry: `import alkey` never loads it.

__all__ = [
    "CHECK_IDENTIFIER",
    "CHECK_TIMEOUT",
    "DEFAULT_CLIENT_OPTIONS",
    "PROVIDERS",
    "RedisConfig",
    "UsesDefaultStore",
    "check_redis",
    "client_from_config",
    "default_configuration",
    "default_store",
    "get_redis_client",
    "get_redis_config",
    "redact_url",
]

log = logging.getLogger("alkey.client")


class RedisConfig(TypedDict):
    """What :func:`get_redis_config` returns."""

    url: str
    db: int
    max_connections: int | None


def get_redis_config(env: Mapping[str, str] | None = None) -> RedisConfig:
    """Read Redis settings from ``env`` (default :data:`os.environ`).

    * The URL comes from the first of ``REDIS_URL``, ``REDISTOGO_URL``,
      ``OPENREDIS_URL``, ``REDISCLOUD_URL``, ``REDISGREEN_URL`` that is set, else
      ``redis://localhost:6379/0``. ``redis://``, ``rediss://`` (TLS) and ``unix://``
      URLs are accepted, and Sentinel's ``redis+sentinel://[[user]:password@]host1:26379
      [,host2:26379...]/service_name[/db]`` (``rediss+sentinel://`` for TLS), whose
      default client is the service's primary, found through the sentinels and followed
      across a failover (:func:`alkey.settings.sentinel_client`); also any scheme
      registered with :func:`alkey.settings.register_scheme`. Credentials go in the URL.
      alkey's own query options (``?alkey_ttl=...``) are removed from the URL returned.
    * The database is the provider's own ``<PREFIX>_DB`` (e.g. ``REDISTOGO_DB``) if set,
      else ``REDIS_DB``, else the URL's (``?db=``, or the path of a ``redis://`` URL),
      else 0.
    * The pool size is ``<PREFIX>_MAX_CONNECTIONS``, else ``REDIS_MAX_CONNECTIONS``,
      else unbounded (redis-py's default).

    alkey 0.3's name for the server part of :func:`alkey.settings.configure` (which also
    checks the ``ALKEY_*`` store options). Raises
    :class:`~alkey.errors.ConfigurationError` (a :class:`ValueError`) naming the variable
    when a value is malformed; passwords never appear in the message.
    """
    configuration = configure(env=env)
    return {
        "url": configuration.url,
        "db": configuration.db,
        "max_connections": configuration.max_connections,
    }


def client_from_config(config: RedisConfig) -> RedisClient:
    """A new client with its own pool, built from a :class:`RedisConfig`, with
    :data:`~alkey.settings.DEFAULT_CLIENT_OPTIONS`."""
    configuration = configure(
        env={}, url=config["url"], db=config["db"], max_connections=config["max_connections"]
    )
    return redis_client(configuration)


_default_client: RedisClient | None = None
# The configuration the default client was built from, with that client: the default
# store's options come from it. (Tests reset _default_client alone; the pair notices.)
_default_configuration: tuple[RedisClient, Configuration] | None = None
_default_lock = threading.Lock()


def _default() -> tuple[RedisClient, Configuration]:
    global _default_client, _default_configuration
    with _default_lock:
        if _default_client is None:
            configuration = configure()
            _default_client = redis_client(configuration)
            _default_configuration = (_default_client, configuration)
            _log_default_redis(configuration, "client")
        elif _default_configuration is None or _default_configuration[0] is not _default_client:
            # A client put in place by hand (a test): configure its store from the
            # environment all the same.
            _default_configuration = (_default_client, configure())
        return _default_configuration


def default_configuration() -> Configuration:
    """The configuration of the process's default client and store, read once from the
    environment by :func:`alkey.settings.configure` (``REDIS_URL``..., ``ALKEY_TTL``...)."""
    return _default()[1]


def default_store() -> TokenStore:
    """The process's default token store: on the default client, with the store options
    of the environment (``ALKEY_TTL``, ``ALKEY_KEY_PREFIX``, ``ALKEY_DURABLE``...).

    Why shared: every key generator and session binding given no client or store uses
    this one object, so the bumps one keeps during an outage are replayed before another
    builds a key. A store built in code on the default client
    (``RedisTokenStore(get_redis_client(), ...)``) is used instead when the environment
    sets no store option.
    """
    client, configuration = _default()
    return configuration.store(client)


def get_redis_client(request: Any = None, *, registry: Any = None) -> RedisClient:
    """The Redis client alkey should use.

    1. With a ``registry`` (or a ``request`` that has one, as Pyramid's does): a
       registered :class:`~alkey.interfaces.IRedisClientFactory` is called, else a client
       is built on a registered :class:`~alkey.interfaces.IRedisConnectionPool`. A
       factory that takes a ``request`` argument (or ``**kwargs``) is called with
       ``request=`` -- the request, or ``None`` -- as alkey 0.3 called every factory;
       one that takes no argument is called with none.
    2. Otherwise, the process's default client, configured once from the environment by
       :func:`alkey.settings.configure` (see :func:`get_redis_config`). Its single
       connection pool is shared by every thread and reset by redis-py in a forked child.
    """
    if registry is None and request is not None:
        registry = getattr(request, "registry", None)
    if registry is not None:
        from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool

        factory = registry.queryUtility(IRedisClientFactory)
        if factory is not None:
            client: RedisClient = factory(request=request) if _takes_request(factory) else factory()
            return client
        pool = registry.queryUtility(IRedisConnectionPool)
        if pool is not None:
            return redis.Redis(connection_pool=pool)
    return _default()[0]


class UsesDefaultStore:
    """Gives a class a ``tokens`` attribute that, left unset, becomes the process's default
    store (:func:`default_store`: the default client, the ``ALKEY_*`` store options) on
    first use -- so that binding or building at import time never connects to Redis.
    (Here, with the configuration, so that the token stores below never look their
    configuration up.)"""

    _tokens: TokenStore | None

    @property
    def tokens(self) -> TokenStore:
        """The token store in use (the default client's, looked up on first use)."""
        if self._tokens is None:
            self._tokens = default_store()
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: TokenStore) -> None:
        self._tokens = tokens


def _takes_request(factory: Any) -> bool:
    """Whether an :class:`~alkey.interfaces.IRedisClientFactory` takes alkey 0.3's
    ``request=`` (a ``request`` parameter, or ``**kwargs``), so that a factory written
    for 0.3 keeps working, and one written for 1.0 is still called with no argument."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): as 1.0 does
        return False
    return any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD
        or (
            parameter.name == "request"
            and parameter.kind
            in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        for parameter in parameters
    )


def _log_default_redis(configuration: Configuration, what: str) -> None:
    """Say which Redis a default client (``what``) uses, and where that came from.

    Why: the default client is made without the application naming a server, so the log
    is the one place that tells an operator which Redis the tokens live in. When nothing
    was configured at all, the client uses ``redis://localhost:6379/0`` -- right on a
    developer's machine, and a silent mistake in production (tokens written into whatever
    Redis runs there, while the real one is never bumped) -- so that case is a WARNING,
    which production logging keeps; a configured server is INFO. Passwords are masked.
    """
    if configuration.sources["url"].kind == "default":
        log.warning(
            "alkey: no Redis is configured (REDIS_URL and the other variables alkey reads "
            "are unset): the default Redis %s uses %s, db %d. If alkey's tokens belong in "
            "another Redis, set REDIS_URL",
            what,
            configuration.redacted_url,
            configuration.db,
        )
    else:
        log.info("alkey: the default Redis %s uses %s", what, configuration.describe())


# -- the startup check ---------------------------------------------------------------------

#: Seconds :func:`check_redis` keeps trying a Redis that cannot be reached yet (refused,
#: timed out, still loading its data) before it gives up: long enough for a Redis started
#: alongside the application, short enough that a wrong address fails the start promptly.
CHECK_TIMEOUT: Final = 5.0

#: The identifier the check fetches and bumps: a token of its own, which no key names.
CHECK_IDENTIFIER: Final = "alkey:alkey-check#probe"


def _check_rounds(store: ScriptStore) -> list[list[Call]]:
    """The round trips of a check, each as the store makes it: fetch twice (``EVAL``,
    which loads the script, then ``EVALSHA``), then bump -- in durable mode behind an
    intent that the bump clears, as a commit does."""
    calls: ScriptCalls = store.calls
    fetch = calls.fetch([CHECK_IDENTIFIER], ())
    rounds = [fetch, fetch]
    if store.options.durable:
        intent = "check-" + new_token()
        rounds.append(calls.intend(intent, [CHECK_IDENTIFIER]))
        rounds.append(calls.bump([CHECK_IDENTIFIER], [intent]))
    else:
        rounds.append(calls.bump([CHECK_IDENTIFIER]))
    return rounds


def _epoch_problem(results: list[Any]) -> str | None:
    """What is wrong with a check's fetch answer: an empty epoch (``INFO`` hidden)."""
    if results and results[-1] and results[-1][0]:
        return None
    return (
        "its scripts cannot read INFO replication (an ACL without +info, or a proxy that "
        "hides it): alkey would work, but could not tell a failover or a restart that lost "
        "writes from a normal day, and keys could come back to values cached before a "
        "write; grant +info (or pass require_epoch=False to accept this)"
    )


def _needs(store: ScriptStore) -> str:
    """The commands and keys a store needs, and the ACL rule that grants them."""
    prefix = store.options.key_prefix
    commands = "+eval +evalsha +mget +set +ping +select +info"
    scripts = "MGET, SET and INFO replication"
    if store.options.durable:
        commands += " +time +zadd +zrangebyscore +zrem +hset +hget +hdel"
        scripts += "; in durable mode also TIME, ZADD, ZRANGEBYSCORE, ZREM, HSET, HGET, HDEL"
    return (
        f"alkey runs EVAL and EVALSHA (its scripts call {scripts}), PING, and SELECT "
        "for a database other than 0, on the keys "
        f"{prefix}alkey:*; e.g. ACL SETUSER <user> on >password ~{prefix}alkey:* "
        f"resetchannels -@all {commands}"
    )


def _diagnosis(error: BaseException, store: ScriptStore) -> tuple[str, bool]:
    """What a check's failure means, said for an operator, and whether it may pass by
    itself (a Redis not reachable *yet*, or a replica about to be promoted: worth trying
    again until the deadline). A misconfiguration reads as the store's own log line says
    it (:func:`alkey.transports.misconfiguration`), with the exact ACL rule this store
    needs when that is what is wrong."""
    cause = error.__cause__ if isinstance(error, TokenStoreError) and error.__cause__ else error
    client = getattr(store, "client", None)  # a sync or an asyncio store's
    found = misconfiguration(cause, errors_of(client), clustered=store.calls.clustered)
    if found is not None:
        fix = _needs(store) if found.kind == "permissions" else found.fix
        return f"{found.problem}: {fix}", False
    names = {kind.__name__ for kind in type(cause).__mro__}
    text = redacted(str(cause)) or type(cause).__name__
    if "ReadOnlyError" in names or text.upper().startswith("READONLY"):
        return (
            f"it is a read-only replica ({text}): point alkey at the primary (or at "
            "Sentinel, with a redis+sentinel:// URL)",
            True,
        )
    if (
        names & {"ConnectionError", "TimeoutError", "TokenStoreUnavailableError", "OSError"}
        or "LOADING" in text.upper()
    ):
        return f"it cannot be reached ({text})", True
    return f"it answered alkey's calls with an error ({text})", False


def _server(store: object, configuration: Configuration | None = None) -> str:
    """The server a store uses, for a message: its URL (password masked) and where that
    came from when it is the default store, else host and port (never a password)."""
    if configuration is not None:
        source = configuration.sources["url"]
        said = "nothing configured: the default" if source.kind == "default" else str(source)
        return f"{configuration.redacted_url} (from {said}), db {configuration.db}"
    client = getattr(store, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        db = getattr(pool, "connection_kwargs", {}).get("db", 0)
        return f"{_where(pool)}, db {db}"
    if client is not None:
        return f"the {type(client).__name__} given"
    return "Redis"


def _checked_store(target: object) -> tuple[object, str]:
    """The token store a check of ``target`` exercises, and how to name its server."""
    if target is None:
        client, configuration = _default()
        return default_store(), _server(client, configuration)
    if isinstance(target, (redis.Redis, RedisCluster)):
        target = store_for(target)
    # Unwrap Pyramid's ApplicationTokenStore (.store), a Binding or a key generator (.tokens).
    while not isinstance(target, ScriptStore):
        inner = getattr(target, "store", None) or getattr(target, "tokens", None)
        if inner is None or inner is target:
            break
        target = inner
    return target, _server(target)


def _failed(server: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"alkey cannot use the Redis at {server}: {problem}")


def check_redis(
    target: object = None, *, timeout: float = CHECK_TIMEOUT, require_epoch: bool = True
) -> None:
    """Refuse to start on a Redis alkey cannot use: raise
    :class:`~alkey.errors.ConfigurationError` saying which server, and what is wrong.

    Why: at run time a token store never fails a request -- a Redis it cannot use makes
    every key miss and keeps the bumps for later, with one line in the log. That is right
    for an outage, and wrong for a mistake made at deployment (a wrong host or password,
    a user whose ACL lacks a command), which would then run for days as a cache that
    never hits. Call this at startup -- or bind with ``alkey.bind(..., fail_fast=True)``,
    or set ``alkey.fail_fast = true`` in Pyramid -- to fail the start instead.

    ``target`` is a token store, a ``redis.Redis`` (or ``RedisCluster``: its shared
    store), a :class:`~alkey.events.Binding`, or ``None`` for the process's default store
    (:func:`default_store`). The check runs the store's own calls on a token of its own
    (:data:`CHECK_IDENTIFIER`), under the store's ``key_prefix``: ``PING``, its fetch
    script twice (``EVAL``, then ``EVALSHA``), and its bump (in durable mode behind an
    intent, as a commit does) -- so it exercises the connection, the credentials, the
    database, the ACL's commands and keys, and the scripts. A Redis that cannot be
    reached yet is tried again for up to ``timeout`` seconds; anything else fails at
    once. With ``require_epoch`` (the default), scripts that cannot read ``INFO
    replication`` fail the check too (see docs/deploying.md, "the epoch"). The client's
    own socket timeouts bound each attempt. A store of another kind is checked by one
    ``fetch`` and one ``bump``, which only its own error policy can make fail.

    The message names the server with any password masked; the client library's error
    is the ``__cause__``. asyncio code awaits :func:`alkey.asyncio.acheck_redis`.
    """
    store, server = _checked_store(target)
    if not isinstance(store, RedisTokenStore):
        if callable(getattr(store, "afetch", None)):
            raise TypeError(
                "check_redis() cannot await an asyncio token store: "
                "await alkey.asyncio.acheck_redis(...) instead"
            )
        try:
            getattr(store, "fetch")([CHECK_IDENTIFIER])  # noqa: B009 - any store kind
            getattr(store, "bump")([CHECK_IDENTIFIER])  # noqa: B009
        except Exception as error:
            raise _failed(server, f"its token store failed ({redacted(str(error))})") from error
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            _check_once(store, require_epoch)
        except Exception as error:
            time.sleep(_retry_after(error, store, server, deadline - time.monotonic()))
        else:
            log.info("alkey: the Redis at %s passed alkey's check", server)
            return


def _retry_after(error: Exception, store: ScriptStore, server: str, left: float) -> float:
    """How long the check (sync or asyncio) waits before trying again after ``error``,
    with ``left`` seconds to its deadline; or the check's :class:`ConfigurationError`,
    raised, when waiting cannot help or the time is up."""
    if isinstance(error, ConfigurationError):
        raise _failed(server, str(error)) from None
    problem, passing = _diagnosis(error, store)
    if not passing or left <= 0:
        raise _failed(server, problem) from error
    return min(0.1, left)


def _check_once(store: RedisTokenStore, require_epoch: bool) -> None:
    store.client.ping()
    answers = [store.transport.run(calls) for calls in _check_rounds(store)]
    problem = _epoch_problem(answers[0]) if require_epoch else None
    if problem is not None:
        raise ConfigurationError(problem)

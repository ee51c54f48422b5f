"""Redis configuration from the environment, and the client and store alkey use by default.

Configuration follows alkey 0.3: ``REDIS_URL``, ``REDIS_DB`` and
``REDIS_MAX_CONNECTIONS``, plus the variables that hosting add-ons set
(``REDISTOGO_URL``, ``OPENREDIS_URL``, ``REDISCLOUD_URL``, ``REDISGREEN_URL``), and now
the token store's options, ``ALKEY_TTL``, ``ALKEY_DURABLE``... All of it is read by
:func:`alkey.settings.configure`, the one configuration path; this module keeps alkey
0.3's names on top of it (see :func:`get_redis_config` for the precedence).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, TypedDict

import redis

from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool
from alkey.settings import (
    DEFAULT_CLIENT_OPTIONS,
    PROVIDERS,
    Configuration,
    configure,
    redact_url,
    redis_client,
)
from alkey.tokens import RedisClient, TokenStore

__all__ = [
    "DEFAULT_CLIENT_OPTIONS",
    "PROVIDERS",
    "RedisConfig",
    "UsesDefaultStore",
    "client_from_config",
    "default_configuration",
    "default_store",
    "get_redis_client",
    "get_redis_config",
    "redact_url",
]


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
       is built on a registered :class:`~alkey.interfaces.IRedisConnectionPool`.
    2. Otherwise, the process's default client, configured once from the environment by
       :func:`alkey.settings.configure` (see :func:`get_redis_config`). Its single
       connection pool is shared by every thread and reset by redis-py in a forked child.
    """
    if registry is None and request is not None:
        registry = getattr(request, "registry", None)
    if registry is not None:
        factory = registry.queryUtility(IRedisClientFactory)
        if factory is not None:
            client: RedisClient = factory()
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

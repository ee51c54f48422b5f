"""Redis configuration from the environment, and the client alkey uses by default.

Configuration follows alkey 0.3: ``REDIS_URL``, ``REDIS_DB`` and
``REDIS_MAX_CONNECTIONS``, plus the variables that hosting add-ons set
(``REDISTOGO_URL``, ``OPENREDIS_URL``, ``REDISCLOUD_URL``, ``REDISGREEN_URL``). See
:func:`get_redis_config` for the precedence.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, TypedDict
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis

from alkey.constants import DEFAULT_REDIS_URL
from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool
from alkey.tokens import RedisClient, TokenStore, store_for

__all__ = [
    "PROVIDERS",
    "RedisConfig",
    "UsesDefaultStore",
    "get_redis_client",
    "get_redis_config",
    "redact_url",
]

#: Environment variable prefixes, in order of precedence: ``<PREFIX>_URL`` names the
#: server, and ``<PREFIX>_DB`` / ``<PREFIX>_MAX_CONNECTIONS`` go with it.
PROVIDERS = ("REDIS", "REDISTOGO", "OPENREDIS", "REDISCLOUD", "REDISGREEN")

#: Applied to the default client so that an unreachable Redis costs seconds, not a hang.
#: A ``?socket_timeout=`` (or any other option) in the URL overrides them.
DEFAULT_CLIENT_OPTIONS: Mapping[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 2.0,
    "health_check_interval": 30,
}

_SCHEMES = ("redis", "rediss", "unix")


class RedisConfig(TypedDict):
    """What :func:`get_redis_config` returns."""

    url: str
    db: int
    max_connections: int | None


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _integer(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, not {raw!r}")
    return value


def _url_db(url: str) -> int | None:
    """The database a URL names: its ``?db=`` query, else (redis/rediss) its path."""
    parts = urlsplit(url)
    query = parse_qs(parts.query).get("db")
    text = query[0] if query else ("" if parts.scheme == "unix" else parts.path.strip("/"))
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the database in {redact_url(url)!r} must be a number") from None


def get_redis_config(env: Mapping[str, str] | None = None) -> RedisConfig:
    """Read Redis settings from ``env`` (default :data:`os.environ`).

    * The URL comes from the first of ``REDIS_URL``, ``REDISTOGO_URL``,
      ``OPENREDIS_URL``, ``REDISCLOUD_URL``, ``REDISGREEN_URL`` that is set, else
      ``redis://localhost:6379/0``. ``redis://``, ``rediss://`` (TLS) and ``unix://``
      URLs are accepted; credentials go in the URL.
    * The database is the provider's own ``<PREFIX>_DB`` (e.g. ``REDISTOGO_DB``) if set,
      else ``REDIS_DB``, else the URL's (``?db=``, or the path of a ``redis://`` URL),
      else 0.
    * The pool size is ``<PREFIX>_MAX_CONNECTIONS``, else ``REDIS_MAX_CONNECTIONS``,
      else unbounded (redis-py's default).

    Raises :class:`ValueError` naming the variable when a value is malformed; passwords
    never appear in the message.
    """
    if env is None:
        env = os.environ
    prefix, url = "REDIS", DEFAULT_REDIS_URL
    for candidate in PROVIDERS:
        value = env.get(f"{candidate}_URL", "").strip()
        if value:
            prefix, url = candidate, value
            break
    variable = f"{prefix}_URL"
    if urlsplit(url).scheme not in _SCHEMES:
        raise ValueError(
            f"{variable}={redact_url(url)!r} is not a Redis URL: "
            "use redis://[user:password@]host[:port][/db], rediss://... or unix:///path"
        )

    def setting(suffix: str) -> int | None:
        own = _integer(env, f"{prefix}_{suffix}") if prefix != "REDIS" else None
        return own if own is not None else _integer(env, f"REDIS_{suffix}")

    db = setting("DB")
    if db is None:
        db = _url_db(url) or 0
    return {"url": url, "db": db, "max_connections": setting("MAX_CONNECTIONS")}


def client_from_config(config: RedisConfig) -> RedisClient:
    """A new client with its own pool, built from a :class:`RedisConfig`."""
    options: dict[str, Any] = dict(DEFAULT_CLIENT_OPTIONS)
    if config["max_connections"] is not None:
        options["max_connections"] = config["max_connections"]
    pool = redis.ConnectionPool.from_url(config["url"], **options)
    # from_url lets the URL's path win over a db argument; the environment's REDIS_DB
    # has been resolved already and must win.
    pool.connection_kwargs["db"] = config["db"]
    return redis.Redis(connection_pool=pool)


_default_client: RedisClient | None = None
_default_lock = threading.Lock()


def _default() -> RedisClient:
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = client_from_config(get_redis_config())
        return _default_client


def get_redis_client(request: Any = None, *, registry: Any = None) -> RedisClient:
    """The Redis client alkey should use.

    1. With a ``registry`` (or a ``request`` that has one, as Pyramid's does): a
       registered :class:`~alkey.interfaces.IRedisClientFactory` is called, else a client
       is built on a registered :class:`~alkey.interfaces.IRedisConnectionPool`.
    2. Otherwise, the process's default client, configured once from the environment by
       :func:`get_redis_config`. Its single connection pool is shared by every thread
       and reset by redis-py in a forked child.
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
    return _default()


class UsesDefaultStore:
    """Gives a class a ``tokens`` attribute that, left unset, becomes the store of the
    process's default client on first use -- so that binding or building at import time
    never connects to Redis. (Here, with the configuration, so that the token stores
    below never look their configuration up.)"""

    _tokens: TokenStore | None

    @property
    def tokens(self) -> TokenStore:
        """The token store in use (the default client's, looked up on first use)."""
        if self._tokens is None:
            self._tokens = store_for(get_redis_client())
        return self._tokens

    @tokens.setter
    def tokens(self, tokens: TokenStore) -> None:
        self._tokens = tokens

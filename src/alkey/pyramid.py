"""Pyramid integration: ``config.include('alkey')``.

Including alkey does two things, both configured from the application's settings:

* binds the session named by ``alkey.session_cls`` (default ``pyramid_basemodel.Session``)
  with :func:`alkey.events.bind`, so that every transaction ``pyramid_tm`` commits bumps
  the tokens of the rows it wrote, before the response is returned;
* adds ``request.cache_key``, a :class:`~alkey.cache.CacheKeyGenerator` on the same token
  store, so the keys a view builds change exactly when those commits happen.

=========================  ==============================================================
setting                    meaning
=========================  ==============================================================
``alkey.session_cls``      dotted path of a Session class, ``sessionmaker``,
                           ``scoped_session`` or Session instance (default
                           ``pyramid_basemodel.Session``)
``alkey.redis_url``        ``redis://``, ``rediss://`` or ``unix://`` URL of the token
                           Redis; ``redis.url`` is read when it is unset
``alkey.cache_key_prefix`` text in front of every ``request.cache_key(...)`` key
=========================  ==============================================================

Redis is chosen once per application, in this order: an
:class:`~alkey.interfaces.IRedisClientFactory` or
:class:`~alkey.interfaces.IRedisConnectionPool` registered in the application's registry
(before or after the include), else the URL from the settings, else the environment
(:func:`alkey.client.get_redis_config`). The choice is made when the configuration is
committed (``config.commit()`` or ``make_wsgi_app()``), or at the first commit or key
before that, and logged with any password masked.

This module is imported only by :func:`alkey.includeme`; the core never imports Pyramid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

from pyramid.config import Configurator  # type: ignore[import-untyped]
from pyramid.exceptions import ConfigurationError  # type: ignore[import-untyped]
from pyramid.interfaces import PHASE3_CONFIG  # type: ignore[import-untyped]

from alkey import events
from alkey.cache import CacheKeyGenerator
from alkey.client import client_from_config, get_redis_client, get_redis_config, redact_url
from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool
from alkey.tokens import RedisClient, TokenStore, bump, intend, store_for

__all__ = [
    "CACHE_KEY_PREFIX_SETTING",
    "DEFAULT_SESSION_CLS",
    "REDIS_URL_SETTINGS",
    "SESSION_CLS_SETTING",
    "ApplicationTokenStore",
    "cache_key",
    "includeme",
]

log = logging.getLogger("alkey.pyramid")

SESSION_CLS_SETTING: Final = "alkey.session_cls"
#: The seed's default: pyramid_basemodel's thread-local scoped session.
DEFAULT_SESSION_CLS: Final = "pyramid_basemodel.Session"
#: Read in this order; the first one set names the token Redis.
REDIS_URL_SETTINGS: Final = ("alkey.redis_url", "redis.url")
CACHE_KEY_PREFIX_SETTING: Final = "alkey.cache_key_prefix"

# Where the application's key generator lives in its registry (a dict, as in Pyramid's
# cookiecutter): per application, never a module global.
_KEY_GENERATOR: Final = "alkey.key_generator"
# After the actions of the application and its other add-ons, so that an
# IRedisClientFactory they register in an action is seen too.
_AFTER_OTHER_ACTIONS: Final = PHASE3_CONFIG + 1000


class ApplicationTokenStore:
    """The token store of one Pyramid application, on the Redis its configuration names.

    Both the session binding (which bumps) and ``request.cache_key`` (which reads) hold
    this one object, so they always use the same Redis, however the application
    configures it. Redis is chosen on first use rather than at ``config.include`` so that
    an :class:`~alkey.interfaces.IRedisClientFactory` or
    :class:`~alkey.interfaces.IRedisConnectionPool` registered after the include still
    counts; the choice is then kept for the life of the process.
    """

    def __init__(self, registry: Any, redis_url: str | None, redis_url_setting: str) -> None:
        self._registry = registry
        self._redis_url = redis_url
        self._redis_url_setting = redis_url_setting
        self._client: RedisClient | None = None
        self._store: TokenStore | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> RedisClient:
        """The application's Redis client, chosen on first use."""
        self._resolve()
        assert self._client is not None
        return self._client

    @property
    def store(self) -> TokenStore:
        """The process's shared store for :attr:`client` (:func:`alkey.tokens.store_for`)."""
        self._resolve()
        assert self._store is not None
        return self._store

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        return self.store.fetch(identifiers)

    def intend(self, identifiers: Collection[str]) -> str | None:
        return intend(self.store, identifiers)

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        bump(self.store, identifiers, intent)

    def registers_redis(self) -> bool:
        """Whether the registry holds one of alkey's Redis extension points."""
        return (
            self._registry.queryUtility(IRedisClientFactory) is not None
            or self._registry.queryUtility(IRedisConnectionPool) is not None
        )

    def _resolve(self) -> None:
        if self._store is not None:
            return
        with self._lock:
            if self._store is not None:
                return
            client, source = self._choose()
            log.info("alkey: tokens live in the Redis given by %s", source)
            self._client = client
            self._store = store_for(client)

    def _choose(self) -> tuple[RedisClient, str]:
        if self.registers_redis():
            return (
                get_redis_client(registry=self._registry),
                "the IRedisClientFactory or IRedisConnectionPool in the registry",
            )
        if self._redis_url is not None:
            config = get_redis_config({"REDIS_URL": self._redis_url})
            source = f"{self._redis_url_setting} = {redact_url(self._redis_url)}"
            return client_from_config(config), source
        url = redact_url(get_redis_config()["url"])
        return get_redis_client(), f"the environment ({url})"


def _setting(settings: Mapping[str, Any], name: str) -> Any:
    # A blank .ini value counts as unset.
    value = settings.get(name)
    if isinstance(value, str):
        return value.strip() or None
    return value


def _redis_url(settings: Mapping[str, Any]) -> tuple[str | None, str]:
    for name in REDIS_URL_SETTINGS:
        url = _setting(settings, name)
        if url is None:
            continue
        try:
            get_redis_config({"REDIS_URL": str(url)})
        except ValueError as error:
            raise ConfigurationError(
                f"{name} = {redact_url(str(url))!r} is not a usable Redis URL: {error}"
            ) from None
        return str(url), name
    return None, REDIS_URL_SETTINGS[0]


def _session_target(config: Configurator, settings: Mapping[str, Any]) -> object:
    value = settings.get(SESSION_CLS_SETTING, DEFAULT_SESSION_CLS)
    try:
        # maybe_dotted also accepts the object itself, for settings passed in code.
        return config.maybe_dotted(value)
    except Exception as error:
        raise ConfigurationError(
            f"{SESSION_CLS_SETTING} = {value!r} does not resolve "
            f"({type(error).__name__}: {error}). Set {SESSION_CLS_SETTING} to the dotted "
            "path of the Session class, sessionmaker or scoped_session that your "
            "application commits with, e.g. myapp.models.DBSession."
        ) from error


def cache_key(request: Any) -> CacheKeyGenerator:
    """``request.cache_key``: the application's key generator.

    It reads the same token store the session binding bumps, so a key built after a
    request committed a write to a row differs from the key built before.
    """
    generator: CacheKeyGenerator = request.registry[_KEY_GENERATOR]
    return generator


def includeme(config: Configurator) -> None:
    """Bind the configured session and add ``request.cache_key``.

    Errors in the settings -- a ``alkey.session_cls`` that does not resolve or cannot be
    bound, a malformed Redis URL or key prefix -- raise
    :class:`pyramid.exceptions.ConfigurationError` here, at startup, naming the setting.
    """
    settings: Mapping[str, Any] = config.get_settings() or {}
    target = _session_target(config, settings)
    redis_url, redis_url_setting = _redis_url(settings)
    tokens = ApplicationTokenStore(config.registry, redis_url, redis_url_setting)
    try:
        generator = CacheKeyGenerator(
            tokens=tokens, prefix=str(_setting(settings, CACHE_KEY_PREFIX_SETTING) or "")
        )
    except ValueError as error:
        raise ConfigurationError(f"{CACHE_KEY_PREFIX_SETTING}: {error}") from None
    try:
        events.bind(target, tokens=tokens)
    except TypeError as error:
        value = settings.get(SESSION_CLS_SETTING, DEFAULT_SESSION_CLS)
        raise ConfigurationError(f"{SESSION_CLS_SETTING} = {value!r}: {error}") from None
    config.registry[_KEY_GENERATOR] = generator
    config.add_request_method(cache_key, "cache_key", reify=True)

    def choose_redis() -> None:
        # At commit: a Redis that cannot be configured fails the startup, and code that
        # asks the registry (alkey.get_cache_key_generator(request)) gets the same client.
        registered = tokens.registers_redis()
        client = tokens.client
        if not registered:
            config.registry.registerUtility(lambda: client, IRedisClientFactory)

    config.action(("alkey.pyramid", "redis"), choose_redis, order=_AFTER_OTHER_ACTIONS)

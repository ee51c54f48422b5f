"""Pyramid integration: ``config.include('alkey')``.

Including alkey does two things, both configured from the application's settings:

* binds the session named by ``alkey.session_cls`` (default ``pyramid_basemodel.Session``)
  with :func:`alkey.events.bind`, so that every transaction ``pyramid_tm`` commits bumps
  the tokens of the rows it wrote, before the response is returned;
* adds ``request.cache_key``, a :class:`~alkey.keys.CacheKeyGenerator` on the same token
  store, so the keys a view builds change exactly when those commits happen.

============================  ===========================================================
setting                       meaning
============================  ===========================================================
``alkey.session_cls``         dotted path of a Session class, ``sessionmaker``,
                              ``scoped_session`` or Session instance (default
                              ``pyramid_basemodel.Session``)
``alkey.redis_url``           ``redis://``, ``rediss://`` or ``unix://`` URL of the token
                              Redis; ``redis.url`` is read when it is unset
``alkey.cache_key_prefix``    text in front of every ``request.cache_key(...)`` key
``alkey.fail_fast``           ``true`` (or a number of seconds to wait for Redis): check
                              the chosen Redis when the configuration is committed, and
                              refuse to start if alkey cannot use it
                              (:func:`alkey.client.check_redis`); default ``false``
``alkey.<option>``            the token store's options (``ttl``, ``key_prefix``,
                              ``on_error``, ``max_pending``, ``retry_interval``,
                              ``durable``, ``lease``, ``local_cache``: see
                              :class:`alkey.options.StoreOptions`), read by
                              :func:`alkey.settings.configure` like every other source:
                              these settings win over the URL's ``alkey_*`` query options
                              and the ``ALKEY_*`` environment variables
============================  ===========================================================

Redis is chosen once per application, in this order: an
:class:`~alkey.interfaces.IRedisClientFactory` or
:class:`~alkey.interfaces.IRedisConnectionPool` registered in the application's registry
(before or after the include), else the URL from the settings, else the environment
(:func:`alkey.client.get_redis_config`). The store options apply whichever client is
chosen. The choice is made when the configuration is committed (``config.commit()`` or
``make_wsgi_app()``), or at the first commit or key before that, and logged with any
password masked; the settings themselves are checked at ``config.include('alkey')``.

This module is imported only by :func:`alkey.includeme`; the core never imports Pyramid.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final

import pyramid.exceptions  # type: ignore[import-untyped]
from pyramid.config import Configurator  # type: ignore[import-untyped]
from pyramid.interfaces import PHASE3_CONFIG  # type: ignore[import-untyped]

from alkey import errors, events
from alkey.client import CHECK_TIMEOUT, check_redis, default_store, get_redis_client
from alkey.interfaces import IRedisClientFactory, IRedisConnectionPool
from alkey.keys import CacheKeyGenerator
from alkey.settings import SETTINGS_PREFIX, Configuration, configure
from alkey.tokens import RedisClient, TokenStore, bump, intend

__all__ = [
    "CACHE_KEY_PREFIX_SETTING",
    "DEFAULT_SESSION_CLS",
    "FAIL_FAST_SETTING",
    "REDIS_URL_SETTINGS",
    "SESSION_CLS_SETTING",
    "ApplicationTokenStore",
    "PyramidConfigurationError",
    "cache_key",
    "includeme",
]

log = logging.getLogger("alkey.pyramid")

#: The setting naming the session to bind: a dotted path, or the object itself when the
#: application passes settings from code.
SESSION_CLS_SETTING: Final = "alkey.session_cls"
#: The seed's default: pyramid_basemodel's thread-local scoped session.
DEFAULT_SESSION_CLS: Final = "pyramid_basemodel.Session"
#: Read in this order; the first one set names the token Redis.
REDIS_URL_SETTINGS: Final = ("alkey.redis_url", "redis.url")
#: The setting whose text starts every ``request.cache_key(...)`` key, so that two
#: applications sharing a cache never share keys.
CACHE_KEY_PREFIX_SETTING: Final = "alkey.cache_key_prefix"
#: The setting that makes the application refuse to start on a Redis alkey cannot use:
#: ``true``/``false`` (also ``yes``/``no``, ``on``/``off``), or a number: the seconds to
#: wait for a Redis that cannot be reached yet (``0``: no check).
FAIL_FAST_SETTING: Final = "alkey.fail_fast"

# Where the application's key generator lives in its registry (a dict, as in Pyramid's
# cookiecutter): per application, never a module global.
_KEY_GENERATOR: Final = "alkey.key_generator"
# After the actions of the application and its other add-ons, so that an
# IRedisClientFactory they register in an action is seen too.
_AFTER_OTHER_ACTIONS: Final = PHASE3_CONFIG + 1000


class PyramidConfigurationError(
    errors.ConfigurationError,
    pyramid.exceptions.ConfigurationError,  # type: ignore[misc]  # Pyramid is untyped
):
    """A setting of ``config.include('alkey')`` cannot work.

    Both :class:`alkey.errors.ConfigurationError` and Pyramid's own
    :class:`pyramid.exceptions.ConfigurationError`, so that an application catches it
    either way, and Pyramid reports it as the configuration error it is.
    """


class ApplicationTokenStore:
    """The token store of one Pyramid application, on the Redis its configuration names.

    Both the session binding (which bumps) and ``request.cache_key`` (which reads) hold
    this one object, so they always use the same Redis and the same store options,
    however the application configures them. Redis is chosen on first use rather than at
    ``config.include`` so that an :class:`~alkey.interfaces.IRedisClientFactory` or
    :class:`~alkey.interfaces.IRedisConnectionPool` registered after the include still
    counts; the choice is then kept for the life of the process.

    ``configuration`` is what :func:`alkey.settings.configure` made of the application's
    settings. (A URL string, or ``None`` for the environment, with the name of the
    setting that gave it, is still accepted, as before there was a configuration.)
    """

    def __init__(
        self,
        registry: Any,
        configuration: Configuration | str | None = None,
        redis_url_setting: str = REDIS_URL_SETTINGS[0],
    ) -> None:
        if not isinstance(configuration, Configuration):
            configuration = configure(
                {redis_url_setting: configuration} if configuration is not None else None
            )
        self._registry = registry
        self.configuration = configuration
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
        """The application's store, shared through :attr:`client`'s connection pool
        (:func:`alkey.tokens.store_for` returns it for that client)."""
        self._resolve()
        assert self._store is not None
        return self._store

    def fetch(self, identifiers: Sequence[str]) -> list[str]:
        """The application store's :meth:`~alkey.tokens.TokenStore.fetch`."""
        return self.store.fetch(identifiers)

    def intend(self, identifiers: Collection[str]) -> str | None:
        """The application store's :meth:`~alkey.tokens.DurableTokenStore.intend`, if it
        is durable; else ``None``, nothing recorded."""
        return intend(self.store, identifiers)

    def bump(self, identifiers: Collection[str], intent: str | None = None) -> None:
        """The application store's :meth:`~alkey.tokens.DurableTokenStore.bump` (its
        :meth:`~alkey.tokens.TokenStore.bump` if it is not durable)."""
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
            client, store, source = self._choose()
            log.info("alkey: tokens live in the Redis given by %s", source)
            self._client = client
            self._store = store

    def _choose(self) -> tuple[RedisClient, TokenStore, str]:
        configuration = self.configuration
        options = configuration.describe_store_options()
        with_options = f", with {options}" if options else ""
        if self.registers_redis():
            client = get_redis_client(registry=self._registry)
            return (
                client,
                configuration.store(client),
                "the IRedisClientFactory or IRedisConnectionPool in the registry" + with_options,
            )
        url_source = configuration.sources["url"]
        if url_source.kind == "settings":
            store = configuration.store()
            source = f"{url_source.name} = {configuration.redacted_url}{with_options}"
            return _client_of(store), store, source
        source = f"the environment ({configuration.redacted_url}){with_options}"
        if any(source.kind == "settings" for source in configuration.sources.values()):
            # Options of this application's own, on the process's default client: the
            # store is shared through its pool, so that code using the default store
            # (alkey.bind without a client, CacheKeyGenerator()) sees the bumps this one
            # keeps during an outage, and no second pool is opened.
            client = get_redis_client()
            return client, configuration.store(client), source
        # Nothing of the application's own: the process's default client and store,
        # shared with everything else in the process.
        return get_redis_client(), default_store(), source


def _client_of(store: TokenStore) -> RedisClient:
    client: RedisClient = getattr(store, "client")  # noqa: B009 - any registered store kind
    return client


def _configuration(settings: Mapping[str, Any]) -> Configuration:
    try:
        return configure(settings, prefix=SETTINGS_PREFIX)
    except errors.ConfigurationError as error:
        raise PyramidConfigurationError(str(error)) from None


def _session_target(config: Configurator, settings: Mapping[str, Any]) -> object:
    value = settings.get(SESSION_CLS_SETTING, DEFAULT_SESSION_CLS)
    try:
        # maybe_dotted also accepts the object itself, for settings passed in code.
        return config.maybe_dotted(value)
    except Exception as error:
        raise PyramidConfigurationError(
            f"{SESSION_CLS_SETTING} = {value!r} does not resolve "
            f"({type(error).__name__}: {error}). Set {SESSION_CLS_SETTING} to the dotted "
            "path of the Session class, sessionmaker or scoped_session that your "
            "application commits with, e.g. myapp.models.DBSession."
        ) from error


def _fail_fast(settings: Mapping[str, Any]) -> float | None:
    """The check's timeout that ``alkey.fail_fast`` asks for, or ``None`` for no check."""
    value = settings.get(FAIL_FAST_SETTING)
    if value is None or value is False or (isinstance(value, str) and not value.strip()):
        return None
    if value is True:
        return CHECK_TIMEOUT
    text = str(value).strip().lower()
    if text in ("true", "yes", "on"):
        return CHECK_TIMEOUT
    if text in ("false", "no", "off", "0"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise PyramidConfigurationError(
            f"{FAIL_FAST_SETTING} = {value!r}: use true or false, or the seconds to wait "
            "for Redis (a positive number)"
        )
    return seconds


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
    bound, a malformed Redis URL, store option or key prefix, an ``alkey.*`` setting that
    does not exist -- raise :class:`PyramidConfigurationError` (both alkey's and Pyramid's
    ``ConfigurationError``) here, at startup, naming the setting. With ``alkey.fail_fast``,
    a Redis that alkey cannot use fails the configuration's commit the same way (Pyramid
    wraps it in its ``ConfigurationExecutionError``).
    """
    settings: Mapping[str, Any] = config.get_settings() or {}
    fail_fast = _fail_fast(settings)
    target = _session_target(config, settings)
    tokens = ApplicationTokenStore(config.registry, _configuration(settings))
    prefix = settings.get(CACHE_KEY_PREFIX_SETTING)
    try:
        generator = CacheKeyGenerator(
            tokens=tokens, prefix=prefix.strip() if isinstance(prefix, str) else str(prefix or "")
        )
    except ValueError as error:
        raise PyramidConfigurationError(f"{CACHE_KEY_PREFIX_SETTING}: {error}") from None
    try:
        events.bind(target, tokens=tokens)
    except TypeError as error:
        value = settings.get(SESSION_CLS_SETTING, DEFAULT_SESSION_CLS)
        raise PyramidConfigurationError(f"{SESSION_CLS_SETTING} = {value!r}: {error}") from None
    config.registry[_KEY_GENERATOR] = generator
    config.add_request_method(cache_key, "cache_key", reify=True)

    def choose_redis() -> None:
        # At commit: a Redis that cannot be configured fails the startup, and code that
        # asks the registry (alkey.get_cache_key_generator(request)) gets the same client.
        registered = tokens.registers_redis()
        client = tokens.client
        if fail_fast is not None:
            try:
                check_redis(tokens.store, timeout=fail_fast)
            except errors.ConfigurationError as error:
                raise PyramidConfigurationError(f"{FAIL_FAST_SETTING}: {error}") from error
        if not registered:
            config.registry.registerUtility(lambda: client, IRedisClientFactory)

    config.action(("alkey.pyramid", "redis"), choose_redis, order=_AFTER_OTHER_ACTIONS)

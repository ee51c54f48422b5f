"""One configuration path: every source of alkey's settings goes through :func:`configure`.

Why one path: alkey can be configured from code (keyword arguments), from a Pyramid
``.ini`` file (``alkey.*`` settings), from the Redis URL itself (``?alkey_durable=true``)
and from the environment (``REDIS_URL``, ``ALKEY_TTL``...). Each of these used to have its
own reader, so the token store's options could not be set from an ``.ini`` file or the
environment, and a typo was noticed -- if ever -- at the first commit. Here every source
is read the same way, in one order, and checked at once:

1. keyword arguments of :func:`configure` (code);
2. the ``settings`` mapping, under ``prefix`` (``alkey.ttl``, ``alkey.durable``...,
   ``alkey.redis_url`` and then ``redis.url`` for the URL): a Pyramid ``.ini`` file;
3. the Redis URL's query options reserved for alkey, ``alkey_<option>``
   (``redis://host/0?alkey_durable=true&alkey_ttl=3600``), removed before the URL
   reaches redis-py;
4. the environment: ``ALKEY_<OPTION>`` (``ALKEY_TTL``, ``ALKEY_DURABLE``...), and for the
   server the rules of alkey 0.3 (``REDIS_URL`` or a hosting provider's variable,
   ``REDIS_DB``, ``REDIS_MAX_CONNECTIONS``), with Heroku's ``REDIS_TLS_URL`` before
   ``REDIS_URL`` (see :func:`configure`);
5. the defaults (:class:`~alkey.options.StoreOptions`, ``redis://localhost:6379/0``).

The result, a :class:`Configuration`, also records where each value came from, for
error messages and logs. Token stores are made by URL scheme (:func:`register_scheme`),
so that another kind of server or client library plugs in without touching this path.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import math
import os
import re
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias, TypeVar
from urllib.parse import parse_qs, parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry

from alkey.constants import DEFAULT_REDIS_URL
from alkey.errors import ConfigurationError
from alkey.options import StoreOptions
from alkey.tokens import (
    RedisClient,
    RedisTokenStore,
    ScriptStore,
    TokenStore,
    shared_store,
    store_for,
)

__all__ = [
    "DEFAULT_CLIENT_OPTIONS",
    "ENV_PREFIX",
    "INTEGRATION_SETTINGS",
    "PROVIDERS",
    "REDIS_SCHEMES",
    "SENTINEL_SCHEMES",
    "SETTINGS_PREFIX",
    "STORE_OPTIONS",
    "TLS_URL_VARIABLE",
    "URL_OPTION_PREFIX",
    "URL_VARIABLES",
    "Configuration",
    "Flavour",
    "SentinelURL",
    "Source",
    "StoreFactory",
    "async_sentinel_client",
    "configure",
    "redact_url",
    "redis_client",
    "register_scheme",
    "registered_schemes",
    "scheme_factory",
    "sentinel_client",
    "unregister_scheme",
]

#: Environment variable prefixes, in order of precedence: ``<PREFIX>_URL`` names the
#: server, and ``<PREFIX>_DB`` / ``<PREFIX>_MAX_CONNECTIONS`` go with it.
PROVIDERS: Final = ("REDIS", "REDISTOGO", "OPENREDIS", "REDISCLOUD", "REDISGREEN")

#: Heroku's variable for the same server as ``REDIS_URL``, over TLS (``rediss://``). It
#: comes first of the environment's URLs: where both are set, the password and the
#: tokens then travel encrypted. ``REDIS_DB`` and ``REDIS_MAX_CONNECTIONS`` go with it.
TLS_URL_VARIABLE: Final = "REDIS_TLS_URL"

#: The environment variables that name the server, in order of precedence:
#: :data:`TLS_URL_VARIABLE`, then ``<PREFIX>_URL`` of each of :data:`PROVIDERS`.
URL_VARIABLES: Final = (TLS_URL_VARIABLE, *(f"{provider}_URL" for provider in PROVIDERS))

#: Applied to the clients alkey builds, so that an unreachable Redis costs seconds, not a
#: hang. A ``?socket_timeout=`` (or any other redis-py option) in the URL overrides them.
DEFAULT_CLIENT_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {"socket_connect_timeout": 2.0, "socket_timeout": 2.0, "health_check_interval": 30}
)

#: The schemes alkey registers itself: plain, TLS and Unix-socket Redis (redis-py).
REDIS_SCHEMES: Final = ("redis", "rediss", "unix")
#: A primary found through Redis Sentinel (plain or TLS): ``redis+sentinel://[[user]:
#: password@]host1:26379[,host2:26379...]/service_name[/db][?options]``.
SENTINEL_SCHEMES: Final = ("redis+sentinel", "rediss+sentinel")
#: The port of a sentinel named without one.
SENTINEL_PORT: Final = 26379

#: Where alkey's settings live in a settings mapping (a Pyramid ``.ini`` file).
SETTINGS_PREFIX: Final = "alkey."
#: Environment variables of the store options: ``ALKEY_TTL``, ``ALKEY_DURABLE``...
ENV_PREFIX: Final = "ALKEY_"
#: Query options of a Redis URL that belong to alkey: ``?alkey_durable=true``.
URL_OPTION_PREFIX: Final = "alkey_"

#: The token store options, as :class:`~alkey.options.StoreOptions` names them.
STORE_OPTIONS: Final = tuple(field.name for field in dataclasses.fields(StoreOptions))

#: Settings under the prefix that are not store options but belong to an integration
#: (read by :mod:`alkey.pyramid`); any other ``alkey.*`` setting is a mistake.
INTEGRATION_SETTINGS: Final = frozenset(
    {"session_cls", "redis_url", "cache_key_prefix", "fail_fast"}
)

#: Read after ``<prefix>redis_url`` when it is unset: the name other Pyramid add-ons use.
_SHARED_URL_SETTING: Final = "redis.url"

#: Which kind of store a scheme's factory makes: for ``redis.Redis`` or ``redis.asyncio``.
Flavour: TypeAlias = Literal["sync", "asyncio"]
FLAVOURS: Final[tuple[Flavour, ...]] = ("sync", "asyncio")

SourceKind: TypeAlias = Literal["keyword", "settings", "url", "environment", "default"]


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for logs and error messages.

    Why here: every message about a setting goes through this module, and a Redis URL
    is the one setting that carries a secret -- in its user part, and in its query
    (``?password=...``, a Sentinel URL's ``?sentinel_password=...``).

    The URL is read as redis-py reads it (``urllib.parse.urlsplit``): the user part
    is everything before the last ``@`` of the network location, and a query option is
    ``name=value`` between ``&``. The host, port, path and the other options are shown
    as written -- they say which server was meant -- and several hosts (a Sentinel URL's
    ``host1:26379,host2:26379``) too. Masked: the password of the user part (the user
    name is kept), the value of every query option whose name looks like a secret
    (``password``, ``sentinel_password``, ``ssl_password``, a misspelt ``pasword``, any
    name with ``pass``, ``pwd``, ``secret``, ``token`` or ``auth`` in it) together with
    any ``&``-piece after it that is no option (an unencoded ``&`` in the password), and
    a fragment (an unencoded ``#`` in a query password; a Redis URL has no fragment).

    A password whose ``/``, ``#`` or ``?`` is not percent-encoded ends the network
    location early for a URL parser (:func:`configure` refuses such URLs): the user part
    is then taken to end at the last ``@`` that is not inside a query option's value, so
    the message refusing it shows no piece of it either.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url
    end = _user_part_end(rest)
    userinfo, server = ("", rest) if end is None else (rest[:end], rest[end + 1 :])
    user, colon, _ = userinfo.partition(":")
    shown_user = f"{user}:***@" if colon else (f"{userinfo}@" if end is not None else "")
    location, hash_sign, _ = server.partition("#")
    head, question, query = location.partition("?")
    shown = head + (question + _redacted_query(query) if question else "")
    return f"{scheme}://{shown_user}{shown}{'#***' if hash_sign else ''}"


def _user_part_end(rest: str) -> int | None:
    """Where the user part of a URL (``rest``: after ``scheme://``) ends: the index of its
    ``@``, or ``None`` without one.

    As a URL parser reads it, the last ``@`` of the network location (the text up to the
    first ``/``, ``?`` or ``#``). Then, an ``@`` further on means a password with an
    unencoded ``/``, ``#`` or ``?`` -- unless it is inside the value of a known query
    option (``?client_name=me@x``): the path of a Redis URL is a database number or a
    service name, and its fragment nothing."""
    netloc_end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if found != -1:
            netloc_end = min(netloc_end, found)
    end = rest.rfind("@", 0, netloc_end)
    position = netloc_end
    while (position := rest.find("@", position + 1)) != -1:
        if not _inside_option_value(rest, position):
            end = position
    return None if end == -1 else end


def _inside_option_value(rest: str, position: int) -> bool:
    """Whether ``rest[position]`` lies in the value of a query option redis-py or alkey
    knows (``client_name=me@x``), or after a secret option's ``=`` (``password=a#b@c``),
    rather than in a password that ended the network location early."""
    question = rest.find("?")
    if question == -1 or question > position:
        return False
    # After a secret option's "=", anything is its value (or a piece of it cut off by an
    # unencoded "&" or "#"): an "@" there is no end of a user part.
    before = rest[question + 1 : position].split("#", 1)
    for piece in before[0].split("&"):
        name, equals, _ = piece.partition("=")
        if equals and _secret_name(unquote_plus(name)):
            return True
    if len(before) > 1:  # in a fragment: no option's value
        return False
    name, equals, _ = before[0].rpartition("&")[2].partition("=")
    return bool(equals) and _known_option(unquote_plus(name))


def _known_option(name: str) -> bool:
    """Whether ``name`` is a query option of a Redis URL: redis-py's, a Sentinel URL's
    ``sentinel_<option>``, or alkey's ``alkey_<option>``."""
    known = _connection_options() | {"ssl", *_SENTINEL_MANAGER_OPTIONS}
    return (
        name in known
        or (name.startswith(_SENTINEL_OPTION) and name[len(_SENTINEL_OPTION) :] in known)
        or name.startswith(URL_OPTION_PREFIX)
    )


def _secret_name(name: str) -> bool:
    """Whether a query option or setting named ``name`` may hold a secret: its value is
    masked wherever it is shown (misspelt names too, since a refused option is shown)."""
    return _SECRET_NAME.search(name) is not None


_SECRET_NAME: Final = re.compile(r"pass|pasw|pwd|secret|token|auth|credential", re.IGNORECASE)


def _query_options(query: str) -> list[tuple[str, str, str]]:
    """The options of a URL's query as ``(name, value, text)``: name and value decoded as
    redis-py decodes them, and the option's text as written.

    A ``&``-piece that follows a secret option's value and is no known option
    (``?password=Se&cr``: an unencoded ``&``) belongs to that value: its text and value
    run on, so that it is masked with it, and :func:`configure` can refuse it without
    showing it."""
    options: list[tuple[str, str, str]] = []
    for piece in query.split("&") if query else ():
        name, equals, value = piece.partition("=")
        decoded = unquote_plus(name)
        if options and _secret_name(options[-1][0]) and not (equals and _known_option(decoded)):
            last_name, last_value, last_text = options[-1]
            options[-1] = (last_name, f"{last_value}&{unquote_plus(piece)}", f"{last_text}&{piece}")
            continue
        options.append((decoded, unquote_plus(value), piece))
    return options


def _redacted_query(query: str) -> str:
    """A URL's query with the value of every secret option masked (:func:`redact_url`)."""
    shown = []
    for name, _, text in _query_options(query):
        if _secret_name(name):
            shown.append(f"{text.partition('=')[0]}=***")
        else:
            shown.append(text)
    return "&".join(shown)


def _check_encoded(url: str, source: Source) -> None:
    """Refuse a URL whose password has an unencoded ``/``, ``#`` or ``?``: a URL parser
    ends the user part there, so the client would connect to a "host" made of a piece
    of the password (and print it), and the database or query would be read from the
    rest. Likewise a secret query option (``?password=``) with an unencoded ``&`` or
    ``#``, which would cut the password short. The message shows the URL masked, and how
    to encode the password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": an unencoded "[" or "]"
        raise ConfigurationError(
            f"{source.spell(url)} is not a valid URL: a '[' or ']' in it must enclose an "
            "IPv6 address; in a password, percent-encode them (%5B, %5D), e.g. "
            "urllib.parse.quote(password, safe='')"
        ) from None
    rest = url.partition("://")[2]
    end = _user_part_end(rest)
    if end is not None and end > len(parts.netloc):
        raise ConfigurationError(
            f"{source.spell(url)}: its password holds a '/', '#' or '?' that is not "
            "percent-encoded; encode it (%2F, %23, %3F), e.g. "
            "urllib.parse.quote(password, safe='')"
        )
    for name, _, text in _query_options(parts.query):
        if _secret_name(name) and ("&" in text or parts.fragment):
            raise ConfigurationError(
                f"{source.spell(url)}: its {name} option holds a '&' or '#' that is not "
                "percent-encoded (or is followed by an unknown option); encode the value "
                "(%26, %23), e.g. urllib.parse.quote(password, safe='')"
            )


# -- where a value came from -----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where one value of a :class:`Configuration` came from, spelt as the user spelt it.

    Why: an error or a log line that says ``ALKEY_TTL`` or ``alkey.ttl`` tells the reader
    which file or variable to fix; "ttl" alone would not.
    """

    kind: SourceKind
    #: The name as written: ``"ttl"`` (keyword), ``"alkey.ttl"`` (settings),
    #: ``"alkey_ttl"`` (URL query), ``"ALKEY_TTL"`` (environment), ``""`` (default).
    name: str = ""
    #: For a URL query option: the name of the setting or variable that gave the URL.
    url_source: str = ""

    def __str__(self) -> str:
        if self.kind == "keyword":
            return f"keyword argument {self.name}"
        if self.kind == "settings":
            return f"setting {self.name}"
        if self.kind == "url":
            return f"{self.name} in the query of {self.url_source}"
        if self.kind == "environment":
            return f"environment variable {self.name}"
        return "default"

    def spell(self, value: object) -> str:
        """``value`` as the user wrote it under this source, passwords masked: a URL's,
        and the whole value of a setting whose name looks like a secret's
        (``alkey.redis_password``, misspelt or not)."""
        shown: object = redact_url(str(value)) if isinstance(value, str) else value
        if _secret_name(self.name):
            shown = "***"
        if self.kind == "settings":
            return f"{self.name} = {shown!r} in the settings"
        if self.kind == "url":
            return f"{self.name}={shown!r} in the query of {self.url_source}"
        if self.kind == "environment":
            return f"{self.name}={shown!r} in the environment"
        if self.kind == "keyword":
            return f"{self.name}={shown!r}"
        return repr(shown)


_DEFAULT: Final = Source("default")


# -- parsing text ---------------------------------------------------------------------------

_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})


def _boolean(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(text)


def _whole(text: str) -> int:
    return int(text.strip())


def _real(text: str) -> float:
    value = float(text.strip())
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _policy(text: str) -> str:
    word = text.strip().lower()
    if word not in ("degrade", "raise"):
        raise ValueError(text)
    return word


@dataclass(frozen=True)
class _Option:
    parse: Callable[[str], object]
    accepted: str


_OPTIONS: Final[Mapping[str, _Option]] = {
    "ttl": _Option(_whole, "a positive whole number of seconds, e.g. 86400"),
    "key_prefix": _Option(str, "text, e.g. myapp:"),
    "on_error": _Option(_policy, "degrade or raise"),
    "max_pending": _Option(_whole, "a whole number of at least 1, e.g. 100000"),
    "retry_interval": _Option(_real, "a number of seconds, 0 or more, e.g. 1 or 0.5"),
    "durable": _Option(_boolean, "true or false (or yes/no, on/off, 1/0)"),
    "lease": _Option(_real, "a positive number of seconds, e.g. 5"),
    "local_cache": _Option(
        _whole, "a whole number of tokens to keep, e.g. 100000, or 0 to turn the cache off"
    ),
}


def _option_value(name: str, raw: object, source: Source) -> object:
    """``raw`` (text from a file, a URL or the environment, or a value from code) as the
    value of store option ``name``, checked; a :class:`~alkey.errors.ConfigurationError` naming
    ``source`` otherwise."""
    option = _OPTIONS[name]
    value = raw
    if isinstance(raw, str):
        try:
            value = option.parse(raw)
        except ValueError:
            raise ConfigurationError(
                f"{source.spell(raw)} is invalid: use {option.accepted}"
            ) from None
    try:
        StoreOptions(**{name: value})  # type: ignore[arg-type]
    except ConfigurationError:
        raise ConfigurationError(f"{source.spell(raw)} is invalid: use {option.accepted}") from None
    return value


def _blank(value: object) -> bool:
    # A blank .ini value or environment variable counts as unset.
    return value is None or (isinstance(value, str) and not value.strip())


def _suggestion(name: str, candidates: list[str], spelling: str) -> str:
    """``"; did you mean <spelling of the closest candidate>?"``, or nothing."""
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {spelling}{close[0]}?" if close else ""


# -- the scheme registry --------------------------------------------------------------------

#: Makes a token store from a :class:`Configuration`. ``client`` is ``None`` when the
#: factory should build the client itself (from the configuration's URL and client
#: options), or a client the application supplies (e.g. from a Pyramid registry), for
#: which it only builds the store, with the configuration's store options.
StoreFactory: TypeAlias = Callable[["Configuration", Any], TokenStore]

_schemes: dict[str, dict[Flavour, StoreFactory]] = {}
_schemes_lock = threading.Lock()
_SCHEME_NAME: Final = re.compile(r"[a-z][a-z0-9+.-]*")


def register_scheme(
    scheme: str, *, sync: StoreFactory | None = None, asyncio: StoreFactory | None = None
) -> None:
    """Make URLs with ``scheme`` build their token stores with these factories.

    Why a registry: the scheme of the URL is what tells a plain Redis from a Sentinel
    group, a cluster or another server, and each needs its own client and store; the
    configuration path stays the same. Each flavour is registered on its own, so
    ``alkey.asyncio`` adds its factory for ``redis://`` when it is imported, next to the
    sync one; a flavour registered again replaces the previous factory. The built-in
    schemes are :data:`REDIS_SCHEMES`.
    """
    if not isinstance(scheme, str) or not _SCHEME_NAME.fullmatch(scheme):
        raise ConfigurationError(
            f"URL scheme {scheme!r} is invalid: use lower-case letters, digits, '+', '-' "
            "or '.', starting with a letter, e.g. 'redis+sentinel'"
        )
    given: dict[Flavour, StoreFactory] = {}
    if sync is not None:
        given["sync"] = sync
    if asyncio is not None:
        given["asyncio"] = asyncio
    if not given:
        raise TypeError("register_scheme() needs a sync or an asyncio factory, or both")
    with _schemes_lock:
        _schemes.setdefault(scheme, {}).update(given)


def unregister_scheme(scheme: str, flavour: Flavour | None = None) -> None:
    """Forget ``scheme``'s factory of ``flavour`` (of every flavour when ``None``), e.g.
    at the end of a test that registered one."""
    with _schemes_lock:
        factories = _schemes.get(scheme, {})
        for name in FLAVOURS if flavour is None else (flavour,):
            factories.pop(name, None)
        if not factories:
            _schemes.pop(scheme, None)


def registered_schemes(flavour: Flavour | None = None) -> tuple[str, ...]:
    """The schemes with a factory of ``flavour`` (of any flavour when ``None``), sorted."""
    with _schemes_lock:
        return tuple(
            sorted(name for name, factories in _schemes.items() if flavour in (None, *factories))
        )


def scheme_factory(scheme: str, flavour: Flavour = "sync") -> StoreFactory:
    """The factory registered for ``scheme`` and ``flavour``; a
    :class:`~alkey.errors.ConfigurationError` listing the registered schemes otherwise."""
    with _schemes_lock:
        factory = _schemes.get(scheme, {}).get(flavour)
    if factory is None and flavour == "asyncio" and "alkey.asyncio" not in sys.modules:
        # The asyncio stores register themselves when alkey.asyncio is imported; loaded
        # by name, as a plugin, so that this layer never imports it (nor greenlet).
        importlib.import_module("alkey.asyncio")
        return scheme_factory(scheme, flavour)
    if factory is None:
        hint = " (import alkey.asyncio to register its stores)" if flavour == "asyncio" else ""
        raise ConfigurationError(
            f"no {flavour} token store is registered for URL scheme {scheme!r}{hint}: "
            f"registered schemes are {', '.join(registered_schemes(flavour)) or 'none'}"
        )
    return factory


# -- the result --------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Configuration:
    """Everything alkey needs to reach Redis and run a token store, resolved once.

    Why a value object: the same configuration serves the sync store, the asyncio one and
    the integrations, and an application can log it (its ``repr`` masks the password) or
    check it at startup before anything connects. Build it with :func:`configure`.
    """

    #: The Redis URL handed to the client library, with alkey's query options removed.
    #: It may hold a password: show :attr:`redacted_url` instead.
    url: str
    #: The database number; it wins over the URL's path.
    db: int
    #: The connection pool's size (``None``: the client library's default).
    max_connections: int | None
    #: Keyword arguments of the client (socket timeouts...): :data:`DEFAULT_CLIENT_OPTIONS`
    #: and any given to :func:`configure`; the URL's own query options win over them.
    client_options: Mapping[str, Any]
    #: The token store's options.
    store_options: StoreOptions
    #: Where each value came from: ``"url"``, ``"db"``, ``"max_connections"`` and each
    #: store option (:data:`STORE_OPTIONS`).
    sources: Mapping[str, Source]

    def __repr__(self) -> str:
        return (
            f"Configuration(url={self.redacted_url!r}, db={self.db}, "
            f"max_connections={self.max_connections}, store_options={self.store_options})"
        )

    @property
    def redacted_url(self) -> str:
        """:attr:`url` with its password masked, for logs and messages."""
        return redact_url(self.url)

    @property
    def scheme(self) -> str:
        """The URL's scheme, which chooses the store factory (:func:`register_scheme`)."""
        return urlsplit(self.url).scheme

    @property
    def sets_store_options(self) -> bool:
        """Whether some store option was given by a source rather than left at its default.

        When none was, :meth:`store` on an existing client reuses whatever store that
        client's pool already shares, as ``store_for(client)`` always has.
        """
        return any(self.sources[name].kind != "default" for name in STORE_OPTIONS)

    def describe(self) -> str:
        """One line for a log: the server (password masked) and each store option set,
        with its source."""
        server = f"{self.redacted_url} (from {self.sources['url']}), db {self.db}"
        options = self.describe_store_options()
        return f"{server}; {options}" if options else server

    def describe_store_options(self) -> str:
        """The store options not left at their defaults, each with its source, e.g.
        ``"ttl=3600 (from setting alkey.ttl)"``; empty when there are none."""
        return "; ".join(
            f"{name}={getattr(self.store_options, name)!r} (from {self.sources[name]})"
            for name in STORE_OPTIONS
            if self.sources[name].kind != "default"
        )

    def redis_config(self) -> dict[str, Any]:
        """``{"url", "db", "max_connections"}``: alkey 0.3's ``get_redis_config`` shape."""
        return {"url": self.url, "db": self.db, "max_connections": self.max_connections}

    def store(self, client: Any = None, *, flavour: Flavour = "sync") -> TokenStore:
        """The token store this configuration describes, made by its scheme's factory.

        Without ``client`` the factory builds a new client (and pool) from the URL: keep
        the store rather than calling this per request. With ``client`` (one the
        application built or registered) only the store is made, with these options. The
        store is shared through the client's connection pool, so
        ``CacheKeyGenerator(client)`` and ``bind(..., redis_client=client)`` use it too,
        and calling this again for the same pool returns the same store.
        """
        return scheme_factory(self.scheme, flavour)(self, client)


# -- configure -----------------------------------------------------------------------------


def _env_integer(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, not {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"{name} must not be negative, not {raw!r}")
    return value


def _url_db(url: str, source: Source) -> int | None:
    """The database a URL names: its ``?db=`` query, else (redis/rediss) its path."""
    parts = urlsplit(url)
    query = parse_qs(parts.query).get("db")
    if query:
        text = query[0]
    elif parts.scheme in SENTINEL_SCHEMES:  # /service_name[/db]
        text = parts.path.strip("/").partition("/")[2]
    else:
        text = "" if parts.scheme == "unix" else parts.path.strip("/")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(
            f"{source.spell(url)}: the database in {redact_url(url)!r} must be a number"
        ) from None


def _split_url_options(url: str) -> tuple[str, list[tuple[str, str]]]:
    """``url`` without its ``alkey_*`` query options, and those options."""
    parts = urlsplit(url)
    if URL_OPTION_PREFIX not in parts.query:
        return url, []
    kept: list[str] = []
    ours: list[str] = []
    for item in parts.query.split("&"):
        key = item.split("=", 1)[0]
        (ours if key.startswith(URL_OPTION_PREFIX) else kept).append(item)
    options = parse_qsl("&".join(ours), keep_blank_values=True)
    return urlunsplit(parts._replace(query="&".join(kept))), options


@functools.cache
def _connection_options() -> frozenset[str]:
    """The query options a Redis URL may carry: what redis-py's connections and pools
    take (read from their signatures, so that a new redis-py's options are known)."""
    names: set[str] = {"max_connections", "timeout", *URL_QUERY_ARGUMENT_PARSERS}
    for cls in (
        redis.connection.AbstractConnection,
        redis.connection.Connection,
        redis.connection.SSLConnection,
        redis.connection.UnixDomainSocketConnection,
    ):
        names.update(inspect.signature(cls.__init__).parameters)
    return frozenset(names - {"self", "kwargs"})


def _check_url_options(url: str, source: Source) -> None:
    """Refuse a query option redis-py does not take (``?foo=1``, a misspelt
    ``sentinel_pasword``): redis-py would pass it on to each new connection, whose
    ``TypeError`` would reach the first key generation or commit instead of this
    configuration. A Sentinel URL also takes ``sentinel_<option>``, ``ssl`` and
    ``min_other_sentinels``."""
    known = _connection_options()
    parts = urlsplit(url)
    sentinel = parts.scheme in SENTINEL_SCHEMES
    if sentinel:
        known = known | {"ssl", *_SENTINEL_MANAGER_OPTIONS}
    for name, _ in parse_qsl(parts.query, keep_blank_values=True):
        plain = (
            name[len(_SENTINEL_OPTION) :]
            if sentinel and name.startswith(_SENTINEL_OPTION)
            else name
        )
        if plain in known:
            continue
        candidates = sorted(known) + ([_SENTINEL_OPTION + k for k in known] if sentinel else [])
        raise ConfigurationError(
            f"{source.spell(url)}: {name!r} is not an option of a Redis connection"
            f"{_suggestion(name, candidates, '')} (alkey's own options are spelt "
            f"{URL_OPTION_PREFIX}<option>)"
        )


def _check_settings(settings: Mapping[str, object], prefix: str) -> None:
    known = [*STORE_OPTIONS, *sorted(INTEGRATION_SETTINGS)]
    for key, value in settings.items():
        if not isinstance(key, str) or not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name in known:
            continue
        suggestion = _suggestion(name, known, prefix)
        raise ConfigurationError(
            f"{Source('settings', key).spell(value)} is not an alkey setting{suggestion} "
            f"(alkey's settings: {', '.join(prefix + name for name in known)})"
        )


def configure(
    settings: Mapping[str, object] | None = None,
    *,
    prefix: str = SETTINGS_PREFIX,
    env: Mapping[str, str] | None = None,
    url: str | None = None,
    db: int | None = None,
    max_connections: int | None = None,
    client_options: Mapping[str, Any] | None = None,
    ttl: int | str | None = None,
    key_prefix: str | None = None,
    on_error: str | None = None,
    max_pending: int | str | None = None,
    retry_interval: float | str | None = None,
    durable: bool | str | None = None,
    lease: float | str | None = None,
    local_cache: int | str | None = None,
) -> Configuration:
    """Resolve alkey's configuration from every source, in one order, checked at once.

    Precedence, highest first: keyword arguments; ``settings`` under ``prefix``
    (``alkey.ttl``...; the URL from ``alkey.redis_url``, else ``redis.url``); the chosen
    URL's ``alkey_<option>`` query options; the environment (``env``, default
    :data:`os.environ`); the defaults. A blank value counts as unset.

    The server, from the environment, follows alkey 0.3: the URL is the first of
    ``REDIS_TLS_URL``, ``REDIS_URL``, ``REDISTOGO_URL``, ``OPENREDIS_URL``,
    ``REDISCLOUD_URL``, ``REDISGREEN_URL`` that is set (:data:`URL_VARIABLES`); the
    database is that provider's ``<PREFIX>_DB``, else ``REDIS_DB``, else the URL's
    (``?db=`` or the path), else 0; the pool size is ``<PREFIX>_MAX_CONNECTIONS``, else
    ``REDIS_MAX_CONNECTIONS``. Those variables go with an environment URL only: a URL
    from code or the settings brings its own database.

    ``REDIS_TLS_URL`` (Heroku's) comes before ``REDIS_URL`` because Heroku sets both for
    one server, the first over TLS: where TLS is offered, alkey uses it. A URL from code
    or the settings still wins over both. Heroku's TLS endpoints present a self-signed
    certificate, which redis-py refuses by default: add ``?ssl_cert_reqs=none`` (or
    ``ssl_ca_certs=...``) to the URL you give alkey, or pass it in ``client_options``; a
    refused certificate is logged as such
    (:class:`~alkey.errors.TokenStoreConfigurationError`), not as an outage.

    Text is parsed (booleans ``true``/``false``, ``yes``/``no``, ``on``/``off``,
    ``1``/``0``; whole and decimal numbers). A value that cannot work, an ``alkey.*``
    setting that alkey does not know (with a "did you mean"), or a URL whose scheme is
    not registered (:func:`register_scheme`) raises
    :class:`~alkey.errors.ConfigurationError` naming the setting as it was spelt, its
    value (passwords masked) and what is accepted -- here, rather than at the first
    commit. Unknown ``ALKEY_*`` environment variables are ignored: the environment is
    shared with other programs.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    given: Mapping[str, object] = settings if settings is not None else {}
    _check_settings(given, prefix)
    sources: dict[str, Source] = {}

    # The server.
    provider = ""
    url_source = _DEFAULT
    chosen: str = DEFAULT_REDIS_URL
    if not _blank(url):
        chosen, url_source = str(url).strip(), Source("keyword", "url")
    else:
        for name in (f"{prefix}redis_url", _SHARED_URL_SETTING):
            if not _blank(given.get(name)):
                chosen, url_source = str(given[name]).strip(), Source("settings", name)
                break
        else:
            for variable in URL_VARIABLES:
                value = environ.get(variable, "").strip()
                if value:
                    provider = "REDIS" if variable == TLS_URL_VARIABLE else variable[:-4]
                    chosen, url_source = value, Source("environment", variable)
                    break
    sources["url"] = url_source
    _check_encoded(chosen, url_source)
    scheme = urlsplit(chosen).scheme
    if scheme not in registered_schemes():
        raise ConfigurationError(
            f"{url_source.spell(chosen)} is not a Redis URL: use "
            "redis://[user:password@]host[:port][/db], rediss://..., unix:///path or "
            "redis+sentinel://[user:password@]host:26379[,host:26379...]/service[/db] "
            f"(registered schemes: {', '.join(registered_schemes())})"
        )
    redis_url, url_options = _split_url_options(chosen)
    if scheme in REDIS_SCHEMES or scheme in SENTINEL_SCHEMES:
        _check_url_options(redis_url, url_source)
    if scheme in SENTINEL_SCHEMES:
        SentinelURL.parse(redis_url, url_source)  # checked now, not at the first commit

    def from_env(suffix: str) -> tuple[int | None, Source]:
        if provider and provider != "REDIS":
            own = _env_integer(environ, f"{provider}_{suffix}")
            if own is not None:
                return own, Source("environment", f"{provider}_{suffix}")
        if provider or url_source.kind == "default":
            value = _env_integer(environ, f"REDIS_{suffix}")
            if value is not None:
                return value, Source("environment", f"REDIS_{suffix}")
        return None, _DEFAULT

    resolved_db: int | None
    if db is not None:
        resolved_db, sources["db"] = db, Source("keyword", "db")
    else:
        resolved_db, sources["db"] = from_env("DB")
        if resolved_db is None:
            resolved_db, sources["db"] = _url_db(redis_url, url_source), url_source
    if resolved_db is None:
        resolved_db, sources["db"] = 0, _DEFAULT
    if max_connections is not None:
        sources["max_connections"] = Source("keyword", "max_connections")
    else:
        max_connections, sources["max_connections"] = from_env("MAX_CONNECTIONS")

    # The store options, each from the first source that sets it.
    keywords: dict[str, object] = {
        "ttl": ttl,
        "key_prefix": key_prefix,
        "on_error": on_error,
        "max_pending": max_pending,
        "retry_interval": retry_interval,
        "durable": durable,
        "lease": lease,
        "local_cache": local_cache,
    }
    in_url: dict[str, str] = {}
    for key, value in url_options:
        name = key[len(URL_OPTION_PREFIX) :]
        if name not in _OPTIONS:
            suggestion = _suggestion(name, list(STORE_OPTIONS), URL_OPTION_PREFIX)
            raise ConfigurationError(
                f"{Source('url', key, url_source.name or 'the URL').spell(value)} "
                f"({redact_url(chosen)}) is not an alkey option{suggestion} (alkey's URL "
                f"options: {', '.join(URL_OPTION_PREFIX + name for name in STORE_OPTIONS)})"
            )
        in_url[name] = value
    chosen_options: dict[str, object] = {}
    for name in STORE_OPTIONS:
        candidates: list[tuple[object, Source]] = [
            (keywords.get(name), Source("keyword", name)),
            (given.get(prefix + name), Source("settings", prefix + name)),
            (in_url.get(name), Source("url", URL_OPTION_PREFIX + name, url_source.name)),
            (
                environ.get(ENV_PREFIX + name.upper()),
                Source("environment", ENV_PREFIX + name.upper()),
            ),
        ]
        sources[name] = _DEFAULT
        for raw, source in candidates:
            # key_prefix may be empty on purpose, but only where it is typed as text in code.
            if _blank(raw) and not (source.kind == "keyword" and raw == ""):
                continue
            chosen_options[name] = _option_value(name, raw, source)
            sources[name] = source
            break

    options: dict[str, Any] = dict(DEFAULT_CLIENT_OPTIONS)
    options.update(client_options or {})
    return Configuration(
        url=redis_url,
        db=resolved_db,
        max_connections=max_connections,
        client_options=MappingProxyType(options),
        store_options=StoreOptions(**chosen_options),  # type: ignore[arg-type]
        sources=MappingProxyType(sources),
    )


# -- the built-in schemes: redis-py --------------------------------------------------------


def redis_client(configuration: Configuration) -> RedisClient:
    """A new ``redis.Redis`` with its own pool, for ``redis://``, ``rediss://`` and
    ``unix://`` URLs: the configuration's URL, database, pool size and client options.

    For a Sentinel URL (:data:`SENTINEL_SCHEMES`), the primary's client of
    :func:`sentinel_client`, so that every path that builds alkey's default client (the
    environment's ``REDIS_URL``, ``get_redis_client()``, ``client_from_config``) follows a
    failover."""
    if configuration.scheme in SENTINEL_SCHEMES:
        client: RedisClient = sentinel_client(configuration)
        return client
    options: dict[str, Any] = dict(configuration.client_options)
    if configuration.max_connections is not None:
        options["max_connections"] = configuration.max_connections
    pool = redis.ConnectionPool.from_url(configuration.url, **options)
    # from_url lets the URL's path win over a db argument; the configured database (the
    # environment's REDIS_DB, say) has been resolved already and must win.
    pool.connection_kwargs["db"] = configuration.db
    return redis.Redis(connection_pool=pool)


# The options each store was built with, so that configuring the same pool again with the
# same options shares the store, and with other options replaces it.
_built_with: weakref.WeakKeyDictionary[ScriptStore, StoreOptions] = weakref.WeakKeyDictionary()
_built_lock = threading.Lock()
_S = TypeVar("_S", bound=ScriptStore)


def configured_store(
    share_key: object,
    kind: type[_S],
    configuration: Configuration,
    make: Callable[[StoreOptions], _S],
    default: Callable[[], _S],
) -> _S:
    """The store of ``kind`` shared through ``share_key`` (a client's connection pool),
    with the configuration's store options: the one already shared there if no option
    was set (``default()``, i.e. ``store_for(client)``) or if it was built with the same
    options, else a new one by ``make(options)``, which then becomes the shared one.

    Written once for every store kind, so that the sync and asyncio factories (and the
    cluster or sentinel ones to come) share stores alike.
    """
    if not configuration.sets_store_options:
        return default()
    options = configuration.store_options

    def build() -> _S:
        store = make(options)
        _built_with[store] = options
        return store

    with _built_lock:
        current = shared_store(share_key, kind, build)
        return current if _built_with.get(current) == options else build()


def _redis_store(configuration: Configuration, client: RedisClient | None) -> TokenStore:
    chosen = client if client is not None else redis_client(configuration)
    return configured_store(
        chosen.connection_pool,
        RedisTokenStore,
        configuration,
        lambda options: RedisTokenStore(chosen, options=options),
        lambda: store_for(chosen),
    )


# -- Redis Sentinel ----------------------------------------------------------------------------

# The query options of a Sentinel URL that configure the sentinels rather than the primary:
# ``sentinel_<option>`` (sentinel_password, sentinel_username, sentinel_socket_timeout...).
_SENTINEL_OPTION: Final = "sentinel_"
# Options of the Sentinel object itself, not of any connection.
_SENTINEL_MANAGER_OPTIONS: Final = {"min_other_sentinels": int}
# Connection options the sentinels share with the primary when the URL sets no
# ``sentinel_`` variant: timeouts (so a dead sentinel costs seconds) and TLS.
_SHARED_WITH_SENTINELS: Final = ("socket_timeout", "socket_connect_timeout", "socket_keepalive")


# TLS switches that redis-py's URL parsers leave as text ("false" would be true).
_BOOLEAN_URL_OPTIONS: Final = frozenset({"ssl", "ssl_check_hostname"})


def _url_boolean(value: str) -> bool:
    """A URL option's boolean, as redis-py reads its own (``to_bool``): false for an
    empty value, ``0``, ``f``, ``false``, ``n`` or ``no``, whatever the case."""
    return value.strip().upper() not in ("", "0", "F", "FALSE", "N", "NO")


@dataclass(frozen=True, repr=False)
class SentinelURL:
    """A ``redis+sentinel://`` (or ``rediss+sentinel://``) URL, taken apart.

    ``redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/service_name[/db]
    [?options]``: the credentials and the query options (``socket_timeout``...) are the
    primary's; ``sentinel_password``, ``sentinel_username`` and any other
    ``sentinel_<option>`` are the sentinels' own (Sentinel has its own ``requirepass``);
    ``min_other_sentinels`` goes to redis-py's ``Sentinel``. A sentinel named without a
    port is on 26379.

    Why a class: the URL is checked once, by :func:`configure` (an unknown scheme, a
    missing service name or a malformed port is a
    :class:`~alkey.errors.ConfigurationError` then, password masked), and read by the
    sync and asyncio client builders alike.
    """

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    #: The database the URL's path or ``?db=`` names (``None``: not named).
    db: int | None
    #: The primary's connection options: credentials, TLS, the URL's query options.
    connection: Mapping[str, Any]
    #: The sentinels' connection options (``sentinel_<option>``, without the prefix).
    sentinel: Mapping[str, Any]
    #: Options of redis-py's ``Sentinel`` itself (``min_other_sentinels``).
    manager: Mapping[str, Any]

    def __repr__(self) -> str:
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"SentinelURL(sentinels={hosts!r}, service_name={self.service_name!r})"

    @classmethod
    def parse(cls, url: str, source: Source = _DEFAULT) -> SentinelURL:
        """``url`` taken apart; a :class:`~alkey.errors.ConfigurationError` naming
        ``source`` (and the URL, password masked) if it cannot name a Sentinel group."""

        def invalid(problem: str) -> ConfigurationError:
            return ConfigurationError(f"{source.spell(url)} is invalid: {problem}")

        parts = urlsplit(url)
        if parts.scheme not in SENTINEL_SCHEMES:
            raise invalid(f"a Sentinel URL starts with {' or '.join(SENTINEL_SCHEMES)}://")
        userinfo, _, hosts = parts.netloc.rpartition("@")
        sentinels = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon or "]" in port:  # no port, or an IPv6 address without one
                host, port = item.strip(), str(SENTINEL_PORT)
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise invalid(f"sentinel {item.strip()!r} is not host[:port], e.g. sentinel1:26379")
            sentinels.append((unquote(host), int(port)))
        service, _, db_text = parts.path.strip("/").partition("/")
        if not service:
            raise invalid(
                "it names no service: redis+sentinel://host:26379[,host:26379...]/service[/db]"
            )
        connection: dict[str, Any] = {}
        sentinel: dict[str, Any] = {}
        manager: dict[str, Any] = {}
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            target, key = connection, name
            if name in _SENTINEL_MANAGER_OPTIONS:
                target = manager
            elif name.startswith(_SENTINEL_OPTION):
                target, key = sentinel, name[len(_SENTINEL_OPTION) :]
            parsers: Mapping[str, Any] = URL_QUERY_ARGUMENT_PARSERS
            parse = (
                _SENTINEL_MANAGER_OPTIONS.get(name)
                or parsers.get(key)
                or (_url_boolean if key in _BOOLEAN_URL_OPTIONS else None)
            )
            try:
                target[key] = parse(value) if parse is not None else value
            except (TypeError, ValueError):
                shown = "***" if _secret_name(name) else repr(value)
                raise invalid(f"option {name}={shown} is not valid for redis-py") from None
        db: int | None = None
        text = str(connection.pop("db", "")) or db_text
        if text:
            try:
                db = int(text)
            except ValueError:
                raise invalid(f"the database {text!r} must be a number") from None
        if userinfo:
            user, colon, password = userinfo.partition(":")
            if user:
                connection["username"] = unquote(user)
            if colon and password:
                connection["password"] = unquote(password)
        if parts.scheme == "rediss+sentinel":
            connection["ssl"] = True
        return cls(
            tuple(sentinels),
            unquote(service),
            db,
            MappingProxyType(connection),
            MappingProxyType(sentinel),
            MappingProxyType(manager),
        )

    def sentinel_options(self, client_options: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword arguments of the clients that ask the sentinels where the primary
        is: the primary's timeouts and TLS unless the URL gives their ``sentinel_``
        variant, the ``sentinel_`` options, and never a retry.

        Why no retry: redis-py's ``redis.Redis()`` retries three times with a backoff of
        seconds, and a sentinel that is down would then hold every new connection of
        the primary's pool for that long during a failover, when it matters most."""
        merged = {**client_options, **self.connection}
        options: dict[str, Any] = {
            name: merged[name] for name in _SHARED_WITH_SENTINELS if name in merged
        }
        if merged.get("ssl"):
            options.update(
                {name: value for name, value in merged.items() if name.startswith("ssl")}
            )
        options.update(self.sentinel)
        options["retry"] = Retry(NoBackoff(), 0)
        return options


def _sentinel_arguments(
    configuration: Configuration,
) -> tuple[SentinelURL, dict[str, Any], dict[str, Any]]:
    """The parsed URL, the primary's connection options and the sentinels' ones, for the
    sync and the asyncio client alike."""
    parsed = SentinelURL.parse(configuration.url, configuration.sources.get("url", _DEFAULT))
    options: dict[str, Any] = dict(configuration.client_options)
    options.update(parsed.connection)
    options["db"] = configuration.db
    options.setdefault("retry", Retry(NoBackoff(), 0))
    if configuration.max_connections is not None:
        options["max_connections"] = configuration.max_connections
    return parsed, options, parsed.sentinel_options(configuration.client_options)


class _SentinelPrimary(redis.Redis):
    """The primary's client of a Sentinel URL: closing it also closes the clients that
    asked the sentinels, which redis-py leaves open (they belong to the ``Sentinel``
    object, which alkey made for this client alone)."""

    def close(self) -> None:
        super().close()
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            sentinel.close()


class _AsyncSentinelPrimary(redis.asyncio.Redis):
    """:class:`_SentinelPrimary` for asyncio."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for sentinel in getattr(manager, "sentinels", ()):
            await sentinel.aclose()


def sentinel_client(configuration: Configuration) -> RedisClient:
    """A new client of the primary of a Sentinel URL's service, with its own pool:
    redis-py's ``Sentinel(...).master_for(service, ...)``, with the configuration's
    database, pool size and client options (alkey's 2 s socket timeouts), the URL's own
    options over them, and no retries -- as alkey's default client, so that a failover
    costs a bounded wait.

    Why ``master_for``: its pool asks the sentinels for the primary's address on every
    new connection and drops connections to a primary that became a replica
    (``READONLY``), so the client follows a failover by itself; alkey's outage handling
    covers the seconds in between (misses; bumps kept and replayed on the new primary).
    """
    parsed, options, sentinel_kwargs = _sentinel_arguments(configuration)
    manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        parsed.sentinels, sentinel_kwargs=sentinel_kwargs, **parsed.manager
    )
    client: RedisClient = manager.master_for(  # type: ignore[no-untyped-call]
        parsed.service_name, redis_class=_SentinelPrimary, **options
    )
    return client


def async_sentinel_client(configuration: Configuration) -> redis.asyncio.Redis:
    """:func:`sentinel_client` for asyncio: ``redis.asyncio``'s ``master_for`` client,
    with the same options (for ``alkey.asyncio``'s default client and stores)."""
    parsed, options, sentinel_kwargs = _sentinel_arguments(configuration)
    manager = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        parsed.sentinels, sentinel_kwargs=sentinel_kwargs, **parsed.manager
    )
    client: redis.asyncio.Redis = manager.master_for(
        parsed.service_name, redis_class=_AsyncSentinelPrimary, **options
    )
    return client


for _scheme in REDIS_SCHEMES:
    register_scheme(_scheme, sync=_redis_store)
# Their asyncio stores come from alkey.asyncio, whose client follows a Sentinel URL too.
for _scheme in SENTINEL_SCHEMES:
    register_scheme(_scheme, sync=_redis_store)

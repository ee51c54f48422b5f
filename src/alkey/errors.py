"""alkey's exceptions: one hierarchy, whichever Redis client library is underneath.

Why a hierarchy of its own: under ``on_error="raise"`` a token store lets failures reach
the application, and the application should catch *alkey's* failure -- not redis-py's
today and valkey-py's or a cluster client's tomorrow. Each transport maps its client
library's errors to these (the original error is the ``__cause__``).

The store errors also subclass redis-py's :class:`~redis.exceptions.RedisError` (and
:class:`TokenStoreUnavailableError` its ``ConnectionError``), so code written against alkey 1.0's
first releases, which caught redis-py's errors, keeps working. :class:`ConfigurationError`
subclasses :class:`ValueError` for the same reason.
"""

from __future__ import annotations

import re

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

__all__ = [
    "AlkeyError",
    "ConfigurationError",
    "TokenStoreConfigurationError",
    "TokenStoreError",
    "TokenStorePoolExhaustedError",
    "TokenStoreUnavailableError",
    "redacted",
]

# A secret in a client's repr or options, as client libraries print them in their
# errors: ``password=s3cret,`` / ``password=s3cret)>`` (a connection's repr, whose values
# are not quoted: a password with a "," or a ")" goes on to the next ``,name=`` or to the
# ``)>`` that closes the repr), ``'password': 's3cret'`` (a dict of options, the value a
# Python literal) -- any option whose name ends in "password", "passwd" or "secret" --
# and the user part of a URL (``redis://user:s3cret@host``).
_SECRET_NAME = r"(?:password|passwd|secret)"
_PASSWORD = re.compile(
    rf"""(?P<key>{_SECRET_NAME}=)(?:(?!,[A-Za-z_][A-Za-z0-9_]*=|\)>(?:\)|>|,|\]|\s|$))[^\n])*"""
    rf"""|(?P<entry>{_SECRET_NAME}['"]?\s*:\s*)"""
    r"""(?:b?'(?:[^'\\\n]|\\.)*'|b?"(?:[^"\\\n]|\\.)*"|[^,}\n]*)"""
    # A URL's password runs to the authority's *last* "@", as redis-py reads it.
    r"""|(?P<url>\b[a-z][a-z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#]*@""",
    re.IGNORECASE,
)


def _masked(match: re.Match[str]) -> str:
    if match.group("url"):
        return f"{match.group('url')}***@"
    return f"{match.group('key') or match.group('entry')}***"


def redacted(text: str) -> str:
    """``text`` with every password a client library may have put in it masked.

    Why: alkey logs and raises its client library's error messages, which are meant to
    name only host and port; but some do more -- redis-py before 7.4 printed each sentinel
    client's connection, password included, in ``MasterNotFoundError`` -- and alkey's
    promise is that no password reaches a log or an error of its own. A password is
    masked whole whatever it holds: in a connection's repr (``password=Se,cr)et)>``) it
    runs to the next ``,option=`` or to the ``)>`` closing the repr, which may hide a
    little more than the password but never shows a piece of it.
    """
    return _PASSWORD.sub(_masked, text)


class AlkeyError(Exception):
    """Base class of every exception alkey raises on purpose."""


class ConfigurationError(AlkeyError, ValueError):
    """A setting, option or URL alkey was given cannot work.

    The message names the setting, the value (passwords masked) and what would be
    accepted, and nothing has been changed: fix the setting and try again.
    """


class TokenStoreError(AlkeyError, RedisError):
    """A token store call failed, and the store's policy is ``on_error="raise"``.

    With the default ``on_error="degrade"`` stores never raise this: keys miss and bumps
    are kept for replay instead. The client library's own error is ``__cause__``.
    """


class TokenStoreUnavailableError(TokenStoreError, RedisConnectionError):
    """The token store could not be reached in time (connection refused or lost, a
    timeout, a server still loading its data, a failover in progress)."""


class TokenStorePoolExhaustedError(TokenStoreUnavailableError):
    """No connection of the client's pool came free in time (``max_connections``).

    Redis itself answers: only this process ran out of connections. So a degrading store
    lets the one call go without Redis and marks nothing down; under ``on_error="raise"``
    this distinct error lets the application tell it from an outage (e.g. to size its
    pool rather than page someone).
    """


class TokenStoreConfigurationError(TokenStoreError):
    """Redis answers, but not to alkey as it is configured: waiting will not help.

    A TLS certificate or handshake the client refuses (or the server refuses), a wrong
    password or user (``WRONGPASS``, ``NOAUTH``), an ACL that denies alkey's commands
    (``NOPERM``), a plain client pointed at a node of a Redis Cluster (``CROSSSLOT``,
    ``MOVED``), a cluster client pointed at a plain Redis, a database number the server
    does not have, scripting switched off. Each used to be taken for an outage
    ("Redis unavailable") although it lasts until someone fixes a setting.

    Why a :class:`TokenStoreError` (so every ``except TokenStoreError`` still catches it)
    but neither a :class:`TokenStoreUnavailableError` (nothing is unavailable: code that
    waits out an outage would wait for ever) nor a :class:`ConfigurationError` (that one is
    a :class:`ValueError` raised by :func:`~alkey.settings.configure` before anything
    connects, with nothing changed; this one comes from the server's answer to a call, at
    run time, and an ``except ValueError`` around application code must not swallow it).

    A degrading store treats it as an incident as it does an outage -- keys miss, bumps
    are kept for replay, the store waits ``retry_interval`` between tries rather than
    paying a connection per call, and recovers by itself once the setting is fixed on
    either side -- but its log line says what is wrong and what to check
    (:class:`~alkey.observers.LoggingObserver`). The client library's error is
    ``__cause__``.
    """

    def __init__(self, message: str, *, server: str = "", problem: str = "", fix: str = "") -> None:
        super().__init__(message)
        #: The Redis alkey tried, as ``host:port`` (or a socket path, a cluster's nodes).
        self.server = server
        #: What is wrong, e.g. "the server's TLS certificate was not accepted".
        self.problem = problem
        #: What to check or change, e.g. "check ssl_ca_certs".
        self.fix = fix

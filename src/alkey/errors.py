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
    "TokenStoreError",
    "TokenStorePoolExhaustedError",
    "TokenStoreUnavailableError",
    "redacted",
]

# A password in a client's repr or options, as client libraries print them in their
# errors: ``password=s3cret,`` / ``password=s3cret>`` (a connection's repr) and
# ``'password': 's3cret'`` (a dict of options); any option ending in "password".
_PASSWORD = re.compile(
    r"""(password=)[^,>)\s]*|(password['"]?\s*:\s*)(?:'[^']*'|"[^"]*"|[^,}\s]*)""",
    re.IGNORECASE,
)


def redacted(text: str) -> str:
    """``text`` with every password a client library may have put in it masked.

    Why: alkey logs and raises its client library's error messages, which are meant to
    name only host and port; but some do more -- redis-py before 7.4 printed each sentinel
    client's connection, password included, in ``MasterNotFoundError`` -- and alkey's
    promise is that no password reaches a log or an error of its own.
    """
    return _PASSWORD.sub(lambda m: f"{m.group(1) or m.group(2)}***", text)


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

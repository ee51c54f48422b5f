"""Names and defaults shared by every part of alkey.

They live in one module so that the identifier format, which applications write by hand
(``'alkey:users#1'``), has exactly one definition.
"""

from __future__ import annotations

from typing import Final

#: Every identifier starts with this namespace, e.g. ``alkey:users#1``.
NAMESPACE: Final = "alkey"

#: Separates the table part of an identifier from its row part.
ROW_SEPARATOR: Final = "#"

#: The row part of a table identifier: ``alkey:users#*`` changes when any user changes.
ALL_ROWS: Final = "*"

#: Changes whenever any row of any table bound to alkey is written.
GLOBAL_WRITE_TOKEN: Final = "alkey:*#*"

#: The row part of a table's unknown-rows token, ``alkey:users#?`` (see
#: :data:`alkey.identity.UNKNOWN_ROWS`).
UNKNOWN_ROWS: Final = "?"

#: Bumped by a write whose tables are unknown (raw SQL that cannot be parsed, a stored
#: procedure); every key that names any token also depends on it. Here rather than with
#: the identifier grammar because the token stores keep it too, in place of the bumps an
#: outage made them drop (see :class:`alkey.tokens.OutageLedger`).
UNKNOWN_WRITES: Final = "alkey:*#?"

#: Seconds a token lives in Redis without being bumped (one day, as in alkey 0.3).
#: An expired token is recreated with a new random value, so expiry costs one cache miss,
#: never a stale hit.
DEFAULT_TOKEN_TTL: Final = 24 * 60 * 60

#: Random bytes per token: 128 bits, so a token recreated after Redis lost its data cannot
#: repeat an old one and revive a stale cache entry.
TOKEN_BYTES: Final = 16

#: Upper bound for a generated cache key, prefix included (memcached's key limit).
MAX_KEY_LENGTH: Final = 250

#: Used when nothing else configures Redis.
DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"

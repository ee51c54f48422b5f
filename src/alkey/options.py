"""The options of a token store, in one validated object.

Why one object: every store (sync, asyncio, and the cluster or sentinel ones to come)
takes the same options, and every way of configuring alkey -- keyword arguments, a URL's
query, ``ALKEY_*`` environment variables, a Pyramid ``.ini`` file -- ends up here, so the
options are spelt, defaulted and checked in exactly one place (see :mod:`alkey.settings`
for reading them from text).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from alkey.constants import DEFAULT_TOKEN_TTL
from alkey.errors import ConfigurationError

__all__ = ["DEFAULT_LEASE", "ErrorPolicy", "StoreOptions"]

#: ``"degrade"``: Redis errors never reach the application (keys miss, bumps are kept and
#: replayed); ``"raise"``: they propagate as :class:`alkey.errors.TokenStoreError`.
ErrorPolicy: TypeAlias = Literal["degrade", "raise"]

#: Seconds after which any alkey process bumps a commit's intent that was not cleared.
DEFAULT_LEASE = 5.0


@dataclass(frozen=True)
class StoreOptions:
    """How a token store behaves; the same for every kind of store.

    Invalid values raise :class:`~alkey.errors.ConfigurationError` (a
    :class:`ValueError`) naming the option, the value and what is accepted.
    """

    #: Seconds a token lives in Redis without being bumped; an expired token comes back
    #: as a new random value (a miss, never a stale hit).
    ttl: int = DEFAULT_TOKEN_TTL
    #: Text in front of every Redis key alkey writes, to share one Redis database between
    #: applications.
    key_prefix: str = ""
    #: What a Redis failure does: ``"degrade"`` (misses, bumps kept and replayed) or
    #: ``"raise"``.
    on_error: ErrorPolicy = "degrade"
    #: Most identifiers kept for replay during an outage; past it, one bump of
    #: :data:`~alkey.constants.UNKNOWN_WRITES` stands for the rest.
    max_pending: int = 100_000
    #: Seconds between attempts to reach Redis while it is down.
    retry_interval: float = 1.0
    #: Whether commits record their bumps in Redis before the database COMMIT, so that
    #: another process bumps them if this one dies in between.
    durable: bool = False
    #: Seconds after which another process bumps an intent its writer did not clear.
    lease: float = DEFAULT_LEASE
    #: Most tokens kept in this process's local token cache, which answers warm keys with
    #: no round trip and is kept current by Redis's invalidation messages
    #: (:mod:`alkey.localcache`); 0, the default, turns it off.
    local_cache: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int) or self.ttl <= 0:
            _invalid("ttl", self.ttl, "a positive whole number of seconds, e.g. 86400")
        if not isinstance(self.key_prefix, str):
            _invalid("key_prefix", self.key_prefix, "text, e.g. 'myapp:'")
        if self.on_error not in ("degrade", "raise"):
            _invalid("on_error", self.on_error, "'degrade' or 'raise'")
        if (
            isinstance(self.max_pending, bool)
            or not isinstance(self.max_pending, int)
            or self.max_pending < 1
        ):
            _invalid("max_pending", self.max_pending, "a whole number of at least 1")
        if not _number(self.retry_interval) or self.retry_interval < 0:
            _invalid("retry_interval", self.retry_interval, "a number of seconds, 0 or more")
        if not isinstance(self.durable, bool):
            _invalid("durable", self.durable, "True or False")
        if not _number(self.lease) or not self.lease > 0:
            _invalid("lease", self.lease, "a positive number of seconds, e.g. 5")
        if (
            isinstance(self.local_cache, bool)
            or not isinstance(self.local_cache, int)
            or self.local_cache < 0
        ):
            _invalid(
                "local_cache",
                self.local_cache,
                "a whole number of tokens to keep, e.g. 100000, or 0 to turn the cache off",
            )

    def replace(self, **changes: Any) -> StoreOptions:
        """A copy with ``changes`` applied (and checked)."""
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise ConfigurationError(
                f"unknown token store option(s) {', '.join(unknown)}: the options are "
                f"{', '.join(field.name for field in dataclasses.fields(self))}"
            )
        return dataclasses.replace(self, **changes)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _invalid(name: str, value: object, accepted: str) -> None:
    raise ConfigurationError(f"token store option {name}={value!r} is invalid: use {accepted}")

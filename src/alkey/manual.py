"""Invalidation by hand, for writes alkey cannot see: :func:`touch` and :func:`invalidate`.

A trigger the metadata does not describe, another service, a stored procedure, a
migration: ``touch`` records such a write against a bound session's transaction, so that
its commit bumps it and a rollback drops it; ``invalidate`` bumps at once, for writes
that have committed elsewhere already. What a target stands for is
:func:`alkey.writes.invalidation_identifiers`'s answer.
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from alkey.client import default_store
from alkey.events import _binding_for, bound_stores, is_bound
from alkey.tokens import TokenStore
from alkey.transactions import changes_of
from alkey.writes import invalidation_identifiers

__all__ = ["invalidate", "touch"]

log = logging.getLogger("alkey.manual")


def touch(session: Session, *targets: object) -> None:
    """Invalidate ``targets`` when ``session``'s current transaction commits.

    For writes alkey cannot see -- a trigger, another service, a stored procedure -- that
    belong to this transaction: recorded like any other write, so a rollback drops them.
    ``session`` must be bound (:func:`alkey.events.bind`). Targets are instances, mapped
    classes, Table objects or identifiers.
    """
    if not is_bound(session):
        raise ValueError(
            "alkey.touch() needs a session bound with alkey.bind(): this one would never "
            "bump what it records"
        )
    identifiers: set[str] = set()
    for target in targets:
        identifiers |= invalidation_identifiers(target)
    if identifiers:
        if session.get_transaction() is None:
            session.begin()  # what the session's next statement would do by itself
        changes_of(session).record(session, identifiers)


def invalidate(
    *targets: object, tokens: TokenStore | None = None, session: Session | None = None
) -> None:
    """Invalidate ``targets`` now, outside any transaction (one round trip per store).

    For writes that have already committed elsewhere: a migration script, another service.
    Targets are instances, mapped classes, Table objects or identifiers. The tokens are
    bumped in:

    * ``tokens``, if given;
    * else the store of ``session``'s binding, if given (it must be bound, as for
      :func:`touch`);
    * else every store the process's bindings (:func:`alkey.bind`) bump in -- usually
      one -- so that the keys its sessions' commits would invalidate are invalidated,
      whatever Redis and ``key_prefix`` each binding was given. An asyncio binding's
      store can only be awaited: it is left out, with a warning once -- asyncio code
      awaits :func:`alkey.asyncio.ainvalidate`, which bumps in every store;
    * else, with no binding (or only asyncio ones), the process's default store
      (:func:`alkey.client.default_store`: ``REDIS_URL``, and the ``ALKEY_*`` options
      such as ``ALKEY_KEY_PREFIX``).

    (Before alkey 1.0's release this always used the default client's store, which
    ignored ``ALKEY_KEY_PREFIX`` and the stores given to :func:`alkey.bind`.)
    """
    identifiers, stores = invalidation_plan(targets, tokens, session)
    if not identifiers:
        return
    if tokens is not None:
        stores = [tokens]
    elif session is None:  # every binding's store, as far as a sync call can bump in it
        usable = [store for store in stores if not _awaited_only(store)]
        if len(usable) < len(stores):
            _warn_awaited_only()
        stores = usable or [default_store()]
    for store in stores:
        store.bump(identifiers)


def invalidation_plan(
    targets: tuple[object, ...],
    tokens: object | None,
    session: Session | None,
    caller: str = "alkey.invalidate",
) -> tuple[set[str], list[TokenStore]]:
    """What :func:`invalidate` (and :func:`alkey.asyncio.ainvalidate`) bump, and in
    which stores: ``session``'s binding's, or every binding's (an empty list: no
    binding, so the caller's default store); none when ``tokens`` is given, which the
    caller bumps in itself. ``caller`` names the function in errors."""
    if tokens is not None and session is not None:
        raise ValueError(f"{caller}(): pass either tokens or session, not both")
    identifiers: set[str] = set()
    for target in targets:
        identifiers |= invalidation_identifiers(target)
    if tokens is not None:
        return identifiers, []
    if session is not None:
        binding = _binding_for(session)
        if binding is None:
            raise ValueError(
                f"{caller}(session=...) needs a session bound with alkey.bind(): its "
                "store is the one to bump"
            )
        return identifiers, [binding.tokens]
    return identifiers, bound_stores()


def _awaited_only(store: TokenStore) -> bool:
    """Whether ``store`` is an asyncio binding's (it has ``abump``), whose ``bump`` a
    sync call outside SQLAlchemy's greenlet cannot use."""
    return callable(getattr(store, "abump", None))


_warned_awaited_only = False


def _warn_awaited_only() -> None:
    global _warned_awaited_only
    if not _warned_awaited_only:
        _warned_awaited_only = True
        log.warning(
            "alkey.invalidate() cannot bump in the token store of an asyncio binding, "
            "which can only be awaited; it bumps in the other bound stores, or else the "
            "default store (REDIS_URL), which misses keys if that binding was given "
            "another Redis or key_prefix. In asyncio code, await "
            "alkey.asyncio.ainvalidate(...), which bumps in every bound store (said once)"
        )

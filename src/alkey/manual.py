"""Invalidation by hand, for writes alkey cannot see: :func:`touch` and :func:`invalidate`.

A trigger the metadata does not describe, another service, a stored procedure, a
migration: ``touch`` records such a write against a bound session's transaction, so that
its commit bumps it and a rollback drops it; ``invalidate`` bumps at once, for writes
that have committed elsewhere already. What a target stands for is
:func:`alkey.writes.invalidation_identifiers`'s answer.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from alkey.client import get_redis_client
from alkey.events import is_bound
from alkey.tokens import TokenStore, store_for
from alkey.transactions import changes_of
from alkey.writes import invalidation_identifiers

__all__ = ["invalidate", "touch"]


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


def invalidate(*targets: object, tokens: TokenStore | None = None) -> None:
    """Invalidate ``targets`` now, outside any transaction (one round trip).

    For writes that have already committed elsewhere: a migration script, another service.
    Tokens live in ``tokens``, else in the default client's store.
    """
    identifiers: set[str] = set()
    for target in targets:
        identifiers |= invalidation_identifiers(target)
    if identifiers:
        (tokens if tokens is not None else store_for(get_redis_client())).bump(identifiers)

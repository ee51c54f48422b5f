"""The algorithm of alkey 0.3, re-implemented for comparison only. NOT alkey's code.

This is the baseline the benchmark measures alkey against, reduced to its Redis traffic:

* key generation: one ``GET`` per token, and a ``SETEX`` when it is missing;
* flush: one ``SADD`` of the changed identifiers to a set keyed by the session;
* commit: ``SMEMBERS`` of that set, then one pipeline of ``SET`` per token plus ``DEL``
  (two round trips, paid by every commit, even one that changed nothing).

Its defects (the per-process session counter, the inverted savepoint check, ``/``-joined
keys) are kept out: they would not change the traffic and are not what is measured.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from typing import Any

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import instance_state

from alkey.identity import identifier_for, write_identifiers
from alkey.tokens import new_token

_TTL = 24 * 60 * 60
_session_numbers = itertools.count()


class OriginalKeyGenerator:
    """Cache keys the 0.3 way: one round trip per token."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def token(self, obj: object) -> str:
        identifier = identifier_for(obj)
        value = self.client.get(identifier)
        if value is None:
            value = str(time.time()).encode()
            self.client.setex(identifier, _TTL, value)
        return value.decode() if isinstance(value, bytes) else str(value)

    def __call__(self, *args: Any) -> str:
        parts = []
        for arg in args:
            if isinstance(arg, str) and not arg.startswith("alkey:"):
                parts.append(arg)
            else:
                parts.append(f"{identifier_for(arg)}@{self.token(arg)}")
        return hashlib.md5("/".join(parts).encode(), usedforsecurity=False).hexdigest()


def bind_original(factory: sessionmaker[Session], client: redis.Redis) -> None:
    """Attach the 0.3-style listeners to ``factory``'s sessions."""

    def changes_key(session: Session) -> str:
        number = session.info.setdefault("original.number", next(_session_numbers))
        return f"alkey:changed:{number}"

    @event.listens_for(factory, "after_flush")
    def record(session: Session, flush_context: Any) -> None:
        objects = [*session.new, *session.dirty, *session.deleted]
        identifiers = write_identifiers(instance_state(obj) for obj in objects)
        if identifiers:
            client.sadd(changes_key(session), *identifiers)

    @event.listens_for(factory, "after_commit")
    def bump(session: Session) -> None:
        key = changes_key(session)
        identifiers = client.smembers(key)
        pipe = client.pipeline()
        for identifier in identifiers:
            pipe.setex(identifier, _TTL, new_token())
        pipe.delete(key)
        pipe.execute()

    @event.listens_for(factory, "after_rollback")
    def discard(session: Session) -> None:
        client.delete(changes_key(session))

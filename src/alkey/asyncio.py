"""alkey under asyncio: AsyncSession, async_sessionmaker and redis.asyncio.

Requires ``pip install 'alkey[asyncio]'`` (SQLAlchemy's greenlet support).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
from sqlalchemy.orm import Session

__all__ = ["sync_target"]


def sync_target(target: object) -> object:
    """The synchronous session target whose events an async ``target`` fires.

    SQLAlchemy runs an :class:`AsyncSession`'s work in a synchronous
    :class:`~sqlalchemy.orm.Session` (its ``sync_session``), and its events fire there.
    An ``async_sessionmaker`` without a ``sync_session_class`` of its own is given a
    dedicated subclass, so that binding it never binds every ``Session`` of the process.
    Anything that is not an asyncio session object is returned unchanged.
    """
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if isinstance(target, async_sessionmaker):
        sync_class: type[Session] | None = target.kw.get("sync_session_class")
        if sync_class is None:
            base = target.class_.sync_session_class
            sync_class = type(f"Alkey{base.__name__}", (base,), {"__module__": __name__})
            target.kw["sync_session_class"] = sync_class
        return sync_class
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, type) and issubclass(target, AsyncSession):
        sync: Any = target.sync_session_class
        return sync
    return target

"""What a session's transactions changed, kept in process memory until they end.

This module knows nothing about Redis: it only answers "which identifiers did the
outermost transaction that just committed write?". That keeps the transaction rules --
the part alkey 0.3 got wrong -- small enough to read in one sitting:

* A write is recorded against the innermost *real* transaction: the innermost savepoint
  (``Session.begin_nested()``) if there is one, else the root transaction. The
  subtransactions SQLAlchemy opens around each flush are not units of work and are
  skipped.
* A savepoint that commits (is released) hands its changes to its parent.
* The root transaction that commits hands its changes to the caller, to be bumped, when
  it ends: by then the session has closed it, so whatever the caller does with them
  (including raising) leaves the session in a clean state.
* Any transaction that *ends* without having committed (rollback, ``Session.close()``,
  a zope.sqlalchemy abort, which fires ``after_transaction_end`` but not
  ``after_rollback``) drops only the changes recorded against itself.

Commits are detected positively (``after_commit``). One exception keeps the promise when
a commit goes wrong half-way: once the root transaction has *started* committing
(``before_commit``), ending without the confirmation -- another ``after_commit`` listener
raised, or the second database of a multi-bind session failed its COMMIT after the first
succeeded -- counts as committed. The database may hold the changes, so bumping them is
the safe side: at worst a few extra cache misses for work that was rolled back after all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sqlalchemy.orm import Session, SessionTransaction

__all__ = ["TransactionChanges", "changes_of"]

_INFO_KEY: Final = "alkey.changes"


class TransactionChanges:
    """The identifiers written in each open transaction of one session.

    Lives in ``session.info``, so it is never shared between sessions, threads or
    processes, and needs no lock.
    """

    __slots__ = ("_committed", "_committing", "_intents", "_pending")

    def __init__(self) -> None:
        self._pending: dict[SessionTransaction, set[str]] = {}
        self._committed: dict[SessionTransaction, set[str]] = {}
        self._committing: set[SessionTransaction] = set()
        # Root transaction -> the id of the intent recorded before its database COMMIT
        # (None: asked already, nothing recorded). Durable mode only.
        self._intents: dict[SessionTransaction, str | None] = {}

    def record(self, session: Session, identifiers: Iterable[str]) -> None:
        """Record writes against the session's innermost savepoint or its root transaction."""
        owner = session.get_nested_transaction() or session.get_transaction()
        if owner is None:  # pragma: no cover - SQLAlchemy always has one while writing
            raise RuntimeError("alkey recorded a write outside any transaction")
        self._pending.setdefault(owner, set()).update(identifiers)

    def committing(self, session: Session) -> None:
        """Handle ``before_commit``: note that the root transaction began to commit.

        ``session.commit()`` commits the savepoints first, so when none is open this is
        the root's own commit.
        """
        if session.get_nested_transaction() is None:
            root = session.get_transaction()
            if root is not None:
                self._committing.add(root)

    def to_be_committed(self, session: Session) -> set[str] | None:
        """What the root transaction will hand over if its database COMMIT succeeds.

        Asked just before that COMMIT (durable mode records it as an intent), once per
        transaction however many connections it commits: ``None`` after the first time,
        or when nothing was written. By then ``session.commit()`` has flushed and released
        every savepoint, so all the writes are recorded against the root.
        """
        root = session.get_transaction()
        if root is None or root in self._intents:
            return None
        self._intents[root] = None
        return self._pending.get(root) or None

    def intended(self, session: Session, intent: str | None) -> None:
        """Remember the intent recorded for the root transaction's writes."""
        root = session.get_transaction()
        if root is not None:
            self._intents[root] = intent

    def intent(self, transaction: SessionTransaction) -> str | None:
        """Pop the intent recorded for ``transaction`` (call once it has ended)."""
        return self._intents.pop(transaction, None)

    def committed(self, session: Session) -> None:
        """Handle ``after_commit`` (a released savepoint or the root transaction).

        A savepoint's changes move to its parent; the root's are set aside for
        :meth:`ended`, which runs once the session has closed the transaction.
        """
        transaction = session.get_nested_transaction() or session.get_transaction()
        if transaction is None:  # pragma: no cover - after_commit always has one
            return
        changes = self._pending.pop(transaction, None)
        if not changes:
            return
        if transaction.nested:
            self._pending.setdefault(_real_parent(transaction), set()).update(changes)
        else:
            self._committed[transaction] = changes

    def ended(self, transaction: SessionTransaction) -> set[str] | None:
        """Handle ``after_transaction_end``: what to bump if this was a committed root.

        Whatever else was recorded against the transaction was not committed: dropped.
        """
        unconfirmed = self._pending.pop(transaction, None)
        committed = self._committed.pop(transaction, None)
        if transaction in self._committing:
            self._committing.discard(transaction)
            if committed is None:
                return unconfirmed
        return committed

    def __bool__(self) -> bool:
        return bool(self._pending or self._committed or self._committing or self._intents)


def _real_parent(transaction: SessionTransaction) -> SessionTransaction:
    parent = transaction.parent
    while parent is not None:
        if parent.nested or parent.parent is None:
            return parent
        parent = parent.parent
    raise RuntimeError("a savepoint without an enclosing transaction")  # pragma: no cover


def changes_of(session: Session) -> TransactionChanges:
    """The change tracker of ``session``, created on first use."""
    changes = session.info.get(_INFO_KEY)
    if changes is None:
        changes = session.info[_INFO_KEY] = TransactionChanges()
    assert isinstance(changes, TransactionChanges)
    return changes

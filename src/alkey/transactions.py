"""What a transaction changed, kept in process memory until it ends -- written once.

This module knows nothing about Redis: it only answers "which identifiers did the
outermost transaction that just committed write?". That keeps the transaction rules --
the part alkey 0.3 got wrong -- small enough to read in one sitting, and the same for a
Session's transactions (:class:`TransactionChanges`) and for the Core connections that no
session owns (:class:`alkey.connections.EngineBinding`). Both keep a
:class:`ChangeStack`, one change set per level:

* A write is recorded against the innermost open level: the innermost savepoint if there
  is one, else the outermost transaction.
* A savepoint that opens pushes a level; one that is released merges its changes into the
  level below; one that is rolled back drops its own changes, and nothing else.
* The outermost transaction that commits hands over the union of its levels, to be
  bumped once its COMMIT has returned; one that rolls back (or ends without committing)
  drops them all.

A Session adds two things of its own. The subtransactions SQLAlchemy opens around each
flush are not units of work and get no level. And commits are detected positively
(``after_commit``), with one exception that keeps the promise when a commit goes wrong
half-way: once the root transaction has *started* committing (``before_commit``), ending
without the confirmation -- another ``after_commit`` listener raised, or the second
database of a multi-bind session failed its COMMIT after the first succeeded -- counts
as committed. The database may hold the changes, so bumping them is the safe side: at
worst a few extra cache misses for work that was rolled back after all. The root's
changes are handed over when it *ends* (``after_transaction_end``): by then the session
has closed it, so whatever the caller does with them (including raising) leaves the
session in a clean state.

Last, :class:`inside_commit`: the one place that decides what a token store failure does
while SQLAlchemy is committing -- it is logged, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Final

from sqlalchemy.orm import Session, SessionTransaction

from alkey.written import Written

__all__ = ["ChangeStack", "TransactionChanges", "changes_of", "inside_commit"]

_INFO_KEY: Final = "alkey.changes"


class ChangeStack:
    """The changes of one open transaction: a stack of change sets, the outermost
    transaction's at the bottom and one per open savepoint above it.

    The transaction rules live here and nowhere else: record into the top, :meth:`push`
    when a savepoint opens, :meth:`release` merges the top into its parent,
    :meth:`rollback` drops the top alone, and :meth:`written` is what the outermost
    commit hands over. Not thread-safe: one transaction runs on one thread at a time, and
    whoever shares a stack between threads locks around it.
    """

    __slots__ = ("_levels",)

    def __init__(self) -> None:
        # Compact sets (see alkey.written): a level holds a row of an integer key as
        # its number until the transaction hands its writes over. The outermost level is
        # made when first needed: most transactions write nothing.
        self._levels: list[Written] = []

    def record(self, identifiers: Iterable[str] | Written) -> None:
        """Record writes against the innermost open level. A
        :class:`~alkey.written.Written` passed in becomes the stack's (it may be kept as the
        level itself): do not change it."""
        levels = self._levels
        if not levels:
            if type(identifiers) is Written:
                levels.append(identifiers)  # the first writes: the level itself, no copy
                return
            levels.append(Written())
        levels[-1].update(identifiers)

    def push(self) -> None:
        """A savepoint opened: later writes are its own until it ends."""
        levels = self._levels
        if not levels:
            levels.append(Written())
        levels.append(Written())

    def release(self) -> None:
        """The innermost savepoint was released: its changes join its parent's, since
        they now commit or roll back with it. (No-op without an open savepoint.)"""
        levels = self._levels
        if len(levels) > 1:
            released = levels.pop()
            levels[-1].update(released)

    def rollback(self) -> None:
        """The innermost savepoint was rolled back: its changes never happened; those of
        the levels below stand. (No-op without an open savepoint.)"""
        if len(self._levels) > 1:
            self._levels.pop()

    def clear(self) -> None:
        """Forget every level (the transaction ended), leaving what :meth:`written`
        returned before untouched."""
        if self._levels:
            self._levels = []

    @property
    def savepoints(self) -> int:
        """How many savepoints are open above the outermost transaction."""
        return max(len(self._levels) - 1, 0)

    def written(self) -> set[str]:
        """Everything recorded at any open level: what the outermost transaction hands
        over if it commits now. Do not modify it: with no savepoint open it is the
        outermost level's own spelling, kept until the level changes, so that asking
        twice (a durable commit's intent, then its bump) spells it out once."""
        levels = self._levels
        if len(levels) == 1:
            return levels[0].identifiers()
        return set().union(*[level.identifiers() for level in levels]) if levels else set()

    def __bool__(self) -> bool:
        return any(self._levels)

    def __repr__(self) -> str:
        return f"<ChangeStack levels={[sorted(level) for level in self._levels]!r}>"


class TransactionChanges:
    """The identifiers written in the open transaction of one session.

    A :class:`ChangeStack` whose levels are the root transaction and the savepoints
    (``Session.begin_nested()``) that were open when something was written, plus the
    state of the root's commit. Lives in ``session.info``, so it is never shared between
    sessions, threads or processes, and needs no lock.
    """

    __slots__ = ("_asked", "_committed", "_committing", "_intent", "_root", "_savepoints", "_stack")

    def __init__(self) -> None:
        self._root: SessionTransaction | None = None
        self._stack = ChangeStack()
        # The savepoint of each stack level above the root's, innermost last. Pushed when
        # a write first meets a savepoint: one that writes nothing costs nothing.
        self._savepoints: list[SessionTransaction] = []
        self._committing = False
        self._committed: set[str] | None = None
        # The id of the intent recorded before the root's database COMMIT (durable mode
        # only), and whether it was asked for already (once however many connections).
        self._intent: str | None = None
        self._asked = False

    def _start(self, root: SessionTransaction | None) -> None:
        """Start afresh for ``root`` (what a previous root left is never bumped)."""
        self._root = root
        self._stack.clear()
        self._savepoints.clear()
        self._committing = False
        self._committed = None
        self._intent = None
        self._asked = False

    def record(self, session: Session, identifiers: Iterable[str] | Written) -> None:
        """Record writes against the session's innermost savepoint or its root transaction."""
        root = session.get_transaction()
        if root is None:  # pragma: no cover - SQLAlchemy always has one while writing
            raise RuntimeError("alkey recorded a write outside any transaction")
        if root is not self._root:
            self._start(root)
        savepoint = session.get_nested_transaction()
        savepoints = self._savepoints
        if savepoint is None:
            if savepoints:  # pragma: no cover - each savepoint's end pops its level
                self._unwind(0)
        elif not savepoints or savepoints[-1] is not savepoint:
            self._enter(savepoint)
        self._stack.record(identifiers)

    def _level(self, savepoint: SessionTransaction) -> int:
        """The stack level of ``savepoint`` (1 for the outermost), 0 if it has none."""
        for index, known in enumerate(self._savepoints):
            if known is savepoint:
                return index + 1
        return 0

    def _unwind(self, level: int) -> None:
        """Drop the levels above ``level``: savepoints that ended without our hearing of
        their release count as rolled back."""
        while len(self._savepoints) > level:
            self._savepoints.pop()
            self._stack.rollback()

    def _enter(self, savepoint: SessionTransaction) -> None:
        """Push levels for ``savepoint`` and the enclosing savepoints that have none yet,
        outermost first, so that each level's parent is the level below it."""
        opened: list[SessionTransaction] = []
        current: SessionTransaction | None = savepoint
        level = 0
        while current is not None and current is not self._root:
            level = self._level(current)
            if level:
                break
            opened.append(current)
            current = _enclosing_savepoint(current)
        self._unwind(level)
        for entered in reversed(opened):
            self._savepoints.append(entered)
            self._stack.push()

    def committing(self, session: Session) -> None:
        """Handle ``before_commit``: note that the root transaction began to commit.

        ``session.commit()`` commits the savepoints first, so when none is open this is
        the root's own commit.
        """
        if session.get_nested_transaction() is None:
            root = session.get_transaction()
            if root is not None:
                if root is not self._root:
                    self._start(root)
                self._committing = True

    def to_be_committed(self, session: Session) -> set[str] | None:
        """What the root transaction will hand over if its database COMMIT succeeds.

        Asked just before that COMMIT (durable mode records it as an intent), once per
        transaction however many connections it commits: ``None`` after the first time,
        or when nothing was written. By then ``session.commit()`` has flushed and released
        every savepoint, so all the writes are recorded against the root.
        """
        if not self._stack:
            return None  # nothing written, so no connection's COMMIT has anything to record
        root = session.get_transaction()
        if root is None:
            return None
        if root is not self._root:
            self._start(root)
        if self._asked:
            return None
        self._asked = True
        return self._stack.written() or None

    def intended(self, session: Session, intent: str | None) -> None:
        """Remember the intent recorded for the root transaction's writes."""
        if session.get_transaction() is self._root:
            self._intent = intent

    def committed(self, session: Session) -> None:
        """Handle ``after_commit`` (a released savepoint or the root transaction).

        A savepoint's changes join its parent's; the root's are set aside for
        :meth:`ended`, which runs once the session has closed the transaction.
        """
        savepoint = session.get_nested_transaction()
        if savepoint is not None:
            level = self._level(savepoint)
            if level:
                self._unwind(level)
                self._savepoints.pop()
                self._stack.release()
        elif session.get_transaction() is self._root and self._root is not None:
            self._committed = self._stack.written()

    def ended(self, transaction: SessionTransaction) -> tuple[set[str], str | None] | None:
        """Handle ``after_transaction_end``: what to bump, and its intent, if this was a
        committed root (or one whose commit began, see the module).

        Whatever else was recorded against the transaction was not committed: dropped.
        """
        if transaction.nested:
            level = self._level(transaction)
            if level:  # ended without a release: rolled back
                self._unwind(level - 1)
            return None
        if transaction is not self._root:
            return None  # a flush's subtransaction, or a root that wrote nothing
        committed = self._committed
        if committed is None and self._committing:
            committed = self._stack.written()
        intent = self._intent
        self._start(None)
        return (committed, intent) if committed else None

    def __bool__(self) -> bool:
        return self._root is not None


def _enclosing_savepoint(transaction: SessionTransaction) -> SessionTransaction | None:
    """The savepoint that encloses ``transaction``, or its root (skipping the
    subtransactions SQLAlchemy opens around flushes)."""
    parent = transaction.parent
    while parent is not None:
        if parent.nested or parent.parent is None:
            return parent
        parent = parent.parent
    return None  # pragma: no cover - a savepoint always has an enclosing transaction


def changes_of(session: Session) -> TransactionChanges:
    """The change tracker of ``session``, created on first use."""
    changes = session.info.get(_INFO_KEY)
    if changes is None:
        changes = session.info[_INFO_KEY] = TransactionChanges()
    assert isinstance(changes, TransactionChanges)
    return changes


class inside_commit:  # noqa: N801 - used as a statement, like contextlib.suppress
    """``with inside_commit(log, "what failed", *args):`` around a token store call made
    from inside SQLAlchemy's commit machinery: a failure is logged once, never raised.

    Inside the commit an exception would be taken for a database error: raised before the
    COMMIT it aborts the commit half-way (SQLAlchemy skips the COMMIT yet hands the
    connection back to its pool with the transaction open); raised from the wrapped
    ``do_commit`` after it, it reports a commit that succeeded as failed. So whatever the
    store's error policy, a failure here is logged on ``log`` -- with its traceback, as an
    error -- and the commit goes ahead. ``reported_later`` names failures that what follows
    will meet and report anyway (a bump after a failed intent, raising under
    ``on_error="raise"``): those are logged at debug level only, so that one failure makes
    one report. Exceptions that are not :class:`Exception` (``KeyboardInterrupt``) pass.

    A session's own bump, in ``after_transaction_end``, is deliberately *not* guarded:
    that runs after the COMMIT with the session already clean, so a store that raises
    (``on_error="raise"``) raises to the caller of ``commit()``.
    """

    __slots__ = ("_args", "_log", "_message", "_reported_later")

    def __init__(
        self,
        log: logging.Logger,
        message: str,
        *args: object,
        reported_later: tuple[type[Exception], ...] = (),
    ) -> None:
        self._log = log
        self._message = message
        self._args = args
        self._reported_later = reported_later

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        if isinstance(error, self._reported_later):
            self._log.debug(self._message + ": %s", *self._args, error, stacklevel=2)
        else:
            # stacklevel: the record names the site of the store call, not this guard.
            self._log.error(
                self._message, *self._args, exc_info=(type(error), error, traceback), stacklevel=2
            )
        return True

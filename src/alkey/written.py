"""What a transaction wrote, held compactly from its flush until it ends.

A transaction that updates 10,000 rows holds each row's identifier from the flush that
wrote it until its COMMIT, and a batch job may flush many times before it commits. Held
as strings in a set (``alkey:users#123``), each row costs about 120 bytes: the string,
and its slot in the set. Almost every row written has a primary key of one integer, so
:class:`Written` keeps those as the number alone, in an array per table (8 bytes a row),
and spells the identifiers out once, when the transaction hands them over to be bumped.
Everything else -- tables, composite or text keys, shards, the global token -- is kept
as the identifier string.

This module knows nothing of SQLAlchemy or Redis: it is a set of identifier strings with
a compact inside (see :mod:`alkey.transactions` for the rules that stack them).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from typing import Final

__all__ = ["Written"]

#: How many repeated rows an array may gather before it is deduplicated: a job that
#: writes the same rows in every one of many flushes keeps each row at most about twice,
#: plus at most this many repeats per table.
_SLACK: Final = 1024
#: The arrays' signed 64-bit range: a key outside it is kept as its string.
_RANGE: Final = 2**63


class Written:
    """A set of identifiers, with the rows of integer primary keys held as numbers.

    Add identifiers with :meth:`update` (from strings or another :class:`Written`), and
    rows of integer keys with :meth:`add_rows`, which stores ``prefix + str(row)``
    without building it. :meth:`identifiers` spells the whole set out, once per change.
    Iterating it, ``len()`` and ``in`` answer for the identifiers.
    Not thread-safe, like the transaction that owns it.
    """

    __slots__ = ("_names", "_rows", "_spelled", "_unique")

    def __init__(self, identifiers: Iterable[str] = ()) -> None:
        self._names: set[str] = set(identifiers)
        # Per row prefix ("alkey:users#"): the integer keys of rows written, repeats
        # included until the array has _SLACK more entries than after its last dedup.
        self._rows: dict[str, array[int]] = {}
        self._unique: dict[str, int] = {}
        self._spelled: set[str] | None = None

    def add_rows(self, prefix: str, rows: list[int]) -> None:
        """Add the identifier ``prefix + str(row)`` of each row keyed by one integer in
        ``rows`` (of type ``int`` exactly, so that ``str()`` spells it as a key)."""
        mine = self._rows.get(prefix)
        if mine is None:
            mine = self._rows[prefix] = array("q")
            # One flush's rows, each written once (or twice, a delete-orphan the session
            # also lists): nothing worth deduplicating yet.
            self._unique[prefix] = len(rows)
        before = len(mine)
        try:
            mine.extend(rows)
        except OverflowError:  # a key beyond 64 bits: those are kept as strings
            del mine[before:]
            for row in rows:
                if -_RANGE <= row < _RANGE:
                    mine.append(row)
                else:
                    self._names.add(prefix + str(row))
        if len(mine) > 2 * self._unique[prefix] + _SLACK:
            self._compact(prefix)
        self._spelled = None

    def update(self, identifiers: Iterable[str] | Written) -> None:
        """Add every identifier of ``identifiers``: strings, or another :class:`Written`
        (whose numbers stay numbers)."""
        if isinstance(identifiers, Written):
            self._names |= identifiers._names
            for prefix, rows in identifiers._rows.items():
                mine = self._rows.get(prefix)
                if mine is None:
                    self._rows[prefix] = array("q", rows)
                    self._unique[prefix] = identifiers._unique[prefix]
                else:
                    mine.extend(rows)
                    if len(mine) > 2 * self._unique[prefix] + _SLACK:
                        self._compact(prefix)
        else:
            self._names.update(identifiers)
        self._spelled = None

    def _compact(self, prefix: str) -> None:
        """Drop the repeats of ``prefix``'s rows (once they outgrow the slack)."""
        unique = array("q", set(self._rows[prefix]))
        self._rows[prefix] = unique
        self._unique[prefix] = len(unique)

    def identifiers(self) -> set[str]:
        """Every identifier, spelled out: a set that the caller must not modify (it is
        kept, and handed out again until the next change). For the commit, which asks for
        them, to bump them, once or twice (a durable commit records them first)."""
        spelled = self._spelled
        if spelled is None:
            spelled = self._spelled = self._spell()
        return spelled

    def _spell(self) -> set[str]:
        spelled = set(self._names)
        for prefix, rows in self._rows.items():
            spelled.update(map(prefix.__add__, map(str, set(rows))))
        return spelled

    def __bool__(self) -> bool:
        return bool(self._names) or any(self._rows.values())

    # The reads below spell the set out without keeping it: one made in the middle of a
    # transaction (an "in", a log line) must not hold the strings until it ends.

    def __iter__(self) -> Iterator[str]:
        return iter(self._spelled if self._spelled is not None else self._spell())

    def __len__(self) -> int:
        return len(self._spelled if self._spelled is not None else self._spell())

    def __contains__(self, identifier: object) -> bool:
        return identifier in (self._spelled if self._spelled is not None else self._spell())

    def __repr__(self) -> str:
        return f"<Written {sorted(self)!r}>"

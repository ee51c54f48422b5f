"""Moved: what a transaction changed is kept by :mod:`alkey.transactions`.

"Tracking" reads like Redis's CLIENT TRACKING, which is what alkey's local token cache
uses (:mod:`alkey.invalidations`), so since alkey 1.0 the transaction rules live in
:mod:`alkey.transactions`, written once for sessions and for Core connections. Its names
stay importable from here, silently and as the very same objects, for code written
against the old module.
"""

from __future__ import annotations

from alkey.transactions import TransactionChanges, changes_of

__all__ = ["TransactionChanges", "changes_of"]

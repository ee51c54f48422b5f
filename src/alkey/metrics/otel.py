"""A token store's counts and timings as OpenTelemetry metrics (the ``opentelemetry``
extra).

Why: a service instrumented with OpenTelemetry exports its metrics through the SDK it
configured (OTLP to a collector, a Prometheus reader...); alkey's counts should travel the
same way, as instruments on a meter, rather than through a second exporter.

What: :class:`OpenTelemetryObserver`, a :class:`~alkey.observers.StoreObserver` that
records the events of every store it is attached to on a meter -- by default
``opentelemetry.metrics.get_meter("alkey")``, from the global meter provider, which does
nothing until the application sets one up::

    from alkey.metrics.otel import OpenTelemetryObserver

    store.add_observer(OpenTelemetryObserver())

The instruments are those of :mod:`alkey.metrics.prometheus`, with dotted names
(Prometheus shows them with underscores, and counters with ``_total``):

* ``alkey.fetches`` (Counter): fetch calls; attribute ``result``: ``hit`` answered by
  Redis, ``miss`` a forced miss;
* ``alkey.round_trip`` (Histogram, unit ``s``): how long each round trip to Redis
  took; attributes ``operation`` (``fetch``, ``bump``, ``intend``) and ``result``
  (``ok``, ``error``), with the buckets of
  :data:`alkey.metrics.ROUND_TRIP_BUCKETS` as advice;
* ``alkey.tokens.bumped`` (Counter): tokens bumped in Redis;
* ``alkey.bumps.replayed`` (Counter): of those, bumps kept during an outage (or intents
  of a dead writer) sent late;
* ``alkey.bumps.pending`` (UpDownCounter): bumps kept, waiting for Redis;
* ``alkey.bumps.dropped`` (Counter): kept bumps past ``max_pending``;
* ``alkey.outages`` (Counter): incidents; attribute ``kind``: ``outage`` or
  ``misconfiguration``;
* ``alkey.outage`` (UpDownCounter): 1 during an incident, else 0;
* ``alkey.pool.exhaustions`` (Counter): incidents of an exhausted connection pool;
* ``alkey.pool.starved_calls`` (Counter): calls that went without a connection
  meanwhile;
* ``alkey.intents.claimed`` (Counter): durable mode: intents of dead writers claimed;
* ``alkey.recoveries`` (Counter): durable mode: recoveries of due intents;
* ``alkey.local_cache.lookups`` (Counter): identifiers looked up in the local token
  cache; attribute ``result``: ``hit`` or ``miss``;
* ``alkey.local_cache.invalidations`` (Counter): token keys announced changed;
* ``alkey.local_cache.evictions`` (Counter): of those, tokens evicted from the cache;
* ``alkey.local_cache.flushes`` (Counter): times the local token cache was emptied;
  attribute ``reason``.

One observer may watch several stores (their counts add up; the two UpDownCounters show
the last store to report). Two observers on one meter share its instruments, so their
counts add up too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry import metrics
from opentelemetry.metrics import Meter, MeterProvider

from alkey.errors import TokenStoreConfigurationError
from alkey.metrics import ROUND_TRIP_BUCKETS
from alkey.observers import StoreObserver

__all__ = ["OpenTelemetryObserver"]

_HIT = {"result": "hit"}
_MISS = {"result": "miss"}
_OUTAGE = {"kind": "outage"}
_MISCONFIGURATION = {"kind": "misconfiguration"}


class OpenTelemetryObserver(StoreObserver):
    """Records a token store's events on an OpenTelemetry meter (see the module for the
    instruments).

    ``meter``: the meter to create the instruments on; else ``meter_provider``'s meter
    named ``alkey``; else ``opentelemetry.metrics.get_meter("alkey")`` (the global
    provider's). Thread-safe and quick, as an observer must be.
    """

    def __init__(
        self, meter: Meter | None = None, *, meter_provider: MeterProvider | None = None
    ) -> None:
        if meter is None:
            meter = (
                metrics.get_meter("alkey")
                if meter_provider is None
                else meter_provider.get_meter("alkey")
            )
        #: The meter the instruments belong to.
        self.meter = meter
        self._lock = threading.Lock()
        self._pending = 0
        self._outage = 0
        self.fetches = meter.create_counter(
            "alkey.fetches",
            unit="{fetch}",
            description="Token fetches: result=hit answered by Redis, result=miss a forced "
            "miss (fresh random tokens: Redis down or recovering, no free connection).",
        )
        self.round_trips = meter.create_histogram(
            "alkey.round_trip",  # unit s: alkey_round_trip_seconds, as Prometheus's
            unit="s",
            description="Seconds a round trip to Redis took, by operation (fetch: a key's "
            "tokens; bump: after a COMMIT, or a replay; intend: durable mode, before a "
            "COMMIT) and result (ok, or error: a timeout, a refused or lost connection, an "
            "error answer).",
            explicit_bucket_boundaries_advisory=ROUND_TRIP_BUCKETS,
        )
        self._round_trip_attributes = {
            (operation, failed): {"operation": operation, "result": "error" if failed else "ok"}
            for operation in ("fetch", "bump", "intend")
            for failed in (False, True)
        }
        self.tokens_bumped = meter.create_counter(
            "alkey.tokens.bumped",
            unit="{token}",
            description="Tokens bumped in Redis (each a row, table or global token).",
        )
        self.bumps_replayed = meter.create_counter(
            "alkey.bumps.replayed",
            unit="{token}",
            description="Bumped tokens that were kept during an outage (or intents of a "
            "dead writer) and sent late.",
        )
        self.bumps_pending = meter.create_up_down_counter(
            "alkey.bumps.pending",
            unit="{token}",
            description="Token bumps kept for replay, waiting for Redis to answer.",
        )
        self.bumps_dropped = meter.create_counter(
            "alkey.bumps.dropped",
            unit="{token}",
            description="Kept bumps past max_pending: the global token is bumped in their "
            "place (every key misses once after the replay).",
        )
        self.outages = meter.create_counter(
            "alkey.outages",
            unit="{incident}",
            description="Incidents of a store: kind=outage (Redis unreachable) or "
            "kind=misconfiguration (refused password or certificate, ACL, CROSSSLOT).",
        )
        self.outage = meter.create_up_down_counter(
            "alkey.outage",
            unit="1",
            description="1 while a store cannot use Redis (keys miss, bumps wait), else 0.",
        )
        self.pool_exhaustions = meter.create_counter(
            "alkey.pool.exhaustions",
            unit="{incident}",
            description="Incidents where calls found no free connection in the Redis pool.",
        )
        self.pool_starved_calls = meter.create_counter(
            "alkey.pool.starved_calls",
            unit="{call}",
            description="Calls that went without Redis for want of a free pool connection.",
        )
        self.claimed_intents = meter.create_counter(
            "alkey.intents.claimed",
            unit="{intent}",
            description="Durable mode: intents of writers that died between COMMIT and "
            "bump, claimed to be bumped.",
        )
        self.recoveries = meter.create_counter(
            "alkey.recoveries",
            unit="{recovery}",
            description="Durable mode: recoveries of due intents begun.",
        )
        self.local_lookups = meter.create_counter(
            "alkey.local_cache.lookups",
            unit="{token}",
            description="Identifiers looked up in the local token cache: result=hit "
            "answered by it, result=miss sent to Redis.",
        )
        self.local_invalidations = meter.create_counter(
            "alkey.local_cache.invalidations",
            unit="{token}",
            description="Token keys Redis announced changed (or this process bumped), for "
            "the local token cache.",
        )
        self.local_evictions = meter.create_counter(
            "alkey.local_cache.evictions",
            unit="{token}",
            description="Tokens evicted from the local token cache by invalidations.",
        )
        self.local_flushes = meter.create_counter(
            "alkey.local_cache.flushes",
            unit="{flush}",
            description="Times the local token cache was emptied, by reason (tracking "
            "connection lost or new, Redis flushed, failover, closed).",
        )

    def _set_pending(self, pending: int) -> None:
        with self._lock:  # an UpDownCounter takes changes: record the difference
            change, self._pending = pending - self._pending, pending
            if change:
                self.bumps_pending.add(change)

    def _set_outage(self, value: int) -> None:
        with self._lock:
            change, self._outage = value - self._outage, value
            if change:
                self.outage.add(change)

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        self.fetches.add(1, _MISS if missed else _HIT)

    def bumped(self, *, count: int, replayed: int) -> None:
        self.tokens_bumped.add(count)
        if replayed:
            self.bumps_replayed.add(replayed)

    def round_trip(self, *, operation: str, seconds: float, failed: bool) -> None:
        self.round_trips.record(seconds, self._round_trip_attributes[operation, failed])

    def bump_kept(self, *, count: int, pending: int) -> None:
        self._set_pending(pending)

    def dropped(self, *, count: int, max_pending: int) -> None:
        self.bumps_dropped.add(count)

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        misconfigured = isinstance(error, TokenStoreConfigurationError)
        self.outages.add(1, _MISCONFIGURATION if misconfigured else _OUTAGE)
        self._set_outage(1)
        self._set_pending(pending)

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        self._set_outage(0)
        self._set_pending(0)

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        self.pool_exhaustions.add(1)

    def pool_recovered(self, *, starved: int) -> None:
        self.pool_starved_calls.add(starved)

    def intents_claimed(self, *, count: int) -> None:
        self.claimed_intents.add(count)

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        self.recoveries.add(1)

    def local_lookup(self, *, hits: int, misses: int) -> None:
        if hits:
            self.local_lookups.add(hits, _HIT)
        if misses:
            self.local_lookups.add(misses, _MISS)

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        self.local_invalidations.add(count)
        if evicted:
            self.local_evictions.add(evicted)

    def local_flushed(self, *, reason: str, entries: int) -> None:
        self.local_flushes.add(1, {"reason": reason})

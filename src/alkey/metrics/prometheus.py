"""A token store's counts and timings as Prometheus metrics (the ``prometheus`` extra).

Why: Prometheus scrapes counters; a service that already exposes its metrics with
``prometheus_client`` (``start_http_server``, a WSGI or ASGI app, a multiprocess
collector) gets alkey's beside its own by attaching one observer to its token stores.

What: :class:`PrometheusObserver`, a :class:`~alkey.observers.StoreObserver` that
registers its counters and gauges in a ``CollectorRegistry`` (``prometheus_client``'s
default one unless told) and counts the events of every store it is attached to::

    from alkey.metrics.prometheus import PrometheusObserver

    metrics = PrometheusObserver()
    store.add_observer(metrics)

The metrics (with the default ``namespace="alkey"``):

* ``alkey_fetches_total{result}`` (counter): fetch calls: ``hit`` answered by Redis,
  ``miss`` a forced miss (fresh random tokens);
* ``alkey_round_trip_seconds{operation,result}`` (histogram): how long each round trip
  to Redis took: ``operation`` ``fetch`` (a key's tokens), ``bump`` (after a COMMIT, or a
  replay) or ``intend`` (durable mode, before one); ``result`` ``ok`` or ``error``;
* ``alkey_tokens_bumped_total`` (counter): tokens bumped in Redis;
* ``alkey_bumps_replayed_total`` (counter): of those, bumps kept during an outage (or
  intents of a dead writer) sent late;
* ``alkey_bumps_pending`` (gauge): bumps kept, waiting for Redis;
* ``alkey_bumps_dropped_total`` (counter): kept bumps past ``max_pending``;
* ``alkey_outages_total{kind}`` (counter): incidents: ``outage`` or
  ``misconfiguration``;
* ``alkey_outage`` (gauge): 1 during an incident, else 0;
* ``alkey_pool_exhaustions_total`` (counter): incidents of an exhausted connection pool;
* ``alkey_pool_starved_calls_total`` (counter): calls that went without a connection
  meanwhile;
* ``alkey_intents_claimed_total`` (counter): durable mode: intents of dead writers
  claimed;
* ``alkey_recoveries_total`` (counter): durable mode: recoveries of due intents;
* ``alkey_local_cache_lookups_total{result}`` (counter): identifiers looked up in the
  local token cache: ``hit`` or ``miss``;
* ``alkey_local_cache_invalidations_total`` (counter): token keys announced changed;
* ``alkey_local_cache_evictions_total`` (counter): of those, tokens evicted from the
  cache;
* ``alkey_local_cache_flushes_total{reason}`` (counter): times the local token cache was
  emptied.

One observer, several stores: attach the same observer to each (``add_observer``); their
counts add up, and the two gauges show the last store to report. A second
:class:`PrometheusObserver` with the same namespace in the same registry is refused with a
:class:`ValueError` (Prometheus cannot hold two metrics of one name): share the first, or
give the second another ``namespace`` or ``registry``.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from alkey.errors import TokenStoreConfigurationError
from alkey.metrics import ROUND_TRIP_BUCKETS
from alkey.observers import StoreObserver

__all__ = ["PrometheusObserver"]


class PrometheusObserver(StoreObserver):
    """Counts a token store's events in Prometheus counters and gauges, and times its
    round trips in a histogram (see the module for the metrics).

    ``registry``: where to register them (``prometheus_client.REGISTRY`` by default);
    ``namespace``: the prefix of their names (``alkey``). Raises :class:`ValueError` when
    the registry already holds metrics of these names -- most likely another
    :class:`PrometheusObserver`: attach that one to every store instead.

    Thread-safe and quick, as an observer must be: each event increments a counter or
    two, or observes one histogram (``prometheus_client``'s metrics take their own locks).
    """

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "alkey") -> None:
        #: The registry the metrics are registered in.
        self.registry = REGISTRY if registry is None else registry
        #: The prefix of the metrics' names.
        self.namespace = namespace
        self._registered: list[MetricWrapperBase] = []
        try:
            self._create()
        except ValueError as error:
            for metric in self._registered:
                self.registry.unregister(metric)
            raise ValueError(
                f"alkey's metrics ({namespace}_...) are already registered in this "
                "Prometheus registry, most likely by another PrometheusObserver: attach "
                "that one to every store (store.add_observer(observer)), or give this one "
                f"another namespace or registry ({error})"
            ) from error

    def _counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        counter = Counter(
            name,
            documentation,
            labelnames=labelnames,
            namespace=self.namespace,
            registry=self.registry,
        )
        self._registered.append(counter)
        return counter

    def _gauge(self, name: str, documentation: str) -> Gauge:
        gauge = Gauge(name, documentation, namespace=self.namespace, registry=self.registry)
        self._registered.append(gauge)
        return gauge

    def _histogram(self, name: str, documentation: str, labelnames: Sequence[str]) -> Histogram:
        histogram = Histogram(
            name,
            documentation,
            labelnames=labelnames,
            namespace=self.namespace,
            registry=self.registry,
            buckets=ROUND_TRIP_BUCKETS,
        )
        self._registered.append(histogram)
        return histogram

    def _create(self) -> None:
        fetches = self._counter(
            "fetches",
            "Token fetches: result=hit answered by Redis, result=miss a forced miss (fresh "
            "random tokens: Redis down or recovering, no free connection).",
            ["result"],
        )
        #: Fetches Redis answered.
        self.fetch_hits = fetches.labels(result="hit")
        #: Forced misses.
        self.fetch_misses = fetches.labels(result="miss")
        round_trips = self._histogram(
            "round_trip_seconds",
            "Seconds a round trip to Redis took, by operation (fetch: a key's tokens; "
            "bump: after a COMMIT, or a replay; intend: durable mode, before a COMMIT) and "
            "result (ok, or error: a timeout, a refused or lost connection, an error "
            "answer).",
            ["operation", "result"],
        )
        #: The round-trip histograms, by ``(operation, failed)``.
        self.round_trips = {
            (operation, failed): round_trips.labels(
                operation=operation, result="error" if failed else "ok"
            )
            for operation in ("fetch", "bump", "intend")
            for failed in (False, True)
        }
        #: Tokens bumped in Redis.
        self.tokens_bumped = self._counter(
            "tokens_bumped", "Tokens bumped in Redis (each a row, table or global token)."
        )
        #: Of those, bumps kept during an outage or intents of dead writers.
        self.bumps_replayed = self._counter(
            "bumps_replayed",
            "Bumped tokens that were kept during an outage (or intents of a dead writer) "
            "and sent late.",
        )
        #: Bumps waiting for Redis.
        self.bumps_pending = self._gauge(
            "bumps_pending", "Token bumps kept for replay, waiting for Redis to answer."
        )
        #: Kept bumps past ``max_pending``.
        self.bumps_dropped = self._counter(
            "bumps_dropped",
            "Kept bumps past max_pending: the global token is bumped in their place (every "
            "key misses once after the replay).",
        )
        outages = self._counter(
            "outages",
            "Incidents of a store: kind=outage (Redis unreachable) or kind=misconfiguration "
            "(refused password or certificate, ACL, CROSSSLOT: will not end by waiting).",
            ["kind"],
        )
        #: Incidents where Redis could not be reached.
        self.outages = outages.labels(kind="outage")
        #: Incidents that will not end by waiting.
        self.misconfigurations = outages.labels(kind="misconfiguration")
        #: 1 during an incident, else 0.
        self.outage = self._gauge(
            "outage", "1 while a store cannot use Redis (keys miss, bumps wait), else 0."
        )
        #: Incidents of an exhausted connection pool.
        self.pool_exhaustions = self._counter(
            "pool_exhaustions",
            "Incidents where calls found no free connection in the Redis pool.",
        )
        #: Calls that went without a connection.
        self.pool_starved_calls = self._counter(
            "pool_starved_calls",
            "Calls that went without Redis for want of a free pool connection.",
        )
        #: Intents of dead writers claimed (durable mode).
        self.claimed_intents = self._counter(
            "intents_claimed",
            "Durable mode: intents of writers that died between COMMIT and bump, claimed "
            "to be bumped.",
        )
        #: Recoveries of due intents (durable mode).
        self.recoveries = self._counter(
            "recoveries", "Durable mode: recoveries of due intents begun."
        )
        lookups = self._counter(
            "local_cache_lookups",
            "Identifiers looked up in the local token cache: result=hit answered by it, "
            "result=miss sent to Redis.",
            ["result"],
        )
        #: Identifiers the local token cache answered.
        self.local_hits = lookups.labels(result="hit")
        #: Identifiers it sent to Redis.
        self.local_misses = lookups.labels(result="miss")
        #: Token keys announced changed.
        self.local_invalidations = self._counter(
            "local_cache_invalidations",
            "Token keys Redis announced changed (or this process bumped), for the local "
            "token cache.",
        )
        #: Of those, tokens evicted from the local cache.
        self.local_evictions = self._counter(
            "local_cache_evictions",
            "Tokens evicted from the local token cache by invalidations.",
        )
        #: Times the local token cache was emptied, by reason.
        self.local_flushes = self._counter(
            "local_cache_flushes",
            "Times the local token cache was emptied, by reason (tracking connection lost "
            "or new, Redis flushed, failover, closed).",
            ["reason"],
        )

    def fetched(self, *, identifiers: Sequence[str], missed: bool) -> None:
        (self.fetch_misses if missed else self.fetch_hits).inc()

    def bumped(self, *, count: int, replayed: int) -> None:
        self.tokens_bumped.inc(count)
        if replayed:
            self.bumps_replayed.inc(replayed)

    def round_trip(self, *, operation: str, seconds: float, failed: bool) -> None:
        self.round_trips[operation, failed].observe(seconds)

    def bump_kept(self, *, count: int, pending: int) -> None:
        self.bumps_pending.set(pending)

    def dropped(self, *, count: int, max_pending: int) -> None:
        self.bumps_dropped.inc(count)

    def outage_began(
        self, *, action: str, error: BaseException, pending: int, dropped: int, max_pending: int
    ) -> None:
        misconfigured = isinstance(error, TokenStoreConfigurationError)
        (self.misconfigurations if misconfigured else self.outages).inc()
        self.outage.set(1)
        self.bumps_pending.set(pending)

    def outage_ended(self, *, replayed: int, dropped: int) -> None:
        self.outage.set(0)
        self.bumps_pending.set(0)

    def pool_exhausted(self, *, action: str, error: BaseException, pending: int) -> None:
        self.pool_exhaustions.inc()

    def pool_recovered(self, *, starved: int) -> None:
        self.pool_starved_calls.inc(starved)

    def intents_claimed(self, *, count: int) -> None:
        self.claimed_intents.inc(count)

    def recovery_began(self, *, claimed: int, lease: float, backlog: bool) -> None:
        self.recoveries.inc()

    def local_lookup(self, *, hits: int, misses: int) -> None:
        if hits:
            self.local_hits.inc(hits)
        if misses:
            self.local_misses.inc(misses)

    def local_invalidated(self, *, count: int, evicted: int) -> None:
        self.local_invalidations.inc(count)
        if evicted:
            self.local_evictions.inc(evicted)

    def local_flushed(self, *, reason: str, entries: int) -> None:
        self.local_flushes.labels(reason=reason).inc()

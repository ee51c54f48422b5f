"""Metrics: a token store's counts, exported to Prometheus or OpenTelemetry.

Why: an operator should see on a dashboard what the logs only tell one line at a time --
how many fetches Redis answered and how many were forced misses, how long each round
trip to Redis took, how many tokens each commit bumped, outages and the bumps they kept
and replayed, exhausted connection pools, recoveries of due intents, and the local token
cache's hit rate -- and be alerted on it, with the monitoring the service already runs.

What: two :class:`~alkey.observers.StoreObserver` subclasses, each in a module of its own
because each imports its library (an optional extra of alkey):

* :class:`alkey.metrics.prometheus.PrometheusObserver` (``pip install 'alkey[prometheus]'``)
  registers counters, gauges and a histogram named ``alkey_...`` in a
  ``prometheus_client`` ``CollectorRegistry``;
* :class:`alkey.metrics.otel.OpenTelemetryObserver` (``pip install 'alkey[opentelemetry]'``)
  records the same counts and timings on an OpenTelemetry meter, as instruments named
  ``alkey....``.

Attach one to a store with ``store.add_observer(observer)`` (or pass it in the store's
``observers``, beside :class:`~alkey.observers.LoggingObserver`); one observer may watch
several stores, and then counts their events together. Both override only the events
they count, and each event costs a counter increment or two (a round trip, one
histogram observation; with no observer timing them, round trips are not timed at
all). See the *Metrics* page of the documentation for the metrics, a dashboard query
for each, and alerts worth setting.

This package imports neither library: import the module of the one you use.
"""

from __future__ import annotations

__all__ = ["ROUND_TRIP_BUCKETS"]

#: The histogram buckets of a round trip's duration, in seconds, for both exporters: a
#: round trip on loopback takes about 0.1 ms, across a data centre 0.2-1 ms, and one that
#: runs into the client's socket timeout seconds. The libraries' default buckets begin at
#: 5 ms (Prometheus) or are meant for milliseconds (OpenTelemetry), and would put every
#: healthy round trip in one bucket.
ROUND_TRIP_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

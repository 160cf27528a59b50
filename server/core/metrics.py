"""Service counters in the Prometheus text format (``GET /metrics`` on the HTTP listener).

The broker, the control plane and the store each keep plain counters
(``collections.Counter`` and a few attributes); this module reads them when a
scrape arrives and renders them. Nothing is computed on the hot paths for it.

Counter names like ``dropped.acl`` become ``fleetcmd_broker_dropped_acl_total``;
gauges (things that go up and down: connected clients, active executions) have
no ``_total`` suffix.

``GET /metrics`` renders them through a prometheus-client ``CollectorRegistry``
(:class:`ServiceMetrics`) with a custom collector, next to the histograms
(latency to a final status and to delivery, store commit duration and batch
size, gRPC and HTTP request duration) and the process metrics (CPU, RSS, fds).
"""

from __future__ import annotations

import enum
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

PREFIX = "fleetcmd"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


class Kind(enum.Enum):
    """Prometheus metric types used here."""

    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True)
class Sample:
    """One value at scrape time."""

    name: str  # without prefix or suffix, e.g. "broker_dropped_acl"
    value: float
    kind: Kind
    help: str = ""


def metric_name(*parts: str) -> str:
    """A valid Prometheus name from free-form parts (dots, dashes and the like become ``_``)."""
    return "_".join(_UNSAFE.sub("_", p).strip("_") for p in parts if p)


def counters(group: str, values: Mapping[str, int], help_text: str) -> list[Sample]:
    """Counter samples from a ``Counter``-like mapping, one per key."""
    return [Sample(metric_name(group, key), float(n), Kind.COUNTER, help_text) for key, n in sorted(values.items())]


def render(samples: Iterable[Sample]) -> str:
    """The Prometheus text exposition (version 0.0.4) of ``samples``.

    Two keys that normalise to the same name are summed, so the output never repeats a series.
    """
    merged: dict[str, Sample] = {}
    for s in samples:
        full = f"{PREFIX}_{s.name}" + ("_total" if s.kind is Kind.COUNTER else "")
        seen = merged.get(full)
        merged[full] = s if seen is None else Sample(s.name, seen.value + s.value, s.kind, seen.help)
    lines: list[str] = []
    for full, s in sorted(merged.items()):
        if s.help:
            lines.append(f"# HELP {full} {s.help}")
        lines.append(f"# TYPE {full} {s.kind.value}")
        value = int(s.value) if float(s.value).is_integer() else s.value
        lines.append(f"{full} {value}")
    return "\n".join(lines) + "\n"


Collector = Callable[[], list[Sample]]


# ---- prometheus-client: the exposition, histograms and process metrics ------------------------

# Seconds: from a few milliseconds (a local round trip) to the largest default TTL region.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, float("inf"))
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, float("inf"))
# Actions are named by operators and devices' types: the first MAX_ACTION_LABELS distinct ones
# get their own series, later ones share OTHER_ACTION, so a typo storm cannot grow the registry.
MAX_ACTION_LABELS = 50
OTHER_ACTION = "other"


class _SampleCollector:
    """Renders today's plain counters and gauges through the registry, read at scrape time."""

    def __init__(self, collect: Collector) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        merged: dict[tuple[str, Kind], Sample] = {}
        for s in self._collect():
            name = f"{PREFIX}_{s.name}"
            seen = merged.get((name, s.kind))
            merged[(name, s.kind)] = s if seen is None else Sample(s.name, seen.value + s.value, s.kind, seen.help)
        for (name, kind), s in sorted(merged.items(), key=lambda item: item[0][0]):
            if kind is Kind.COUNTER:
                yield CounterMetricFamily(name, s.help, value=s.value)
            else:
                yield GaugeMetricFamily(name, s.help, value=s.value)


class Buckets:
    """One label set of a :class:`PlainHistogram`: plain counts, updated on the event loop without a lock."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # the last bound is +Inf: every value has a bucket
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose upper bound is at least ``value``."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class PlainHistogram:
    """A histogram kept as plain numbers and rendered at scrape time, for what is observed per command.

    prometheus-client's ``Histogram.observe`` takes a lock and walks the buckets in Python; observed
    two or three times per command in the commit listener it cost measurably more service CPU per
    command than counting into a list (a paired steady A/B with ``bench/ab.py``). Only the event loop
    observes and scrapes, so no lock is needed.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = bounds
        self.children: dict[tuple[str, ...], Buckets] = {}

    def labels(self, *values: str) -> Buckets:
        """The counts of one label set (created at first use)."""
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Buckets(self.bounds)
        return child

    def observe(self, value: float) -> None:
        """Observe ``value`` for a histogram without labels."""
        self.labels().observe(value)

    def family(self) -> HistogramMetricFamily:
        """The histogram as the exposition renders it (cumulative buckets, sum)."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=list(self.labelnames))
        for values, child in list(self.children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds, child.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
            family.add_metric(list(values), buckets, sum_value=child.total)
        return family


class _PlainHistograms:
    """Renders :class:`PlainHistogram` s through the registry."""

    def __init__(self, histograms: Iterable[PlainHistogram]) -> None:
        self._histograms = tuple(histograms)

    def collect(self) -> Iterator[Metric]:
        for histogram in self._histograms:
            yield histogram.family()


class ServiceMetrics:
    """One registry per service: today's counters (a custom collector), histograms, process metrics.

    The histograms are observed where the event is already handled (the commit listener, the
    store's completion callback, the request middleware); children are cached per label set so an
    observation is a dict lookup and the histogram's own update.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.execution_latency = PlainHistogram(
            f"{PREFIX}_execution_latency_seconds",
            "Creation to final status, by action (first 50 distinct, then 'other') and final status.",
            ("action", "status"),
            LATENCY_BUCKETS,
        )
        self.delivery_latency = PlainHistogram(
            f"{PREFIX}_execution_delivery_seconds",
            "Creation to SENT (stage=sent: as far as a QoS 0 request gets) and to DELIVERED (stage=delivered).",
            ("stage",),
            LATENCY_BUCKETS,
        )
        self.commit_duration = PlainHistogram(
            f"{PREFIX}_store_commit_seconds", "Duration of one store transaction (one group commit).", (), COMMIT_BUCKETS
        )
        self.commit_batch = PlainHistogram(
            f"{PREFIX}_store_commit_batch_size", "Writes committed together in one store transaction.", (), BATCH_BUCKETS
        )
        # Observed once per call on the event loop: plain histograms too (prometheus-client's locked
        # observe showed up in a profile of unary Sends under steady load).
        self.grpc_duration = PlainHistogram(
            f"{PREFIX}_grpc_request_seconds", "gRPC call duration by method and status code.", ("method", "code"), REQUEST_BUCKETS
        )
        self.http_duration = PlainHistogram(
            f"{PREFIX}_http_request_seconds",
            "HTTP request duration by method, route and status code.",
            ("method", "route", "code"),
            REQUEST_BUCKETS,
        )
        self.registry.register(
            _PlainHistograms(
                (
                    self.execution_latency,
                    self.delivery_latency,
                    self.commit_duration,
                    self.commit_batch,
                    self.grpc_duration,
                    self.http_duration,
                )
            )
        )
        self._actions: set[str] = set()
        self._final: dict[tuple[str, str], Buckets] = {}
        self._sent = self.delivery_latency.labels("sent")
        self._delivered = self.delivery_latency.labels("delivered")

    def add_samples(self, collect: Collector) -> None:
        """Render ``collect``'s counters and gauges (today's metrics) with every scrape."""
        self.registry.register(_SampleCollector(collect))

    def action_label(self, action: str) -> str:
        """``action`` while fewer than :data:`MAX_ACTION_LABELS` distinct ones were seen, else ``other``."""
        if action in self._actions:
            return action
        if len(self._actions) < MAX_ACTION_LABELS:
            self._actions.add(action)
            return action
        return OTHER_ACTION

    def observe_final(self, action: str, status: str, seconds: float) -> None:
        """An execution reached its final ``status`` ``seconds`` after its creation."""
        # Keyed by the label, not the action: past MAX_ACTION_LABELS every new action shares "other",
        # and so does its cache entry (the cache stays as bounded as the label set).
        key = (self.action_label(action), status)
        child = self._final.get(key)
        if child is None:
            child = self._final[key] = self.execution_latency.labels(*key)
        child.observe(seconds)

    def observe_delivery(self, delivered: bool, seconds: float) -> None:
        """An execution was SENT (``delivered`` False) or DELIVERED ``seconds`` after its creation."""
        (self._delivered if delivered else self._sent).observe(seconds)

    def observe_commit(self, seconds: float, writes: int) -> None:
        """One store transaction of ``writes`` writes took ``seconds``."""
        self.commit_duration.observe(seconds)
        self.commit_batch.observe(writes)

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) of everything registered."""
        return generate_latest(self.registry)

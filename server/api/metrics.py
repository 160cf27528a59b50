"""Service counters in the Prometheus text format (``GET /metrics`` on the HTTP listener).

The broker, the control plane and the store each keep plain counters
(``collections.Counter`` and a few attributes); this module reads them when a
scrape arrives and renders them. Nothing is computed on the hot paths for it.

Counter names like ``dropped.acl`` become ``fleetcmd_broker_dropped_acl_total``;
gauges (things that go up and down: connected clients, active executions) have
no ``_total`` suffix.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

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

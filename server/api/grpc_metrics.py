"""gRPC call duration by method and status code (``fleetcmd_grpc_request_seconds``).

Observed inside the wrapper every servicer method already has (:func:`server.api.grpc_errors.maps_errors`,
and ``SendStream`` itself), not by a server interceptor: grpc.aio runs each interceptor as its own
coroutine chain on every call, which measurably slowed a unary ``Send`` (a paired A/B with ``bench/ab.py``).
One ``perf_counter`` pair and one observation of a histogram child looked up in a dict per call.
Calls refused by the authentication interceptor never reach a servicer and are not observed.
"""

from __future__ import annotations

import time

from server.core.metrics import Buckets, PlainHistogram


class CallTimer:
    """Observe call durations of one gRPC service (``service`` is its full name, e.g. ``fleetcmd.v1.CommandService``)."""

    __slots__ = ("_children", "_histogram", "_service")

    def __init__(self, histogram: PlainHistogram, service: str) -> None:
        self._histogram = histogram
        self._service = service
        self._children: dict[tuple[str, str], Buckets] = {}

    def observe(self, method: str, code: str, started: float) -> None:
        """One call of ``method`` (its short name) that ended with ``code``, started at ``perf_counter()`` ``started``."""
        child = self._children.get((method, code))
        if child is None:
            child = self._histogram.labels(f"/{self._service}/{method}", code)
            self._children[(method, code)] = child
        child.observe(time.perf_counter() - started)

"""The proxy's Prometheus metrics, in a registry of its own per proxy so two proxies never mix counts.

Per-request counts are plain numbers made into metrics only when scraped (`Traffic`); they are counted
here, on the request path, whatever the access log does.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .buffer import Counts
from .tokens import TokenSource

if TYPE_CHECKING:  # only its type: the metrics need not load read-ahead's machinery
    from .readahead import ReadAhead

_KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class Metrics:
    """The proxy's Prometheus metrics; `endpoint` serves them as text."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.traffic = traffic = Traffic()
        registry.register(traffic)
        self.token_acquisitions = Counter(
            "dicom_proxy_token_acquisitions", "Token acquisitions by result", ["result"], registry=registry
        )
        self.token_acquisition_duration = Histogram(
            "dicom_proxy_token_acquisition_duration_seconds", "Time the credential took to answer", registry=registry
        )
        self.token_expires_in = Gauge(
            "dicom_proxy_token_expires_in_seconds",
            "Seconds until the held token expires (0: none held)",
            registry=registry,
        )
        # Updated from the DIMSE gateway's threads: prometheus-client's own counters take the lock they need.
        self.dimse_operations = Counter(
            "dicom_proxy_dimse_operations",
            "DIMSE operations answered by the gateway, by operation and final status",
            ["operation", "status"],
            registry=registry,
        )
        self.dimse_associations = Counter(
            "dicom_proxy_dimse_associations",
            "DIMSE associations requested, by result (accepted, rejected)",
            ["result"],
            registry=registry,
        )

    def record_acquisition(self, result: str, seconds: float) -> None:
        self.token_acquisitions.labels(result=result).inc()
        self.token_acquisition_duration.observe(seconds)

    def watch(self, tokens: TokenSource, clock: Callable[[], float] = time.time) -> None:
        def expires_in() -> float:
            token = tokens.current
            return max(0.0, token.expires_on - clock()) if token else 0.0

        self.token_expires_in.set_function(expires_in)

    def watch_read_ahead(self, read_ahead: ReadAhead) -> None:
        self.registry.register(ReadAheadCounts(read_ahead))

    async def endpoint(self, request: web.BaseRequest) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def begin(self) -> float:
        """Count a request in flight; returns the start time for `end`."""
        self.traffic.in_flight += 1
        return time.perf_counter()

    def end(self, request: web.BaseRequest, status: int | None, sent: int, started: float, failure: str | None) -> None:
        """Count what the client finally got: `status` None when the exchange broke off."""
        traffic = self.traffic
        traffic.in_flight -= 1
        method = request.method if request.method in _KNOWN_METHODS else "other"
        key = (method, _STATUS_CLASSES.get(status // 100, "error") if status else "error")
        traffic.requests[key] = traffic.requests.get(key, 0) + 1
        seconds = time.perf_counter() - started
        traffic.duration_counts[bisect.bisect_left(_DURATION_BUCKETS, seconds)] += 1
        traffic.duration_sum += seconds
        traffic.received += request.content.total_bytes
        traffic.sent += sent
        if failure is not None:
            traffic.upstream_errors[failure] = traffic.upstream_errors.get(failure, 0) + 1

    def malformed(self) -> None:
        """A request the HTTP parser refused: counted, though no handler saw it."""
        key = ("other", "4xx")
        self.traffic.requests[key] = self.traffic.requests.get(key, 0) + 1


class Traffic(Collector):
    """The per-request counts, kept as plain numbers and made into Prometheus metrics only when scraped.

    prometheus-client's Counter, Gauge and Histogram take a lock on every update, which costs a small
    request several percent; these are only ever updated from the event loop's thread.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.received = 0
        self.sent = 0
        self.upstream_errors: dict[str, int] = {}
        # One count per bucket of _DURATION_BUCKETS (upper bounds, inclusive) and one for +Inf.
        self.duration_counts = [0] * (len(_DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "dicom_proxy_requests", "Requests answered, by method and status class", labels=["method", "status"]
        )
        for (method, status), count in sorted(self.requests.items()):
            requests.add_metric([method, status], count)
        yield requests
        cumulative = list(itertools.accumulate(self.duration_counts))
        yield HistogramMetricFamily(
            "dicom_proxy_request_duration_seconds",
            "Time from request to the last byte of the answer",
            buckets=[(str(float(bound)), count) for bound, count in zip(_DURATION_BUCKETS, cumulative, strict=False)]
            + [("+Inf", cumulative[-1])],
            sum_value=self.duration_sum,
        )
        yield CounterMetricFamily(
            "dicom_proxy_received_bytes", "Request body bytes received from clients", value=self.received
        )
        yield CounterMetricFamily("dicom_proxy_sent_bytes", "Response bytes sent to clients", value=self.sent)
        yield GaugeMetricFamily("dicom_proxy_requests_in_flight", "Requests being answered now", value=self.in_flight)
        errors = CounterMetricFamily(
            "dicom_proxy_upstream_errors", "Upstream failures by kind (connect, tls, timeout, reset)", labels=["kind"]
        )
        for kind, count in sorted(self.upstream_errors.items()):
            errors.add_metric([kind], count)
        yield errors


class ReadAheadCounts(Collector):
    """What read-ahead did: hits and misses of client requests, and the bytes it fetched and wasted."""

    def __init__(self, read_ahead: ReadAhead) -> None:
        self._read_ahead = read_ahead

    def collect(self) -> Iterator[Metric]:
        counts = self._read_ahead.counts
        for field in dataclasses.fields(Counts):
            name, help_text = f"dicom_proxy_read_ahead_{field.name}", field.metadata["help"]
            yield CounterMetricFamily(name, help_text, value=getattr(counts, field.name))
        yield GaugeMetricFamily(
            "dicom_proxy_read_ahead_buffered_bytes", "Bytes held by read-ahead now", value=self._read_ahead.buffered
        )
        yield GaugeMetricFamily(
            "dicom_proxy_read_ahead_pending",
            "Read-ahead requests queued or on their way now",
            value=self._read_ahead.pending,
        )

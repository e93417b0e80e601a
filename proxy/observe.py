"""Local endpoints (/-/health, /-/ready, /-/metrics), request ids, metrics, the access log and log format.

Liveness never touches the token or the upstream; readiness reports whether a valid token is held and
the service has not refused it. Metrics live in a registry of their own per proxy, so two proxies in one
process never mix counts. No client bytes reach a log line except the path, with control characters
escaped.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import NotReady, loggable
from .tokens import TokenSource, expiry_text

REQUEST_ID = web.RequestKey("request_id", str)
# Set on the stand-in request aiohttp makes for bytes its parser refused: it has no real method or path.
MALFORMED = web.RequestKey("malformed", bool)
REQUEST_ID_HEADER = "X-Request-Id"
# A client's own request id is kept when it looks like one; anything else could forge log lines.
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_KNOWN_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"})
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


async def health(request: web.BaseRequest) -> web.Response:
    return web.json_response({"status": "ok"})


class Readiness:
    """200 while a valid token is held and the service has not refused it; raises the reason otherwise."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    async def __call__(self, request: web.BaseRequest) -> web.Response:
        if self._tokens.refusal is not None:
            raise self._tokens.refusal
        token = self._tokens.current
        if token is not None:
            return web.json_response({"status": "ready", "token_expires_at": expiry_text(token.expires_on)})
        raise self._tokens.last_error or NotReady("the first token has not been acquired yet")


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

        # Request ids: a random per-process prefix and a counter are unique enough and cost far less
        # than uuid4 on every request.
        self._id_prefix = os.urandom(6).hex()
        self._id_counter = itertools.count(1)

    def request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter):010x}"

    def record_acquisition(self, result: str, seconds: float) -> None:
        self.token_acquisitions.labels(result=result).inc()
        self.token_acquisition_duration.observe(seconds)

    def watch(self, tokens: TokenSource, clock: Callable[[], float] = time.time) -> None:
        def expires_in() -> float:
            token = tokens.current
            return max(0.0, token.expires_on - clock()) if token else 0.0

        self.token_expires_in.set_function(expires_in)

    async def endpoint(self, request: web.BaseRequest) -> web.Response:
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def begin(self, request: web.BaseRequest) -> float:
        """Give the request its id and count it in flight; returns the start time for `end`."""
        incoming = request.headers.get(REQUEST_ID_HEADER)
        request[REQUEST_ID] = incoming if incoming and _CLIENT_REQUEST_ID.match(incoming) else self.request_id()
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


class AccessLogger(AbstractAccessLogger):
    """One line per request; the query string is left out because it can hold patient names."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        request_id = request.get(REQUEST_ID, "-")
        method, path = ("-", "-") if request.get(MALFORMED) else (request.method, loggable(request.path))
        fields = {
            "client": request.remote,
            "method": method,
            "path": path,
            "status": response.status,
            "bytes": response.body_length,
            "seconds": round(time, 4),
            "request_id": request_id,
        }
        self.logger.info(
            '%s "%s %s" %d %d %.3fs id=%s',
            request.remote,
            method,
            path,
            response.status,
            response.body_length,
            time,
            request_id,
            extra={"access": fields},
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`time level logger: message` in UTC, with the time text made once per second, not per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return f"{self._second_text},{int(record.msecs):03d}"


def configure_logging(log_format: str, *, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # Facts no line of ours shows, which every record would otherwise look up (Logging HOWTO, "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (sys._getframe) per record
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # azure-identity logs every get_token at INFO; our own token lines say what matters.
    logging.getLogger("azure").setLevel(logging.WARNING)

"""The facts the status page and its JSON are made from, read from the parts that hold them when asked.

The request path pays for one `deque.append` of a tuple (see `RecentRequest`); everything here runs only
when someone looks. The token, the access key and query strings never reach a snapshot: it knows only the
token's claims, whether a key is set, and paths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TypedDict

from prometheus_client import CollectorRegistry

from ..errors import ProxyError, loggable
from ..tokens import who

# One answered request, kept raw and formatted only when the page is rendered: (finished at, epoch
# seconds; method; path without the query; status, None when the exchange broke off; seconds taken).
RecentRequest = tuple[float, str, str, int | None, float]
RECENT_LIMIT = 50
# How many of the newest forwarded answers are looked at for refusals by the service (401/403).
REFUSALS_WINDOW = 20
_PATH_LIMIT = 300
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
_UPSTREAM_FAILURES = ("connect", "tls", "timeout", "reset")
_REFUSED = frozenset({401, 403})


def recent_requests() -> deque[RecentRequest]:
    """The ring buffer the proxy appends each answered request to; the oldest falls out."""
    return deque(maxlen=RECENT_LIMIT)


class Identity(TypedDict):
    user: str
    tenant: str


class TokenState(TypedDict):
    expires_at: str
    expires_in_seconds: int


class Problem(TypedDict):
    error: str
    detail: str
    hint: str


class ReadAheadCounters(TypedDict):
    hits: int
    misses: int
    wasted_bytes: int
    buffered_bytes: int


class Counters(TypedDict):
    requests: dict[str, int]
    received_bytes: int
    sent_bytes: int
    in_flight: int
    upstream_errors: dict[str, int]
    token_acquisitions: dict[str, int]
    read_ahead: ReadAheadCounters | None  # None: read-ahead is off (--read-ahead-mib 0)


class Recent(TypedDict):
    time: str
    method: str
    path: str
    status: int | None
    seconds: float


class Refusals(TypedDict):
    newest: bool  # the newest forwarded answer was a refusal
    count: int
    of: int
    last_status: int
    last_time: str
    text: str


class Snapshot(TypedDict):
    version: str
    # ready: a token is held and not refused; starting: the first one is on its way;
    # no_token: the credential fails; refused: the service refuses the tokens it is given;
    # denied: a token is held, but the service refused the newest forwarded request (401/403).
    state: str
    identity: Identity | None
    token: TokenState | None
    problem: Problem | None
    credential: str
    audience: str
    upstream: str
    base_url: str
    access_key_required: bool
    access_key_header: str
    read_only: bool
    cors_origins: list[str]
    counters: Counters
    recent: list[Recent]
    refusals: Refusals | None


def identity(claims: dict[str, Any]) -> Identity:
    """User and tenant from the token's claims."""
    return {"user": who(claims), "tenant": str(claims.get("tid", "unknown"))}


def problem(error: ProxyError) -> Problem:
    body = error.body()
    return {"error": body["error"], "detail": body["detail"], "hint": body["hint"]}


# Sample name -> the label its values are summed by (None: one number), as /-/metrics shows them.
_COUNTED = {
    "dicom_proxy_requests_total": "status",
    "dicom_proxy_received_bytes_total": None,
    "dicom_proxy_sent_bytes_total": None,
    "dicom_proxy_requests_in_flight": None,
    "dicom_proxy_upstream_errors_total": "kind",
    "dicom_proxy_token_acquisitions_total": "result",
    "dicom_proxy_read_ahead_hits_total": None,
    "dicom_proxy_read_ahead_misses_total": None,
    "dicom_proxy_read_ahead_wasted_bytes_total": None,
    "dicom_proxy_read_ahead_buffered_bytes": None,
}


def counters(registry: CollectorRegistry) -> Counters:
    """The counters, read from the proxy's Prometheus registry exactly as a scrape would read them."""
    totals: dict[str, dict[str, int]] = {name: {} for name in _COUNTED}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in _COUNTED:
                label = _COUNTED[sample.name]
                key = sample.labels.get(label, "") if label else ""
                sums = totals[sample.name]
                sums[key] = sums.get(key, 0) + int(sample.value)
    return {
        "requests": dict.fromkeys(STATUS_CLASSES, 0) | totals["dicom_proxy_requests_total"],
        "received_bytes": totals["dicom_proxy_received_bytes_total"].get("", 0),
        "sent_bytes": totals["dicom_proxy_sent_bytes_total"].get("", 0),
        "in_flight": totals["dicom_proxy_requests_in_flight"].get("", 0),
        "upstream_errors": dict.fromkeys(_UPSTREAM_FAILURES, 0) | totals["dicom_proxy_upstream_errors_total"],
        "token_acquisitions": {"ok": 0, "error": 0} | totals["dicom_proxy_token_acquisitions_total"],
        "read_ahead": _read_ahead(totals),
    }


def _read_ahead(totals: dict[str, dict[str, int]]) -> ReadAheadCounters | None:
    # The read-ahead counters are in the registry only when read-ahead is on (--read-ahead-mib above 0).
    if not totals["dicom_proxy_read_ahead_hits_total"]:
        return None
    return {
        "hits": totals["dicom_proxy_read_ahead_hits_total"][""],
        "misses": totals["dicom_proxy_read_ahead_misses_total"].get("", 0),
        "wasted_bytes": totals["dicom_proxy_read_ahead_wasted_bytes_total"].get("", 0),
        "buffered_bytes": totals["dicom_proxy_read_ahead_buffered_bytes"].get("", 0),
    }


def recent(entries: Iterable[RecentRequest]) -> list[Recent]:
    """Newest first; paths cut and with control characters escaped, as in the log."""
    return [
        {
            "time": _time(at),
            "method": loggable(method, 20),
            "path": loggable(path, _PATH_LIMIT),
            "status": status,
            "seconds": round(seconds, 6),
        }
        for at, method, path, status, seconds in reversed(list(entries))
    ]


def refusals(entries: Iterable[RecentRequest]) -> Refusals | None:
    """The service's refusals (401/403) among the newest forwarded answers, or None when there were none.

    A token the service accepts can still be refused on every request (an identity without a DICOM role,
    or without one on a data partition): the page must not stay green while that happens.
    """
    newest = [entry for entry in reversed(list(entries)) if entry[3] is not None][:REFUSALS_WINDOW]
    refused = [entry for entry in newest if entry[3] in _REFUSED]
    if not refused:
        return None
    at, _, _, status, _ = refused[0]
    when = _time(at)
    return {
        "newest": newest[0] is refused[0],
        "count": len(refused),
        "of": len(newest),
        "last_status": int(status or 0),
        "last_time": when,
        "text": f"The service refused {len(refused)} of the last {len(newest)} forwarded requests "
        f"(the last with {status} at {when[11:19]} UTC).",
    }


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

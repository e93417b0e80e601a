"""Pure header functions: what crosses the proxy in each direction, and what it adds.

Kept free of I/O so that every rule can be tested with plain dictionaries.
"""

from __future__ import annotations

import email.utils
import time

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 section 7.6.1, plus the de-facto members that proxies drop as well.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Client credentials meant for the proxy (or for nobody) that must never reach the service.
CLIENT_SECRETS = frozenset({"authorization", "cookie", "x-dicom-proxy-key"})

# Ask some servers to act as another method (a GET that deletes would pass --read-only) or, on servers
# that honour them (IIS URL Rewrite), another path, which would route around the path checks made here.
REQUEST_OVERRIDES = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"}
)

# Set by the proxy itself, so whatever the client sent is replaced rather than trusted.
REPLACED_ON_THE_WAY_UP = frozenset(
    {"host", "expect", "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
)

Headers = CIMultiDictProxy[str] | CIMultiDict[str]

# The proxy's own request id, on every answer; a client's own one is kept when it is a UUID or hex.
REQUEST_ID_HEADER = "X-Request-Id"


def split_host(host: str) -> tuple[str, str] | None:
    """A Host value's name and port ('' when it names none, or an empty one); None when it is not
    `name[:port]`. An IPv6 name keeps its brackets. The one parser for the allowlist and for the links
    built from the Host, so they can never disagree about which host a value names."""
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (end + 1 < len(host) and host[end + 1] != ":"):
            return None
        name, port = host[: end + 1], host[end + 2 :]
    else:
        name, _, port = host.partition(":")
    if not name or (port and not (port.isascii() and port.isdigit())):
        return None
    return name, port


def connection_tokens(headers: Headers) -> set[str]:
    """Header names listed in Connection, which are hop-by-hop for this one connection (RFC 9110 7.6.1)."""
    names: set[str] = set()
    for value in headers.getall("Connection", []):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


# What never crosses, per direction; precomputed because these run on every request.
_NOT_UP = HOP_BY_HOP | CLIENT_SECRETS | REPLACED_ON_THE_WAY_UP | REQUEST_OVERRIDES
_NOT_DOWN = HOP_BY_HOP


def _copy_except(headers: Headers, drop: frozenset[str], dropped_prefix: str | None = None) -> CIMultiDict[str]:
    listed = connection_tokens(headers) if "Connection" in headers else None
    copied: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in drop or (listed and lowered in listed):
            continue
        if dropped_prefix is not None and lowered.startswith(dropped_prefix):
            continue
        copied.add(name, value)
    return copied


def upstream_request_headers(
    incoming: Headers,
    *,
    token: str,
    client_address: str | None = None,
    client_scheme: str | None = None,
    client_host: str | None = None,
) -> CIMultiDict[str]:
    """Headers for any request that leaves the proxy: the given ones, minus hop-by-hop and secrets, plus the
    token, and the X-Forwarded-* that describe an HTTP client (the DIMSE gateway has none, and sends none).

    Host is left out so that the HTTP client writes the upstream's own.
    """
    headers = _copy_except(incoming, _NOT_UP)
    headers["Authorization"] = f"Bearer {token}"
    if client_address:
        headers["X-Forwarded-For"] = client_address
    if client_scheme:
        headers["X-Forwarded-Proto"] = client_scheme
    if client_host:
        headers["X-Forwarded-Host"] = client_host
    return headers


def forwardable(incoming: Headers) -> CIMultiDict[str]:
    """The headers of a request that may be sent on to the service: no secrets, nothing hop-by-hop, nothing
    the proxy sets itself."""
    return _copy_except(incoming, _NOT_UP)


def client_response_headers(upstream: Headers) -> CIMultiDict[str]:
    """Headers for the client's response: the upstream's, minus hop-by-hop ones and its CORS answer.

    The service's Access-Control-* headers are dropped because the proxy's own CORS policy decides which
    pages may read through it (guard.Cors adds them back for allowed origins). Set-Cookie passes: the
    proxy keeps no cookie jar, so a service cookie belongs to the client.
    """
    return _copy_except(upstream, _NOT_DOWN, dropped_prefix="access-control-")


# The longest a Retry-After is heeded: a service's mistake must not stop the proxy's own work for hours.
MOST_RETRY_AFTER = 600.0


def retry_after_seconds(value: str | None, default: float, *, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After in seconds or as an HTTP date, at most 10 minutes; `default` when
    there is none or it cannot be read."""
    if value is None:
        return default
    text = value.strip()
    if text.isdigit():
        return min(float(text), MOST_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return default
    return max(0.0, min(when - (time.time() if now is None else now), MOST_RETRY_AFTER))

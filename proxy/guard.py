"""Request policy applied before anything is forwarded.

Anything that can reach the proxy acts with the user's Azure identity, so each defence is a small
policy class with one job and its own refusal (a ProxyError, turned into JSON in app.py). `Guard` runs
them in order before anything else looks at a request, and before a `100 Continue` invites its body: the
Host check first, since a DNS-rebinding page must learn nothing, and CORS preflights before the access
key, which browsers do not send on a preflight.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging

from aiohttp import web
from multidict import CIMultiDict

from .errors import AccessKeyRequired, HostNotAllowed, PolicyRefused, RequestRefused
from .headers import split_host
from .settings import Settings

logger = logging.getLogger("proxy.guard")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths probes reach without a key, and with an IP-address Host too (Kubernetes sends the pod IP).
PROBE_PATHS = frozenset({"/-/health", "/-/ready"})
ACCESS_KEY_HEADER = "X-Dicom-Proxy-Key"
# Headers a page may need to read from DICOMweb answers (Location of a STOW, ETags, Warning on partial
# success, the service's own request and error identifiers).
EXPOSED_HEADERS = (
    "Location, Content-Location, ETag, Warning, Content-Type, Content-Length, Content-Range, "
    "Content-Encoding, Last-Modified, Retry-After, X-Request-Id, X-Ms-Request-Id, X-Ms-Correlation-Request-Id"
)
PREFLIGHT_MAX_AGE = "600"


class Policy:
    """One defence: `check` raises a ProxyError to refuse, returns a response to answer locally, or None."""

    def check(self, request: web.BaseRequest) -> web.StreamResponse | None:
        raise NotImplementedError


class OriginFormOnly(Policy):
    """Refuse CONNECT, TRACE, absolute-form targets and odd framing: a reverse proxy, not an open one."""

    REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

    def check(self, request: web.BaseRequest) -> None:
        if request.method in self.REFUSED_METHODS:
            raise RequestRefused(f"{request.method} is not served; this is not an open proxy")
        if not request.raw_path.startswith("/"):
            raise RequestRefused("the request target is not a path; this is not an open proxy")
        codings = request.headers.getall("Transfer-Encoding", ())
        if codings and ([coding.strip().lower() for coding in codings] != ["chunked"] or request.version < (1, 1)):
            # The body would be forwarded de-chunked with its other coding unnamed, corrupting what the service
            # stores; and HTTP/1.0 has no chunked framing at all (RFC 9112 6.1).
            raise RequestRefused("only 'Transfer-Encoding: chunked' on HTTP/1.1 is accepted")


class HostAllowlist(Policy):
    """Serve only Host values the user expects, so a DNS-rebinding page cannot ride the proxy."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._allowed = frozenset(name.lower() for name in allowed)

    def allows(self, host_header: str | None, *, addresses: bool = False) -> bool:
        """Whether the Host is listed; with `addresses`, any IP address too (no DNS name can rebind to it)."""
        split = split_host(host_header.lower()) if host_header else None
        if split is None:
            return False
        name, _ = split
        if name in self._allowed:
            return True
        if addresses:
            try:
                ipaddress.ip_address(name.strip("[]"))
            except ValueError:
                return False
            return True
        return False

    def check(self, request: web.BaseRequest) -> None:
        host = request.headers.get("Host")
        if not self.allows(host, addresses=request.path in PROBE_PATHS):
            # The Host is not echoed: it is the client's text, and this detail may be logged.
            raise HostNotAllowed("this Host is not one this proxy serves" if host else "no Host header")


class AccessKey(Policy):
    """Require the shared key, as a Basic password (what legacy tools can send) or X-Dicom-Proxy-Key."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def presented(self, request: web.BaseRequest) -> bytes | None:
        header = request.headers.get(ACCESS_KEY_HEADER)
        if header is not None:
            # A key that is not UTF-8 must make a wrong key, never a crash.
            return header.encode("utf-8", "surrogateescape")
        authorization = request.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]

    def check(self, request: web.BaseRequest) -> None:
        if request.path not in PROBE_PATHS:
            presented = self.presented(request)
            # compare_digest: the time taken must not tell how much of a guess was right.
            if presented is None or not hmac.compare_digest(presented, self._key):
                raise AccessKeyRequired("missing access key" if presented is None else "wrong access key")


class ReadOnly(Policy):
    """With --read-only, only GET, HEAD and OPTIONS reach the upstream: viewers can never delete."""

    def check(self, request: web.BaseRequest) -> None:
        if request.method not in SAFE_METHODS:
            raise PolicyRefused(
                f"{request.method} is refused: the proxy runs with --read-only",
                hint="Restart the proxy without --read-only to store, update or delete.",
            )


class Cors(Policy):
    """Browser access: preflights answered here, listed origins echoed, unlisted origins kept out.

    With no origins configured CORS stays off, but a cross-origin write is still refused: a browser sends
    a simple POST or a form submission before any CORS check could stop it. A cross-site GET carries no
    Origin when an `<img>` or `<script>` makes it, only `Sec-Fetch-Site: cross-site`, and the page learns
    from its load and error events: such requests are refused too unless their Origin is listed.
    """

    def __init__(self, origins: tuple[str, ...], *, read_only: bool) -> None:
        self._origins = frozenset(origins)
        self._any = "*" in self._origins
        methods = SAFE_METHODS if read_only else SAFE_METHODS | {"POST", "PUT", "PATCH", "DELETE"}
        self._methods = ", ".join(sorted(methods))
        if self._any:
            logger.warning("CORS allows any origin ('*'): every web page you visit can read through this proxy")

    def allows(self, origin: str) -> bool:
        return self._any or origin in self._origins

    def check(self, request: web.BaseRequest) -> web.StreamResponse | None:
        origin = request.headers.get("Origin")
        if origin is not None and len(request.headers.getall("Origin")) > 1:
            raise RequestRefused("more than one Origin header")
        if request.headers.get("Sec-Fetch-Site") == "cross-site" and (origin is None or not self.allows(origin)):
            raise PolicyRefused(
                "a request made by a web page on another site is refused",
                hint="Add the page's origin with --cors-origin if it should read through the proxy.",
            )
        if origin is None:
            return None
        if not self.allows(origin):
            if request.method not in SAFE_METHODS:
                raise PolicyRefused(
                    f"{request.method} from a web page whose origin is not listed is refused",
                    hint="Add the page's origin with --cors-origin if it should be allowed to change data.",
                )
            return None
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return self.preflight(request, origin)
        return None

    def preflight(self, request: web.BaseRequest, origin: str) -> web.Response:
        headers = CIMultiDict(self.response_headers(origin))
        headers["Access-Control-Allow-Methods"] = self._methods
        requested = request.headers.get("Access-Control-Request-Headers", "")
        allowed = [name.strip() for name in requested.split(",") if name.strip().lower() not in ("cookie", "")]
        if allowed:
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
        headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
            # Chrome's Private Network Access: a page on a public origin asks before calling localhost.
            headers["Access-Control-Allow-Private-Network"] = "true"
        return web.Response(status=204, headers=headers)

    def response_headers(self, origin: str) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": "*" if self._any else origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }

    def decorate(self, request: web.BaseRequest, headers: CIMultiDict[str]) -> None:
        """Add the CORS answer to a response's headers when the request came from a listed origin."""
        origin = request.headers.get("Origin")
        if origin is None or not self.allows(origin) or "Access-Control-Allow-Origin" in headers:
            return
        extra = self.response_headers(origin)
        headers.add("Vary", extra.pop("Vary"))
        headers.update(extra)


class Guard:
    """The policies in order: the first that refuses (raises) or answers decides; None lets the request on."""

    def __init__(self, settings: Settings) -> None:
        self.cors = Cors(settings.cors_origins, read_only=settings.read_only)
        chain: list[Policy] = [OriginFormOnly(), HostAllowlist(settings.allowed_hosts), self.cors]
        if settings.access_key is not None:
            chain.append(AccessKey(settings.access_key))
        if settings.read_only:
            chain.append(ReadOnly())
        self.policies = tuple(chain)

    def check(self, request: web.BaseRequest) -> web.StreamResponse | None:
        for policy in self.policies:
            answer = policy.check(request)
            if answer is not None:
                return answer
        return None

"""Request policy applied before anything is forwarded.

Anything that can reach the proxy acts with the user's Azure identity, so each defence is a small
policy class with one job and its own refusal (a ProxyError, turned into JSON by the app's error
middleware). `Guard` runs them in order as one middleware (a middleware each cost ~5% of small-request
throughput): the Host check first, since a DNS-rebinding page must learn nothing, and CORS preflights
before the access key, which browsers do not send on a preflight.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from .errors import AccessKeyRequired, HostNotAllowed, PolicyRefused, RequestRefused
from .settings import Settings

logger = logging.getLogger("proxy.guard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths probes must reach whatever Host they use (Kubernetes sends the pod IP) and without a key.
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

    def check(self, request: web.Request) -> web.StreamResponse | None:
        raise NotImplementedError


class OriginFormOnly(Policy):
    """Refuse CONNECT, TRACE and absolute-form targets: this is a reverse proxy, not an open one."""

    REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

    def check(self, request: web.Request) -> None:
        if request.method in self.REFUSED_METHODS:
            raise RequestRefused(f"{request.method} is not served; this is not an open proxy")
        if not request.raw_path.startswith("/"):
            raise RequestRefused(f"request target {request.raw_path[:100]!r} is not a path; this is not an open proxy")


class HostAllowlist(Policy):
    """Serve only Host values the user expects, so a DNS-rebinding page cannot ride the proxy."""

    def __init__(self, allowed: tuple[str, ...]) -> None:
        self._allowed = frozenset(name.lower() for name in allowed)

    def allows(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        host = host_header.lower()
        if host.startswith("["):
            name, _, rest = host.partition("]")
            name += "]"
            port = rest.removeprefix(":")
        else:
            name, _, port = host.partition(":")
        return name in self._allowed and (port == "" or port.isdigit())

    def check(self, request: web.Request) -> None:
        if request.path not in PROBE_PATHS:
            host = request.headers.get("Host")
            if not self.allows(host):
                raise HostNotAllowed(f"Host {host!r} is not one this proxy serves" if host else "no Host header")


class AccessKey(Policy):
    """Require the shared key, as a Basic password (what legacy tools can send) or X-Dicom-Proxy-Key."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()

    def presented(self, request: web.Request) -> bytes | None:
        header = request.headers.get(ACCESS_KEY_HEADER)
        if header is not None:
            return header.encode()
        authorization = request.headers.get("Authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]

    def check(self, request: web.Request) -> None:
        if request.path not in PROBE_PATHS:
            presented = self.presented(request)
            # compare_digest: the time taken must not tell how much of a guess was right.
            if presented is None or not hmac.compare_digest(presented, self._key):
                raise AccessKeyRequired("missing access key" if presented is None else "wrong access key")


class ReadOnly(Policy):
    """With --read-only, only GET, HEAD and OPTIONS reach the upstream: viewers can never delete."""

    def check(self, request: web.Request) -> None:
        if request.method not in SAFE_METHODS:
            raise PolicyRefused(
                f"{request.method} is refused: the proxy runs with --read-only",
                hint="Restart the proxy without --read-only to store, update or delete.",
            )


class Cors(Policy):
    """Browser access: preflights answered here, listed origins echoed, unlisted origins kept from writing.

    With no origins configured CORS stays off, but a cross-origin write is still refused: a browser sends
    a simple POST or a form submission before any CORS check could stop it.
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

    def check(self, request: web.Request) -> web.StreamResponse | None:
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        if not self.allows(origin):
            if request.method not in SAFE_METHODS:
                raise PolicyRefused(
                    f"{request.method} from the web page at {origin[:100]!r} is refused",
                    hint="Add the page's origin with --cors-origin if it should be allowed to change data.",
                )
            return None
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return self.preflight(request, origin)
        return None

    def preflight(self, request: web.Request, origin: str) -> web.Response:
        headers = CIMultiDict(self.response_headers(origin))
        headers["Access-Control-Allow-Methods"] = self._methods
        requested = request.headers.get("Access-Control-Request-Headers", "")
        allowed = [name.strip() for name in requested.split(",") if name.strip().lower() not in ("cookie", "")]
        if allowed:
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
        headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
        return web.Response(status=204, headers=headers)

    def response_headers(self, origin: str) -> dict[str, str]:
        return {
            "Access-Control-Allow-Origin": "*" if self._any else origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Signal handler: decorate every answer, streamed ones included, before its headers leave."""
        origin = request.headers.get("Origin")
        if origin is None or not self.allows(origin) or "Access-Control-Allow-Origin" in response.headers:
            return
        headers = self.response_headers(origin)
        response.headers.add("Vary", headers.pop("Vary"))
        response.headers.update(headers)


class Guard:
    """The policies as one middleware: the first that refuses or answers decides; otherwise the handler does."""

    __middleware_version__ = 1  # a new-style aiohttp middleware

    def __init__(self, settings: Settings) -> None:
        self.cors = Cors(settings.cors_origins, read_only=settings.read_only)
        chain: list[Policy] = [OriginFormOnly(), HostAllowlist(settings.allowed_hosts), self.cors]
        if settings.access_key is not None:
            chain.append(AccessKey(settings.access_key))
        if settings.read_only:
            chain.append(ReadOnly())
        self.policies = tuple(chain)

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        for policy in self.policies:
            answer = policy.check(request)
            if answer is not None:
                return answer
        return await handler(request)

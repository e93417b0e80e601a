"""Request policy applied before anything is forwarded.

Each policy is a small middleware class with one job and its own refusal (a ProxyError, turned into JSON
by the app's error middleware). They run in the order the app lists them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .errors import RequestRefused

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OriginFormOnly:
    """Refuse CONNECT, TRACE and absolute-form targets: this is a reverse proxy, not an open one."""

    # Marks instances as new-style aiohttp middlewares (what @web.middleware does for functions).
    __middleware_version__ = 1
    REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in self.REFUSED_METHODS:
            raise RequestRefused(f"{request.method} is not served; this is not an open proxy")
        if not request.raw_path.startswith("/"):
            raise RequestRefused(f"request target {request.raw_path[:100]!r} is not a path; this is not an open proxy")
        return await handler(request)

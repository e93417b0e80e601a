"""The private parts of aiohttp that the proxy relies on, in one place.

`RELIED_ON` names each one; tests/test_app.py::test_the_aiohttp_internals_the_proxy_relies_on_exist checks
them all, so an aiohttp upgrade that removes one fails there, by name, rather than somewhere downstream.
pyproject.toml declares the aiohttp versions that test has passed on. A new reliance is one more entry in
`RELIED_ON` (and, when it is more than a name to read, a small class or function here).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict


@dataclass(frozen=True)
class Internal:
    """One private aiohttp name: the class that has it, the name, and what the proxy does with it."""

    owner: type
    name: str
    use: str

    def present(self) -> bool:
        """Whether this aiohttp still has it (an attribute set only in `__init__` needs an instance instead)."""
        return hasattr(self.owner, self.name)

    def __str__(self) -> str:
        return f"{self.owner.__module__}.{self.owner.__qualname__}.{self.name}"


RELIED_ON = (
    Internal(
        web.RequestHandler,
        "_request_in_progress",
        "connection.Connection: while a request is being handled, the connection's silence is no silence",
    ),
    Internal(
        web.RequestHandler,
        "_request_count",
        "connection.Connection: a silent connection gets a 408 only before its first request",
    ),
    Internal(
        web.StreamResponse,
        "_prepare_headers",
        "AsSentStreamResponse, AsSentResponse: where aiohttp adds a Content-Type the service never sent",
    ),
    Internal(
        aiohttp.ClientRequest,
        "_skip_auto_headers",
        "AsBuiltRequest: which headers aiohttp must not add to a request (it also reads it for Content-Type)",
    ),
    Internal(aiohttp.TCPConnector, "_release", "WarmConnector: where a used connection goes back to the pool"),
)


class AsSentStreamResponse(web.StreamResponse):
    """A streamed answer whose headers go out as given: no Content-Type is added where the service sent none.

    aiohttp's `_prepare_headers` adds `Content-Type: application/octet-stream` to an answer that has a body
    and no type; RFC 9110 8.3 allows a body without one (the recipient may then sniff).
    """

    async def _prepare_headers(self) -> None:
        untyped = "Content-Type" not in self.headers
        await super()._prepare_headers()
        if untyped:
            self.headers.popall("Content-Type", None)


class AsSentResponse(AsSentStreamResponse, web.Response):
    """A whole answer whose headers go out as given (`AsSentStreamResponse`'s rule, on aiohttp's Response)."""


# What aiohttp adds to a request on its own: the proxy sends none of them unless the client did.
_AUTOMATIC_HEADERS: CIMultiDict[None] = CIMultiDict(
    (name, None) for name in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
)


class AsBuiltRequest(aiohttp.ClientRequest):
    """A request with exactly the headers it was given.

    aiohttp would add Accept-Encoding: gzip (and Accept, User-Agent, Content-Type) that the client never
    asked for. Its `skip_auto_headers` option says the same, but copies every request's headers to do it;
    setting `_skip_auto_headers` once, in place of adding the automatic headers, costs nothing.
    """

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        self._skip_auto_headers = _AUTOMATIC_HEADERS


class WarmConnector(aiohttp.TCPConnector):
    """aiohttp's pool, handing out the most recently used idle connection first.

    aiohttp's own pool is first-in first-out: requests made one after another (a viewer scrolling, one
    frame at a time) rotate through every idle connection, each idle long enough for Linux to have reset
    its congestion window (tcp_slow_start_after_idle). The one used last is still warm. Idle connections
    sit in `_conns[key]`, a deque that `_get` takes from the front; the one just released goes there.
    (`_conns` is set in `__init__`, so tests/test_session.py checks it on an instance.)
    """

    def _release(self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        idle = self._conns.get(key)
        if idle and idle[-1][0] is protocol:
            idle.rotate(1)

"""The private parts of aiohttp that the proxy relies on, in one place.

Each has a test that names it (tests/test_app.py::test_the_aiohttp_internals_the_proxy_relies_on_exist),
so an aiohttp upgrade that removes one fails there, by name, rather than somewhere downstream.
"""

from __future__ import annotations

from aiohttp import web

# RequestHandler's slots the client connection reads: whether a request is being handled (no silence
# then), and how many requests the connection has had (a 408 only before the first).
REQUEST_HANDLER_SLOTS = ("_request_in_progress", "_request_count")

# StreamResponse._prepare_headers: where aiohttp adds `Content-Type: application/octet-stream` to an answer
# that has a body and no type (RFC 9110 8.3 allows a body without one; the recipient may then sniff).
PREPARE_HEADERS = "_prepare_headers"


class AsSentStreamResponse(web.StreamResponse):
    """A streamed answer whose headers go out as given: no Content-Type is added where the service sent none."""

    async def _prepare_headers(self) -> None:
        untyped = "Content-Type" not in self.headers
        await super()._prepare_headers()
        if untyped:
            self.headers.popall("Content-Type", None)


class AsSentResponse(web.Response):
    """A whole answer whose headers go out as given: no Content-Type is added where the service sent none."""

    async def _prepare_headers(self) -> None:
        untyped = "Content-Type" not in self.headers
        await super()._prepare_headers()
        if untyped:
            self.headers.popall("Content-Type", None)

"""The client's request body on its way to the service.

Small bodies are read whole so that a request refused with a 401 can be sent again with a fresh token;
larger or unsized ones stream in bounded pieces. A client that goes silent mid-body for longer than the
read timeout is cut off, and the failure is its own, not the service's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .errors import ClientTimeout
from .silence import Silence

Body = bytes | AsyncIterator[bytes] | None

# Set when the client stopped sending its body: the upstream request failed because of the client.
_CLIENT_STALLED = web.RequestKey("client_stalled", bool)


async def request_body(request: web.BaseRequest, *, replay_limit: int, silence_limit: float) -> Body:
    """The body to send: bytes when it is at most `replay_limit` long, else a stream of it; None if none."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= replay_limit:
        return b"".join([chunk async for chunk in _client_body(request, silence_limit)])
    return _client_body(request, silence_limit)


def stall_error(request: web.BaseRequest, silence_limit: float) -> ClientTimeout | None:
    """The error for a request whose client stopped sending its body; None when it did not."""
    return _stalled_error(silence_limit) if request.get(_CLIENT_STALLED) else None


async def _client_body(request: web.BaseRequest, silence_limit: float) -> AsyncIterator[bytes]:
    """The client's body as it arrives; a pause longer than `silence_limit` seconds ends the request."""
    content = request.content

    def went_silent() -> None:
        request[_CLIENT_STALLED] = True
        content.set_exception(_stalled_error(silence_limit))

    silence = Silence(silence_limit, went_silent)
    try:
        while True:
            silence.waiting()
            chunk = await content.readany()
            silence.heard()
            if not chunk:
                return
            yield chunk
    finally:
        silence.close()


def _stalled_error(seconds: float) -> ClientTimeout:
    return ClientTimeout(f"the client sent no body bytes for {seconds:g}s")

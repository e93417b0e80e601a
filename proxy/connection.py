"""Client connections: aiohttp's HTTP/1.1 handling with the limits and answers the proxy promises.

aiohttp waits forever for a request line and headers that never finish, and answers what its parser
refuses with text that quotes the request (and logs it with a traceback). Here a silent connection is cut
after the read timeout, and refused bytes get the proxy's JSON answer without being echoed or logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion10, HttpVersion11, StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage

from .errors import ClientTimeout
from .logs import access_line
from .silence import Silence

ACCESS_LOG = logging.getLogger("aiohttp.access")
# Set on a request whose request line named no HTTP version: the handler refuses it.
NO_HTTP_VERSION = web.RequestKey("no_http_version", bool)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The answer to bytes the parser refused (a 4xx status) or to a handler that failed (500).
Refuse = Callable[[web.BaseRequest, int, BaseException | None], web.Response]


class Connection(web.RequestHandler):
    """One client connection: aiohttp's, plus a silence limit and the proxy's own answer to bad bytes."""

    def __init__(self, manager: web.Server, *, refuse: Refuse, silence: float, **options: Any) -> None:
        super().__init__(manager, **options)
        self._refuse = refuse
        self._silence_limit = silence
        self._event_loop = options["loop"]
        self._silence: Silence | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # While a request is handled, the forwarder times the body; waiting on the upstream is no silence.
        self._silence = Silence(
            self._silence_limit, self._silent, excused=lambda: self._request_in_progress, loop=self._event_loop
        )
        self._silence.waiting()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._silence is not None:
            self._silence.close()
            self._silence = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._silence is not None:
            self._silence.waiting()
        super().data_received(data)

    def _silent(self) -> None:
        self._silence = None
        # A connection that has had an answer (and may be reading the rest of a refused upload) just
        # closes; one that never completed a request is told why.
        if self.transport is not None and self._request_count == 0:
            body = json.dumps(ClientTimeout(f"no request arrived within {self._silence_limit:g}s").body()).encode()
            head = (
                "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            answer = head.encode() + body
            self.transport.write(answer)
            peer = self.transport.get_extra_info("peername")
            access_line(ACCESS_LOG, None, 408, self._silence_limit, peer=peer[0] if peer else None, sent=len(answer))
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed instead")
        response = self._refuse(request, status, exc)
        response.force_close()
        return response


class HttpServer(web.Server):
    """aiohttp's low-level server with one handler for every request, making `Connection`s."""

    def __init__(self, handler: Handler, *, refuse: Refuse, silence: float, **options: Any) -> None:
        super().__init__(handler, handler_cancellation=True, request_factory=self._request, **options)
        self._connection_options = {"refuse": refuse, "silence": silence, **options}

    def _request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        # A request line without a version is HTTP/0.9 to aiohttp, which would answer it with an
        # "HTTP/0.9 ..." status line no client reads: it is marked for refusal and answered as HTTP/1.1.
        obsolete = message.version < HttpVersion10
        if obsolete:
            message = message._replace(version=HttpVersion11)
        request = web.BaseRequest(message, payload, protocol, writer, task, self._loop)
        if obsolete:
            request[NO_HTTP_VERSION] = True
        return request

    def __call__(self) -> web.RequestHandler:
        return Connection(self, loop=asyncio.get_running_loop(), **self._connection_options)

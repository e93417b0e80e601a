"""Builds the proxy from Settings and serves it.

The request path is one handler on aiohttp's low-level server: the guard, then a local endpoint or the
forwarder, and the one place where the proxy's errors become the DESIGN's JSON bodies. (An Application
with a router and three middleware layers cost about 40% of small-request throughput.) Building a
`Proxy` is cheap; `start()` makes the credential, token source and upstream pool, `close()` ends them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from azure.core.credentials_async import AsyncSupportsTokenInfo
from multidict import CIMultiDict

from . import __version__
from .connection import ACCESS_LOG, NO_HTTP_VERSION, HttpServer
from .credentials import build_credential, end_child_processes
from .errors import (
    AccessKeyRequired,
    ExpectationFailed,
    NotFound,
    ProxyError,
    RequestRefused,
    loggable,
)
from .forward import UPSTREAM_FAILURE, Forwarder
from .guard import Guard
from .headers import REQUEST_ID_HEADER
from .logs import MALFORMED, AccessLogger, access_line, sent_bytes
from .metrics import Metrics
from .observe import REQUEST_ID, Readiness, RequestIds, health
from .process import DescriptorShortage, raise_open_file_limit, stop_on_signals
from .readahead import ReadAhead
from .session import READ_BUFFER, upstream_session
from .settings import Settings, is_loopback
from .status import StatusPage, recent_requests
from .tokens import TokenSource

if TYPE_CHECKING:
    from .dimse import Gateway

logger = logging.getLogger("proxy")
# Set once the guard let a request on to the upstream: what the status page lists.
FORWARDED = web.RequestKey("forwarded", bool)

Endpoint = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

# Header limits (aiohttp's defaults are 8 KiB); DICOMweb requests carry short headers.
MAX_LINE_SIZE = 16 * 1024
MAX_FIELD_SIZE = 16 * 1024
LISTEN_BACKLOG = 1024
# Idle keep-alive connections are closed after this long (aiohttp's web.run_app default).
KEEPALIVE_TIMEOUT = 75.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(error: ProxyError) -> web.Response:
    """The one place a ProxyError becomes what the client sees."""
    response = web.Response(
        status=error.status,
        body=json.dumps(error.body()).encode(),
        content_type="application/json",
    )
    if isinstance(error, AccessKeyRequired):
        response.headers["WWW-Authenticate"] = 'Basic realm="dicom-auth-proxy"'
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


class Proxy:
    """The request handler: guard, local endpoints, forwarder; `start()`/`close()` own its resources.

    `credential` and `session` replace the real ones when given (they then stay the caller's to close).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        credential: AsyncSupportsTokenInfo | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.request_ids = RequestIds()
        self.guard = Guard(settings)
        self._given_credential = credential
        self._given_session = session
        self._credential: AsyncSupportsTokenInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self.tokens: TokenSource | None = None
        self._forwarder: Forwarder | None = None
        self._read_ahead: ReadAhead | None = None
        self._read_ahead_session: aiohttp.ClientSession | None = None
        self._gateway: Gateway | None = None
        self._local: dict[str, Endpoint] = {}
        # The last requests, for the status page: one append per request, formatted only when shown.
        self.recent = recent_requests()

    async def start(self) -> None:
        settings = self.settings
        self._credential = self._given_credential or build_credential(settings)
        self.tokens = tokens = TokenSource(
            self._credential,
            settings.scope,
            tenant=settings.tenant,
            credential_name=settings.credential,
            refresh_margin=settings.refresh_margin,
            on_acquisition=self.metrics.record_acquisition,
        )
        self.metrics.watch(tokens)
        self._session = self._given_session or upstream_session(settings)
        if settings.read_ahead > 0:
            self._start_read_ahead(tokens)
        self._forwarder = Forwarder(
            settings, session=self._session, tokens=tokens, decorate=self.decorate, read_ahead=self._read_ahead
        )
        status = StatusPage(
            settings,
            tokens=tokens,
            registry=self.metrics.registry,
            recent=self.recent,
            base_url=partial(viewer_base_url, settings),
        )
        self._local = {
            "/-/health": health,
            "/-/ready": Readiness(tokens, detailed=settings.access_key is None),
            "/-/metrics": self.metrics.endpoint,
            "/-/": status.page,
            "/-/status.json": status.json,
        }
        tokens.start()
        if settings.dimse_listen is not None:
            # Imported only when asked for: pynetdicom and pydicom cost start-up time the HTTP side never needs.
            from .dimse import DicomWebClient, Gateway

            client = DicomWebClient(settings, session=self._session, tokens=tokens)
            self._gateway = Gateway(settings, client=client, metrics=self.metrics)
            self._gateway.start()

    def _start_read_ahead(self, tokens: TokenSource) -> None:
        # A pool of its own (unless one was given): read-ahead's bursts lose packets on a congested link, and
        # a connection that lost some grows its window slowly for a while; the viewer's keep clean ones.
        if self._given_session is None:
            self._read_ahead_session = upstream_session(self.settings)
        session = self._read_ahead_session or self._session
        assert session is not None
        self._read_ahead = ReadAhead(self.settings, session=session, tokens=tokens)
        self.metrics.watch_read_ahead(self._read_ahead)

    async def close(self) -> None:
        # The gateway first: its associations still use the token source and the session.
        if self._gateway is not None:
            await self._gateway.close()
        if self._read_ahead is not None:
            await self._read_ahead.close()
        if self._read_ahead_session is not None:
            await self._read_ahead_session.close()
        if self.tokens is not None:
            await self.tokens.close()
        if self._given_session is None and self._session is not None:
            await self._session.close()
        if self._given_credential is None and self._credential is not None:
            await self._credential.close()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.request_ids.assign(request)
        started = self.metrics.begin()
        response: web.StreamResponse | None = None
        try:
            response = await self._answer(request)
            return response
        finally:
            if response is None:
                status, sent = None, sent_bytes(request)
            else:
                # A response not prepared yet is written by aiohttp after this returns, whole; one prepared
                # may have been cut off, so what went out is counted rather than what was meant to.
                status = response.status
                sent = sent_bytes(request) if response.prepared else response.content_length or 0
            self.metrics.end(request, status, sent, started, request.get(UPSTREAM_FAILURE))
            seconds = time.perf_counter() - started
            # Only what was forwarded: the status page's refreshes, or a hostile page's refused requests,
            # would push the viewer's out.
            if request.get(FORWARDED):
                self.recent.append((time.time(), request.method, request.path, status, seconds))
            if response is None:
                # aiohttp logs only answers it finished; a client that went away mid-answer gets its line here.
                access_line(ACCESS_LOG, request, None, seconds)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            if request.get(NO_HTTP_VERSION):
                raise RequestRefused("the request line names no HTTP version (HTTP/0.9 is not served)")
            answer = self.guard.check(request)
            if answer is None:
                path = request.path
                if path.startswith("/-/"):
                    endpoint = self._local.get(path)
                    if endpoint is None:
                        raise NotFound(f"{loggable(path, 100)} is not a local endpoint; /-/ is reserved for the proxy")
                    answer = await endpoint(request)
                else:
                    assert self._forwarder is not None, "start() was not awaited"
                    request[FORWARDED] = True
                    await _invite_body(request)
                    answer = await self._forwarder(request)
        except ProxyError as error:
            logger.warning(
                "%s %s -> %d %s: %s",
                request.method,
                loggable(request.path),
                error.status,
                error.code,
                loggable(error.detail),
            )
            answer = error_response(error)
            if isinstance(error, RequestRefused) or not request.content.is_eof():
                # A refused or stalled upload is not read to its end only to keep the connection, and after
                # a request refused for its form or framing, the next bytes cannot be trusted either.
                answer.force_close()
        if not answer.prepared:
            self.decorate(request, answer.headers)
        return answer

    def decorate(self, request: web.BaseRequest, headers: CIMultiDict[str]) -> None:
        """The proxy's own headers on every answer: the request id, and CORS for listed origins."""
        headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
        if "Origin" in request.headers:
            self.guard.cors.decorate(request, headers)

    def refuse_unparsable(self, request: web.BaseRequest, status: int, exc: BaseException | None) -> web.Response:
        """The JSON answer for bytes aiohttp's parser refused (or a bug: status 500), never echoing them."""
        if status >= 500:
            # The frames say where the bug is; the message is left out, as it may quote the client.
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc is not None else ""
            logger.error("internal error (%s); please report it with these lines:\n%s", type(exc).__name__, frames)
            error = ProxyError("the proxy failed while answering this request")
        else:
            request[MALFORMED] = True
            self.metrics.malformed()
            error = RequestRefused(f"the request is not valid HTTP/1.1 ({type(exc).__name__})")
        response = error_response(error)
        response.set_status(status)
        response.headers[REQUEST_ID_HEADER] = self.request_ids.assign(request)
        return response

    def log_banner(self) -> None:
        settings = self.settings
        if settings.access_key is None and not is_loopback(settings.listen_host):
            logger.warning(
                "LISTENING ON %s WITHOUT AN ACCESS KEY (--allow-unauthenticated-remote): anyone who can reach "
                "this port reads and writes your DICOM service with your Azure identity",
                settings.listen_host,
            )
        logger.info(
            "dicom-auth-proxy %s serving %s -> %s (credential: %s, audience: %s)",
            __version__,
            settings.local_url,
            settings.upstream,
            settings.credential,
            settings.audience,
        )
        logger.info("DICOMweb base URL for viewers and scripts: %s", viewer_base_url(settings))
        logger.info("status page: %s/-/", settings.local_url)


async def _invite_body(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` only now that the guard let the request through (RFC 9110 10.1.1)."""
    expectations = request.headers.getall("Expect", ())
    if not expectations:
        return
    if any(expect.strip().lower() != "100-continue" for expect in expectations):
        raise ExpectationFailed("the request's Expect header asks for something other than 100-continue")
    if request.version >= aiohttp.HttpVersion11:
        await request.writer.write(_CONTINUE)


def build_server(proxy: Proxy) -> web.Server:
    """The HTTP server for `proxy`: its connections, limits and access log."""
    return HttpServer(
        proxy,
        refuse=proxy.refuse_unparsable,
        silence=proxy.settings.read_timeout,
        access_log_class=AccessLogger,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        read_bufsize=READ_BUFFER,
        auto_decompress=False,
    )


def viewer_base_url(settings: Settings, origin: str | None = None) -> str:
    """What to paste into a viewer: the local URL (or the `origin` the client used), plus /v2 when the
    upstream is a bare Azure service root."""
    return (origin or settings.local_url) + settings.added_version


async def serve(settings: Settings, *, announce: bool = True) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests then get `shutdown_grace` seconds to finish."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    restore_signals = stop_on_signals(loop, stop)
    loop.set_exception_handler(DescriptorShortage().handle)
    proxy = Proxy(settings)
    await proxy.start()
    runner = web.ServerRunner(build_server(proxy), shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner,
            settings.listen_host,
            settings.listen_port,
            reuse_port=settings.workers > 1 or None,
            # A viewer opens dozens of connections at once; with aiohttp's 128 some wait a second for a SYN retry.
            backlog=LISTEN_BACKLOG,
        )
        await site.start()
        if announce:
            proxy.log_banner()
        await stop.wait()
    finally:
        try:
            # aiohttp waits up to its timeout for handlers, then as long again after cancelling them: the
            # grace is kept here instead, and run() cancels what is still running.
            async with asyncio.timeout(settings.shutdown_grace):
                await runner.cleanup()
        except TimeoutError:
            logger.warning("requests still in flight after --shutdown-grace %gs are cut", settings.shutdown_grace)
        await proxy.close()
        # An `az` cancelled mid-run keeps running otherwise (azure-identity does not stop it). Only here, where
        # the proxy owns the process: a program embedding `Proxy` keeps its own children.
        end_child_processes()
        restore_signals()


def run(settings: Settings, *, announce: bool = True) -> None:
    """Serve in a fresh event loop until SIGINT/SIGTERM."""
    raise_open_file_limit()
    # asyncio.Runner cancels whatever still runs when serve() returns, and closes the loop. The standard
    # loop, not uvloop: uvloop answered 7% more small requests, but while busy it left new connections
    # waiting up to 1.6 s (the standard loop: 0.16 s), and a viewer opening a study opens many at once.
    with asyncio.Runner() as runner:
        runner.run(serve(settings, announce=announce))

"""Builds the aiohttp Application from Settings and runs it.

Expensive resources (TLS context, credential, token source, upstream connection pool) are made in one
start-up hook and closed in the matching clean-up, so building an app is cheap and side-effect free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from azure.core.credentials_async import AsyncSupportsTokenInfo

from . import __version__
from .credentials import build_credential
from .errors import ProxyError, error_response
from .forward import Forwarder
from .guard import Guard
from .observe import METRICS, AccessLogger, Metrics, Readiness, health
from .settings import Settings, is_loopback
from .tokens import TokenSource

logger = logging.getLogger("proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Large reads keep the per-chunk Python work small on multi-GiB retrieves while bounding memory per
# connection to a few MiB.
READ_BUFFER = 1024 * 1024
# Header limits (aiohttp's defaults are 8 KiB); DICOMweb requests carry short headers.
MAX_LINE_SIZE = 16 * 1024
MAX_FIELD_SIZE = 16 * 1024

TOKEN_SOURCE = web.AppKey("token_source", TokenSource)
FORWARDER = web.AppKey("forwarder", Forwarder)
READINESS = web.AppKey("readiness", Readiness)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place where the proxy's own errors become the DESIGN's JSON bodies."""
    try:
        return await handler(request)
    except ProxyError as error:
        logger.warning("%s %s -> %d %s: %s", request.method, request.path, error.status, error.code, error.detail)
        return error_response(error)


def build_app(
    settings: Settings,
    *,
    credential: AsyncSupportsTokenInfo | None = None,
    session: aiohttp.ClientSession | None = None,
    announce: bool = True,
) -> web.Application:
    """The proxy as an Application; `credential` and `session` replace the real ones when given.

    `announce` logs the start-up banner: with several workers, only the first does.
    """
    guard = Guard(settings)
    metrics = Metrics()
    app = web.Application(middlewares=[metrics.middleware, error_middleware, guard])
    app[METRICS] = metrics
    app.on_response_prepare.append(guard.cors.on_response_prepare)
    app.on_response_prepare.append(metrics.on_response_prepare)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        own_credential = credential or build_credential(settings)
        tokens = TokenSource(
            own_credential,
            settings.scope,
            tenant=settings.tenant,
            credential_name=settings.credential,
            refresh_margin=settings.refresh_margin,
            on_acquisition=metrics.record_acquisition,
        )
        metrics.watch(tokens)
        own_session = session or upstream_session(settings)
        app[TOKEN_SOURCE] = tokens
        app[FORWARDER] = Forwarder(settings, session=own_session, tokens=tokens)
        app[READINESS] = Readiness(tokens)
        await tokens.start()
        if announce:
            log_banner(settings)
        yield
        await tokens.close()
        if session is None:
            await own_session.close()
        if credential is None:
            await own_credential.close()

    app.cleanup_ctx.append(resources)
    app.router.add_get("/-/health", health)
    app.router.add_get("/-/ready", _ready)
    app.router.add_get("/-/metrics", metrics.endpoint)
    app.router.add_route("*", "/-/{tail:.*}", _no_such_local_endpoint)
    app.router.add_route("*", "/{tail:.*}", _forward)
    return app


async def _forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER](request)


async def _ready(request: web.Request) -> web.StreamResponse:
    return await request.app[READINESS](request)


async def _no_such_local_endpoint(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {
            "error": "not_found",
            "detail": f"{request.path} is not a local endpoint; /-/ is reserved for the proxy",
            "hint": "Local endpoints: /-/health, /-/ready, /-/metrics.",
        },
        status=404,
    )


def upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The pooled client for the upstream: no cookie jar, no decompression, no redirects, no total timeout."""
    tls = ssl.create_default_context()
    if settings.ca_bundle is not None:
        tls.load_verify_locations(cafile=str(settings.ca_bundle))
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls, limit=0, enable_cleanup_closed=False),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        # Without this aiohttp would add Accept-Encoding: gzip (and others) the client never asked for.
        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout),
        read_bufsize=READ_BUFFER,
        # Proxies are resolved once into Settings.upstream_proxy; trust_env would also read ~/.netrc and
        # could put Basic credentials where the bearer token belongs.
        trust_env=False,
    )


def viewer_base_url(settings: Settings) -> str:
    """What to paste into a viewer: the local URL, plus /v2 when the upstream is a bare Azure service root."""
    return settings.local_url + ("/v2" if settings.upstream.raw_path in ("", "/") else "")


def log_banner(settings: Settings) -> None:
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


def _fast_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (Linux, macOS): about 20% more small requests per second here."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(settings: Settings, *, announce: bool = True) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get `shutdown_timeout` to finish."""
    web.run_app(
        build_app(settings, announce=announce),
        loop=_fast_event_loop(),
        host=settings.listen_host,
        port=settings.listen_port,
        reuse_port=settings.workers > 1 or None,
        print=None,
        access_log_class=AccessLogger,
        handler_cancellation=True,
        shutdown_timeout=settings.shutdown_grace,
        max_line_size=MAX_LINE_SIZE,
        max_field_size=MAX_FIELD_SIZE,
        read_bufsize=READ_BUFFER,
        auto_decompress=False,
    )


def supervise(workers: int, serve: Callable[[int], int]) -> int:
    """Fork `workers` processes that each `serve(number)` on the shared port; return 0 if all exit cleanly.

    Forked before any event loop, thread or credential exists. Each worker gets a session of its own, so a
    terminal's Ctrl-C reaches only this supervisor, which passes SIGINT/SIGTERM on once; when one worker
    fails, the others are stopped too rather than serving on at reduced strength.
    """
    children: set[int] = set()

    def stop(signal_number: int, frame: object = None) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)

    # Installed before the first fork, so no SIGTERM can fall between forking and forwarding; each worker
    # puts the previous handlers back until aiohttp installs its own.
    previous = {each: signal.signal(each, stop) for each in (signal.SIGTERM, signal.SIGINT)}
    for number in range(workers):
        pid = os.fork()
        if pid == 0:
            for signal_number, handler in previous.items():
                signal.signal(signal_number, handler)
            os.setsid()
            code = 1
            try:
                code = serve(number)
            finally:
                logging.shutdown()
                os._exit(code)
        children.add(pid)
    logger.info("%d worker processes share port (SO_REUSEPORT), each with its own token", workers)

    worst = 0
    while children:
        pid, status = os.wait()
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)  # negative: killed by that signal
        if code != 0 and worst == 0:
            logger.error("a worker exited with status %d; stopping the others", code)
            stop(signal.SIGTERM)
            worst = code if code > 0 else 1
    return worst

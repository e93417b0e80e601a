"""The upstream connection pool, made the same way for the proxy and for `check`."""

from __future__ import annotations

import ssl

import aiohttp

from .errors import UpstreamTimeout, UpstreamUnreachable
from .internals import AsBuiltRequest, WarmConnector
from .settings import Settings

# Large reads keep the per-chunk Python work small on multi-GiB retrieves while bounding memory per
# connection to a few MiB.
READ_BUFFER = 1024 * 1024


class UpstreamRequest(AsBuiltRequest):
    """A request to the upstream with exactly the headers the proxy built: aiohttp adds none of its own
    (Accept-Encoding: gzip above all, which the client never asked for). How is aiohttp's business, kept
    in `internals`."""


def upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The pooled client for the upstream: no cookie jar, no decompression, no redirects, no total timeout."""
    tls = ssl.create_default_context()
    if settings.ca_bundle is not None:
        tls.load_verify_locations(cafile=str(settings.ca_bundle))
    return aiohttp.ClientSession(
        connector=WarmConnector(
            ssl=tls, limit=0, enable_cleanup_closed=False, keepalive_timeout=settings.upstream_idle
        ),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        request_class=UpstreamRequest,
        timeout=aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout),
        read_bufsize=READ_BUFFER,
        # Proxies are resolved once into Settings.upstream_proxy; trust_env would also read ~/.netrc and
        # could put Basic credentials where the bearer token belongs.
        trust_env=False,
    )


def upstream_failure(exc: Exception, host: str | None) -> tuple[str, UpstreamUnreachable | UpstreamTimeout] | None:
    """An aiohttp failure to reach the upstream: its kind for the metrics and the proxy's own error; None for
    any other exception. Messages never quote the answer's bytes or the URL, which may carry a query."""
    if isinstance(exc, aiohttp.ClientSSLError):
        hint = "If your network inspects TLS, pass its CA with --ca-bundle."
        return "tls", UpstreamUnreachable(f"TLS with {host} failed: {exc}", hint=hint)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", UpstreamTimeout(f"{host} did not answer within the timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect", UpstreamUnreachable(f"cannot reach {host}: {exc.os_error.strerror or type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientError):
        return "connect", UpstreamUnreachable(f"the answer from {host} could not be read ({type(exc).__name__})")
    return None


async def discard(response: aiohttp.ClientResponse) -> None:
    """Read a short answer that is not kept, so that its connection goes back to the pool; close a long one."""
    if response.content_length is not None and response.content_length <= 64 * 1024:
        await response.read()
    else:
        response.close()

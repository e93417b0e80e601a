"""The upstream connection pool, made the same way for the proxy and for `check`."""

from __future__ import annotations

import ssl

import aiohttp

from .settings import Settings

# Large reads keep the per-chunk Python work small on multi-GiB retrieves while bounding memory per
# connection to a few MiB.
READ_BUFFER = 1024 * 1024


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

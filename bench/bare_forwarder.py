"""The bare forwarder of DESIGN's benchmark: the Python peer with no features, to run beside the proxy.

    python bench/bare_forwarder.py UPSTREAM_URL PORT [CA_FILE]

One catch-all handler copies headers minus hop-by-hop, sets a static Authorization, makes one upstream
request and streams the answer with iter_chunked(65536). No guard, metrics, log or rewriting.
"""

import ssl
import sys

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
HOP = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host", "proxy-authorization"}


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    headers["Authorization"] = "Bearer X"
    body = request.content if request.body_exists else None
    url = request.app[UPSTREAM] + request.raw_path
    async with session.request(request.method, url, headers=headers, data=body, allow_redirects=False) as upstream:
        answer_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        response = web.StreamResponse(status=upstream.status, headers=answer_headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(65536):
            await response.write(chunk)
        await response.write_eof()
        return response


async def make_app(upstream: str, ca_file: str | None) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    tls = ssl.create_default_context(cafile=ca_file) if ca_file else True
    connector = aiohttp.TCPConnector(limit=0, ssl=tls)
    app[SESSION] = aiohttp.ClientSession(auto_decompress=False, connector=connector)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


if __name__ == "__main__":
    ca_file = sys.argv[3] if len(sys.argv) > 3 else None
    web.run_app(make_app(sys.argv[1], ca_file), host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)

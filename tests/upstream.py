"""A loopback HTTPS server that plays the DICOM service's part for the tests.

It runs in its own thread and event loop (so tests can use blocking clients such as curl), serves TLS
with a trustme certificate, accepts only the bearer tokens the `az` stand-in issued and that have not
expired or been revoked (answering 401 like the service otherwise), and records every request it sees.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import json
import random
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web

BLOCK = random.Random(20261125).randbytes(1024 * 1024)


def pattern(size: int) -> bytes:
    """The first `size` bytes of the endless deterministic body that /bytes serves."""
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


def metadata_stream(base: str, blocks: int) -> Iterator[bytes]:
    """About `blocks` MiB of series metadata whose links start with `base`, in odd-sized pieces so that
    links straddle them; the same `blocks` gives the same document whatever the base."""
    item = json.dumps({"00081190": {"vr": "UR", "Value": [f"{base}/v2/studies/1"]}}).encode()
    block = b",".join([item] * 12007)
    for number in range(blocks):
        body = (b"[" if number == 0 else b",") + block
        for start in range(0, len(body), 65521):
            yield body[start : start + 65521]
    yield b"]"


@functools.cache
def gzip_bomb(link: str, mib: int) -> bytes:
    """A gzip JSON body holding one `link`, then `mib` MiB of spaces, at deflate's greatest ratio (about
    1000:1). Each MiB is compressed once after a full flush, which makes its bytes the same every time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    prefix = json.dumps([{"00081190": {"vr": "UR", "Value": [link]}}]).encode()[:-1]
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = b" " * (1024 * 1024)
    spaces = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = (compressor.compress(b"]") + compressor.flush())[:-8]  # its trailer counts one block only
    crc = zlib.crc32(prefix)
    for _ in range(mib):
        crc = zlib.crc32(block, crc)
    size = len(prefix) + mib * len(block) + 1
    return head + spaces * mib + tail + struct.pack("<II", zlib.crc32(b"]", crc), size & 0xFFFFFFFF)


FRAME_BOUNDARY = "frame-boundary-41"


def series_uid(instances: int, frame_bytes: int, frames: int = 1) -> str:
    """A series the fake service makes up on demand: `instances` instances of `frames` frames of `frame_bytes`."""
    return f"9.{instances}.{frame_bytes}" + (f".{frames}" if frames > 1 else "")


def frame_payload(instance: int, frame: int, size: int) -> Iterator[bytes]:
    """The pixel data of one frame, different for every frame, in pieces of at most 1 MiB."""
    offset = (instance * 7919 + frame * 104729) % len(BLOCK)
    rotated = BLOCK[offset:] + BLOCK[:offset]
    sent = 0
    while sent < size:
        piece = rotated[: min(len(rotated), size - sent)]
        yield piece
        sent += len(piece)


def token_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    peer: tuple[str, int] | None

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return values[0] if values else None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}


@dataclass
class Upstream:
    """The fake service; `issued_tokens` is asked on each request which tokens exist."""

    tls: ssl.SSLContext
    issued_tokens: Callable[[], list[str]]
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    events: list[str] = field(default_factory=list)
    sent_digests: dict[str, str] = field(default_factory=dict)
    # When set, every request with a valid token gets this status (403: the identity has no DICOM role).
    refuse_with: int | None = None
    # When set, frames are answered with this status (429 with a Retry-After).
    frame_status: int | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-dicom-service", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake upstream did not start")

    def stop(self) -> None:
        assert self._loop is not None and self._runner is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._record, self._authorize])
        app.router.add_route("*", r"/echo{tail:[\s\S]*}", self._echo)
        app.router.add_get("/v2/studies", self._studies)
        app.router.add_post("/{version:v[12]}/studies", self._stow)
        app.router.add_post("/v2/partitions/{partition}/studies", self._stow)
        app.router.add_post("/v2/extendedquerytags", self._add_tags)
        app.router.add_get("/v2/operations/{id}", self._operation)
        app.router.add_get("/v2/extendedquerytags/{tag}", self._tag)
        app.router.add_post("/v2/workitems", self._workitem)
        app.router.add_get("/v2/gzip-json", self._gzip_json)
        app.router.add_get("/v2/xml", self._xml)
        app.router.add_get("/v2/big-json/{mib}", self._big_json)
        app.router.add_get("/v2/stream-json/{mib}", self._stream_json)
        app.router.add_get("/v2/gzip-json/{mib}", self._gzip_metadata)
        app.router.add_get("/v2/gzip-bomb/{mib}", self._gzip_bomb)
        app.router.add_get("/v2/studies/{study}/series", self._multipart)
        app.router.add_get("/v2/studies/{study}/series/{series}/metadata", self._series_metadata)
        app.router.add_delete("/v2/studies/{study}/series/{series}", self._delete_series)
        app.router.add_get("/v2/studies/{study}/series/{series}/instances/{instance}/frames/{frame}", self._frame)
        app.router.add_get("/bytes/{size}", self._bytes)
        app.router.add_get("/reset/{size}", self._reset)
        app.router.add_get("/slow/{seconds}", self._slow)
        app.router.add_get("/endless", self._endless)
        app.router.add_get("/gzip", self._gzip)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/hop-by-hop", self._hop_by_hop)
        app.router.add_get("/switch", self._switch)
        app.router.add_get("/conditional", self._conditional)
        app.router.add_get("/range", self._range)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    @web.middleware
    async def _record(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), peer))
        return await handler(request)

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ")
        problem = None
        if not authorization.startswith("Bearer ") or token not in self.issued_tokens():
            problem = "The access token is invalid"
        elif token in self.revoked:
            problem = "The access token has been revoked"
        elif float(token_claims(token)["exp"]) < time.time():  # type: ignore[arg-type]
            problem = "The access token has expired"
        elif token_claims(token)["aud"] != "https://dicom.healthcareapis.azure.com":
            problem = f"The audience '{token_claims(token)['aud']}' is invalid"
        if problem:
            challenge = (
                'Bearer authorization_uri="https://login.microsoftonline.com/tenant-one", '
                'resource_id="https://dicom.healthcareapis.azure.com", '
                f'error="invalid_token", error_description="{problem}"'
            )
            return web.json_response({"error": problem}, status=401, headers={"WWW-Authenticate": challenge})
        if self.refuse_with is not None:
            return web.json_response(
                {"error": {"code": "Forbidden", "message": "Authorization failed."}},
                status=self.refuse_with,
                headers={
                    "WWW-Authenticate": 'Bearer error="insufficient_scope", error_description="Authorization failed"'
                },
            )
        return await handler(request)

    def link(self, request: web.Request, path: str) -> str:
        """An absolute URL of the service itself, the way Azure writes them."""
        return f"{self.url}{path}"

    async def _stow(self, request: web.Request) -> web.Response:
        await request.read()
        partition = request.match_info.get("partition")
        base = f"/v2/partitions/{partition}" if partition else f"/{request.match_info.get('version', 'v2')}"
        study = f"{base}/studies/1.2.3"
        body = {
            "00081190": {"vr": "UR", "Value": [self.link(request, study)]},
            "00081199": {
                "vr": "SQ",
                # Several of the service's own links around another host's: every item must be rewritten.
                "Value": [
                    {"00081190": {"vr": "UR", "Value": [self.link(request, f"{study}/series/4/instances/5")]}},
                    {"00081190": {"vr": "UR", "Value": ["https://other.example/v2/studies/1.2.3"]}},
                    {"00081190": {"vr": "UR", "Value": [self.link(request, f"{study}/series/4/instances/6")]}},
                    {"00081190": {"vr": "UR", "Value": [self.link(request, f"{study}/series/7/instances/8")]}},
                ],
            },
            "00081196": {"vr": "US", "Value": [0]},
        }
        return web.json_response(body, content_type="application/dicom+json")

    async def _add_tags(self, request: web.Request) -> web.Response:
        href = self.link(request, "/v2/operations/op-1")
        return web.json_response({"id": "op-1", "href": href}, status=202, headers={"Location": href})

    async def _operation(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "operationId": request.match_info["id"],
                "status": "succeeded",
                "resources": [self.link(request, "/v2/extendedquerytags/00101001")],
                "results": {"errorHref": "https://account.blob.core.windows.net/export/errors.log"},
            }
        )

    async def _tag(self, request: web.Request) -> web.Response:
        tag = request.match_info["tag"]
        return web.json_response(
            {
                "path": tag,
                "errors": {"count": 1, "href": self.link(request, f"/v2/extendedquerytags/{tag}/errors")},
                "operation": {"id": "op-1", "href": self.link(request, "/v2/operations/op-1")},
                "description": f"copied from {self.url}/v2/elsewhere",
            }
        )

    async def _workitem(self, request: web.Request) -> web.Response:
        href = self.link(request, "/v2/workitems/1.2.840.1")
        return web.Response(status=201, headers={"Location": href, "Content-Location": href})

    async def _gzip_json(self, request: web.Request) -> web.Response:
        document = [{"00081190": {"vr": "UR", "Value": [self.link(request, f"/v2/studies/{n}")]}} for n in range(50)]
        return web.Response(
            body=gzip.compress(json.dumps(document).encode()),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"},
        )

    async def _xml(self, request: web.Request) -> web.Response:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel>'
            '<DicomAttribute tag="00081190" vr="UR" keyword="RetrieveURL">'
            f'<Value number="1">{self.link(request, "/v2/studies/1.2.3")}</Value></DicomAttribute>'
            '<DicomAttribute tag="00081190" vr="UR" keyword="RetrieveURL">'
            '<Value number="1">https://other.example/v2/studies/9</Value></DicomAttribute>'
            "</NativeDicomModel>"
        )
        return web.Response(text=body, content_type="application/dicom+xml")

    async def _big_json(self, request: web.Request) -> web.Response:
        size = int(request.match_info["mib"]) * 1024 * 1024
        item = json.dumps({"00081190": {"vr": "UR", "Value": [self.link(request, "/v2/studies/1")]}})
        count = size // (len(item) + 1) + 1
        return web.Response(text="[" + ",".join([item] * count) + "]", content_type="application/dicom+json")

    async def _stream_json(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/dicom+json"})
        await response.prepare(request)
        for piece in metadata_stream(self.url, int(request.match_info["mib"])):
            await response.write(piece)
        return response

    async def _gzip_metadata(self, request: web.Request) -> web.Response:
        """`mib` MiB of metadata, gzipped into a small answer with a Content-Length: a bomb with links."""
        body = gzip.compress(b"".join(metadata_stream(self.url, int(request.match_info["mib"]))), 9)
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"})

    async def _gzip_bomb(self, request: web.Request) -> web.Response:
        body = gzip_bomb(self.link(request, "/v2/studies/1"), int(request.match_info["mib"]))
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"})

    async def _multipart(self, request: web.Request) -> web.Response:
        body = b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--xyz--\r\n"
        return web.Response(body=body, headers={"Content-Type": "multipart/related; boundary=xyz"})

    async def _series_metadata(self, request: web.Request) -> web.Response:
        """DICOM JSON for a made-up series (see series_uid), its links pointing at the service."""
        study, series = request.match_info["study"], request.match_info["series"]
        count = int(series.split(".")[1])
        frames = int(series.split(".")[3]) if series.count(".") == 3 else 1
        instances = []
        for number in range(1, count + 1):
            uid = f"{series}.{number}"
            link = self.link(request, f"/v2/studies/{study}/series/{series}/instances/{uid}")
            instances.append(
                {
                    "00080018": {"vr": "UI", "Value": [uid]},
                    "0020000D": {"vr": "UI", "Value": [study]},
                    "0020000E": {"vr": "UI", "Value": [series]},
                    "00200013": {"vr": "IS", "Value": [number]},
                    "00081190": {"vr": "UR", "Value": [link]},
                    "7FE00010": {"vr": "OW", "BulkDataURI": f"{link}/frames/1"},
                }
                | ({"00280008": {"vr": "IS", "Value": [frames]}} if frames > 1 else {})
            )
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(json.dumps(instances).encode())
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"}
            return web.Response(body=body, headers=headers)
        return web.json_response(instances, content_type="application/dicom+json")

    async def _delete_series(self, request: web.Request) -> web.Response:
        return web.Response(status=202)

    async def _frame(self, request: web.Request) -> web.StreamResponse:
        """One frame as multipart/related, its bytes' digest kept in sent_digests."""
        series, instance = request.match_info["series"], request.match_info["instance"]
        frames = int(series.split(".")[3]) if series.count(".") == 3 else 1
        frame = int(request.match_info["frame"]) if request.match_info["frame"].isdigit() else 0
        if not 1 <= frame <= frames or not instance.startswith(series + "."):
            return web.json_response({"error": "no such frame"}, status=404)
        if self.frame_status is not None:
            retry = {"Retry-After": "60"} if self.frame_status == 429 else {}
            return web.json_response({"error": "refused"}, status=self.frame_status, headers=retry)
        size = int(series.split(".")[2])
        head = f"--{FRAME_BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        tail = f"\r\n--{FRAME_BOUNDARY}--\r\n".encode()
        response = web.StreamResponse(
            headers={
                "Content-Type": f'multipart/related; type="application/octet-stream"; boundary={FRAME_BOUNDARY}',
                "ETag": f'"{instance}"',
                "Content-Location": self.link(request, request.path),
            }
        )
        response.content_length = len(head) + size + len(tail)
        await response.prepare(request)
        digest = hashlib.sha256(head)
        await response.write(head)
        for piece in frame_payload(int(instance.rsplit(".", 1)[1]), frame, size):
            digest.update(piece)
            await response.write(piece)
        digest.update(tail)
        await response.write(tail)
        await response.write_eof()
        self.sent_digests[request.raw_path] = digest.hexdigest()
        return response

    async def _studies(self, request: web.Request) -> web.Response:
        return web.json_response([], content_type="application/dicom+json")

    async def _echo(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            length += len(chunk)
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "body_sha256": digest.hexdigest(),
                "body_length": length,
                "headers": list(request.headers.items()),
            }
        )

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "chunked" not in request.query:
            response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        digest = hashlib.sha256()
        sent = 0
        while sent < size:
            piece = BLOCK[: min(len(BLOCK), size - sent)]
            digest.update(piece)
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        self.sent_digests[request.raw_path] = digest.hexdigest()
        return response

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        response = web.StreamResponse()
        if "chunked" not in request.query:
            response.content_length = size
        await response.prepare(request)
        await response.write(pattern(size // 2))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.json_response({"slow": True})

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(BLOCK[:65536])
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            self.events.append("endless stopped: the client side went away")
            raise

    async def _gzip(self, request: web.Request) -> web.Response:
        body = gzip.compress(json.dumps({"00100010": {"vr": "PN"}}).encode() * 100)
        return web.Response(
            body=body,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/dicom+json"},
        )

    async def _redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "https://elsewhere.example/steal"})

    async def _hop_by_hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Private-Hop",
                "X-Private-Hop": "must not pass",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-End-To-End": "passes",
            },
        )

    async def _switch(self, request: web.Request) -> web.Response:
        return web.Response(status=101, headers={"Upgrade": "websocket", "Connection": "Upgrade"})

    async def _conditional(self, request: web.Request) -> web.Response:
        etag = '"v1"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(text="fresh", headers={"ETag": etag})

    async def _range(self, request: web.Request) -> web.Response:
        body = pattern(1000)
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        part = body[int(first) : int(last) + 1]
        return web.Response(
            status=206,
            body=part,
            headers={"Content-Range": f"bytes {first}-{last}/{len(body)}"},
        )

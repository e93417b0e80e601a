"""The streaming forwarder: one client request becomes one upstream request with the token added.

Bodies flow through in bounded pieces in both directions (the request's: upload.py), with backpressure from
whichever side is slower. A 401 is retried once with a fresh token when the body can be sent again (auth.py).
A frame read ahead (readahead.py) is answered from memory, written like any other answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from functools import partial

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .auth import send_with_token
from .buffer import Buffered
from .errors import ClientTimeout, UpstreamUnreachable, loggable
from .headers import Headers, client_response_headers, split_host, upstream_request_headers
from .internals import AsSentResponse, AsSentStreamResponse
from .logs import SENT_BEFORE_CUT
from .plan import WHOLE_ANSWER_LIMIT, AnswerPlan, plan_answer
from .readahead import MetadataWatch, ReadAhead
from .rewrite import (
    BaseMapping,
    BodyTransform,
    DecodeError,
    mapping_for,
    rewrite_headers,
    upstream_url,
    with_multipart_type,
)
from .series import ClientOrigin
from .session import upstream_failure
from .settings import Settings
from .silence import Silence
from .tokens import TokenSource
from .upload import Body, request_body, stall_error

logger = logging.getLogger("proxy.forward")

# Adds the proxy's own response headers (request id, CORS) to an answer before it leaves.
Decorate = Callable[[web.BaseRequest, CIMultiDict[str]], None]

# Where the forwarder notes how the upstream failed (connect, tls, timeout, reset) for the metrics, which
# see only the response the client got.
UPSTREAM_FAILURE = web.RequestKey("upstream_failure", str)

WRITE_BUFFER_HIGH = 1024 * 1024
# Read size for answers the client asked for as JSON or XML (metadata, QIDO), which may be rewritten: the
# rewriting bounds their speed, and smaller reads keep many of them at once in little memory. Everything
# else (WADO-RS retrieves) uses the session's large reads.
DOCUMENT_READ_BUFFER = 256 * 1024


def local_origin(request: web.BaseRequest) -> str:
    """The origin the client used: its Host (which passed the allowlist), with the port it really connected to.

    Some clients send a Host without the port (dicomweb-client does, on non-default ports); links built
    from it would point at port 80, so the port the connection arrived on fills the gap.
    """
    host = request.host
    split = split_host(host)
    if split is not None:
        name, port = split
        host = f"{name}:{port}" if port else name  # "localhost:" is a Host with an empty port
        if not port and request.transport is not None:
            sockname = request.transport.get_extra_info("sockname")
            if sockname and sockname[1] not in (80, 443):
                host = f"{name}:{sockname[1]}"
    return f"{request.scheme}://{host}"


def _broke_off(request: web.BaseRequest, exc: BaseException) -> None:
    """The upstream's answer broke off mid-body: the client connection is closed instead of the answer
    finished, because a client must never take a cut body for whole."""
    request[UPSTREAM_FAILURE] = _failure_kind(exc)
    request[SENT_BEFORE_CUT] = request.writer.output_size
    logger.warning(
        "upstream broke off %s %s mid-body (%s); closing the client connection",
        request.method,
        loggable(request.path),
        type(exc).__name__,
    )
    if request.transport is not None:
        request.transport.close()


def _failure_kind(exc: BaseException) -> str:
    """How an upstream answer broke off mid-body, as counted in dicom_proxy_upstream_errors_total."""
    return "timeout" if isinstance(exc, TimeoutError) else "reset"


class Forwarder:
    """The catch-all handler: everything that is not a local endpoint goes through here."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession,
        tokens: TokenSource,
        decorate: Decorate | None = None,
        read_ahead: ReadAhead | None = None,
    ) -> None:
        self._settings = settings
        self._session = session
        self._tokens = tokens
        self._decorate = decorate
        self._read_ahead = read_ahead
        self._silence = settings.read_timeout
        self._origin = str(settings.upstream.origin())
        self._base_path = settings.upstream.raw_path.rstrip("/")
        self._proxy = settings.upstream_proxy

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        url = upstream_url(self._origin, self._base_path, request.raw_path)
        if self._read_ahead is not None and not request.body_exists:
            client = ClientOrigin(request.remote, request.scheme, request.host)
            buffered = await self._read_ahead.take(request.method, request.raw_path, request.headers, client)
            if buffered is not None:
                return await self._from_buffer(request, buffered)
        body = await request_body(request, replay_limit=self._settings.replay_limit, silence_limit=self._silence)
        upstream = await send_with_token(
            self._tokens,
            lambda token: self._send(request, url, token, body),
            replayable=not isinstance(body, AsyncIterator),
        )
        if upstream.status == 101:
            upstream.close()
            raise UpstreamUnreachable("the service answered 101 Switching Protocols, which the proxy does not relay")
        try:
            return await self._relay(request, upstream)
        finally:
            upstream.close()

    async def _send(self, request: web.BaseRequest, url: URL, token: str, body: Body) -> aiohttp.ClientResponse:
        headers = upstream_request_headers(
            request.headers,
            token=token,
            client_address=request.remote,
            client_scheme=request.scheme,
            client_host=request.host,
        )
        try:
            response = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                proxy=self._proxy,
                read_bufsize=DOCUMENT_READ_BUFFER if _wants_a_document(request.headers.get("Accept")) else None,
            )
        except ClientTimeout:
            raise
        except Exception as exc:
            stall = stall_error(request, self._silence)
            if stall is not None:
                raise stall from exc
            failure = upstream_failure(exc, url.host)
            if failure is None:
                raise
            request[UPSTREAM_FAILURE], error = failure
            raise error from exc
        if self._read_ahead is not None:
            self._read_ahead.answered(request.method, response.status, response.headers.get("Retry-After"))
        return response

    async def _from_buffer(self, request: web.BaseRequest, buffered: Buffered) -> web.StreamResponse:
        """An answer read ahead, with the headers every answer gets (it holds no link: only such are kept);
        each piece is let go once written, and read-ahead counts what is left until the end."""
        assert self._read_ahead is not None
        try:
            headers = self._response_headers(request, buffered.headers, self._mapping(request))
            return await self._stream(request, buffered.status, buffered.reason, headers, _drain(buffered.pieces))
        finally:
            self._read_ahead.served(buffered)

    def _mapping(self, request: web.BaseRequest) -> BaseMapping | None:
        """The rewrite for this request's answer: worked out once per request, used for headers and body."""
        if not self._settings.rewrite:
            return None
        return mapping_for(self._origin, self._base_path, local_origin(request))

    def _response_headers(
        self, request: web.BaseRequest, upstream: Headers, mapping: BaseMapping | None
    ) -> CIMultiDict[str]:
        headers = client_response_headers(upstream)
        if self._decorate is not None:
            self._decorate(request, headers)
        if mapping is not None:
            rewrite_headers(headers, mapping)
        content_type = with_multipart_type(headers.get("Content-Type"), request.headers.get("Accept"))
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def _relay(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        mapping = self._mapping(request)
        headers = self._response_headers(request, upstream.headers, mapping)
        plan = plan_answer(request.method, upstream.status, upstream.content_length, headers, mapping)
        transform = plan.transform()
        ready: Iterable[bytes] = ()
        if plan.whole:
            small = await self._small(request, upstream, plan, headers, transform)
            if isinstance(small, web.Response):
                watch = self._watch(request, upstream.status, small.headers)
                if watch is not None and isinstance(small.body, bytes):
                    watch.feed(small.body)
                    watch.done()
                return small
            ready = small  # inflates past the limit: the rest streams as it inflates
        headers = plan.headers(headers, transformed=transform is not None)
        watch = self._watch(request, upstream.status, headers)
        return await self._stream(
            request, upstream.status, upstream.reason, headers, ready,
            content=upstream.content, transform=transform, watch=watch,
        )  # fmt: skip

    def _watch(self, request: web.BaseRequest, status: int, headers: Headers) -> MetadataWatch | None:
        """Read-ahead's look at an answer as it goes out with `headers`: a series' metadata teaches it the
        series' instances."""
        if self._read_ahead is None or status != 200:
            return None
        return self._read_ahead.watch(request.method, request.raw_path, headers.get("Content-Encoding"))

    async def _small(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        plan: AnswerPlan,
        headers: CIMultiDict[str],
        transform: BodyTransform | None,
    ) -> web.Response | Iterable[bytes]:
        """A small answer, read whole and sent in one write; or, when it inflates past the whole-answer
        limit, its output so far and the rest, for the stream to carry on with."""
        body = await self._read_whole(request, upstream)

        def answer(out: bytes, *, transformed: bool) -> web.Response:
            fitted = plan.headers(headers, transformed=transformed)
            return AsSentResponse(status=upstream.status, reason=upstream.reason, headers=fitted, body=out)

        if transform is None:
            return answer(body, transformed=False)
        if not transform.inflates:
            rewritten = transform.whole(body)
            return answer(body, transformed=False) if rewritten is None else answer(rewritten, transformed=True)
        try:
            ready, rest = await _inflate_some(transform, body)
        except DecodeError:  # not what it claims to be: no link can be found in it, so it goes as it came
            return answer(body, transformed=False)
        if rest is not None:
            return itertools.chain(ready, rest)
        if not transform.changed:  # no link: it goes out compressed, as it came
            return answer(body, transformed=False)
        return answer(b"".join(ready), transformed=True)

    async def _stream(
        self,
        request: web.BaseRequest,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        ready: Iterable[bytes],
        *,
        content: aiohttp.StreamReader | None = None,
        transform: BodyTransform | None = None,
        watch: MetadataWatch | None = None,
    ) -> web.StreamResponse:
        """Stream the answer out: `ready` (output of a body read whole, or an answer read ahead) first, then
        the rest from the upstream's `content`; `watch` sees what goes out."""
        response = AsSentStreamResponse(status=status, reason=reason, headers=headers)
        await response.prepare(request)
        if request.transport is not None and transform is None:
            # The default 64 KiB high-water mark makes every 1 MiB chunk wait for the client before the next
            # upstream read; room for one chunk lets reading and writing overlap. A rewritten body is bound
            # by the rewriting, not the copying, and keeps the default, which bounds memory per answer.
            request.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        silence = Silence(self._silence, partial(self._stopped_reading, request))
        # Inflated pieces come from bytes already read: no read waits between them, so the loop is let run.
        inflating = transform is not None and transform.inflates
        pieces = _outgoing(ready, content, transform)
        try:
            async for piece in pieces:
                if watch is not None:
                    watch.feed(piece)
                if piece and not await self._write(request, response, silence, piece):
                    return response
                if inflating:
                    await asyncio.sleep(0)
            if await self._write(request, response, silence, None) and watch is not None:
                watch.done()
        except (TimeoutError, aiohttp.ClientError, DecodeError) as exc:
            _broke_off(request, exc)
        finally:
            silence.close()
            await pieces.aclose()
        return response

    def _stopped_reading(self, request: web.BaseRequest) -> None:
        # A client that stops reading would hold this answer's buffers (and the upstream's) forever.
        logger.warning(
            "client read nothing of %s %s for %gs; closing its connection",
            request.method,
            loggable(request.path),
            self._silence,
        )
        if request.transport is not None:
            request.transport.abort()

    async def _write(
        self, request: web.BaseRequest, response: web.StreamResponse, silence: Silence, chunk: bytes | None
    ) -> bool:
        """Write `chunk` on (None: end the answer); False when the client went away, or was cut for reading
        nothing for the read timeout."""
        silence.waiting()
        sent = request.writer.output_size
        try:
            await (response.write_eof() if chunk is None else response.write(chunk))
        except ConnectionError:
            request[SENT_BEFORE_CUT] = sent
            if not silence.noticed:  # else it was cut, and that was logged
                # Leaving closes the upstream connection, which cancels its side.
                logger.info("client went away during %s %s", request.method, loggable(request.path))
            return False
        silence.heard()
        return not silence.noticed

    async def _read_whole(self, request: web.BaseRequest, upstream: aiohttp.ClientResponse) -> bytes:
        """A small answer's body; nothing has reached the client yet, so a break still gets a clear error."""
        try:
            return await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            request[UPSTREAM_FAILURE] = _failure_kind(exc)
            raise UpstreamUnreachable(f"the upstream broke off its answer ({type(exc).__name__})") from exc


async def _inflate_some(transform: BodyTransform, body: bytes) -> tuple[list[bytes], Iterator[bytes] | None]:
    """A compressed small answer inflated (and rewritten) a piece at a time, the event loop running between
    pieces: a small gzip answer can inflate to any size. Returns the output up to the whole-answer limit,
    and the rest still to inflate when it goes past (None when it ended within). Raises DecodeError."""
    ready: list[bytes] = []
    pieces = transform.feed(body)
    for piece in pieces:
        ready.append(piece)
        if transform.plain_size > WHOLE_ANSWER_LIMIT:
            return ready, pieces
        await asyncio.sleep(0)
    ready.append(transform.finish())
    return ready, None


async def _outgoing(
    ready: Iterable[bytes], content: aiohttp.StreamReader | None, transform: BodyTransform | None
) -> AsyncGenerator[bytes, None]:
    """An answer's body as it goes out: `ready` first, then what is left of the upstream's `content`, through
    `transform` when there is one."""
    for piece in ready:
        yield piece
    if content is None:
        return
    while chunk := await content.readany():
        if transform is None:
            yield chunk
        else:
            for piece in transform.feed(chunk):
                yield piece
    if transform is not None:
        yield transform.finish()


def _drain(pieces: list[bytes]) -> Iterator[bytes]:
    """The pieces in order, each let go of as it is handed out."""
    pieces.reverse()
    while pieces:
        yield pieces.pop()


def _wants_a_document(accept: str | None) -> bool:
    """Whether the client asked for JSON or XML only: a metadata or search answer, not a retrieve."""
    if not accept:
        return False
    lowered = accept.lower()
    return ("json" in lowered or "xml" in lowered) and "multipart" not in lowered and "*/*" not in lowered

"""The gateway's one DICOMweb client, on the proxy's event loop, with the proxy's TokenSource and upstream session.

QIDO-RS searches page with `limit` and `offset` until the results end; WADO-RS retrieves stream each
`application/dicom` part, in its stored transfer syntax, into a temporary file as it arrives; STOW-RS uploads
stream from a temporary file. File reads and writes run in the loop's executor, so the loop never waits on a
disk. Every failure leaves as a `Failure` with the DIMSE status a legacy client understands.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from ..auth import send_with_token
from ..errors import TokenRefused, TokenUnavailable, UpstreamUnreachable
from ..headers import upstream_request_headers
from ..session import upstream_failure
from ..settings import Settings
from ..tokens import TokenSource
from .status import (
    COERCION_OF_DATA_ELEMENTS,
    OUT_OF_RESOURCES,
    REFUSED_NOT_AUTHORIZED,
    SUCCESS,
    UNABLE_TO_PROCESS,
    Failure,
    storage_status,
)

logger = logging.getLogger("proxy.dimse")

CHUNK = 1024 * 1024
_DICOM_JSON = "application/dicom+json"
_RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_UNREACHABLE_HINT = UpstreamUnreachable.hint
_REFUSED_HINT = TokenRefused.hint

Body = Callable[[], AsyncIterator[bytes]]


class DicomWebClient:
    """QIDO-RS, WADO-RS and STOW-RS at the service's DICOMweb base, for the DIMSE gateway."""

    def __init__(self, settings: Settings, *, session: aiohttp.ClientSession, tokens: TokenSource) -> None:
        self._base = str(settings.upstream_dicomweb).rstrip("/")
        self._session = session
        self._tokens = tokens
        self._proxy = settings.upstream_proxy
        # --dimse-page-size; a service that caps its pages lower is followed all the same (see `qido`).
        self._page_size = settings.dimse_page_size

    def url(self, path: str) -> URL:
        # The path's UIDs were checked by the mapping (digits and dots only), so nothing here climbs or escapes.
        return URL(f"{self._base}/{path}", encoded=True)

    async def ping(self) -> None:
        """One cheap authorised search: raises Failure unless a token is held and the service accepts it."""
        async with await self._request(
            "GET", self.url("studies").with_query(limit="1"), "search", {"Accept": _DICOM_JSON}
        ):
            pass

    async def qido(self, path: str, params: tuple[tuple[str, str], ...]) -> AsyncIterator[list[dict[str, Any]]]:
        """The results of a QIDO-RS search, page by page, following `offset` until they end.

        A page shorter than the longest seen, or an empty one, is the last: a service that caps pages below
        the `limit` asked for (silently, as some do) is still read to its end.
        """
        offset, longest = 0, 0
        while True:
            query = [*params, ("limit", str(self._page_size)), ("offset", str(offset))]
            url = self.url(path).with_query(query)
            async with await self._request("GET", url, "search", {"Accept": _DICOM_JSON}) as response:
                if response.status == 204:
                    return
                page = await self._json(response)
            if not isinstance(page, list):
                raise Failure(UNABLE_TO_PROCESS, "the service answered a search with something other than a list")
            if page:
                yield page
            if not page or len(page) < longest:
                return
            longest = max(longest, len(page))
            offset += len(page)

    async def retrieve(self, path: str, directory: Path) -> AsyncIterator[Path]:
        """WADO-RS `path` as files in `directory`, one per part, each yielded once written whole."""
        response = await self._request("GET", self.url(path), "retrieve", {"Accept": _RETRIEVE_ACCEPT})
        try:
            if response.status == 204 or response.status == 404:
                return
            self._check(response, "retrieve")
            reader = aiohttp.MultipartReader(response.headers, response.content)
            number = 0
            while True:
                part = await reader.next()
                if part is None:
                    return
                if not isinstance(part, aiohttp.BodyPartReader):
                    raise Failure(UNABLE_TO_PROCESS, "the service answered a retrieve with nested multipart")
                number += 1
                target = directory / f"{number:06d}-{secrets.token_hex(4)}.dcm"
                await _write(part, target)
                yield target
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Failure(OUT_OF_RESOURCES, f"the service broke off a retrieve ({type(exc).__name__})") from exc
        finally:
            response.close()

    async def stow(self, file: Path) -> int:
        """STOW-RS one Part 10 file as it is; the C-STORE status its answer means."""
        boundary = secrets.token_hex(16)
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = (await asyncio.to_thread(os.path.getsize, file)) + len(head) + len(tail)

        async def body() -> AsyncIterator[bytes]:
            yield head
            async for chunk in _read(file):
                yield chunk
            yield tail

        headers = {
            "Accept": _DICOM_JSON,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(size),
        }
        async with await self._request("POST", self.url("studies"), "store", headers, body) as response:
            if response.status in (200, 202, 409) or response.status == 400:
                try:
                    answer = await self._json(response)
                except Failure:
                    answer = None
                return _stow_status(response.status, answer)
            self._check(response, "store")
            return SUCCESS

    async def _request(
        self, method: str, url: URL, what: str, headers: dict[str, str], body: Body | None = None
    ) -> Any:
        """One authorised request: a 401 refreshes the token and sends once more (the body can be re-read).

        `what` names the request in failures ("a search"): its URL holds UIDs, which no message may carry.
        """

        given = CIMultiDict(headers)

        async def send(token: str) -> aiohttp.ClientResponse:
            try:
                return await self._session.request(
                    method,
                    url,
                    # The rules every request that leaves the proxy follows; no HTTP client stands behind this
                    # one, so it carries no X-Forwarded-*.
                    headers=upstream_request_headers(given, token=token),
                    data=body() if body is not None else None,
                    allow_redirects=False,
                    proxy=self._proxy,
                )
            except Exception as exc:
                failure = upstream_failure(exc, url.host)
                if failure is None:
                    raise
                raise Failure(OUT_OF_RESOURCES, failure[1].detail, failure[1].hint) from exc

        try:
            response = await send_with_token(self._tokens, send, replayable=True)
        except TokenUnavailable as error:
            raise Failure(OUT_OF_RESOURCES, error.detail, error.hint) from error
        if response.status in (401, 403):
            response.release()
            refusal = self._tokens.refusal
            raise Failure(
                REFUSED_NOT_AUTHORIZED,
                refusal.detail if refusal else f"the DICOM service answered {response.status} to a {what}",
                refusal.hint if refusal else _REFUSED_HINT,
            )
        return response

    def _check(self, response: aiohttp.ClientResponse, what: str) -> None:
        if response.status >= 500 or response.status == 429:
            detail = f"the DICOM service answered {response.status} to a {what}"
            raise Failure(OUT_OF_RESOURCES, detail, _UNREACHABLE_HINT)
        if response.status >= 300:
            raise Failure(UNABLE_TO_PROCESS, f"the DICOM service answered {response.status} to a {what}")

    async def _json(self, response: aiohttp.ClientResponse) -> Any:
        self._check(response, "search")
        try:
            return json.loads(await response.read() or b"null")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Failure(OUT_OF_RESOURCES, f"the service broke off its answer ({type(exc).__name__})") from exc
        except ValueError as exc:
            raise Failure(UNABLE_TO_PROCESS, "the service's answer is not JSON") from exc


def _stow_status(http_status: int, answer: Any) -> int:
    """The C-STORE status of one instance from its STOW-RS answer (PS3.18 10.5.3)."""
    document = answer[0] if isinstance(answer, list) and answer else answer
    if isinstance(document, dict):
        failed = (document.get("00081198") or {}).get("Value") or []
        if failed:
            reason = (failed[0].get("00081197") or {}).get("Value") or [None]
            return storage_status(reason[0] if isinstance(reason[0], int) else None)
    if http_status == 200:
        return SUCCESS
    if http_status == 202:
        return COERCION_OF_DATA_ELEMENTS
    return storage_status(None)


async def _write(part: aiohttp.BodyPartReader, target: Path) -> None:
    handle = await asyncio.to_thread(target.open, "wb")
    try:
        while chunk := await part.read_chunk(CHUNK):
            await asyncio.to_thread(handle.write, chunk)
    except BaseException:
        await asyncio.to_thread(handle.close)
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    await asyncio.to_thread(handle.close)


async def _read(file: Path) -> AsyncIterator[bytes]:
    handle = await asyncio.to_thread(file.open, "rb")
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)

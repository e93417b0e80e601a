"""Read-ahead for frames: while a viewer fetches a series one frame at a time, the next ones are on their way.

A browser opens six connections to the proxy and the service is tens of milliseconds away, so a series of
hundreds of frames costs dozens of round trips per connection. The proxy learns a series' instances from
the series metadata it forwards, and when a client asks for a frame (or instance) of that series it fetches
the following ones with the client's own headers, at most `--read-ahead-requests` at a time, into memory
bounded by `--read-ahead-mib`. A client request that matches one (same path, Accept and Accept-Encoding) is
answered from it, byte for byte what the service sent. Nothing is fetched but in answer to a client's
request, so read-ahead stops when the client stops asking; nothing is written to disk; everything is
dropped on a 401 or 403, when the token's identity changes, once served, or after BUFFER_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cachetools import TTLCache
from multidict import CIMultiDictProxy
from yarl import URL

from .errors import TokenUnavailable
from .headers import Headers, upstream_request_headers
from .rewrite import body_kind, upstream_path
from .settings import Settings
from .tokens import TokenSource, token_claims, who

logger = logging.getLogger("proxy.readahead")

# A buffered answer not asked for within this long is dropped (and counted as wasted).
BUFFER_SECONDS = 30.0
# How far ahead of the client's last request, in read-ahead requests: a reading starts one request's worth
# ahead, so a client that looks at one frame costs little, and doubles with every hit up to the most, enough
# to keep every request busy while the client catches up.
WINDOW_PER_REQUEST = 4
# After a 429 without Retry-After, or a 403: how long read-ahead rests.
REST_SECONDS = 30.0
# Series whose instances are remembered, and for how long after their metadata went by.
SERIES_KEPT, SERIES_SECONDS = 32, 3600.0
# The most instances learned of one series (a series larger than this is read ahead in its first part).
MOST_INSTANCES = 100_000

_SERIES = r"(?P<series>(?:/[^/?]+)*/studies/[^/?]+/series/[^/?]+)"
_METADATA_PATH = re.compile(_SERIES + r"/metadata")
_ITEM_PATH = re.compile(_SERIES + r"/instances/(?P<instance>[^/?]+)(?:/frames/(?P<frame>[1-9][0-9]{0,5}))?")
# A request with any of these asks for something other than the whole answer, or the service's judgement.
_NOT_FROM_BUFFER = ("Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")

# In DICOM JSON each instance's attributes come in tag order: its SOP Instance UID (00080018), then its
# Instance Number (00200013), then its Number of Frames (00280008).
_ATTRIBUTES = ((b'"00080018"', "uid"), (b'"00200013"', "number"), (b'"00280008"', "frames"))
_VALUE = re.compile(rb'\s*:\s*\{[^{}]{0,64}?"Value"\s*:\s*\[\s*"?([0-9][0-9.]{0,63})["\s,\]]')
# Longer than any attribute with its value, so one cut by a chunk's end is found whole in the next feed.
_OVERLAP = 256


@dataclass
class Instance:
    uid: str
    number: int | None = None
    frames: int = 1


class InstanceScanner:
    """Finds the instances in series metadata (DICOM JSON) as it streams by, without parsing it whole: a
    series' metadata can be tens of MiB, and it is on its way to the client meanwhile."""

    def __init__(self) -> None:
        self._rest = b""
        self.instances: list[Instance] = []

    def feed(self, chunk: bytes, *, final: bool = False) -> None:
        data = self._rest + chunk
        end = len(data) if final else max(0, len(data) - _OVERLAP)
        found: list[tuple[int, str, bytes]] = []
        for tag, name in _ATTRIBUTES:
            # Every tag that starts before `end`, whole: one cut by `end` is read now, not lost to the rest.
            bound = end + len(tag) - 1
            at = data.find(tag, 0, bound)
            while at != -1:
                match = _VALUE.match(data, at + len(tag))
                if match is not None:
                    found.append((at, name, match.group(1)))
                at = data.find(tag, at + len(tag), bound)
        for _, name, value in sorted(found):
            self._note(name, value.decode("ascii"))
        self._rest = data[end:]

    def _note(self, name: str, value: str) -> None:
        if name == "uid":
            if len(self.instances) < MOST_INSTANCES:
                self.instances.append(Instance(value))
        elif self.instances and value.isdigit():
            if name == "number":
                self.instances[-1].number = int(value)
            else:
                self.instances[-1].frames = max(1, min(int(value), 100_000))

    def finish(self) -> list[Instance]:
        """The instances in the order a viewer shows them: by Instance Number where every one has one."""
        self.feed(b"", final=True)
        unique = list({instance.uid: instance for instance in self.instances}.values())
        if unique and all(instance.number is not None for instance in unique):
            unique.sort(key=lambda instance: instance.number or 0)
        return unique


@dataclass(frozen=True)
class Buffered:
    """One answer read ahead: what the service sent, and for which identity."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    # As it came, piece by piece: joining would copy it, and a large one is written out a piece at a time.
    pieces: list[bytes]
    size: int
    identity: tuple[str, str]


@dataclass
class Counts:
    """What read-ahead did, for /-/metrics and the status page."""

    hits: int = 0
    misses: int = 0
    fetched_bytes: int = 0
    wasted_bytes: int = 0
    requests: int = 0


class Buffer(TTLCache[tuple[str, str, str], Buffered]):
    """The answers read ahead, bounded in bytes and time; whatever leaves it unserved counts as wasted."""

    def __init__(self, capacity: int, counts: Counts, timer: Callable[[], float]) -> None:
        super().__init__(maxsize=max(capacity, 1), ttl=BUFFER_SECONDS, timer=timer, getsizeof=lambda entry: entry.size)
        self._counts = counts

    def expire(self, time: Any = None) -> list[tuple[tuple[str, str, str], Buffered]]:
        expired: list[tuple[tuple[str, str, str], Buffered]] = super().expire(time)
        self._counts.wasted_bytes += sum(entry.size for _, entry in expired)
        return expired

    def popitem(self) -> tuple[tuple[str, str, str], Buffered]:
        key, entry = super().popitem()
        self._counts.wasted_bytes += entry.size
        return key, entry


@dataclass(eq=False)
class Reading:
    """The client's reading of one series in one form (frames or instances, with its Accept)."""

    series: str
    items: list[str]  # the paths, in the order a viewer is expected to ask for them
    positions: dict[str, int]
    headers: Headers  # the first request's: what read-ahead sends, with another path
    client: tuple[str | None, str, str]  # its address, scheme and Host, for X-Forwarded-*
    last: int | None = None
    window: int = 1  # how many items after the client's last one are read ahead
    asked: set[int] = field(default_factory=set)  # asked for by the client since the metadata went by
    queued: set[int] = field(default_factory=set)
    largest: int = 0  # the largest answer read ahead so far: room is kept for one more like it
    stopped: bool = False  # an answer too large to buffer: this reading is left to the client


class ReadAhead:
    """The buffer, the readings it serves and the fetches that fill it; `close()` ends the fetches."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession,
        tokens: TokenSource,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._tokens = tokens
        self._clock = clock
        self._origin = str(settings.upstream.origin())
        self._base_path = settings.upstream.raw_path.rstrip("/")
        self._proxy = settings.upstream_proxy
        self._capacity = settings.read_ahead
        # One answer may take a quarter of the cap: a series of such answers still gets several ahead.
        self._largest_answer = settings.read_ahead // 4
        self._concurrency = settings.read_ahead_requests
        self._window = WINDOW_PER_REQUEST * settings.read_ahead_requests
        self.counts = Counts()
        self._buffer = Buffer(settings.read_ahead, self.counts, clock)
        self._series: TTLCache[str, list[Instance]] = TTLCache(SERIES_KEPT, SERIES_SECONDS, timer=clock)
        self._readings: TTLCache[tuple[str, str, str, str], Reading] = TTLCache(
            4 * SERIES_KEPT, SERIES_SECONDS, timer=clock
        )
        self._in_flight: dict[tuple[str, str, str], asyncio.Future[Buffered | None]] = {}
        self._reading_bytes = 0  # bodies being read ahead now, not yet in the buffer
        self._queue: deque[tuple[Reading, int]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped by clear(): fetches begun before it keep nothing
        self._resting_until = 0.0
        self._identities: dict[str, tuple[str, str]] = {}

    @property
    def buffered(self) -> int:
        """Bytes held in the buffer now."""
        return int(self._buffer.currsize)

    @property
    def pending(self) -> int:
        """Read-ahead requests queued or on their way now."""
        return len(self._queue) + len(self._in_flight)

    # ---- learning a series

    def scanner_for(self, method: str, raw_path: str) -> InstanceScanner | None:
        """A scanner for the answer to this request when it is a series' metadata; None for any other."""
        if method != "GET" or _METADATA_PATH.fullmatch(raw_path) is None:
            return None
        return InstanceScanner()

    def learned(self, raw_path: str, scanner: InstanceScanner) -> None:
        """The metadata at `raw_path` went to the client whole: its instances are the series' from now on."""
        found = _METADATA_PATH.fullmatch(raw_path)
        instances = scanner.finish()
        if found is None or not instances:
            return
        series = found["series"]
        changed = [instance.uid for instance in self._series.get(series, ())] != [i.uid for i in instances]
        self._series[series] = instances
        for key, reading in list(self._readings.items()):
            if key[0] == series:
                if changed:
                    self._readings.pop(key, None)
                else:  # the viewer opens the series again: every item may be wanted again
                    reading.asked.clear()
                    reading.window = self._concurrency
        logger.debug("read-ahead knows %d instances of a series", len(instances))

    # ---- answering from the buffer

    async def take(
        self, method: str, raw_path: str, headers: Headers, client: tuple[str | None, str, str]
    ) -> Buffered | None:
        """The buffered answer to this request, waiting for one on its way; None when the request must go to
        the service. Every request of a known series moves the read-ahead on."""
        if method != "GET" or any(name in headers for name in _NOT_FROM_BUFFER) or _wants_it_fresh(headers):
            return None
        found = _ITEM_PATH.fullmatch(raw_path)
        if found is None:
            return None
        reading = self._reading(found, headers, client)
        if reading is None:
            return None
        position = reading.positions.get(raw_path)
        if position is None:
            return None
        key = self._key(raw_path, headers)
        reading.asked.add(position)
        self._advance(reading, position)
        entry = self._buffer.pop(key, None)
        if entry is None and key in self._in_flight:
            entry = await asyncio.shield(self._in_flight[key])
            self._buffer.pop(key, None)
        if entry is not None:
            identity = self._current_identity()
            if identity is None:  # no token held now: the client's request gets one, and the answer with it
                entry = None
            elif entry.identity != identity:
                self.clear("the token's identity changed")
                entry = None
        if entry is None:
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        reading.window = min(self._window, 2 * reading.window)
        return entry

    def clear(self, why: str) -> None:
        """Drop everything read ahead, and keep nothing of what is on its way (a 401, a 403, a new identity)."""
        if self._buffer.currsize or self._in_flight:
            logger.info("read-ahead buffer cleared: %s", why)
        self.counts.wasted_bytes += self.buffered
        self._buffer.clear()
        self._readings.clear()
        self._queue.clear()
        self._generation += 1

    def rest(self, seconds: float) -> None:
        """Stop reading ahead for a while: the service asked for fewer requests (429) or refuses (403)."""
        self._resting_until = max(self._resting_until, self._clock() + seconds)
        self._queue.clear()
        for reading in self._readings.values():
            reading.queued.clear()

    async def close(self) -> None:
        for worker in list(self._workers):
            worker.cancel()
        for worker in list(self._workers):
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._buffer.clear()

    def _reading(self, found: re.Match[str], headers: Headers, client: tuple[str | None, str, str]) -> Reading | None:
        series = found["series"]
        kind = "instances" if found["frame"] is None else "frames"
        key = (series, kind, headers.get("Accept", ""), headers.get("Accept-Encoding", ""))
        reading = self._readings.get(key)
        if reading is not None:
            return reading
        instances = self._series.get(series)
        if instances is None:
            return None
        if kind == "frames":
            items = [
                f"{series}/instances/{instance.uid}/frames/{frame}"
                for instance in instances
                for frame in range(1, instance.frames + 1)
            ]
        else:
            items = [f"{series}/instances/{instance.uid}" for instance in instances]
        sent = headers.copy()
        sent.popall("X-Request-Id", None)  # the first request's own: the service would see it on every one
        positions = {path: index for index, path in enumerate(items)}
        reading = Reading(series, items, positions, sent, client, window=self._concurrency)
        self._readings[key] = reading
        return reading

    @staticmethod
    def _key(raw_path: str, headers: Headers) -> tuple[str, str, str]:
        return raw_path, headers.get("Accept", ""), headers.get("Accept-Encoding", "")

    # ---- reading ahead

    def _advance(self, reading: Reading, position: int) -> None:
        """Queue the items after `position`, in the direction the client is going, up to the window."""
        backwards = reading.last is not None and position < reading.last
        reading.last = position
        if reading.stopped or self._clock() < self._resting_until:
            return
        if backwards:
            following = range(position - 1, max(-1, position - reading.window - 1), -1)
        else:
            following = range(position + 1, min(len(reading.items), position + reading.window + 1))
        for index in following:
            if index in reading.asked or index in reading.queued:
                continue
            key = self._key(reading.items[index], reading.headers)
            if key not in self._in_flight and key not in self._buffer:
                reading.queued.add(index)
                self._queue.append((reading, index))
        while self._queue and len(self._workers) < self._concurrency:
            worker = asyncio.get_running_loop().create_task(self._work())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    async def _work(self) -> None:
        while self._queue:
            reading, index = self._queue.popleft()
            reading.queued.discard(index)
            if index in reading.asked:  # the client asked first: its own request fetches it
                continue
            if not self._has_room(reading) or self._clock() < self._resting_until or reading.stopped:
                continue  # not fetched: the client's next request may queue it again
            try:
                await self._fetch(reading, reading.items[index])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # read-ahead is an optimisation: the client's own request follows
                logger.debug("read-ahead fetch failed (%s)", type(exc).__name__)

    def _has_room(self, reading: Reading) -> bool:
        self._buffer.expire()
        return self._buffer.currsize + self._reading_bytes + reading.largest <= self._capacity

    async def _fetch(self, reading: Reading, raw_path: str) -> None:
        key = self._key(raw_path, reading.headers)
        future: asyncio.Future[Buffered | None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        generation = self._generation
        entry: Buffered | None = None
        try:
            entry = await self._read(reading, raw_path, generation)
            if entry is not None:
                self._buffer[key] = entry
        finally:
            del self._in_flight[key]
            future.set_result(entry)

    async def _read(self, reading: Reading, raw_path: str, generation: int) -> Buffered | None:
        try:
            token = await self._tokens.get()
        except TokenUnavailable:
            return None
        address, scheme, host = reading.client
        headers = upstream_request_headers(
            reading.headers, token=token, client_address=address, client_scheme=scheme, client_host=host
        )
        url = URL(self._origin + upstream_path(self._base_path, raw_path), encoded=True)
        self.counts.requests += 1
        async with self._session.get(url, headers=headers, allow_redirects=False, proxy=self._proxy) as response:
            if not self._bufferable(response, reading):
                await _discard(response)
                return None
            pieces: list[bytes] = []
            size = 0
            try:
                async for chunk in response.content.iter_any():
                    if self._buffer.currsize + self._reading_bytes + len(chunk) > self._capacity or (
                        size + len(chunk) > self._largest_answer
                    ):
                        reading.stopped = size + len(chunk) > self._largest_answer
                        self.counts.wasted_bytes += size
                        response.close()
                        return None
                    pieces.append(chunk)
                    size += len(chunk)
                    self._reading_bytes += len(chunk)
                    self.counts.fetched_bytes += len(chunk)
            finally:
                self._reading_bytes -= size
            if generation != self._generation:  # cleared meanwhile: kept by nobody
                self.counts.wasted_bytes += size
                return None
            reading.largest = max(reading.largest, size)
            return Buffered(response.status, response.reason, response.headers, pieces, size, self._identity(token))

    def _bufferable(self, response: aiohttp.ClientResponse, reading: Reading) -> bool:
        """Only a whole 200 of a kind that goes out as it came is buffered; a refusal stops read-ahead."""
        status = response.status
        if status == 401:
            self.clear("the service refused a token (401)")
        elif status == 403:
            self.clear("the service refused the identity (403)")
            self.rest(REST_SECONDS)
        elif status == 429:
            logger.info("the service asked for fewer requests (429): read-ahead rests")
            self.rest(_retry_after(response.headers.get("Retry-After")))
        if status != 200 or body_kind(response.headers.get("Content-Type")) is not None:
            return False
        if response.content_length is not None and response.content_length > self._largest_answer:
            reading.stopped = True
            return False
        return True

    # ---- identities

    def _identity(self, token: str) -> tuple[str, str]:
        """Who a token speaks for (tenant, user or app): answers kept for one identity are never given to another."""
        identity = self._identities.get(token)
        if identity is None:
            claims = token_claims(token)
            identity = (str(claims.get("tid", "")), who(claims))
            self._identities = {token: identity}  # the token in use now is the only one worth remembering
        return identity

    def _current_identity(self) -> tuple[str, str] | None:
        token = self._tokens.current
        return None if token is None else self._identity(token.value)


def _wants_it_fresh(headers: Headers) -> bool:
    """A client that asks past caches (a reload) gets the service's answer, not one fetched before."""
    cache_control = headers.get("Cache-Control", "") + headers.get("Pragma", "")
    return "no-cache" in cache_control.lower() or "no-store" in cache_control.lower()


async def _discard(response: aiohttp.ClientResponse) -> None:
    """Read a short answer that is not kept, so that its connection goes back to the pool; close a long one."""
    if response.content_length is not None and response.content_length <= 64 * 1024:
        await response.read()
    else:
        response.close()


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After given in seconds (an HTTP date, or nothing, rests REST_SECONDS)."""
    if value is not None and value.strip().isdigit():
        return min(float(value.strip()), 600.0)
    return REST_SECONDS

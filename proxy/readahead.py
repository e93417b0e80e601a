"""Read-ahead for frames: while a viewer fetches a series one frame at a time, the next ones are on their way.

A browser opens six connections to the proxy and the service is tens of milliseconds away, so a series of
hundreds of frames costs dozens of round trips per connection. Read-ahead learns a series' instances from
its metadata (series.py), and when a client asks for a frame (or instance) of it fetches the following ones
with the client's headers, at most `--read-ahead-requests` at a time, into at most `--read-ahead-mib`
(buffer.py), served byte for byte to a request that matches. Nothing is fetched but in answer to a client's
request, so it stops when the client stops asking; all is dropped on a 401 or 403, a new identity, or a
change made through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable

import aiohttp
from cachetools import TTLCache

from .buffer import AnswerKey, Buffer, Buffered, Counts, answer_variant, servable
from .errors import TokenUnavailable
from .headers import REQUEST_ID_HEADER, Headers, forwardable, retry_after_seconds, upstream_request_headers
from .rewrite import body_kind, upstream_url
from .series import ClientOrigin, Instance, InstanceScanner, Reading, Series
from .session import discard
from .settings import Settings
from .tokens import TokenSource, identity_of

logger = logging.getLogger("proxy.readahead")

# How far ahead of the client's last request a reading fetches, in rounds of --read-ahead-requests: it
# starts one round ahead (a client that looks at one frame costs one round) and doubles with every hit up
# to this many.
MOST_WINDOW_ROUNDS = 4
# After a 403, or a 429 or 503 without Retry-After: how long read-ahead rests.
REST_SECONDS = 30.0
# Series remembered, and for how long after their metadata went by; readings of them (one per form and
# Accept); items the service refused, not asked for again for REFUSED_SECONDS.
SERIES_KEPT, SERIES_SECONDS = 16, 3600.0
READINGS_KEPT = 4 * SERIES_KEPT
REFUSALS_KEPT, REFUSED_SECONDS = 4096, 30.0

_SERIES = r"(?P<series>(?:/[^/?]+)*/studies/[^/?]+/series/[^/?]+)"
_METADATA_PATH = re.compile(_SERIES + r"/metadata")
_ITEM_PATH = re.compile(_SERIES + r"/instances/(?P<instance>[^/?]+)(?:/frames/(?P<frame>[1-9][0-9]{0,5}))?")
# Answers to these, when they succeed, may have changed what the service holds.
_CHANGES = frozenset({"DELETE", "POST", "PUT", "PATCH"})


class MetadataWatch:
    """Read-ahead's look at a series' metadata as it goes out to the client: `done()` once it all went."""

    def __init__(self, read_ahead: ReadAhead, prefix: str, scanner: InstanceScanner) -> None:
        self._read_ahead = read_ahead
        self._prefix = prefix
        self._scanner = scanner

    def feed(self, piece: bytes) -> None:
        self._scanner.feed(piece)

    def done(self) -> None:
        self._read_ahead.learned(self._prefix, self._scanner.finish())


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
        self._answer_limit = settings.read_ahead // 4
        self._concurrency = settings.read_ahead_requests  # also a reading's first window: one round
        self._most_window = MOST_WINDOW_ROUNDS * settings.read_ahead_requests
        self.counts = Counts()
        self._buffer = Buffer(settings.read_ahead, self.counts, clock)
        self._refused: TTLCache[AnswerKey, int] = TTLCache(REFUSALS_KEPT, REFUSED_SECONDS, timer=clock)
        self._series: TTLCache[str, Series] = TTLCache(SERIES_KEPT, SERIES_SECONDS, timer=clock)
        # By series prefix, frame by frame or not, and the answer's variant (Accept, Accept-Encoding).
        self._readings: TTLCache[tuple[str, bool, tuple[str, str]], Reading] = TTLCache(
            READINGS_KEPT, SERIES_SECONDS, timer=clock
        )
        self._in_flight: dict[AnswerKey, asyncio.Future[None]] = {}
        self._reading_bytes = 0  # bodies being read ahead now, not yet in the buffer
        self._serving_bytes = 0  # answers taken from the buffer, being written to their client
        self._queue: deque[tuple[Reading, int]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped by clear(): fetches begun before it keep nothing
        self._resting_until = 0.0
        self._last_answer_size = 0

    @property
    def buffered(self) -> int:
        """Bytes held now: buffered, on their way in, or on their way out to a client."""
        return int(self._buffer.currsize) + self._reading_bytes + self._serving_bytes

    @property
    def pending(self) -> int:
        """Read-ahead requests queued or on their way now."""
        return len(self._queue) + len(self._in_flight)

    # ---- learning a series

    def watch(self, method: str, raw_path: str, content_encoding: str | None) -> MetadataWatch | None:
        """A watch on the answer to this request when it is a series' metadata; None for any other."""
        found = _METADATA_PATH.fullmatch(raw_path) if method == "GET" else None
        return None if found is None else MetadataWatch(self, found["series"], InstanceScanner(content_encoding))

    def learned(self, prefix: str, instances: list[Instance]) -> None:
        """The metadata of the series at `prefix` went to the client whole: these are its instances now."""
        if not instances:
            return
        known = self._series.get(prefix)
        changed = known is None or known.uids != [instance.uid for instance in instances]
        if changed:
            self._series[prefix] = Series(prefix, instances)
        for key, reading in list(self._readings.items()):
            if key[0] == prefix:
                if changed:
                    reading.stopped = True  # what it still has queued is dropped
                    self._readings.pop(key, None)
                else:  # the viewer opens the series again: every item may be wanted again
                    reading.asked.clear()
                    reading.window, reading.ahead = self._concurrency, -1
        logger.debug("read-ahead knows %d instances of a series", len(instances))

    # ---- answering from the buffer

    async def take(self, method: str, raw_path: str, headers: Headers, client: ClientOrigin) -> Buffered | None:
        """The buffered answer to this request, waiting for one on its way; None when the request must go to
        the service. Every request of a known series moves the read-ahead on. An answer taken must be given
        back to `served()` once written."""
        found = _ITEM_PATH.fullmatch(raw_path) if method == "GET" else None
        if found is None or not servable(headers):
            return None
        reading = self._reading(found, headers, client)
        if reading is None:
            return None
        frame = found["frame"]
        position = reading.series.position(found["instance"], None if frame is None else int(frame))
        if position is None:
            return None
        key = (raw_path, *reading.variant)
        reading.asked.add(position)
        self._advance(reading, position)
        if key not in self._buffer and key in self._in_flight:
            await asyncio.shield(self._in_flight[key])
        entry = self._buffer.pop(key, None)  # only the request that pops it gets it: each answer is served once
        if entry is not None:
            held = self._tokens.current
            identity = None if held is None else identity_of(held.value)
            if identity is None:  # no token held now: the client's request gets one, and the answer with it
                self.counts.wasted_bytes += entry.size
                entry = None
            elif entry.identity != identity:
                self.counts.wasted_bytes += entry.size
                self.clear("the token's identity changed")
                entry = None
        if entry is None:
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        self._serving_bytes += entry.size
        reading.window = min(self._most_window, 2 * reading.window)
        return entry

    def served(self, entry: Buffered) -> None:
        """An answer taken from the buffer has been written (or its client went away)."""
        self._serving_bytes -= entry.size

    def answered(self, method: str, status: int, retry_after: str | None) -> None:
        """What the service answered a request, the client's or read-ahead's own: a refusal or a change clears
        the buffer, a 403 (the identity may not read) and a 429 or 503 (too many requests) rest read-ahead."""
        if status in (401, 403):
            self.clear(f"the service refused a request ({status})")
            if status == 403:
                self.rest(REST_SECONDS)
        elif status in (429, 503):
            self.rest(retry_after_seconds(retry_after, REST_SECONDS))
        elif method in _CHANGES and 200 <= status < 300:
            self.clear(f"a {method} through the proxy may have changed the service's content")

    def clear(self, why: str) -> None:
        """Drop everything read ahead, and keep nothing of what is on its way: after a refusal, a new identity,
        or a change made through the proxy."""
        if self._buffer.currsize or self._in_flight:
            logger.info("read-ahead buffer cleared: %s", why)
        self.counts.wasted_bytes += int(self._buffer.currsize)
        self._buffer.clear()
        for reading in self._readings.values():
            reading.stopped = True
        self._readings.clear()
        self._queue.clear()
        self._generation += 1

    def rest(self, seconds: float) -> None:
        """Stop reading ahead for a while: the service asked for fewer requests (429, 503) or refuses (403)."""
        now = self._clock()
        if now >= self._resting_until:  # one line when it starts, not one per refused request
            logger.info("read-ahead rests for %.0fs: the service is busy or refuses", seconds)
        self._resting_until = max(self._resting_until, now + seconds)
        self._queue.clear()
        for reading in self._readings.values():
            reading.queued.clear()
            reading.ahead = -1

    async def close(self) -> None:
        for worker in list(self._workers):
            worker.cancel()
        for worker in list(self._workers):
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._buffer.clear()

    def _reading(self, found: re.Match[str], headers: Headers, client: ClientOrigin) -> Reading | None:
        prefix = found["series"]
        by_frame = found["frame"] is not None
        variant = answer_variant(headers)
        key = (prefix, by_frame, variant)
        reading = self._readings.get(key)
        if reading is not None:
            return reading
        series = self._series.get(prefix)
        if series is None:
            return None
        sent = forwardable(headers)
        sent.popall(REQUEST_ID_HEADER, None)  # the first request's own: the service would see it on every one
        reading = Reading(series, by_frame, sent, variant, client, window=self._concurrency)
        self._readings[key] = reading
        return reading

    # ---- reading ahead

    def _advance(self, reading: Reading, position: int) -> None:
        """Queue the items after `position`, in the direction the client is going, up to the window."""
        backwards = reading.last is not None and position < reading.last
        reading.last = position
        if reading.stopped or self._clock() < self._resting_until:
            return
        if backwards:
            following = range(position - 1, max(-1, position - reading.window - 1), -1)
        else:  # only what the window newly covers: a request costs no more than the items it adds
            end = min(reading.series.count(reading.by_frame), position + reading.window + 1)
            following = range(max(position, reading.ahead) + 1, end)
            reading.ahead = max(reading.ahead, end - 1)
        for index in following:
            if index not in reading.asked and index not in reading.queued and self._wanted(reading.key(index)):
                reading.queued.add(index)
                self._queue.append((reading, index))
        while self._queue and len(self._workers) < self._concurrency:
            worker = asyncio.get_running_loop().create_task(self._fetch_queued())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    def _wanted(self, key: AnswerKey) -> bool:
        """Whether an item is still to be fetched: not buffered, on its way, or refused a moment ago."""
        return key not in self._in_flight and key not in self._buffer and key not in self._refused

    async def _fetch_queued(self) -> None:
        while self._queue:
            reading, index = self._queue.popleft()
            reading.queued.discard(index)
            key = reading.key(index)
            if reading.stopped or index in reading.asked or not self._wanted(key):
                continue  # the client asked first, or another reading has it
            if self._clock() < self._resting_until or not self._has_room(reading):
                reading.ahead = min(reading.ahead, index - 1)  # not fetched: the client's next request may queue it
                continue
            try:
                await self._fetch_into_buffer(reading, key)
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, TimeoutError) as exc:  # the client's own request follows
                logger.debug("read-ahead fetch failed (%s)", type(exc).__name__)
            except Exception:  # noqa: BLE001 - a bug here must not end read-ahead, nor go unseen
                logger.exception("read-ahead fetch failed")

    def _has_room(self, reading: Reading) -> bool:
        """Room for one more answer like the largest so far; answers of other series, which the client has
        left, are dropped to make it."""
        self._buffer.expire()
        expected = reading.largest or self._last_answer_size  # a new reading: like the last answer read ahead
        needed = self.buffered + expected - self._capacity
        if needed > 0:
            mine = reading.series.prefix + "/"
            for key in [key for key in self._buffer.keys() if not key[0].startswith(mine)]:
                entry = self._buffer.pop(key)
                self.counts.wasted_bytes += entry.size
                needed -= entry.size
                if needed <= 0:
                    break
        return needed <= 0

    async def _fetch_into_buffer(self, reading: Reading, key: AnswerKey) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        generation = self._generation
        try:
            entry = await self._download(reading, key)
            if entry is not None and generation == self._generation:
                self._buffer[key] = entry
            elif entry is not None:  # cleared meanwhile: kept by nobody
                self.counts.wasted_bytes += entry.size
        finally:
            future.set_result(None)
            if self._in_flight.get(key) is future:
                del self._in_flight[key]

    async def _download(self, reading: Reading, key: AnswerKey) -> Buffered | None:
        try:
            token = await self._tokens.get()
        except TokenUnavailable:
            return None  # the client's own request gets the proxy's 503, which says why
        client = reading.client
        headers = upstream_request_headers(
            reading.headers, token=token, client_address=client.address, client_scheme=client.scheme,
            client_host=client.host,
        )  # fmt: skip
        url = upstream_url(self._origin, self._base_path, key[0])
        self.counts.requests += 1
        async with self._session.get(url, headers=headers, allow_redirects=False, proxy=self._proxy) as response:
            if response.status != 200:
                self._refused_by_service(response, key)
            if not self._keepable(response, reading):
                await discard(response)
                return None
            pieces: list[bytes] = []
            size = 0
            try:
                async for chunk in response.content.iter_any():
                    size += len(chunk)
                    self._reading_bytes += len(chunk)
                    self.counts.fetched_bytes += len(chunk)
                    if self.buffered > self._capacity or size > self._answer_limit:
                        reading.stopped = size > self._answer_limit
                        self.counts.wasted_bytes += size
                        response.close()
                        return None
                    pieces.append(chunk)
            finally:
                self._reading_bytes -= size
            reading.largest = max(reading.largest, size)
            self._last_answer_size = size
            return Buffered(response.status, response.reason, response.headers, pieces, size, identity_of(token))

    def _refused_by_service(self, response: aiohttp.ClientResponse, key: AnswerKey) -> None:
        """A refusal of an item is remembered for a while; one of the token or of the load acts on all."""
        if response.status not in (401, 403, 429, 503):
            self._refused[key] = response.status
        self.answered("GET", response.status, response.headers.get("Retry-After"))

    def _keepable(self, response: aiohttp.ClientResponse, reading: Reading) -> bool:
        """Only a 200 of a kind that goes out as it came (no link to rewrite), small enough, is kept; an
        answer too large stops the reading, whose next ones would be as large."""
        if response.status != 200 or body_kind(response.headers.get("Content-Type")) is not None:
            return False
        if response.content_length is not None and response.content_length > self._answer_limit:
            reading.stopped = True
            return False
        return True

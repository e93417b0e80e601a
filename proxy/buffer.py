"""The read-ahead buffer: answers fetched ahead of a client, held until served, bounded in bytes and time.

What an answer depends on besides its path is its key (Accept and Accept-Encoding, every value of each);
a request that asks past caches, for part of an answer or for the service's judgement is never answered
from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache
from multidict import CIMultiDictProxy

from .headers import Headers

# A buffered answer not asked for within this long is dropped (and counted as wasted).
BUFFER_SECONDS = 30.0
# A request with any of these asks for something other than the whole answer, or the service's judgement.
_NOT_FROM_BUFFER = ("Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")

Key = tuple[str, str, str]  # path, Accept, Accept-Encoding


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


class Buffer(TTLCache[Key, Buffered]):
    """The answers read ahead, bounded in bytes and time; whatever leaves it unserved counts as wasted."""

    def __init__(self, capacity: int, counts: Counts, timer: Callable[[], float]) -> None:
        super().__init__(maxsize=max(capacity, 1), ttl=BUFFER_SECONDS, timer=timer, getsizeof=lambda entry: entry.size)
        self._counts = counts

    def expire(self, time: Any = None) -> list[tuple[Key, Buffered]]:
        expired: list[tuple[Key, Buffered]] = super().expire(time)
        self._counts.wasted_bytes += sum(entry.size for _, entry in expired)
        return expired

    def popitem(self) -> tuple[Key, Buffered]:
        key, entry = super().popitem()
        self._counts.wasted_bytes += entry.size
        return key, entry


def answer_key(raw_path: str, headers: Headers) -> Key:
    """What an answer depends on besides the path; every value of a repeated header, in order."""
    return raw_path, ",".join(headers.getall("Accept", ())), ",".join(headers.getall("Accept-Encoding", ()))


def servable(headers: Headers) -> bool:
    """Whether a request may be answered from the buffer: a whole answer, asked for without conditions."""
    return not any(name in headers for name in _NOT_FROM_BUFFER) and not _wants_it_fresh(headers)


def _wants_it_fresh(headers: Headers) -> bool:
    """A client that asks past caches (a reload) gets the service's answer, not one fetched before."""
    asked = (",".join(headers.getall("Cache-Control", ())) + "," + ",".join(headers.getall("Pragma", ()))).lower()
    return "no-cache" in asked or "no-store" in asked or "max-age=0" in asked

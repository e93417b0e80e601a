"""The read-ahead buffer: answers fetched ahead of a client, held until served, bounded in bytes and time.

What an answer depends on besides its path is its key (Accept and Accept-Encoding, every value of each);
a request that asks past caches, for part of an answer or for the service's judgement is never answered
from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import TTLCache
from multidict import CIMultiDictProxy

from .headers import Headers

# A buffered answer not asked for within this long is dropped (and counted as wasted).
BUFFER_SECONDS = 30.0
# A request with any of these asks for something other than the whole answer, or the service's judgement.
_NOT_FROM_BUFFER = ("Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since", "If-Range")

AnswerKey = tuple[str, str, str]  # path, Accept, Accept-Encoding


@dataclass(frozen=True)
class Buffered:
    """One answer read ahead: what the service sent, and for which identity."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    # As it came, piece by piece: joining would copy it. The one request that serves it empties the list as
    # it writes, letting go of each piece once written.
    pieces: list[bytes]
    size: int
    identity: tuple[str, str]


def _counter(help_text: str) -> int:
    return field(default=0, metadata={"help": help_text})


@dataclass
class Counts:
    """What read-ahead did: each is dicom_proxy_read_ahead_<name>_total in /-/metrics, with its help."""

    hits: int = _counter("Client requests answered from read-ahead")
    misses: int = _counter("Client requests for a frame of a series being read ahead that went to the service")
    fetched_bytes: int = _counter("Body bytes read ahead from the service")
    wasted_bytes: int = _counter("Bytes read ahead and dropped unserved (expired, cleared, or cut off at the cap)")
    requests: int = _counter("Requests read-ahead sent to the service")


class Buffer(TTLCache[AnswerKey, Buffered]):
    """The answers read ahead, bounded in bytes and time; whatever leaves it unserved counts as wasted."""

    def __init__(self, capacity: int, counts: Counts, timer: Callable[[], float]) -> None:
        super().__init__(maxsize=max(capacity, 1), ttl=BUFFER_SECONDS, timer=timer, getsizeof=lambda entry: entry.size)
        self._counts = counts

    def expire(self, time: float | None = None) -> list[tuple[AnswerKey, Buffered]]:
        expired: list[tuple[AnswerKey, Buffered]] = super().expire(time)
        self._counts.wasted_bytes += sum(entry.size for _, entry in expired)
        return expired

    def popitem(self) -> tuple[AnswerKey, Buffered]:
        key, entry = super().popitem()
        self._counts.wasted_bytes += entry.size
        return key, entry


def answer_variant(headers: Headers) -> tuple[str, str]:
    """What an answer depends on besides the path: Accept and Accept-Encoding, every value of each, in order."""
    return ",".join(headers.getall("Accept", ())), ",".join(headers.getall("Accept-Encoding", ()))


def servable(headers: Headers) -> bool:
    """Whether a request may be answered from the buffer: a whole answer, asked for without conditions."""
    return not any(name in headers for name in _NOT_FROM_BUFFER) and not _wants_it_fresh(headers)


def _wants_it_fresh(headers: Headers) -> bool:
    """A client that asks past caches (a reload) gets the service's answer, not one fetched before."""
    asked = (",".join(headers.getall("Cache-Control", ())) + "," + ",".join(headers.getall("Pragma", ()))).lower()
    return "no-cache" in asked or "no-store" in asked or "max-age=0" in asked

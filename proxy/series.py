"""What read-ahead knows of a series (its instances and their frames, learned from the series' metadata) and
of a client's reading of it.

The metadata (DICOM JSON, tens of MiB for a large series) is scanned as it streams to the client, without
parsing it whole, up to MOST_SCANNED bytes; a compressed one is inflated for the scan.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from .headers import Headers
from .inflate import DecodeError, Inflater, inflater_for

# In DICOM JSON each instance's attributes come in tag order: its SOP Instance UID (00080018), then its
# Instance Number (00200013), then its Number of Frames (00280008).
_ATTRIBUTES = ((b'"00080018"', "uid"), (b'"00200013"', "number"), (b'"00280008"', "frames"))
_VALUE = re.compile(rb'\s{0,64}:\s{0,64}\{[^{}]{0,240}?"Value"\s{0,64}:\s{0,64}\[\s{0,64}"?([0-9][0-9.]{0,63})["\s,\]]')
# Longer than any attribute the pattern above matches, so one cut by a piece's end is found whole later.
_OVERLAP = 1024
# The most instances learned of one series, and frames of one instance; metadata scanned, inflated.
MOST_INSTANCES = 20_000
MOST_FRAMES = 100_000
MOST_SCANNED = 64 * 1024 * 1024


@dataclass
class Instance:
    uid: str
    number: int | None = None
    frames: int = 1


class InstanceScanner:
    """Finds the instances in series metadata as it goes by; `finish()` gives them in viewing order."""

    def __init__(self, content_encoding: str | None = None) -> None:
        self._rest = b""
        self._scanned = 0
        encoding = (content_encoding or "identity").strip().lower()
        self._inflater: Inflater | None = inflater_for(encoding)
        self._given_up = encoding != "identity" and self._inflater is None  # br, zstd: nothing to read
        self.instances: list[Instance] = []

    def feed(self, chunk: bytes) -> None:
        if self._given_up:
            return
        if self._inflater is None:
            self._scan(chunk)
            return
        try:
            for piece in self._inflater.feed(chunk):
                self._scan(piece)
                if self._given_up:
                    return
        except DecodeError:
            self._given_up = True

    def finish(self) -> list[Instance]:
        """The instances in the order a viewer shows them (by Instance Number where every one has one);
        none when the metadata could not be read to its end."""
        if self._given_up:
            return []
        self._scan(b"", final=True)
        unique = list({instance.uid: instance for instance in self.instances}.values())
        if unique and all(instance.number is not None for instance in unique):
            unique.sort(key=lambda instance: instance.number or 0)
        return unique

    def _scan(self, chunk: bytes, *, final: bool = False) -> None:
        self._scanned += len(chunk)
        if self._scanned > MOST_SCANNED:
            self._given_up = True
            return
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
                self.instances[-1].frames = max(1, min(int(value), MOST_FRAMES))


class Series:
    """A series' items in viewing order, instance by instance and, for frames, frame by frame; positions and
    paths are worked out when asked, so a series of many multi-frame instances costs one list."""

    def __init__(self, prefix: str, instances: list[Instance]) -> None:
        self.prefix = prefix  # the path up to and with the series UID, as the client wrote it
        self.uids = [instance.uid for instance in instances]
        self._index_of = {uid: index for index, uid in enumerate(self.uids)}
        # Where each instance's frames start among all the series' frames.
        self._starts = list(itertools.accumulate((instance.frames for instance in instances), initial=0))

    def count(self, by_frame: bool) -> int:
        return self._starts[-1] if by_frame else len(self.uids)

    def position(self, uid: str, frame: int | None) -> int | None:
        """Where instance `uid` (or its frame `frame`, counted from 1) stands; None when it is not one of them."""
        index = self._index_of.get(uid)
        if index is None:
            return None
        if frame is None:
            return index
        start = self._starts[index]
        return start + frame - 1 if frame <= self._starts[index + 1] - start else None

    def path(self, position: int, by_frame: bool) -> str:
        if not by_frame:
            return f"{self.prefix}/instances/{self.uids[position]}"
        index = bisect.bisect_right(self._starts, position) - 1
        return f"{self.prefix}/instances/{self.uids[index]}/frames/{position - self._starts[index] + 1}"


class ClientOrigin(NamedTuple):
    """Where a request came from, for the X-Forwarded-* of the requests read-ahead sends in its name."""

    address: str | None
    scheme: str
    host: str


@dataclass(eq=False)
class Reading:
    """A client's reading of one series in one form (frame by frame or instance by instance, with its Accept)."""

    series: Series
    by_frame: bool  # .../frames/n rather than whole instances
    headers: Headers = field(repr=False)  # the first request's, secrets removed: sent again with other paths
    variant: tuple[str, str]  # its Accept and Accept-Encoding, which every answer of this reading depends on
    client: ClientOrigin
    window: int  # how many items after the client's last one are read ahead
    last: int | None = None
    ahead: int = -1  # the furthest item already considered going forwards
    asked: set[int] = field(default_factory=set)  # asked for by the client since the metadata went by
    queued: set[int] = field(default_factory=set)
    largest: int = 0  # the largest answer read ahead so far: room is kept for one more like it
    stopped: bool = False  # left to the client: an answer too large to buffer, or a series that changed

    def key(self, position: int) -> tuple[str, str, str]:
        """The buffer's key for the item at `position`: its path and this reading's variant."""
        return (self.series.path(position, self.by_frame), *self.variant)

"""Undoing gzip and deflate Content-Encoding as a body streams, in bounded pieces.

The rewriter needs identity bytes; a small compressed answer can inflate to any size, so output is
bounded per piece and a caller that stops reading stops the inflating.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

PIECE_SIZE = 256 * 1024

_GZIP_WINDOW = 16 + zlib.MAX_WBITS
_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


class DecodeError(ValueError):
    """A body is not in the Content-Encoding it claims, or ends before its compressed stream does."""


class Inflater:
    """Undoes gzip or deflate Content-Encoding as a body streams, in pieces of at most `piece_size` bytes.

    Output is bounded per piece, not per chunk: a small chunk of a compression bomb becomes many pieces,
    never one huge one, and a caller that stops reading stops the inflating.
    """

    def __init__(self, encoding: str, *, piece_size: int = PIECE_SIZE) -> None:
        if encoding not in _INFLATABLE:
            raise ValueError(f"cannot undo Content-Encoding {encoding!r}")
        self._encoding = encoding
        self._piece_size = piece_size
        self._inflater = zlib.decompressobj(_GZIP_WINDOW)
        # "deflate" means the zlib format, but servers often send a raw deflate stream instead (RFC 9110
        # 8.4.1.2); its first two bytes tell which, so they wait until both have come.
        self._head: bytes | None = b"" if encoding == "deflate" else None
        self._started = False

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The inflated pieces of `chunk`; iterate to the end before the next feed. Raises DecodeError."""
        self._started = self._started or bool(chunk)
        if self._head is not None:
            chunk = self._head + chunk
            if len(chunk) < 2:
                self._head = chunk
                return
            self._head = None
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if _is_zlib_header(chunk) else -zlib.MAX_WBITS)
        while True:
            if self._inflater.eof and chunk:
                if self._encoding == "deflate":
                    raise DecodeError("the body goes on after its deflate stream has ended")
                self._inflater = zlib.decompressobj(_GZIP_WINDOW)  # a gzip body may hold several members
            try:
                piece = self._inflater.decompress(chunk, self._piece_size)
            except zlib.error as exc:
                raise DecodeError(f"the body is not valid {self._encoding}: {exc}") from exc
            if piece:
                yield piece
            if self._inflater.eof:
                chunk = self._inflater.unused_data
                if not chunk:
                    return
            else:
                chunk = self._inflater.unconsumed_tail
                # A full piece may mean zlib holds more output for input it has already taken.
                if not chunk and len(piece) < self._piece_size:
                    return

    def finish(self) -> None:
        """Check that the body did not end inside the compressed stream. Raises DecodeError."""
        if self._started and not self._inflater.eof:
            raise DecodeError(f"the body ends before its {self._encoding} stream does")


def inflatable(content_encoding: str | None) -> bool:
    """Whether a body in this Content-Encoding can be inflated here (gzip or deflate)."""
    return (content_encoding or "").strip().lower() in _INFLATABLE


def inflater_for(content_encoding: str | None, *, piece_size: int = PIECE_SIZE) -> Inflater | None:
    """An Inflater for a gzip or deflate body; None for any other encoding, identity included."""
    if not inflatable(content_encoding):
        return None
    return Inflater((content_encoding or "").strip().lower(), piece_size=piece_size)


def _is_zlib_header(head: bytes) -> bool:
    # RFC 1950 2.2: method 8 (deflate) with a window of at most 32 KiB, and the two bytes a multiple of 31.
    return head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0

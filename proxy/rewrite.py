"""Upstream base URL -> local base URL, so that a client following the service's links stays on the proxy.

The DICOM service writes absolute URLs of itself into Location/Content-Location, STOW-RS RetrieveURLs,
operation references and extended query tag links. Only values that start with the exact upstream base
(followed by a path, query, fragment or nothing) are rewritten: another host's URL, such as a blob storage
errorHref, is data and stays as it is, and so is a URL in the middle of a longer text.

JSON and XML bodies are rewritten as they stream (`BodyRewriter`), byte for byte: nothing is parsed or
re-serialised, so numbers, spacing and key order stay exactly as the service wrote them. gzip and deflate
are undone on the way (`inflate.Inflater`); other bodies stream untouched.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from itertools import islice, repeat
from typing import Literal
from urllib.parse import unquote

from multidict import CIMultiDict
from yarl import URL

from .errors import RequestRefused
from .inflate import DecodeError as DecodeError  # re-exported: the forwarder catches it from a transform
from .inflate import inflater_for

BodyKind = Literal["json", "xml"]

URL_HEADERS = ("Location", "Content-Location")
_JSON_TYPES = frozenset({"application/json", "application/dicom+json"})
_XML_TYPES = frozenset({"application/dicom+xml", "application/xml", "text/xml"})
_VERSION_SEGMENT = re.compile(r"/v\d+(\.\d+)?$")
_PLAIN_MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")
_STARTS_WITH_VERSION = re.compile(r"^/v\d+(\.\d+)?(/|$|\?)")

# Pretty-printed XML may put a line break and indentation between a tag and its URL. More than this is not
# indentation, and the bound keeps what a rewriter holds back between chunks small.
MAX_XML_INDENT = 1024

# Characters that end a URL in a body. An upstream base containing one could not be told apart from its
# surroundings (and RFC 3986 allows none of them but "'", which no service base uses).
_NOT_IN_BASE = re.compile(rb"[\s\"'<>\\]")


@dataclass(frozen=True)
class BaseMapping:
    """The upstream prefix a request's answers use, and the local prefix the client used instead."""

    upstream: str
    local: str

    def rewrite_url(self, value: str) -> str:
        if not value.startswith(self.upstream):
            return value
        rest = value[len(self.upstream) :]
        if rest and rest[0] not in "/?#":
            return value  # https://host/v2x is not under https://host/v2
        return self.local + rest


@functools.lru_cache(maxsize=16)
def split_version(base_path: str) -> tuple[str, bool]:
    """The base path without a trailing API version segment, and whether it had one."""
    match = _VERSION_SEGMENT.search(base_path)
    return (base_path[: match.start()], True) if match else (base_path, False)


_SEGMENT_SEPARATORS = re.compile(r"[/\\]")


def upstream_url(origin: str, base_path: str, raw_target: str) -> URL:
    """The upstream URL for a raw origin-form target, byte for byte, never above the base path (for the
    forwarder, and for read-ahead's requests made in a client's name)."""
    # Decoded twice (%252e), with ';' parameters and NULs cut off (..;/ and ..%00 climb on some servers).
    path = unquote(unquote(raw_target.split("?", 1)[0]))
    # Only a segment that starts with a dot can be one; DICOM UIDs are full of dots, but never there.
    if path.startswith(".") or "/." in path or "\\." in path:
        segments = _SEGMENT_SEPARATORS.split(path)
        if any(segment.split(";", 1)[0].split("\x00", 1)[0] in (".", "..") for segment in segments):
            raise RequestRefused("the path contains '.' or '..' segments, which could climb above the base path")
    return URL(origin + upstream_path(base_path, raw_target), encoded=True)


def upstream_path(base_path: str, raw_target: str) -> str:
    """Join a local target onto the base; a target naming its own version replaces the base's version.

    So with an upstream of https://ws.../v2, both /studies and /v2/studies (and /v1/...) work.
    """
    root, versioned = split_version(base_path)
    if versioned and _STARTS_WITH_VERSION.match(raw_target):
        return root + raw_target
    return base_path + raw_target


# functools' cache rather than cachetools': a pure function of three strings, asked once per request, where
# the C implementation costs a tenth as much.
@functools.lru_cache(maxsize=64)
def mapping_for(upstream_origin: str, base_path: str, local_origin: str) -> BaseMapping:
    """The rewrite for a request: the upstream root (base without version) maps onto the local root.

    Every upstream URL under the root maps back through `upstream_path()` to the same place.
    """
    root, _ = split_version(base_path)
    return BaseMapping(upstream_origin + root, local_origin)


def rewrite_headers(headers: CIMultiDict[str], mapping: BaseMapping) -> None:
    for name in URL_HEADERS:
        if name in headers:
            headers[name] = mapping.rewrite_url(headers[name])


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """A media type's `type/subtype` in lower case and its parameters (names in lower case, values unquoted)."""
    message = Message()
    message["Content-Type"] = value
    return message.get_content_type(), dict(message.get_params(failobj=[])[1:])


def body_kind(content_type: str | None) -> BodyKind | None:
    """'json' or 'xml' when a body of this type may carry service URLs, else None (stream it)."""
    if not content_type:
        return None
    lowered = content_type.lower()
    if "json" not in lowered and "xml" not in lowered:
        return None  # multipart and binary answers, without parsing their parameters
    return _json_or_xml(lowered)


@functools.lru_cache(maxsize=64)
def _json_or_xml(content_type: str) -> BodyKind | None:
    """body_kind's parsing, done once per distinct Content-Type: the service sends a handful."""
    essence, _ = _media_type(content_type)
    if essence in _JSON_TYPES or essence.endswith("+json"):
        return "json"
    if essence in _XML_TYPES or essence.endswith("+xml"):
        return "xml"
    return None


def with_multipart_type(content_type: str | None, accept: str | None) -> str | None:
    """Add the `type=` that the client asked for to a multipart/related answer that lacks one.

    The service answers WADO-RS with a bare `multipart/related; boundary=...`, which some viewers refuse.
    Only done when the Accept header named exactly one multipart/related type, so nothing is guessed.
    """
    if not content_type or not accept or "multipart" not in content_type.lower():
        return None  # as nearly every answer goes, without parsing its type
    essence, parameters = _media_type(content_type)
    if essence != "multipart/related" or "type" in parameters:
        return None
    wanted = {
        parameters["type"]
        for essence, parameters in map(_media_type, accept.split(","))
        if essence == "multipart/related" and "type" in parameters
    }
    if len(wanted) != 1:
        return None
    wanted_type = wanted.pop()
    # Only a plain media type is copied into the answer's header: never quotes or RFC 2231 forms.
    plain = isinstance(wanted_type, str) and _PLAIN_MEDIA_TYPE.match(wanted_type)
    return f'{content_type}; type="{wanted_type}"' if plain else None


# Streaming body rewriting ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One way the upstream base is written in a body: where it is a link, and what it becomes."""

    needle: bytes  # in every link: a text without it needs no regex at all
    pattern: re.Pattern[bytes]  # a link, with what must come before and after it
    replacement: bytes | Callable[[re.Match[bytes]], bytes]
    # The usual link, as plain bytes: `before`, the needle, `after` (a slash). When every needle in a text
    # is framed so, splitting on the needle and joining with `plain_replacement` rewrites them all, far
    # faster than a pattern with lookarounds.
    before: bytes = b""
    after: bytes = b""
    plain_replacement: bytes = b""

    def found_in(self, text: bytes) -> bool:
        # memchr rules out a needle with a backslash (JSON's escaped form) far faster than a search for it.
        return (b"\\" not in self.needle or b"\\" in text) and self.needle in text

    def quick(self, text: bytes, previous: bytes) -> bytes | None:
        """The text rewritten when every occurrence of the needle is the usual link; else None. `previous` is
        the byte just before `text`."""
        if not self.after or previous == b"\\" or (b"\\" in text and b"\\" + self.needle in text):
            return None  # a backslash escapes the needle's quote: the URL is inside a longer string
        parts = text.split(self.needle)
        # Checked in C, part by part: every needle is followed (and preceded) as the usual link is.
        if not all(map(bytes.startswith, islice(parts, 1, None), repeat(self.after))):
            return None
        if self.before and not all(map(bytes.endswith, islice(parts, len(parts) - 1), repeat(self.before))):
            return None
        return self.plain_replacement.join(parts)


def _literal(replacement: bytes) -> bytes:
    """A replacement for `re.sub` that is taken as it is: no group references, so `sub` stays in C."""
    return replacement.replace(b"\\", b"\\\\")


def _json_rule(upstream: bytes, local: bytes, slash: bytes) -> _Rule:
    # A link is a whole string value: '"' before it; a path, query, fragment or the string's end after it.
    # A backslash before that quote escapes it, so the URL is inside a longer string: data. That lookbehind
    # comes after the literal prefix, which keeps the regex search fast.
    needle, replacement = b'"' + upstream, b'"' + local
    after = rb"(?=" + re.escape(slash) + rb'|[?#"])'
    pattern = re.compile(re.escape(needle) + after + rb"(?<!\\" + re.escape(needle) + rb")")
    return _Rule(needle, pattern, _literal(replacement), after=slash, plain_replacement=replacement)


def _xml_rule(upstream: bytes, local: bytes) -> _Rule:
    # A link is a whole text node or attribute value: '>' or a quote before it, perhaps indentation too.
    start = rb"([>\"'][ \t\r\n]{0,%d})" % MAX_XML_INDENT
    pattern = re.compile(start + re.escape(upstream) + rb"(?=[/?#<\"' \t\r\n])")

    def replacement(match: re.Match[bytes]) -> bytes:
        return match.group(1) + local

    # <Value number="1">https://...</Value>
    return _Rule(upstream, pattern, replacement, before=b">", after=b"/", plain_replacement=local)


def _prefixes(text: bytes) -> bytes:
    """A regex matching any beginning of `text`, the empty one included."""
    pattern = b""
    for index in reversed(range(len(text))):
        pattern = b"(?:" + re.escape(text[index : index + 1]) + pattern + b")?"
    return pattern


_Plan = tuple[tuple["_Rule", ...], re.Pattern[bytes], int]


@functools.lru_cache(maxsize=64)
def _plan(kind: BodyKind, mapping: BaseMapping) -> _Plan:
    """The compiled rules for one base and kind, built once: building them cost more than a small answer."""
    upstream, local = mapping.upstream.encode(), mapping.local.encode()
    if not upstream or _NOT_IN_BASE.search(upstream):
        raise ValueError(f"cannot find {mapping.upstream!r} in bodies: not a plain URL")
    if kind == "json":
        # JSON may escape '/' as '\/'; such a base becomes a local base escaped the same way.
        escaped = upstream.replace(b"/", b"\\/")
        rules: tuple[_Rule, ...] = (
            _json_rule(upstream, local, b"/"),
            _json_rule(escaped, local.replace(b"/", b"\\/"), b"\\/"),
        )
        undecided = b'"(?:' + _prefixes(upstream) + b"|" + _prefixes(escaped + b"\\") + b")"
        window = len(escaped) + 2
    else:
        rules = (_xml_rule(upstream, local),)
        undecided = rb"[>\"'][ \t\r\n]{0,%d}" % MAX_XML_INDENT + _prefixes(upstream)
        window = 1 + MAX_XML_INDENT + len(upstream)
    # The start of a link that the bytes so far cannot confirm or rule out.
    return rules, re.compile(undecided + rb"\Z"), window


class BodyRewriter:
    """Rewrites the upstream base into the local base in a JSON or XML body as it streams.

    Bytes in, bytes out, identical except for the replaced bases, in memory that does not grow with the body.
    A link split across chunks is still found: the few bytes at a chunk's end that may begin one (a quote
    and part of the base; in XML, a '>' or quote, indentation and part of the base) are held back until
    the next chunk decides them. The body must be identity-encoded (see `Inflater`).
    """

    def __init__(self, kind: BodyKind, mapping: BaseMapping) -> None:
        self._rules, self._undecided, self._window = _plan(kind, mapping)
        self._held = b""
        self._last = b""  # the last byte handed out, which a rule may look back at
        self.changed = False  # whether a link has been rewritten so far

    @property
    def pending(self) -> int:
        """How many of the bytes fed so far are held back until the next chunk decides them."""
        return len(self._held)

    def feed(self, chunk: bytes) -> bytes:
        """The rewritten bytes that are ready now: all those fed, but the end that may start a link."""
        data = self._held + chunk if self._held else chunk
        undecided = self._undecided.search(data, max(0, len(data) - self._window))
        ready = undecided.start() if undecided else len(data)
        self._held = data[ready:]
        return self._rewrite(data, ready)

    def may_change(self, text: bytes) -> bool:
        """Whether `text` holds a needle of any rule: a text without one passes through unchanged."""
        for rule in self._rules:
            if rule.found_in(text):
                return True
        return False

    def finish(self) -> bytes:
        """The rest, at the end of the body: whatever was held back, rewritten if it was a whole link."""
        data, self._held = self._held, b""
        return self._rewrite(data, len(data))

    def _rewrite(self, data: bytes, ready: int) -> bytes:
        """`data[:ready]`, rewritten."""
        text = data[:ready]
        before, self._last = self._last, text[-1:] or self._last
        rules = [rule for rule in self._rules if rule.found_in(text)]
        if not rules:
            return text
        if len(rules) == 1 and (quick := rules[0].quick(text, before)) is not None:
            rewritten = quick
        else:
            # Patterns look one byte beyond a link on either side. Neither of those bytes can be part of a
            # link: the one before was not held back, the one after starts what is.
            after = data[ready : ready + 1]
            framed = before + text + after
            for rule in rules:
                framed = rule.pattern.sub(rule.replacement, framed)
            rewritten = framed[len(before) : len(framed) - len(after)]
        self.changed = self.changed or rewritten != text
        return rewritten


class BodyTransform:
    """What a JSON or XML answer goes through on its way to the client: inflated if encoded, then rewritten."""

    def __init__(self, kind: BodyKind, mapping: BaseMapping, encoding: str | None = None) -> None:
        self.plain_size = 0  # identity bytes fed to the rewriter so far
        self._rewriter = BodyRewriter(kind, mapping)
        self._inflater = inflater_for(encoding)

    @property
    def changed(self) -> bool:
        """Whether a link has been rewritten so far."""
        return self._rewriter.changed

    @property
    def inflates(self) -> bool:
        """Whether the output is identity-encoded bytes of an encoded input."""
        return self._inflater is not None

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Output pieces for `chunk`, each bounded (a small gzip chunk may inflate to a great deal)."""
        if self._inflater is None:
            self.plain_size += len(chunk)
            yield self._rewriter.feed(chunk)
            return
        for piece in self._inflater.feed(chunk):
            self.plain_size += len(piece)
            yield self._rewriter.feed(piece)

    def finish(self) -> bytes:
        """The held-back end; raises DecodeError if an encoded body stopped mid-stream."""
        if self._inflater is not None:
            self._inflater.finish()
        return self._rewriter.finish()

    def whole(self, body: bytes) -> bytes | None:
        """A whole identity body rewritten at once, or None when no link in it changed."""
        assert self._inflater is None, "an encoded body may inflate to any size: stream it"
        if not self._rewriter.may_change(body):
            return None  # most answers hold no link: no pass over them at all
        rewritten = self._rewriter.feed(body) + self._rewriter.finish()
        return rewritten if self._rewriter.changed else None

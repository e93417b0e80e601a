"""Upstream base URL -> local base URL, so that a client following the service's links stays on the proxy.

The DICOM service writes absolute URLs of itself into Location/Content-Location, STOW-RS RetrieveURLs,
operation references and extended query tag links. Only values that start with the exact upstream base
(followed by a path, query or nothing) are rewritten: another host's URL, such as a blob storage
errorHref, is data and stays as it is. Bodies are rewritten only when they are JSON or XML and small
enough to hold; everything else streams untouched.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp.helpers import parse_mimetype
from multidict import CIMultiDict

URL_HEADERS = ("Location", "Content-Location")
_JSON_TYPES = frozenset({"application/json", "application/dicom+json"})
_XML_TYPES = frozenset({"application/dicom+xml", "application/xml", "text/xml"})
_VERSION_SEGMENT = re.compile(r"/v\d+(\.\d+)?$")
_STARTS_WITH_VERSION = re.compile(r"^/v\d+(\.\d+)?(/|$|\?)")


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


def split_version(base_path: str) -> tuple[str, bool]:
    """The base path without a trailing API version segment, and whether it had one."""
    match = _VERSION_SEGMENT.search(base_path)
    return (base_path[: match.start()], True) if match else (base_path, False)


def upstream_path(base_path: str, raw_target: str) -> str:
    """Join a local target onto the base; a target naming its own version replaces the base's version.

    So with an upstream of https://ws.../v2, both /studies and /v2/studies (and /v1/...) work.
    """
    root, versioned = split_version(base_path)
    if versioned and _STARTS_WITH_VERSION.match(raw_target):
        return root + raw_target
    return base_path + raw_target


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


def body_kind(content_type: str | None) -> str | None:
    """'json' or 'xml' when a body of this type may carry service URLs, else None (stream it)."""
    if not content_type:
        return None
    mime = parse_mimetype(content_type)
    essence = f"{mime.type}/{mime.subtype}".lower()
    if essence in _JSON_TYPES or mime.suffix == "json":
        return "json"
    if essence in _XML_TYPES or mime.suffix == "xml":
        return "xml"
    return None


# zlib window settings per Content-Encoding; "deflate" is often sent raw, without its zlib wrapper
# (RFC 9110 8.4.1.2 notes the confusion), so both are tried.
_WINDOWS = {
    "gzip": (16 + zlib.MAX_WBITS,),
    "x-gzip": (16 + zlib.MAX_WBITS,),
    "deflate": (zlib.MAX_WBITS, -zlib.MAX_WBITS),
}


def decode(body: bytes, content_encoding: str | None, limit: int) -> bytes | None:
    """The identity bytes of a body, or None when its encoding is unknown or it inflates past `limit`."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    for window in _WINDOWS.get(encoding, ()):
        inflater = zlib.decompressobj(window)
        try:
            plain = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        return None if len(plain) > limit or inflater.unconsumed_tail else plain
    return None


def rewrite_body(body: bytes, kind: str, mapping: BaseMapping) -> bytes | None:
    """The rewritten body, or None when nothing in it changed (or it is not what it claims to be)."""
    if mapping.upstream.encode() not in body and mapping.upstream.replace("/", "\\/").encode() not in body:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if kind == "json":
        try:
            document = json.loads(text)
        except ValueError:
            return None
        changed = _rewrite_json(document, mapping)
        if changed == document:
            return None
        return json.dumps(changed, ensure_ascii=False, separators=(",", ":")).encode()
    # In XML a URL is a whole text node or attribute value: it follows '>' or a quote.
    pattern = re.compile(r"(?<=[>\"'])(\s*)" + re.escape(mapping.upstream) + r"(?=[/?#<\"'\s])")
    rewritten = pattern.sub(lambda match: match.group(1) + mapping.local, text)
    return rewritten.encode() if rewritten != text else None


def _rewrite_json(node: Any, mapping: BaseMapping) -> Any:
    if isinstance(node, str):
        return mapping.rewrite_url(node)
    if isinstance(node, list):
        return [_rewrite_json(item, mapping) for item in node]
    if isinstance(node, dict):
        return {key: _rewrite_json(value, mapping) for key, value in node.items()}
    return node


def with_multipart_type(content_type: str | None, accept: str | None) -> str | None:
    """Add the `type=` that the client asked for to a multipart/related answer that lacks one.

    The service answers WADO-RS with a bare `multipart/related; boundary=...`, which some viewers refuse.
    Only done when the Accept header named exactly one multipart/related type, so nothing is guessed.
    """
    if not content_type or not accept:
        return None
    answer = parse_mimetype(content_type)
    if (answer.type, answer.subtype) != ("multipart", "related") or "type" in answer.parameters:
        return None
    wanted = {
        mime.parameters["type"]
        for mime in (parse_mimetype(part) for part in accept.split(","))
        if (mime.type, mime.subtype) == ("multipart", "related") and "type" in mime.parameters
    }
    if len(wanted) != 1:
        return None
    return f'{content_type}; type="{wanted.pop()}"'

"""How one answer goes out, decided once from the request and the answer's head: a decision is a value.

The forwarder computes an `AnswerPlan` before it reads a byte of the body (whole or streamed, rewritten or
not, inflated or not; HEAD, 204, 304 and 206 included), and its two writers (a small answer in one write, a
larger or unsized one streamed) follow it. Each rule about what the answer's headers become is stated here
once, in `AnswerPlan.headers`.
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDict

from .headers import Headers
from .inflate import inflatable
from .rewrite import BaseMapping, BodyKind, BodyTransform, body_kind

# Answers of a known length up to this size are read whole and sent in one write (rewritten, if need be,
# with their exact Content-Length); larger or unsized ones stream.
WHOLE_ANSWER_LIMIT = 1024 * 1024
# Headers that no longer describe a body once it has been rewritten.
_STALE_AFTER_REWRITE = ("Content-Length", "Content-MD5")


@dataclass(frozen=True)
class AnswerPlan:
    """What happens to one answer on its way to the client."""

    has_body: bool  # False for a HEAD, a 204 and a 304
    whole: bool  # a body of known length up to WHOLE_ANSWER_LIMIT: read whole, then sent in one write
    kind: BodyKind | None = None  # the body is rewritten as JSON or XML; None: it goes as it came
    encoding: str | None = None  # the Content-Encoding undone before the rewrite (gzip, deflate); None: identity
    mapping: BaseMapping | None = None
    unsized: bool = False  # a HEAD whose GET would be rewritten: it promises no length

    def transform(self) -> BodyTransform | None:
        """A fresh transform for the body, or None when the body goes as it came."""
        if self.kind is None or self.mapping is None:
            return None
        return BodyTransform(self.kind, self.mapping, self.encoding)

    def headers(self, headers: CIMultiDict[str], *, transformed: bool) -> CIMultiDict[str]:
        """`headers` fitted to the body that goes out: `transformed` when it is the transform's output rather
        than the bytes that came (streamed, that is known before the first byte; whole, only when a link
        changed). A rewritten body has another length and digest; an inflated one no encoding."""
        if self.unsized:
            headers.popall("Content-Length", None)
        if transformed:
            for stale in _STALE_AFTER_REWRITE:
                headers.popall(stale, None)
            if self.encoding is not None:
                headers.popall("Content-Encoding", None)
        return headers


def plan_answer(
    method: str, status: int, content_length: int | None, headers: Headers, mapping: BaseMapping | None
) -> AnswerPlan:
    """The plan for an answer with this status, length and (client-bound) headers to a request with this
    method; `mapping` None when nothing is rewritten (--no-rewrite)."""
    has_body = method != "HEAD" and status not in (204, 304)
    whole = has_body and content_length is not None and content_length <= WHOLE_ANSWER_LIMIT
    kind = body_kind(headers.get("Content-Type")) if mapping is not None else None
    if kind is None:
        return AnswerPlan(has_body, whole)
    if not has_body or status == 206:  # a 206 starts mid-body, where a link cannot be recognised
        return AnswerPlan(has_body, whole, unsized=method == "HEAD")
    encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding == "identity":
        return AnswerPlan(has_body, whole, kind, None, mapping)
    if inflatable(encoding):
        return AnswerPlan(has_body, whole, kind, encoding, mapping)
    return AnswerPlan(has_body, whole)  # br, zstd: cannot be undone here, so it passes as it came

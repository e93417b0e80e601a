"""The forwarder's plan for an answer, decided from the request and the answer's head, without a socket.

The writers that follow the plan are tested through a running proxy in test_forward.py and test_rewrite.py.
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.plan import WHOLE_ANSWER_LIMIT, AnswerPlan, plan_answer
from proxy.rewrite import BaseMapping

MAPPING = BaseMapping("https://ws.example", "http://localhost:8080")
JSON = "application/dicom+json"


def plan(
    method: str = "GET",
    status: int = 200,
    length: int | None = 100,
    content_type: str | None = JSON,
    encoding: str | None = None,
    mapping: BaseMapping | None = MAPPING,
) -> AnswerPlan:
    headers: CIMultiDict[str] = CIMultiDict()
    if content_type is not None:
        headers["Content-Type"] = content_type
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    return plan_answer(method, status, length, headers, mapping)


@pytest.mark.parametrize(
    ("method", "status", "length", "has_body", "whole"),
    [
        ("GET", 200, 100, True, True),
        ("GET", 200, WHOLE_ANSWER_LIMIT, True, True),
        ("GET", 200, WHOLE_ANSWER_LIMIT + 1, True, False),
        ("GET", 200, None, True, False),
        ("HEAD", 200, 100, False, False),
        ("GET", 204, 0, False, False),
        ("GET", 304, 100, False, False),
        ("GET", 206, 100, True, True),
    ],
)
def test_whole_or_streamed(method, status, length, has_body, whole):
    decided = plan(method, status, length, content_type="application/octet-stream")
    assert (decided.has_body, decided.whole) == (has_body, whole)
    assert decided.transform() is None


@pytest.mark.parametrize(
    ("content_type", "encoding", "kind", "undone"),
    [
        (JSON, None, "json", None),
        (JSON, " Identity ", "json", None),
        ("application/dicom+xml", None, "xml", None),
        (JSON, "gzip", "json", "gzip"),
        (JSON, "DEFLATE", "json", "deflate"),
        (JSON, "br", None, None),  # cannot be undone here: passes as it came
        ('multipart/related; type="application/dicom"', None, None, None),
        (None, None, None, None),
    ],
)
def test_rewritten_and_inflated_or_as_it_came(content_type, encoding, kind, undone):
    decided = plan(content_type=content_type, encoding=encoding)
    assert (decided.kind, decided.encoding) == (kind, undone)
    transform = decided.transform()
    assert (transform is not None) == (kind is not None)
    assert transform is None or transform.inflates == (undone is not None)


def test_nothing_is_rewritten_without_a_mapping_or_mid_body():
    assert plan(mapping=None).transform() is None
    assert plan(status=206).transform() is None  # a range starts mid-body, where no link can be recognised


def fitted(decided: AnswerPlan, *, transformed: bool) -> set[str]:
    headers = CIMultiDict({"Content-Length": "9", "Content-MD5": "x", "Content-Encoding": "gzip", "ETag": '"1"'})
    return set(decided.headers(headers, transformed=transformed))


def test_a_body_as_it_came_keeps_its_length_digest_and_encoding():
    assert fitted(plan(encoding="gzip"), transformed=False) == {
        "Content-Length",
        "Content-MD5",
        "Content-Encoding",
        "ETag",
    }


def test_a_rewritten_body_loses_its_length_and_digest_and_an_inflated_one_its_encoding():
    assert fitted(plan(), transformed=True) == {"Content-Encoding", "ETag"}
    assert fitted(plan(encoding="gzip"), transformed=True) == {"ETag"}


@pytest.mark.parametrize(("content_type", "unsized"), [(JSON, True), ("application/dicom", False)])
def test_a_head_promises_no_length_a_rewritten_get_would_not_have(content_type, unsized):
    decided = plan("HEAD", content_type=content_type)
    assert decided.unsized == unsized
    assert ("Content-Length" in fitted(decided, transformed=False)) != unsized
    assert not plan("HEAD", mapping=None).unsized

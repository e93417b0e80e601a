"""The pure header rules, checked on plain multidicts, including a property over random header sets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.headers import (
    CLIENT_SECRETS,
    HOP_BY_HOP,
    client_response_headers,
    connection_tokens,
    upstream_request_headers,
)

NAMES = st.sampled_from(
    sorted(HOP_BY_HOP | CLIENT_SECRETS)
    + ["Accept", "Content-Type", "X-Custom", "Forwarded", "X-Forwarded-For", "Host", "Expect", "X-Hop"]
)
VALUES = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)


def forward(incoming: CIMultiDict[str]) -> CIMultiDict[str]:
    return upstream_request_headers(
        incoming,
        token="TOKEN",
        client_address="127.0.0.1",
        client_scheme="http",
        client_host="localhost:8080",
    )


@given(st.lists(st.tuples(NAMES, VALUES), max_size=12), st.lists(NAMES, max_size=3))
def test_no_secret_or_hop_by_hop_header_ever_goes_up(pairs, connection_names):
    incoming = CIMultiDict(pairs)
    if connection_names:
        incoming.add("Connection", ", ".join(connection_names))
    outgoing = forward(incoming)
    names = {name.lower() for name in outgoing}
    assert names.isdisjoint(HOP_BY_HOP | {"cookie", "x-dicom-proxy-key", "host", "expect", "forwarded"})
    assert names.isdisjoint(
        connection_tokens(incoming) - {"authorization", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
    )
    assert outgoing.getall("Authorization") == ["Bearer TOKEN"]
    assert outgoing.getall("X-Forwarded-For") == ["127.0.0.1"]


def test_end_to_end_headers_keep_their_order_and_repeats():
    incoming = CIMultiDict([("Accept", "application/dicom"), ("X-Custom", "1"), ("X-Custom", "2")])
    outgoing = forward(incoming)
    assert outgoing.getall("X-Custom") == ["1", "2"]
    assert outgoing["Accept"] == "application/dicom"


def test_response_headers_drop_what_connection_names():
    upstream = CIMultiDict(
        [
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("ETag", '"a"'),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]
    )
    assert list(client_response_headers(upstream).items()) == [
        ("ETag", '"a"'),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


def test_url_override_headers_never_go_up():
    # IIS URL Rewrite routes by X-Original-URL / X-Rewrite-URL, around the path checks made here.
    incoming = CIMultiDict(
        [
            ("X-Original-URL", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("Accept", "application/dicom+json"),
        ]
    )
    names = {name.lower() for name in forward(incoming)}
    assert names.isdisjoint({"x-original-url", "x-rewrite-url", "x-http-method-override"})
    assert "accept" in names

"""The pure header rules, checked on plain multidicts, including a property over random header sets."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.headers import (
    CLIENT_SECRETS,
    HOP_BY_HOP,
    client_response_headers,
    connection_tokens,
    split_host,
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


# Host:port, parsed once for the allowlist and for the links built from it ------------------------------

HOST_NAMES = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
)
PORTS = st.one_of(st.none(), st.just(""), st.integers(0, 65535).map(str))


@given(HOST_NAMES, PORTS)
def test_split_host_gives_back_the_name_and_port_it_was_made_of(name, port):
    host = name if port is None else f"{name}:{port}"
    assert split_host(host) == (name, port or "")


@given(st.text(alphabet="[]:.a1-%@ ", max_size=12))
def test_split_host_either_refuses_a_value_or_splits_it_exactly(text):
    split = split_host(text)
    assume(split is not None)
    name, port = split
    assert text in (name, f"{name}:{port}")
    assert port == "" or (port.isascii() and port.isdigit())
    assert name and (name.startswith("[") or ":" not in name)
    assert not name.startswith("[") or (name.endswith("]") and name.count("]") == 1)


def test_split_host_refuses_what_is_no_host_and_port():
    for text in ("", ":8080", "[::1", "[::1]x", "::1", "a:b:c", "localhost:8o", "localhost:²"):
        assert split_host(text) is None, text


def test_a_request_with_no_http_client_behind_it_carries_no_forwarded_headers():
    # The DIMSE gateway's requests: the same rules, and nothing made up about a client that does not exist.
    incoming = CIMultiDict({"Accept": "application/dicom+json", "Authorization": "Basic x", "Connection": "close"})
    outgoing = upstream_request_headers(incoming, token="TOKEN")
    assert list(outgoing.items()) == [("Accept", "application/dicom+json"), ("Authorization", "Bearer TOKEN")]


def test_retry_after_is_read_in_seconds_or_as_a_date_and_bounded():
    from proxy.headers import retry_after_seconds

    now = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    assert retry_after_seconds("120", 30.0, now=now) == 120.0
    assert retry_after_seconds("86400", 30.0, now=now) == 600.0
    assert retry_after_seconds("Fri, 15 Jan 2027 08:01:30 GMT", 30.0, now=now) == 90.0
    assert retry_after_seconds("Fri, 15 Jan 2027 07:00:00 GMT", 30.0, now=now) == 0.0
    assert retry_after_seconds("soon", 30.0, now=now) == 30.0
    assert retry_after_seconds(None, 30.0, now=now) == 30.0

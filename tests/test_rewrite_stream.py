"""Streaming body rewriting and decoding: pure, no network.

The rewriter's output is checked against a plain regex over the whole body (`reference`), for any way the
body may be cut into chunks.
"""

from __future__ import annotations

import gzip
import itertools
import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.rewrite import (
    MAX_XML_INDENT,
    BaseMapping,
    BodyRewriter,
    BodyTransform,
    DecodeError,
    body_kind,
    inflater_for,
)

UP = "https://ws-svc.dicom.azurehealthcareapis.com"
LOCAL = "http://localhost:8080"
MAPPING = BaseMapping(UP, LOCAL)
MAPPINGS = [
    MAPPING,
    BaseMapping("http://127.0.0.1:8042/dicom-web", "http://localhost:8080"),  # a base with a path
    BaseMapping("https://h.example", "http://localhost:8080/a/longer/local/base"),
]


def escaped(text: str) -> str:
    return text.replace("/", "\\/")


def reference(body: bytes, kind: str, mapping: BaseMapping) -> bytes:
    """The rules as one regex over the whole body, nothing streamed."""
    up, local = mapping.upstream.encode(), mapping.local.encode()
    if kind == "xml":
        link = rb"([>\"'][ \t\r\n]{0,%d})" % MAX_XML_INDENT + re.escape(up) + rb"(?=[/?#<\"' \t\r\n])"
        return re.sub(link, lambda match: match[1] + local, body)
    for base, new, slash in ((up, local, b"/"), (up.replace(b"/", b"\\/"), local.replace(b"/", b"\\/"), b"\\/")):
        link = rb'(?<!\\)"' + re.escape(base) + rb"(?=" + re.escape(slash) + rb'|[?#"])'
        body = re.sub(link, lambda _, new=new: b'"' + new, body)
    return body


def stream(body: bytes, cuts: list[int], kind: str = "json", mapping: BaseMapping = MAPPING) -> bytes:
    """The body fed in pieces cut at `cuts`, checking that little is ever held back."""
    rewriter = BodyRewriter(kind, mapping)  # type: ignore[arg-type]
    limit = held_limit(kind, mapping)
    out = []
    for start, end in itertools.pairwise([0, *sorted(cuts), len(body)]):
        out.append(rewriter.feed(body[start:end]))
        assert rewriter.pending <= limit
    out.append(rewriter.finish())
    assert rewriter.pending == 0
    return b"".join(out)


def held_limit(kind: str, mapping: BaseMapping) -> int:
    """The most a rewriter may hold back: a quote and a base (escaped, plus a backslash); in XML, indentation."""
    if kind == "json":
        return len(escaped(mapping.upstream)) + 2
    return 1 + MAX_XML_INDENT + len(mapping.upstream)


# Cut anywhere --------------------------------------------------------------------------------------

JSON = (
    f'[{{"00081190":{{"vr":"UR","Value":["{UP}/v2/studies/1.2.3"]}},"00081196":{{"vr":"US","Value":[0]}}}},'
    f'{{"href":"{UP}","q":"{UP}?a=1","f":"{UP}#x","n": 1.50e+3 }}]'
).encode()
JSON_OUT = JSON.replace(UP.encode(), LOCAL.encode())

ESCAPED = f'{{"id":"op-1","href":"{escaped(UP)}\\/v2\\/operations\\/op-1","end":"{escaped(UP)}"}}'.encode()
ESCAPED_OUT = ESCAPED.replace(escaped(UP).encode(), escaped(LOCAL).encode())

XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<NativeDicomModel>
  <DicomAttribute tag="00081190" vr="UR" keyword="RetrieveURL">
    <Value number="1">{UP}/v2/studies/1.2.3</Value>
    <Value number="2">
\t\t{UP}/v2/studies/4.5.6
    </Value>
  </DicomAttribute>
  <Link href='{UP}?x=1'/><Other href="{UP}"/>
</NativeDicomModel>
""".encode()
XML_OUT = XML.replace(UP.encode(), LOCAL.encode())


@pytest.mark.parametrize(
    ("kind", "body", "expected"), [("json", JSON, JSON_OUT), ("json", ESCAPED, ESCAPED_OUT), ("xml", XML, XML_OUT)]
)
def test_a_link_is_rewritten_wherever_the_body_is_cut(kind, body, expected):
    assert reference(body, kind, MAPPING) == expected
    for cut in range(len(body) + 1):
        assert stream(body, [cut], kind) == expected, cut
    assert stream(body, list(range(len(body))), kind) == expected  # one byte at a time


@pytest.mark.parametrize(("kind", "body", "expected"), [("json", JSON, JSON_OUT), ("xml", XML, XML_OUT)])
def test_a_link_is_rewritten_when_cut_in_three(kind, body, expected):
    first = body.index(UP.encode())
    for a, b in itertools.combinations(range(first - 2, first + len(UP) + 3), 2):
        assert stream(body, [a, b], kind) == expected


# Near misses --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f"{UP}x/v2",  # another host that starts alike
        f"{UP}.evil.example/v2",
        "https://account.blob.core.windows.net/errors.log",
        f"copied from {UP}/v2/elsewhere",  # data, not a link
        f"http{UP[5:]}/v2",
    ],
)
def test_near_misses_are_left_alone(value):
    body = f'{{"a":"{value}","b":"{escaped(value)}"}}'.encode()
    assert stream(body, []) == body
    assert BodyTransform("json", MAPPING).whole(body) is None
    xml = f"<a>{value}</a><b c='{value}'/>".encode()
    assert stream(xml, [], "xml") == xml


def test_a_url_inside_a_string_after_an_escaped_quote_is_data():
    body = f'{{"description":"see \\"{UP}/v2/x\\" for more","href":"{UP}/v2/y"}}'.encode()
    expected = body.replace(f'"{UP}/v2/y'.encode(), f'"{LOCAL}/v2/y'.encode())
    for cut in range(len(body) + 1):
        assert stream(body, [cut]) == expected


@pytest.mark.parametrize("kind", ["json", "xml"])
@pytest.mark.parametrize("size", [1, 5, len(UP) - 1, len(UP)])
def test_a_body_that_ends_in_part_of_a_link_is_emitted_whole(kind, size):
    body = b'{"a":"' + UP[:size].encode()
    rewriter = BodyRewriter(kind, MAPPING)
    head = rewriter.feed(body)
    assert head == b'{"a":' and rewriter.pending == len(body) - 5
    assert head + rewriter.finish() == body


def test_bytes_that_cannot_start_a_link_are_not_held():
    rewriter = BodyRewriter("json", MAPPING)
    assert rewriter.feed(b'{"a": 1.0, "b": "text') == b'{"a": 1.0, "b": "text'
    assert rewriter.feed(b'", "c": "ht') == b'", "c": '
    assert rewriter.feed(b"tpx") == b'"httpx'
    assert rewriter.pending == 0


def test_xml_indentation_is_bounded():
    near = f"<v>{' ' * MAX_XML_INDENT}{UP}/x</v>".encode()
    far = f"<v>{' ' * (MAX_XML_INDENT + 1)}{UP}/x</v>".encode()
    for cut in range(len(near) - len(UP) - 10, len(near)):
        assert stream(near, [cut], "xml") == near.replace(UP.encode(), LOCAL.encode())
        assert stream(far, [cut], "xml") == far


def test_formatting_is_kept_byte_for_byte():
    body = f'{{ "n" : 1.50e+3,\n  "u":"{UP}/v2", "é": "\\u00e9" }}'.encode()
    assert BodyTransform("json", MAPPING).whole(body) == body.replace(UP.encode(), LOCAL.encode())


def test_an_upstream_that_is_no_plain_url_is_refused():
    with pytest.raises(ValueError):
        BodyRewriter("json", BaseMapping('https://host/a"b', LOCAL))


# Any body, any chunks ------------------------------------------------------------------------------


def fragments(mapping: BaseMapping) -> st.SearchStrategy[str]:
    up, esc = mapping.upstream, escaped(mapping.upstream)
    links = [f'"{up}/v2/x"', f'"{up}"', f'"{up}?q=1"', f'"{up}#f"', f'"{esc}\\/v2\\/x"', f'"{esc}"', f">{up}/v2<"]
    links += [f"'{up}'", f'"{up}" ', f'"{up}\t', f">\n    {up}/v2\n<", f"> {up}<", f">{up}\r\n<", f">{up}\n"]
    near = [f'"{up}x"', f'"{up}.evil/v2"', f'"see {up}/v2"', f'\\"{up}/v2', f'"{esc}/v2"', f'"{up}\\/v2']
    near += [f"={up}/v2", f"{up}/v2", '"https://other.example/v2"', f'"{up[:-1]}"', f">{' ' * MAX_XML_INDENT} {up}/"]
    return st.one_of(
        st.sampled_from(links + near),
        st.builds(lambda n: '"' + up[:n], st.integers(0, len(up))),  # a link's start, maybe at the body's end
        st.builds(lambda n: ">" + " " * n + up[:8], st.integers(0, 40)),
        st.text(alphabet="ab1 ,:{}[]/?#.\\\"'<>\n\t", max_size=12),
    )


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str, BaseMapping, list[int]]:
    mapping = draw(st.sampled_from(MAPPINGS))
    body = "".join(draw(st.lists(fragments(mapping), max_size=20))).encode()
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=8))
    return body, draw(st.sampled_from(["json", "xml"])), mapping, cuts


@settings(max_examples=500)
@given(bodies())
def test_streaming_equals_one_regex_over_the_whole_body(case):
    body, kind, mapping, cuts = case
    out = stream(body, cuts, kind, mapping)
    assert out == reference(body, kind, mapping)
    # Byte-identical but for the bases: undoing the replacements gives the body back.
    up, local = mapping.upstream, mapping.local
    assert out.replace(escaped(local).encode(), escaped(up).encode()).replace(local.encode(), up.encode()) == body


# Any size ------------------------------------------------------------------------------------------


def test_a_large_body_streams_in_bounded_memory():
    # 200 MB never held whole; local as long as upstream, so every byte out stands for a byte in.
    mapping = BaseMapping(UP, LOCAL + "/" + "x" * (len(UP) - len(LOCAL) - 1))
    item = f'{{"00081190":{{"vr":"UR","Value":["{UP}/v2/studies/1.2.3/series/%d"]}}}},'
    block = "".join(item % n for n in range(8000)).encode()
    blocks = 200 * 1024 * 1024 // len(block)
    rewriter = BodyRewriter("json", mapping)
    fed = emitted = crc = 0
    for chunk in rechunk(itertools.chain([b"["], itertools.repeat(block, blocks), [b"{}]"]), 1024 * 1024 + 7):
        out = rewriter.feed(chunk)
        fed, emitted, crc = fed + len(chunk), emitted + len(out), zlib.crc32(out, crc)
        assert emitted == fed - rewriter.pending
        assert rewriter.pending <= held_limit("json", mapping)
    crc = zlib.crc32(rewriter.finish(), crc)
    expected_block = reference(block, "json", mapping)
    assert expected_block != block
    expected = zlib.crc32(b"{}]", zlib.crc32(expected_block * blocks, zlib.crc32(b"[")))
    assert fed > 200_000_000 and crc == expected


def rechunk(pieces, size):
    buffer = b""
    for piece in pieces:
        buffer += piece
        while len(buffer) >= size:
            yield buffer[:size]
            buffer = buffer[size:]
    yield buffer


# Content-Encoding ----------------------------------------------------------------------------------

PLAIN = JSON * 20


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def inflate(encoding: str, body: bytes, cuts: list[int], piece_size: int = 256 * 1024) -> bytes:
    inflater = inflater_for(encoding, piece_size=piece_size)
    assert inflater is not None
    out = []
    for start, end in itertools.pairwise([0, *sorted(cuts), len(body)]):
        out.extend(inflater.feed(body[start:end]))
    inflater.finish()
    return b"".join(out)


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", raw_deflate)],
)
def test_inflating_wherever_the_body_is_cut(encoding, compress):
    body = compress(PLAIN)
    for cut in range(len(body) + 1):
        assert inflate(encoding, body, [cut]) == PLAIN
    assert inflate(encoding, body, list(range(len(body))), piece_size=100) == PLAIN


@pytest.mark.parametrize("piece_size", [100, 256, 1000])
def test_all_that_a_chunk_inflates_to_comes_out_at_once(piece_size):
    # Not held back inside zlib until the next chunk: a full piece may leave more behind.
    body = zlib.compress(PLAIN)
    for cut in range(2, len(body)):
        inflater = inflater_for("deflate", piece_size=piece_size)
        assert inflater is not None
        out = b"".join(inflater.feed(body[:cut]))
        assert out == zlib.decompressobj().decompress(body[:cut])


def test_inflated_pieces_are_bounded():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 100_000
    inflater = inflater_for("gzip", piece_size=64 * 1024)
    assert inflater is not None
    pieces = inflater.feed(bomb)
    assert [len(next(pieces)) for _ in range(3)] == [64 * 1024] * 3  # inflated only as far as read
    assert max(map(len, pieces)) <= 64 * 1024


def test_several_gzip_members_are_one_body():
    assert inflate("gzip", gzip.compress(b"one ") + gzip.compress(b"two"), [5]) == b"one two"


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b"not gzip at all"),
        ("deflate", b"\xff\xff\xff\xff"),
        ("deflate", zlib.compress(b"x") + b"more"),
        ("gzip", gzip.compress(PLAIN)[:-10]),  # cut short
        ("deflate", raw_deflate(PLAIN)[:30]),
        ("deflate", b"x"),
    ],
)
def test_a_body_not_in_its_encoding_is_reported(encoding, body):
    with pytest.raises(DecodeError):
        inflate(encoding, body, [])


def test_an_empty_body_inflates_to_nothing():
    assert inflate("gzip", b"", []) == b""


@pytest.mark.parametrize("encoding", [None, "", "identity", "br", "zstd", "gzip, br"])
def test_only_gzip_and_deflate_have_an_inflater(encoding):
    assert inflater_for(encoding) is None
    assert inflater_for(" GZip ") is not None


# Content types -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/dicom+json", "json"),
        ("application/json; charset=utf-8", "json"),
        ("Application/JSON", "json"),
        ("application/vnd.example+json", "json"),
        ("application/dicom+xml; transfer-syntax=*", "xml"),
        ("text/xml", "xml"),
        ("application/atom+xml", "xml"),
        ('multipart/related; type="application/dicom+json"; boundary=x', None),
        ("application/dicom", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_body_kind(content_type, kind):
    assert body_kind(content_type) == kind

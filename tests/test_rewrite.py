"""URL rewriting: the pure rules, then the Azure-shaped answers of the fake service through a running proxy."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from proxy.rewrite import BaseMapping, BodyTransform, inflater_for, upstream_path, with_multipart_type

from .upstream import metadata_stream

MAPPING = BaseMapping("https://ws-svc.dicom.azurehealthcareapis.com", "http://localhost:8080")


# The pure rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://ws-svc.dicom.azurehealthcareapis.com/v2/studies/1", "http://localhost:8080/v2/studies/1"),
        ("https://ws-svc.dicom.azurehealthcareapis.com", "http://localhost:8080"),
        ("https://ws-svc.dicom.azurehealthcareapis.com?x=1", "http://localhost:8080?x=1"),
        ("https://ws-svc.dicom.azurehealthcareapis.com.evil.example/v2", None),
        ("https://ws-svc.dicom.azurehealthcareapis.comx/v2", None),
        ("https://account.blob.core.windows.net/errors.log", None),
        ("see https://ws-svc.dicom.azurehealthcareapis.com/v2", None),
        ("http://ws-svc.dicom.azurehealthcareapis.com/v2", None),
    ],
)
def test_only_the_exact_base_is_rewritten(value, expected):
    assert MAPPING.rewrite_url(value) == (expected or value)


@pytest.mark.parametrize(
    ("base", "target", "expected"),
    [
        ("", "/v2/studies", "/v2/studies"),
        ("/v2", "/studies", "/v2/studies"),
        ("/v2", "/v2/studies", "/v2/studies"),
        ("/v2", "/v1/studies", "/v1/studies"),
        ("/v2", "/v2/partitions/p1/studies", "/v2/partitions/p1/studies"),
        ("/v2", "/v2", "/v2"),
        ("/dicom-web", "/studies", "/dicom-web/studies"),
        ("/dicom-web", "/v2/studies", "/dicom-web/v2/studies"),
        ("/v2", "/vendor/x", "/v2/vendor/x"),
    ],
)
def test_versions_in_the_base_and_the_target(base, target, expected):
    assert upstream_path(base, target) == expected


def rewrite_body(body: bytes, kind: str, mapping: BaseMapping) -> bytes | None:
    """A whole body through the rewriter: the result, or None when nothing changed."""
    return BodyTransform("json" if kind == "json" else "xml", mapping).whole(body)


def inflate(body: bytes, encoding: str) -> bytes:
    inflater = inflater_for(encoding)
    assert inflater is not None
    plain = b"".join(inflater.feed(body))
    inflater.finish()
    return plain


@given(st.text(alphabet=st.sampled_from("ab/:?.%-\\\"'<>"), max_size=40))
def test_a_body_without_the_base_is_never_touched(noise):
    body = json.dumps({"00100010": {"vr": "PN", "Value": [noise]}}).encode()
    assert rewrite_body(body, "json", MAPPING) is None
    assert rewrite_body(noise.encode(), "xml", MAPPING) is None


def test_json_with_escaped_slashes_is_rewritten():
    body = b'{"href":"https:\\/\\/ws-svc.dicom.azurehealthcareapis.com\\/v2\\/operations\\/1"}'
    assert json.loads(rewrite_body(body, "json", MAPPING)) == {"href": "http://localhost:8080/v2/operations/1"}


def test_gzip_and_both_deflates_inflate_and_other_encodings_are_not_ours():
    plain = b'{"a": 1}' * 1000
    assert inflate(gzip.compress(plain), "gzip") == plain
    assert inflate(zlib.compress(plain), "deflate") == plain
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert inflate(raw.compress(plain) + raw.flush(), "deflate") == plain
    assert inflater_for("br") is None and inflater_for("identity") is None


@pytest.mark.parametrize(
    ("content_type", "accept", "expected"),
    [
        (
            "multipart/related; boundary=x",
            'multipart/related; type="application/dicom"',
            'multipart/related; boundary=x; type="application/dicom"',
        ),
        (
            "multipart/related; boundary=x",
            'multipart/related; type="application/octet-stream"; transfer-syntax=*',
            'multipart/related; boundary=x; type="application/octet-stream"',
        ),
        ("multipart/related; boundary=x", "multipart/related", None),
        (
            "multipart/related; boundary=x",
            'multipart/related; type="image/jpeg", multipart/related; type="image/png"',
            None,
        ),
        ('multipart/related; boundary=x; type="application/dicom"', 'multipart/related; type="image/jpeg"', None),
        ("application/dicom", 'multipart/related; type="application/dicom"', None),
        ("multipart/related; boundary=x", None, None),
    ],
)
def test_multipart_type_is_added_only_when_the_client_named_one(content_type, accept, expected):
    assert with_multipart_type(content_type, accept) == expected


# Through the proxy ----------------------------------------------------------------------------------


def test_stow_retrieve_urls_point_at_the_proxy_and_other_hosts_stay(start_proxy, upstream):
    proxy = start_proxy()
    answer = requests.post(f"{proxy.url}/v2/studies", data=b"DICM", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["Content-Length"] == str(len(answer.content))
    body = answer.json()
    assert body["00081190"]["Value"] == [f"{proxy.url}/v2/studies/1.2.3"]
    items = [item["00081190"]["Value"][0] for item in body["00081199"]["Value"]]
    assert items == [
        f"{proxy.url}/v2/studies/1.2.3/series/4/instances/5",
        "https://other.example/v2/studies/1.2.3",
        f"{proxy.url}/v2/studies/1.2.3/series/4/instances/6",
        f"{proxy.url}/v2/studies/1.2.3/series/7/instances/8",
    ]
    assert body["00081196"] == {"vr": "US", "Value": [0]}
    assert upstream.url not in answer.text


def test_operations_tags_and_workitems_follow_through_the_proxy(start_proxy, upstream):
    proxy = start_proxy()
    accepted = requests.post(f"{proxy.url}/v2/extendedquerytags", json=[{"path": "00101001"}], timeout=10)
    assert accepted.status_code == 202
    assert accepted.headers["Location"] == f"{proxy.url}/v2/operations/op-1"
    assert accepted.json() == {"id": "op-1", "href": f"{proxy.url}/v2/operations/op-1"}

    operation = requests.get(accepted.json()["href"], timeout=10).json()
    assert operation["resources"] == [f"{proxy.url}/v2/extendedquerytags/00101001"]
    assert operation["results"]["errorHref"] == "https://account.blob.core.windows.net/export/errors.log"

    tag = requests.get(operation["resources"][0], timeout=10).json()
    assert tag["errors"]["href"] == f"{proxy.url}/v2/extendedquerytags/00101001/errors"
    assert tag["operation"]["href"] == f"{proxy.url}/v2/operations/op-1"
    assert tag["description"] == f"copied from {upstream.url}/v2/elsewhere"  # data, not a link

    workitem = requests.post(f"{proxy.url}/v2/workitems", data=b"{}", timeout=10)
    assert workitem.status_code == 201
    assert workitem.headers["Location"] == workitem.headers["Content-Location"] == f"{proxy.url}/v2/workitems/1.2.840.1"


def test_the_local_base_is_the_host_the_client_used(start_proxy, upstream):
    proxy = start_proxy()
    answer = requests.post(f"http://localhost:{proxy.port}/v2/studies", data=b"DICM", timeout=10)
    assert answer.json()["00081190"]["Value"] == [f"http://localhost:{proxy.port}/v2/studies/1.2.3"]


def test_gzip_json_is_decoded_rewritten_and_sent_identity(start_proxy, upstream):
    proxy = start_proxy()
    answer = requests.get(f"{proxy.url}/v2/gzip-json", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=10)
    raw = answer.raw.read()
    assert "Content-Encoding" not in answer.headers
    assert answer.headers["Content-Length"] == str(len(raw))
    urls = [item["00081190"]["Value"][0] for item in json.loads(raw)]
    assert urls == [f"{proxy.url}/v2/studies/{n}" for n in range(50)]


def test_dicom_xml_is_rewritten(start_proxy, upstream):
    proxy = start_proxy()
    answer = requests.get(f"{proxy.url}/v2/xml", timeout=10)
    assert f'<Value number="1">{proxy.url}/v2/studies/1.2.3</Value>' in answer.text
    assert '<Value number="1">https://other.example/v2/studies/9</Value>' in answer.text
    assert upstream.url not in answer.text


@pytest.mark.slow
def test_a_200_mib_metadata_answer_is_rewritten_as_it_streams_in_flat_memory(start_proxy, upstream):
    proxy = start_proxy()
    expected = hashlib.sha256()
    for piece in metadata_stream(proxy.url, 200):
        expected.update(piece)
    received, size = hashlib.sha256(), 0
    with requests.get(f"{proxy.url}/v2/stream-json/200", stream=True, timeout=60) as answer:
        assert answer.status_code == 200
        assert "Content-Length" not in answer.headers
        for chunk in answer.iter_content(1024 * 1024):
            received.update(chunk)
            size += len(chunk)
    assert size > 150 * 1024 * 1024
    assert received.hexdigest() == expected.hexdigest(), "every link rewritten, every other byte as it came"
    assert proxy.peak_rss_mib() < 100


def test_no_rewrite_turns_it_off(start_proxy, upstream):
    proxy = start_proxy("--no-rewrite")
    answer = requests.post(f"{proxy.url}/v2/studies", data=b"DICM", timeout=10)
    assert answer.json()["00081190"]["Value"] == [f"{upstream.url}/v2/studies/1.2.3"]


def test_multipart_answers_get_the_type_the_client_asked_for(start_proxy, upstream):
    proxy = start_proxy()
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    answer = requests.get(f"{proxy.url}/v2/studies/1.2.3/series", headers={"Accept": accept}, timeout=10)
    assert answer.headers["Content-Type"] == 'multipart/related; boundary=xyz; type="application/dicom"'
    assert answer.content == b"--xyz\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--xyz--\r\n"


@pytest.mark.parametrize("local_path", ["/v2/studies", "/v1/studies", "/v2/partitions/p1/studies", "/studies"])
def test_versions_and_partitions_with_a_versioned_upstream(start_proxy, upstream, local_path):
    proxy = start_proxy(upstream_url=f"{upstream.url}/v2")
    answer = requests.post(f"{proxy.url}{local_path}", data=b"DICM", timeout=10)
    assert answer.status_code == 200
    expected_upstream_path = local_path if local_path != "/studies" else "/v2/studies"
    assert upstream.seen[-1].raw_path == expected_upstream_path
    retrieve_url = answer.json()["00081190"]["Value"][0]
    assert retrieve_url == f"{proxy.url}{expected_upstream_path}/1.2.3"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_host_without_its_port_gets_the_port_the_client_connected_to(start_proxy, upstream, host):
    # dicomweb-client sends Host without the port; links must still lead back to this proxy.
    proxy = start_proxy()
    answer = requests.post(f"{proxy.url}/v2/studies", data=b"DICM", headers={"Host": host}, timeout=10)
    assert answer.json()["00081190"]["Value"] == [f"http://{host}:{proxy.port}/v2/studies/1.2.3"]


def test_a_small_gzip_answer_that_inflates_far_streams_out_rewritten_in_flat_memory(start_proxy, upstream):
    proxy = start_proxy()
    expected = hashlib.sha256(b"".join(metadata_stream(proxy.url, 60))).hexdigest()
    received = hashlib.sha256()
    with requests.get(
        f"{proxy.url}/v2/gzip-json/60", headers={"Accept-Encoding": "gzip"}, stream=True, timeout=60
    ) as answer:
        assert answer.status_code == 200
        assert "Content-Encoding" not in answer.headers
        assert "Content-Length" not in answer.headers
        for chunk in answer.iter_content(1024 * 1024):
            received.update(chunk)
    assert received.hexdigest() == expected
    assert proxy.peak_rss_mib() < 100


def test_a_head_does_not_promise_the_length_a_rewritten_get_would_not_have(start_proxy, upstream):
    proxy = start_proxy()
    head = requests.head(f"{proxy.url}/v2/xml", timeout=10)
    assert head.status_code == 200
    assert "Content-Length" not in head.headers
    get = requests.get(f"{proxy.url}/v2/xml", timeout=10)
    assert int(get.headers["Content-Length"]) == len(get.content)
    assert f"{proxy.url}/v2/studies/1.2.3" in get.text


@pytest.mark.parametrize(
    "accept",
    ['multipart/related; type="a\\"b"', "multipart/related; type*=utf-8''application%2Fdicom"],
)
def test_an_odd_type_in_accept_is_not_copied_into_the_answer(accept):
    assert with_multipart_type("multipart/related; boundary=x", accept) is None


def test_an_upstream_that_could_not_be_found_in_bodies_is_refused_at_start(capsys):
    from proxy.cli import main

    assert main(["serve", "--upstream", "http://127.0.0.1:8042/d'x"]) == 2
    assert "quote" in capsys.readouterr().err

"""Read-ahead: frames of a series fetched ahead of a viewer, served byte for byte as the service sent them."""

from __future__ import annotations

import asyncio
import hashlib
import urllib.request

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_for
from .upstream import series_uid, token_claims

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
STUDY = "1.2.3"
# Headers that differ between two answers to the same request whatever the proxy does.
_PER_ANSWER = {"date", "x-request-id"}


def frame_path(series: str, number: int, frame: int = 1) -> str:
    return f"/v2/studies/{STUDY}/series/{series}/instances/{series}.{number}/frames/{frame}"


async def metadata(client: aiohttp.ClientSession, base: str, series: str, **headers: str) -> bytes:
    """The series' metadata as it came (gzip, when the client accepts it and the proxy leaves it so)."""
    async with client.get(
        f"{base}/v2/studies/{STUDY}/series/{series}/metadata", headers={"Accept": "application/dicom+json", **headers}
    ) as response:
        assert response.status == 200
        return await response.read()


async def frames(
    base: str,
    series: str,
    numbers: list[int] | list[tuple[int, int]],
    *,
    connections: int = 6,
    with_metadata: bool = True,
) -> dict[str, tuple[int, str, list[tuple[str, str]]]]:
    """Fetch the frames `numbers` (instance numbers for frame 1, or (instance, frame) pairs) as a browser does
    (six connections); per path: status, sha256, headers."""
    got: dict[str, tuple[int, str, list[tuple[str, str]]]] = {}
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as client:
        if with_metadata:
            await metadata(client, base, series)
        gate = asyncio.Semaphore(connections)

        async def one(number: int | tuple[int, int]) -> None:
            path = frame_path(series, *number) if isinstance(number, tuple) else frame_path(series, number)
            async with gate, client.get(base + path, headers={"Accept": FRAME_ACCEPT}) as response:
                digest = hashlib.sha256()
                async for chunk in response.content.iter_any():
                    digest.update(chunk)
                headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _PER_ANSWER]
                got[path] = (response.status, digest.hexdigest(), headers)

        if connections == 1:
            for number in numbers:
                await one(number)
        else:
            await asyncio.gather(*(one(number) for number in numbers))
    return got


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/-/metrics") as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not in /-/metrics")


def settled(proxy) -> None:
    """Wait until read-ahead has nothing queued or on its way."""
    wait_for(lambda: metric(proxy.url, "dicom_proxy_read_ahead_pending") == 0, what="read-ahead to settle")


async def read_ahead_of_one_frame(start_proxy, series: str):
    """A proxy that has forwarded the series' metadata and its first frame, and read ahead what follows."""
    proxy = start_proxy()
    await frames(proxy.url, series, [1], connections=1)
    settled(proxy)
    return proxy


def frame_requests(upstream, series: str) -> list:
    return [seen for seen in upstream.seen if f"/series/{series}/instances/" in seen.raw_path]


def assert_the_services_bytes(got, upstream, count: int) -> None:
    assert len(got) == count
    for path, (status, digest, _) in got.items():
        assert status == 200, path
        assert digest == upstream.sent_digests[path], path


async def test_frames_read_ahead_are_the_services_bytes_and_headers(start_proxy, upstream):
    series = series_uid(60, 96 * 1024)
    reading, plain = start_proxy(), start_proxy("--read-ahead-mib", "0")
    got = await frames(reading.url, series, list(range(1, 61)))
    assert_the_services_bytes(got, upstream, 60)
    # Each frame crossed the link once: read ahead, or asked for by the viewer before read-ahead got to it.
    paths = [seen.raw_path for seen in frame_requests(upstream, series)]
    assert sorted(paths) == sorted(got)
    hits = metric(reading.url, "dicom_proxy_read_ahead_hits_total")
    assert hits >= 30, f"only {hits:g} of 60 frames came from read-ahead"
    assert metric(reading.url, "dicom_proxy_read_ahead_misses_total") == 60 - hits
    # The same frames without read-ahead: the same status, bytes and headers (Content-Location rewritten).
    direct = await frames(plain.url, series, list(range(1, 61)))
    for path, (status, digest, headers) in got.items():
        assert direct[path][:2] == (status, digest)
        assert [(k, v.replace(plain.url, reading.url)) for k, v in direct[path][2]] == headers
    assert any(k == "Content-Location" and v.startswith(reading.url) for k, v in got[frame_path(series, 60)][2])


async def test_the_frames_of_multi_frame_instances_are_read_ahead_in_order(start_proxy, upstream):
    series = series_uid(3, 8 * 1024, frames=20)
    proxy = start_proxy()
    wanted = [(instance, frame) for instance in (1, 2, 3) for frame in range(1, 21)]
    got = await frames(proxy.url, series, wanted)
    assert_the_services_bytes(got, upstream, 60)
    assert len(set(upstream.sent_digests[path] for path in got)) == 60, "the fake service repeats a frame"
    assert sorted(seen.raw_path for seen in frame_requests(upstream, series)) == sorted(got)
    assert metric(proxy.url, "dicom_proxy_read_ahead_hits_total") >= 30


async def test_read_ahead_off_sends_the_service_exactly_what_the_client_asked(start_proxy, upstream):
    series = series_uid(30, 16 * 1024)
    proxy = start_proxy("--read-ahead-mib", "0")
    got = await frames(proxy.url, series, [1, 2, 3])
    assert_the_services_bytes(got, upstream, 3)
    asked = [seen.raw_path for seen in upstream.seen]
    assert asked == [f"/v2/studies/{STUDY}/series/{series}/metadata", *sorted(got)] or sorted(asked[1:]) == sorted(got)
    assert len(asked) == 4
    with pytest.raises(AssertionError, match="not in /-/metrics"):
        metric(proxy.url, "dicom_proxy_read_ahead_hits_total")


async def test_a_client_that_asks_in_reverse_order_costs_the_service_nothing_more(start_proxy, upstream):
    series = series_uid(40, 32 * 1024)
    proxy = start_proxy("--read-ahead-requests", "1")  # a long queue, which the client's requests overtake
    got = await frames(proxy.url, series, list(range(40, 0, -1)))
    assert_the_services_bytes(got, upstream, 40)
    settled(proxy)
    paths = [seen.raw_path for seen in frame_requests(upstream, series)]
    assert sorted(paths) == sorted(got), "a frame was fetched twice, or one nobody asked for"
    assert metric(proxy.url, "dicom_proxy_read_ahead_hits_total") > 0, "read-ahead did not follow the client down"


async def test_one_frame_alone_costs_at_most_the_cap(start_proxy, upstream):
    series = series_uid(100, 128 * 1024)
    proxy = start_proxy("--read-ahead-mib", "1", "--read-ahead-requests", "4")
    got = await frames(proxy.url, series, [1])
    assert_the_services_bytes(got, upstream, 1)
    settled(proxy)
    fetched = metric(proxy.url, "dicom_proxy_read_ahead_fetched_bytes_total")
    assert 0 < fetched
    assert metric(proxy.url, "dicom_proxy_read_ahead_buffered_bytes") <= 1024 * 1024
    # A reading starts one request's worth ahead (--read-ahead-requests): a look at one frame costs 4 more.
    assert len(frame_requests(upstream, series)) <= 1 + 4


@pytest.mark.slow
async def test_the_cap_holds_with_a_1_gb_series(start_proxy, upstream):
    series = series_uid(100, 10 * 1024 * 1024)
    proxy = start_proxy("--read-ahead-mib", "64")
    got = await frames(proxy.url, series, list(range(1, 101)))
    assert_the_services_bytes(got, upstream, 100)
    assert metric(proxy.url, "dicom_proxy_read_ahead_hits_total") > 0
    assert proxy.peak_rss_mib() <= 64 + 100, f"peak RSS {proxy.peak_rss_mib():.0f} MiB with a 64 MiB cap"


async def test_a_401_drops_what_was_read_ahead_with_the_refused_token(start_proxy, upstream, az):
    series = series_uid(150, 16 * 1024)
    proxy = start_proxy()
    first = await frames(proxy.url, series, list(range(1, 11)), connections=1)
    assert_the_services_bytes(first, upstream, 10)
    settled(proxy)
    assert metric(proxy.url, "dicom_proxy_read_ahead_buffered_bytes") > 0
    refused = az.issued_tokens()[-1]
    upstream.revoked.add(refused)
    async with aiohttp.ClientSession() as client:  # any request now meets the 401, and the proxy takes a new token
        async with client.get(f"{proxy.url}/v2/studies") as response:
            assert response.status == 200
    rest = await frames(proxy.url, series, list(range(11, 151)), connections=1, with_metadata=False)
    assert_the_services_bytes(rest, upstream, 140)
    for path in rest:  # every frame after the 401 came with the new token, none from the old buffer
        fresh = [s for s in upstream.seen if s.raw_path == path and s.header("Authorization") != f"Bearer {refused}"]
        assert fresh, f"{path} was served from what was read ahead with the refused token"
    assert metric(proxy.url, "dicom_proxy_read_ahead_wasted_bytes_total") > 0


async def test_nothing_read_ahead_for_one_identity_is_served_to_another(start_proxy, upstream, az):
    az.configure(lifetime=305)  # refreshed 10 s after it is taken (the earliest the proxy refreshes)
    series = series_uid(150, 16 * 1024)
    proxy = start_proxy()
    first = await frames(proxy.url, series, list(range(1, 11)), connections=1)
    assert_the_services_bytes(first, upstream, 10)
    assert metric(proxy.url, "dicom_proxy_read_ahead_buffered_bytes") > 0
    az.configure(lifetime=3600, tenant="tenant-two")  # `az account set` to a subscription in another tenant
    wait_for(lambda: "in tenant tenant-two" in proxy.output(), timeout=30, what="the scheduled refresh's new token")
    rest = await frames(proxy.url, series, list(range(11, 151)), connections=1, with_metadata=False)
    assert_the_services_bytes(rest, upstream, 140)
    for path in rest:
        tenants = {token_claims(s.header("Authorization")[7:])["tid"] for s in upstream.seen if s.raw_path == path}
        assert "tenant-two" in tenants, f"{path} was served from what was read ahead for tenant-one"


async def test_a_429_stops_read_ahead_and_the_client_sees_the_services_answer(start_proxy, upstream):
    series = series_uid(100, 16 * 1024)
    proxy = start_proxy()
    upstream.frame_status = 429
    got = await frames(proxy.url, series, [1, 2], connections=1)
    assert [status for status, _, _ in got.values()] == [429, 429]
    settled(proxy)
    sent = metric(proxy.url, "dicom_proxy_read_ahead_requests_total")
    assert sent <= 16, "read-ahead kept asking after a 429"
    upstream.frame_status = None
    got = await frames(proxy.url, series, [3, 4, 5], connections=1, with_metadata=False)
    assert_the_services_bytes(got, upstream, 3)
    assert metric(proxy.url, "dicom_proxy_read_ahead_requests_total") == sent, "read-ahead did not rest"


async def test_a_reload_is_answered_by_the_service(start_proxy, upstream):
    series = series_uid(30, 16 * 1024)
    proxy = await read_ahead_of_one_frame(start_proxy, series)
    read_ahead = len(frame_requests(upstream, series))
    assert read_ahead > 1
    async with aiohttp.ClientSession() as client:
        headers = {"Accept": FRAME_ACCEPT, "Cache-Control": "no-cache"}
        async with client.get(proxy.url + frame_path(series, 2), headers=headers) as response:
            assert response.status == 200
            assert hashlib.sha256(await response.read()).hexdigest() == upstream.sent_digests[frame_path(series, 2)]
    assert len(frame_requests(upstream, series)) == read_ahead + 1, "the reload was answered from read-ahead"


async def test_the_status_page_shows_what_read_ahead_did(start_proxy, upstream):
    series = series_uid(40, 16 * 1024)
    proxy = start_proxy()
    await frames(proxy.url, series, list(range(1, 41)))
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/-/status.json") as response:
            counters = (await response.json())["counters"]["read_ahead"]
        async with client.get(f"{proxy.url}/-/") as response:
            page = await response.text()
    assert counters["hits"] == metric(proxy.url, "dicom_proxy_read_ahead_hits_total") > 0
    assert counters["misses"] + counters["hits"] == 40
    assert f'data-f="read-ahead-hits">{counters["hits"]}<' in page
    assert "frames served from read-ahead" in page and "read ahead, never asked for" in page


async def test_clients_asking_at_once_for_a_frame_on_its_way_each_get_it_whole(start_proxy, upstream):
    series = series_uid(10, 3 * 1024 * 1024)  # larger than one write: the answer goes out piece by piece
    proxy = start_proxy()
    await frames(proxy.url, series, [1], connections=1)

    async def fetch(client: aiohttp.ClientSession) -> tuple[int, str]:
        async with client.get(proxy.url + frame_path(series, 2), headers={"Accept": FRAME_ACCEPT}) as response:
            return response.status, hashlib.sha256(await response.read()).hexdigest()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        answers = await asyncio.gather(*(fetch(client) for _ in range(3)))
    assert answers == [(200, upstream.sent_digests[frame_path(series, 2)])] * 3
    assert metric(proxy.url, "dicom_proxy_read_ahead_hits_total") <= 1, "one answer read ahead, served twice"


async def test_a_series_of_many_multi_frame_instances_costs_little_memory(start_proxy, upstream):
    series = series_uid(3, 1024, frames=100_000)  # whole-slide images: 300,000 frames in a few lines of metadata
    proxy = start_proxy()
    accepts = [FRAME_ACCEPT, f"{FRAME_ACCEPT}, */*", "multipart/related; type=application/octet-stream"]
    async with aiohttp.ClientSession() as client:
        await metadata(client, proxy.url, series)
        for accept in accepts:  # each Accept is a reading of its own
            async with client.get(proxy.url + frame_path(series, 2, 5000), headers={"Accept": accept}) as response:
                assert response.status == 200
    settled(proxy)
    read_ahead = [seen.raw_path for seen in frame_requests(upstream, series)]
    assert f"/v2/studies/{STUDY}/series/{series}/instances/{series}.2/frames/5001" in read_ahead
    assert proxy.peak_rss_mib() < 150, f"peak RSS {proxy.peak_rss_mib():.0f} MiB for a series of 300,000 frames"


async def test_a_viewer_that_moves_to_another_series_gets_read_ahead_there(start_proxy, upstream):
    first, second = series_uid(40, 250 * 1024), series_uid(41, 250 * 1024)
    proxy = start_proxy("--read-ahead-mib", "1", "--read-ahead-requests", "4")
    await frames(proxy.url, first, [1], connections=1)  # read-ahead fills the buffer with the first series
    settled(proxy)
    assert metric(proxy.url, "dicom_proxy_read_ahead_buffered_bytes") > 4 * 250 * 1024
    got = await frames(proxy.url, second, list(range(1, 21)), connections=1)
    assert_the_services_bytes(got, upstream, 20)
    assert metric(proxy.url, "dicom_proxy_read_ahead_hits_total") >= 5, "the first series' frames kept the room"


async def test_frames_the_service_refuses_are_not_asked_for_again_and_again(start_proxy, upstream):
    series = series_uid(100, 16 * 1024)
    proxy = start_proxy()
    upstream.frame_status = 500
    got = await frames(proxy.url, series, [1, 2, 3, 4], connections=1)
    assert [status for status, _, _ in got.values()] == [500] * 4
    settled(proxy)
    # 16 ahead of the first frame, then one more per frame asked: each refused item is left alone for 30 s.
    assert metric(proxy.url, "dicom_proxy_read_ahead_requests_total") <= 16 + 3


async def test_a_service_that_refuses_the_identity_is_not_asked_again_and_again(start_proxy, upstream):
    series = series_uid(100, 16 * 1024)
    proxy = start_proxy()
    upstream.frame_status = 403  # the identity may read the metadata but not the pixels
    got = await frames(proxy.url, series, [1, 2, 3, 4, 5, 6], connections=1)
    assert [status for status, _, _ in got.values()] == [403] * 6
    settled(proxy)
    # The first frame's round went out before the refusal came back; after it, read-ahead rests.
    assert metric(proxy.url, "dicom_proxy_read_ahead_requests_total") <= 16


async def test_compressed_metadata_passed_through_still_teaches_read_ahead(start_proxy, upstream):
    series = series_uid(30, 16 * 1024)
    proxy = start_proxy("--no-rewrite")
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        body = await metadata(client, proxy.url, series, **{"Accept-Encoding": "gzip"})
    assert body[:2] == b"\x1f\x8b", "the metadata did not go out gzip-compressed"
    got = await frames(proxy.url, series, list(range(1, 31)), with_metadata=False)
    assert_the_services_bytes(got, upstream, 30)
    assert metric(proxy.url, "dicom_proxy_read_ahead_hits_total") >= 10


async def test_a_request_with_other_accept_values_is_not_answered_from_the_buffer(start_proxy, upstream):
    series = series_uid(30, 16 * 1024)
    proxy = await read_ahead_of_one_frame(start_proxy, series)
    before = len(frame_requests(upstream, series))
    headers = CIMultiDict([("Accept", FRAME_ACCEPT), ("Accept", "application/octet-stream")])
    async with aiohttp.ClientSession() as client:
        async with client.get(proxy.url + frame_path(series, 2), headers=headers) as response:
            assert response.status == 200
    asked = [seen for seen in frame_requests(upstream, series)[before:] if seen.raw_path == frame_path(series, 2)]
    assert asked and len([v for k, v in asked[0].headers if k.lower() == "accept"]) == 2


async def test_a_delete_through_the_proxy_drops_what_was_read_ahead(start_proxy, upstream):
    series = series_uid(30, 16 * 1024)
    proxy = await read_ahead_of_one_frame(start_proxy, series)
    assert metric(proxy.url, "dicom_proxy_read_ahead_buffered_bytes") > 0
    async with aiohttp.ClientSession() as client:
        async with client.delete(f"{proxy.url}/v2/studies/{STUDY}/series/{series}") as response:
            assert response.status == 202
    assert metric(proxy.url, "dicom_proxy_read_ahead_buffered_bytes") == 0
    before = len(frame_requests(upstream, series))
    await frames(proxy.url, series, [2], connections=1, with_metadata=False)
    assert frame_path(series, 2) in [seen.raw_path for seen in frame_requests(upstream, series)[before:]]

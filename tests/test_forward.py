"""The streaming forwarder, tested through a running proxy process in front of the fake TLS upstream."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import http.client
import json
import subprocess

import aiohttp
import pytest

from .conftest import free_port, raw_exchange, wait_for
from .upstream import BLOCK, pattern, token_claims

MiB = 1024 * 1024


def get(url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"):  # noqa: ANN201
    """A plain http.client request: it adds nothing but Host and sends the path untouched."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest(method, path, skip_accept_encoding=True)
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response, body


def test_adds_the_token_and_the_upstream_sees_its_own_host(start_proxy, upstream, az):
    proxy = start_proxy()
    response, body = get(proxy.url, "/echo/v2/studies")
    assert response.status == 200
    seen = upstream.seen[-1]
    assert seen.header("Authorization") == f"Bearer {az.issued_tokens()[0]}"
    assert seen.header("Host") == f"127.0.0.1:{upstream.port}"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{proxy.port}"
    assert token_claims(az.issued_tokens()[0])["aud"] == "https://dicom.healthcareapis.azure.com"


def test_client_secrets_and_hop_by_hop_headers_never_reach_the_upstream(start_proxy, upstream, az):
    proxy = start_proxy()
    response, _ = get(
        proxy.url,
        "/echo/v2/studies",
        headers={
            "Authorization": "Basic dXNlcjpwYXNz",
            "Cookie": "session=client-secret",
            "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
            "X-Forwarded-For": "203.0.113.66",
            "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=203.0.113.66",
            "Connection": "X-Named-Hop",
            "X-Named-Hop": "dropped",
            "TE": "trailers",
            "Accept": "application/dicom+json",
        },
    )
    assert response.status == 200
    seen = upstream.seen[-1]
    names = seen.header_names()
    assert {"cookie", "proxy-authorization", "x-named-hop", "te", "forwarded"}.isdisjoint(names)
    assert seen.header("Authorization") == f"Bearer {az.issued_tokens()[0]}"
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Host") == f"127.0.0.1:{proxy.port}"
    assert seen.header("Accept") == "application/dicom+json"
    # Nothing the client did not send is invented either (aiohttp would add Accept-Encoding: gzip).
    assert "accept-encoding" not in names and "user-agent" not in names


def test_uploads_without_a_content_type_reach_the_upstream_without_one(start_proxy, upstream):
    # aiohttp would label a body application/octet-stream, and the service would refuse a STOW so labelled.
    proxy = start_proxy()
    for framing in (b"Content-Length: 5\r\n\r\nhello", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"):
        request = b"POST /echo/upload HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + framing
        assert raw_exchange(proxy.port, request).startswith(b"HTTP/1.1 200")
        seen = upstream.seen[-1]
        assert (seen.method, seen.raw_path) == ("POST", "/echo/upload")
        assert {"content-type", "accept", "accept-encoding", "user-agent"}.isdisjoint(seen.header_names())


def test_paths_and_queries_pass_byte_for_byte(start_proxy, upstream, curl):
    proxy = start_proxy()
    target = "/echo/v2/partitions/p%201/studies/1.2.3%2F4//series?PatientName=Doe%5EJohn&x=a:b&y=%2F"
    result = subprocess.run(
        [curl, "-sS", "--path-as-is", proxy.url + target], capture_output=True, check=True, timeout=30
    )
    assert json.loads(result.stdout)["raw_path"] == target


@pytest.mark.parametrize(
    "target",
    [
        "/echo/../private",
        "/echo/%2e%2e/private",
        "/echo/.%2E/private",
        "/echo/..%5Cprivate",
        "/echo/./x",
        "/echo/..;/private",
        "/echo/%252e%252e/private",
        "/echo/..%00/private",
    ],
)
def test_paths_that_climb_above_the_base_are_refused(start_proxy, upstream, target):
    proxy = start_proxy()
    answer = raw_exchange(proxy.port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400")
    assert b'"error": "bad_request"' in answer
    assert upstream.seen == []
    assert get(proxy.url, "/echo/still-serving")[0].status == 200


@pytest.mark.parametrize(
    "request_line",
    ["GET http://elsewhere.example/steal HTTP/1.1", "CONNECT elsewhere.example:443 HTTP/1.1"],
)
def test_it_is_not_an_open_proxy(start_proxy, upstream, request_line):
    proxy = start_proxy()
    answer = raw_exchange(
        proxy.port, f"{request_line}\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.split(b"\r\n")[0] in (b"HTTP/1.1 400 Bad Request",)
    assert upstream.seen == []


def test_redirects_go_back_to_the_client_unfollowed(start_proxy, upstream):
    proxy = start_proxy()
    response, _ = get(proxy.url, "/redirect")
    assert response.status == 302
    assert response.headers["Location"] == "https://elsewhere.example/steal"
    assert [seen.raw_path for seen in upstream.seen] == ["/redirect"]


def test_hop_by_hop_response_headers_are_dropped(start_proxy, upstream):
    proxy = start_proxy()
    response, body = get(proxy.url, "/hop-by-hop")
    assert body == b"ok"
    assert response.headers["X-End-To-End"] == "passes"
    for name in ("X-Private-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert response.headers.get(name) is None, name


def test_content_encoding_passes_through_undecoded(start_proxy, upstream):
    proxy = start_proxy()
    response, body = get(proxy.url, "/gzip", headers={"Accept-Encoding": "gzip"})
    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(body)
    assert gzip.decompress(body).startswith(b'{"00100010"')
    assert upstream.seen[-1].header("Accept-Encoding") == "gzip"


def test_head_304_and_206_pass_through(start_proxy, upstream):
    proxy = start_proxy()
    response, body = get(proxy.url, "/bytes/5000", method="HEAD")
    assert (response.status, response.headers["Content-Length"], body) == (200, "5000", b"")

    response, body = get(proxy.url, "/conditional", headers={"If-None-Match": '"v1"'})
    assert (response.status, response.headers["ETag"], body) == (304, '"v1"', b"")

    response, body = get(proxy.url, "/range", headers={"Range": "bytes=100-199"})
    assert response.status == 206
    assert response.headers["Content-Range"] == "bytes 100-199/1000"
    assert body == pattern(1000)[100:200]


def test_connections_to_the_upstream_are_reused(start_proxy, upstream):
    proxy = start_proxy()
    for _ in range(5):
        assert get(proxy.url, "/echo/keep-alive")[0].status == 200
    assert len({seen.peer for seen in upstream.seen}) == 1


async def test_a_256_mib_download_streams_byte_for_byte_in_bounded_memory(start_proxy, upstream):
    # 256 MiB is enough: anything that held the body whole would pass the memory bound.
    proxy = start_proxy()
    size = 256 * MiB
    digest = hashlib.sha256()
    received = 0
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{proxy.url}/bytes/{size}") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            assert "Transfer-Encoding" not in response.headers
            async for chunk in response.content.iter_chunked(MiB):
                digest.update(chunk)
                received += len(chunk)
    assert received == size
    assert digest.hexdigest() == upstream.sent_digests[f"/bytes/{size}"]
    assert proxy.peak_rss_mib() < 150


@pytest.mark.parametrize("sized", [False, True], ids=["chunked", "content-length"])
async def test_a_256_mib_upload_streams_byte_for_byte_in_bounded_memory(start_proxy, upstream, sized):
    # Only a body small enough to replay after a 401 is held; one that states a large size streams too.
    proxy = start_proxy()
    digest = hashlib.sha256()

    async def body():  # noqa: ANN202
        for _ in range(256):
            digest.update(BLOCK)
            yield BLOCK

    headers = {"Content-Type": "application/dicom"}
    if sized:
        headers["Content-Length"] = str(256 * MiB)
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{proxy.url}/echo/v2/studies", data=body(), headers=headers) as response:
            assert response.status == 200
            echoed = await response.json()
    assert echoed["body_length"] == 256 * MiB
    assert echoed["body_sha256"] == digest.hexdigest()
    assert dict(echoed["headers"]).get("Content-Length") == headers.get("Content-Length")
    assert proxy.peak_rss_mib() < 150


@pytest.mark.parametrize("framing", ["", "?chunked"])
async def test_an_upstream_reset_mid_body_breaks_the_client_response(start_proxy, upstream, framing):
    proxy = start_proxy()
    # A short timeout: with the feature broken, only aiohttp's 75 s keep-alive close would end the body.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        async with client.get(f"{proxy.url}/reset/{8 * MiB}{framing}") as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        async with client.get(f"{proxy.url}/echo/after-reset") as response:
            assert response.status == 200
    assert "upstream broke off GET /reset" in proxy.output()


async def test_a_client_that_goes_away_cancels_the_upstream_request(start_proxy, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/endless") as response:
            await response.content.readexactly(MiB)
            response.close()
    wait_for(lambda: upstream.events, what="the upstream to see the request end")
    assert upstream.events == ["endless stopped: the client side went away"]
    assert get(proxy.url, "/echo/after-disconnect")[0].status == 200


async def test_a_client_that_goes_away_before_the_answer_cancels_the_upstream_request(start_proxy, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        with pytest.raises(asyncio.TimeoutError):
            await client.get(f"{proxy.url}/slow/30", timeout=aiohttp.ClientTimeout(total=1))
    wait_for(lambda: len(upstream.seen) == 1, what="the request to reach the upstream")
    # The proxy dropped its upstream connection, so the next request needs a new one.
    assert get(proxy.url, "/echo/after")[0].status == 200
    assert upstream.seen[0].peer != upstream.seen[1].peer


def test_an_unreachable_upstream_gives_502_json(start_proxy, upstream):
    proxy = start_proxy(upstream_url=f"https://127.0.0.1:{free_port()}")
    response, body = get(proxy.url, "/v2/studies")
    assert response.status == 502
    answer = json.loads(body)
    assert answer["error"] == "upstream_unreachable"
    assert "--upstream" in answer["hint"]


def test_a_slow_upstream_gives_504_json(start_proxy, upstream):
    proxy = start_proxy("--read-timeout", "0.5")
    response, body = get(proxy.url, "/slow/5")
    assert response.status == 504
    assert json.loads(body)["error"] == "upstream_timeout"


def test_an_untrusted_upstream_certificate_gives_502_with_a_ca_bundle_hint(start_proxy, upstream, proxy_env, tmp_path):
    port = free_port()
    from .conftest import ProxyProcess

    proxy = ProxyProcess(
        ["serve", "--upstream", upstream.url, "--listen", f"127.0.0.1:{port}"],
        proxy_env,
        tmp_path / "no-ca.log",
        port,
    )
    try:
        proxy.wait_listening()
        response, body = get(proxy.url, "/v2/studies")
        assert response.status == 502
        assert "--ca-bundle" in json.loads(body)["hint"]
        assert upstream.seen == []
    finally:
        proxy.stop()


async def test_https_proxy_from_the_environment_is_used(start_proxy, upstream, proxy_env):
    tunnels: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        tunnels.append(request.split(b"\r\n")[0])
        host, port = request.split(b" ")[1].decode().rsplit(":", 1)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writers.extend((writer, upstream_writer))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = dict(proxy_env, HTTPS_PROXY=f"http://127.0.0.1:{port}")
    proxy = start_proxy(env=env)
    async with server, aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/echo/through-the-tunnel") as response:
            assert response.status == 200
        for writer in writers:
            writer.close()
    assert tunnels == [f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1".encode()]


# Stalled clients and odd answers (issue 10) ------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo/small HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc",
        b"POST /echo/large HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n\r\nabc",
        b"POST /echo/chunked HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"GET /echo/headers HTTP/1.1\r\nHost: local",
        b"",
    ],
    ids=["small-body", "large-body", "chunked-body", "half-headers", "nothing"],
)
def test_a_client_that_goes_silent_is_cut_after_the_read_timeout(start_proxy, upstream, request_bytes):
    import time

    proxy = start_proxy("--read-timeout", "0.5")
    started = time.monotonic()
    answer = raw_exchange(proxy.port, request_bytes)  # fails after 10 s if the proxy never cuts
    # Not before the read timeout; how long after it is up to a busy machine, and the 408 says why.
    assert time.monotonic() - started >= 0.5
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
    assert get(proxy.url, "/echo/after")[0].status == 200


def test_many_stalled_uploads_are_all_cut_and_memory_comes_back(start_proxy, upstream):
    import socket

    proxy = start_proxy("--read-timeout", "0.5")
    head = b"POST /echo/stalled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000000\r\n\r\n"
    sockets = [socket.create_connection(("127.0.0.1", proxy.port), timeout=15) for _ in range(100)]
    try:
        for sock in sockets:
            sock.sendall(head + b"x" * 65536)
        for sock in sockets:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    finally:
        for sock in sockets:
            sock.close()
    assert get(proxy.url, "/echo/after")[0].status == 200
    assert proxy.peak_rss_mib() < 200


def test_an_upstream_101_is_refused_cleanly(start_proxy, upstream):
    proxy = start_proxy()
    response, body = get(proxy.url, "/switch")
    assert response.status == 502
    assert json.loads(body)["error"] == "upstream_unreachable"
    assert "101" in json.loads(body)["detail"]
    assert get(proxy.url, "/echo/after")[0].status == 200


def test_a_path_with_an_encoded_newline_is_forwarded_not_refused(start_proxy, upstream):
    proxy = start_proxy()
    response, body = get(proxy.url, "/echo/a%0Ab")
    assert response.status == 200
    assert json.loads(body)["raw_path"] == "/echo/a%0Ab"


def test_a_small_answer_cut_by_the_upstream_gets_a_clear_502(start_proxy, upstream):
    # Up to 1 MiB an answer is read whole before anything is sent, so the client can still be told.
    proxy = start_proxy()
    response, body = get(proxy.url, "/reset/100000")
    assert response.status == 502
    assert json.loads(body)["error"] == "upstream_unreachable"


@pytest.mark.parametrize(
    ("host", "origin"),
    [
        ("localhost", "http://localhost:8080"),
        ("localhost:8080", "http://localhost:8080"),
        ("127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("[::1]", "http://[::1]:8080"),
        ("[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_the_local_origin_takes_the_connections_port_when_the_host_has_none(host, origin):
    from unittest.mock import Mock

    from aiohttp.test_utils import make_mocked_request

    from proxy.forward import local_origin

    transport = Mock()
    transport.get_extra_info.return_value = ("127.0.0.1", 8080)
    assert local_origin(make_mocked_request("GET", "/v2", headers={"Host": host}, transport=transport)) == origin


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Bad\x01: PatientName\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
    ],
    ids=["bad-header", "bad-status-line", "two-lengths"],
)
def test_a_malformed_upstream_answer_gets_502_and_neither_it_nor_the_query_is_logged(start_proxy, raw_upstream, answer):
    target = "/v2/studies?PatientName=SECRETNAME"
    proxy = start_proxy(upstream_url=raw_upstream({target: answer}))
    response, body = get(proxy.url, target)
    assert response.status == 502
    assert json.loads(body)["error"] == "upstream_unreachable"
    assert b"SECRETNAME" not in body and b"PatientName" not in body
    proxy.stop()
    assert "SECRETNAME" not in proxy.output()
    assert "PatientName" not in proxy.output()


def test_a_client_that_stops_reading_a_download_is_cut_after_the_read_timeout(start_proxy, upstream):
    import socket
    import time

    proxy = start_proxy("--read-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(b"GET /bytes/209715200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.recv(1024)  # the answer has started; now the client reads nothing more
        wait_for(lambda: "client read nothing of GET /bytes" in proxy.output(), timeout=20, what="the cut")
        # What was sent before the cut can still be read; then the connection ends.
        deadline = time.monotonic() + 20
        sock.settimeout(5)
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                closed = not sock.recv(1 << 20)
            except ConnectionResetError:
                closed = True
        assert closed, "the proxy closed the connection"
    assert get(proxy.url, "/echo/after")[0].status == 200
    assert proxy.peak_rss_mib() < 100


def test_method_override_headers_never_reach_the_upstream(start_proxy, upstream):
    proxy = start_proxy("--read-only")
    response, _ = get(proxy.url, "/echo/x", headers={"X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE"})
    assert response.status == 200
    assert not {"x-http-method-override", "x-http-method"} & upstream.seen[-1].header_names()


def test_a_host_with_an_empty_port_gives_working_links(start_proxy, upstream):
    proxy = start_proxy()
    answer = raw_exchange(
        proxy.port,
        b"POST /v2/studies HTTP/1.1\r\nHost: localhost:\r\nContent-Length: 4\r\nConnection: close\r\n\r\nDICM",
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert f"http://localhost:{proxy.port}/v2/studies/1.2.3".encode() in answer


@pytest.fixture
def raw_upstream():  # noqa: ANN201
    """A loopback HTTP server answering each path with fixed bytes: answers aiohttp's server cannot write."""
    import socket
    import threading

    servers: list[socket.socket] = []

    def start(answers: dict[str, bytes]) -> str:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        servers.append(server)

        def serve() -> None:
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    request = connection.recv(65536)
                    path = request.split(b" ")[1].decode() if b" " in request else ""
                    connection.sendall(answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"))

        threading.Thread(target=serve, daemon=True).start()
        return f"http://127.0.0.1:{server.getsockname()[1]}"

    yield start
    for server in servers:
        server.close()


def test_an_answer_without_a_content_type_passes_without_one(start_proxy, raw_upstream):
    # aiohttp would label it application/octet-stream; the README promises the answer as the service sent it.
    url = raw_upstream(
        {
            "/whole": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            "/streamed": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        }
    )
    proxy = start_proxy(upstream_url=url)
    for path in ("/whole", "/streamed"):
        request = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        answer = raw_exchange(proxy.port, request.encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), answer
        assert b"hello" in body
        assert b"content-type" not in head.lower(), head


@pytest.mark.parametrize("framing", ["", "?chunked"])
def test_an_answer_cut_mid_body_is_logged_with_the_bytes_sent(start_proxy, upstream, framing):
    proxy = start_proxy()
    path = f"/reset/{8 * MiB}"
    received = raw_exchange(proxy.port, f"GET {path}{framing} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert received.startswith(b"HTTP/1.1 200") and len(received) > MiB
    line = wait_for(
        lambda: next((line for line in proxy.output().splitlines() if f'"GET {path}"' in line), None),
        what="the access line of the cut answer",
    )
    assert f'"GET {path}" 200 {len(received)} ' in line, line


def test_a_gzip_answer_that_inflates_to_1000_mib_never_freezes_other_clients(start_proxy, upstream):
    # About 1 MiB of gzip, small enough to be read whole, holding one link and then 1000 MiB of spaces. It
    # must inflate in steps that let the event loop answer others, and stream out once past the small-answer
    # limit; the client reads only its start, so nothing waits on the rest being inflated.
    import select
    import socket
    import time

    import requests

    proxy = start_proxy()
    waits: list[float] = []
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=60) as bomb:
        bomb.sendall(b"GET /v2/gzip-bomb/1000 HTTP/1.1\r\nHost: localhost\r\nAccept-Encoding: gzip\r\n\r\n")
        deadline = time.monotonic() + 120
        after_the_answer_began = 5  # probes while it streams, too
        while after_the_answer_began and time.monotonic() < deadline:
            asked = time.monotonic()
            assert requests.get(f"{proxy.url}/-/health", timeout=120).status_code == 200
            waits.append(time.monotonic() - asked)
            if after_the_answer_began < 5 or select.select([bomb], [], [], 0)[0]:
                after_the_answer_began -= 1
        start = b""
        while b"/v2/studies/1" not in start and len(start) < 4 * MiB:
            start += bomb.recv(65536)
    head = start.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200"), start[:200]
    assert b"content-encoding" not in head and b"content-length" not in head
    assert f"http://localhost:{proxy.port}/v2/studies/1".encode() in start
    # A loop frozen by inflating it whole made a probe wait 5-10 s; a busy machine answers one in milliseconds.
    assert max(waits) < 2.0, waits
    assert proxy.peak_rss_mib() < 100


async def test_a_1_mib_upload_that_meets_a_401_is_sent_again_with_a_fresh_token(start_proxy, upstream, az):
    # 1 MiB is the default replay limit: a body that size is held, so a refused token costs no failed upload.
    proxy = start_proxy()
    body = pattern(MiB)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/echo/warm") as response:
            assert response.status == 200
        first = az.issued_tokens()[0]
        upstream.revoked.add(first)
        async with client.post(f"{proxy.url}/echo/v2/studies", data=body) as response:
            assert response.status == 200
            echoed = await response.json()
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert [seen.header("Authorization") for seen in upstream.seen[1:]] == [
        f"Bearer {first}",
        f"Bearer {az.issued_tokens()[1]}",
    ]


def test_a_small_answer_not_rewritten_keeps_its_digest(start_proxy, raw_upstream):
    # Content-MD5 describes the body as the service sent it: dropped only when the body was rewritten.
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-MD5: XUFAKrxLKna5cZ2REBfFkg==\r\n\r\nhello"
    proxy = start_proxy(upstream_url=raw_upstream({"/plain": answer}))
    response, body = get(proxy.url, "/plain")
    assert (response.status, body) == (200, b"hello")
    assert response.headers["Content-MD5"] == "XUFAKrxLKna5cZ2REBfFkg=="


def _answer(status: str, head: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/dicom+json\r\nContent-MD5: bWQ1\r\n{head}\r\n".encode() + body
    )


@pytest.mark.parametrize(
    ("case", "kept"),
    [
        # Small, read whole: rewritten only when a link changed; inflated only when that was needed to.
        ("link", {"Content-Length"}),
        ("gzip-link", {"Content-Length"}),
        ("gzip-no-link", {"Content-Length", "Content-MD5", "Content-Encoding"}),
        ("not-gzip", {"Content-Length", "Content-MD5", "Content-Encoding"}),
        # Streamed: decided before the first byte, so no length or digest is promised.
        ("chunked-link", set()),
        # A range starts mid-body: never rewritten.
        ("range-link", {"Content-Length", "Content-MD5"}),
    ],
)
def test_an_answer_loses_exactly_the_headers_its_rewriting_made_stale(start_proxy, raw_upstream, case, kept):
    answers: dict[str, bytes] = {}
    base = raw_upstream(answers)  # answered from this dict, filled once the base its links name is known
    link = f'[{{"00081190": {{"vr": "UR", "Value": ["{base}/v2/studies/1"]}}}}]'.encode()
    gzipped, empty = gzip.compress(link), gzip.compress(b"[]")
    sized = "Content-Length: {}\r\n".format
    answers.update(
        {
            "/link": _answer("200 OK", sized(len(link)), link),
            "/gzip-link": _answer("200 OK", "Content-Encoding: gzip\r\n" + sized(len(gzipped)), gzipped),
            "/gzip-no-link": _answer("200 OK", "Content-Encoding: gzip\r\n" + sized(len(empty)), empty),
            "/not-gzip": _answer("200 OK", "Content-Encoding: gzip\r\n" + sized(len(link)), link),
            "/chunked-link": _answer(
                "200 OK", "Transfer-Encoding: chunked\r\n", f"{len(link):x}\r\n".encode() + link + b"\r\n0\r\n\r\n"
            ),
            "/range-link": _answer(
                "206 Partial Content", f"Content-Range: bytes 0-{len(link) - 1}/99999\r\n" + sized(len(link)), link
            ),
        }
    )
    proxy = start_proxy(upstream_url=base)
    response, body = get(proxy.url, f"/{case}")
    assert response.status == (206 if case == "range-link" else 200)
    present = {name for name in ("Content-Length", "Content-MD5", "Content-Encoding") if response.getheader(name)}
    assert present == kept
    if "Content-Length" in kept:
        assert int(response.getheader("Content-Length")) == len(body)
    rewritten = link.replace(base.encode(), proxy.url.encode())
    expected = {"gzip-no-link": empty, "not-gzip": link, "range-link": link}.get(case, rewritten)
    assert body == expected

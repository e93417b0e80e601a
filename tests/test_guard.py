"""Each defence of the guard, attacked through a running proxy; nothing refused may reach the upstream."""

from __future__ import annotations

import base64
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import ProxyProcess, free_port, in_process_proxy, raw_exchange

KEY = "k3y-for-the-tests-0123456789"


def status_line(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


@pytest.fixture
def key_file(tmp_path):  # noqa: ANN201
    path = tmp_path / "access-key"
    path.write_text(KEY + "\n")
    return path


# 1. Loopback by default ------------------------------------------------------------------------------


def test_a_remote_listen_address_needs_a_key_or_an_explicit_opt_out(proxy_env, upstream, ca_bundle, tmp_path):
    port = free_port()
    common = ["serve", "--upstream", upstream.url, "--ca-bundle", str(ca_bundle), "--listen", f"0.0.0.0:{port}"]
    refused = ProxyProcess(common, proxy_env, tmp_path / "refused.log", port)
    refused.process.wait(30)
    assert refused.stop() == 2
    assert "reachable from other machines" in refused.output()

    opted_out = ProxyProcess([*common, "--allow-unauthenticated-remote"], proxy_env, tmp_path / "open.log", port)
    try:
        opted_out.wait_listening()
        assert requests.get(f"http://127.0.0.1:{port}/-/health", timeout=10).status_code == 200
        assert "WITHOUT AN ACCESS KEY" in opted_out.output()
    finally:
        opted_out.stop()


# 2. Local access key ---------------------------------------------------------------------------------


def test_the_access_key_is_required_and_never_forwarded(start_proxy, upstream, key_file):
    proxy = start_proxy("--access-key-file", str(key_file))
    url = f"{proxy.url}/echo/v2/studies"

    missing = requests.get(url, timeout=10)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Basic realm="dicom-auth-proxy"'
    assert missing.json()["error"] == "access_key_required"
    wrong = requests.get(url, headers={"X-Dicom-Proxy-Key": KEY[:-1] + "x"}, timeout=10)
    assert wrong.status_code == 401
    garbage = requests.get(url, headers={"Authorization": "Basic %%%not-base64"}, timeout=10)
    assert garbage.status_code == 401
    assert upstream.seen == []

    by_header = requests.get(url, headers={"X-Dicom-Proxy-Key": KEY}, timeout=10)
    by_basic = requests.get(url, auth=("any-user", KEY), timeout=10)
    assert (by_header.status_code, by_basic.status_code) == (200, 200)
    for seen in upstream.seen:
        assert seen.header("X-Dicom-Proxy-Key") is None
        assert seen.header("Authorization").startswith("Bearer ")
        assert KEY not in json.dumps(seen.headers)
        assert base64.b64encode(f"any-user:{KEY}".encode()).decode() not in json.dumps(seen.headers)

    assert requests.get(f"{proxy.url}/-/health", timeout=10).status_code == 200
    proxy.stop()
    assert KEY not in proxy.output()


def test_the_access_key_can_come_from_the_environment(start_proxy, upstream, proxy_env):
    proxy = start_proxy(env=dict(proxy_env, DICOM_PROXY_ACCESS_KEY=KEY))
    assert requests.get(f"{proxy.url}/echo/x", timeout=10).status_code == 401
    assert requests.get(f"{proxy.url}/echo/x", auth=("", KEY), timeout=10).status_code == 200


# 3. DNS rebinding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.2", ""])
def test_hosts_outside_the_allowlist_get_421(start_proxy, upstream, host):
    proxy = start_proxy()
    # HTTP/1.1 without Host is refused by the parser already (400); HTTP/1.0 may omit it, and gets 421.
    request = f"GET /echo/x HTTP/1.1\r\nHost: {host}\r\n" if host else "GET /echo/x HTTP/1.0\r\n"
    answer = raw_exchange(proxy.port, f"{request}Connection: close\r\n\r\n".encode())
    assert status_line(answer).endswith(b" 421 Misdirected Request")
    assert b'"error": "host_not_allowed"' in answer
    assert upstream.seen == []


@pytest.mark.parametrize("host", ["localhost:8080", "127.0.0.1", "[::1]:9", "LOCALHOST", "dicom-proxy:8080"])
def test_loopback_names_and_added_hosts_are_served(start_proxy, upstream, host):
    proxy = start_proxy("--allow-host", "dicom-proxy")
    answer = raw_exchange(proxy.port, f"GET /echo/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    assert status_line(answer) == b"HTTP/1.1 200 OK"


# 4. Browser pages ------------------------------------------------------------------------------------

VIEWER = "https://viewer.example.org"


def test_cors_is_off_until_origins_are_listed(start_proxy, upstream):
    proxy = start_proxy()
    response = requests.get(f"{proxy.url}/echo/x", headers={"Origin": VIEWER}, timeout=10)
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers


def test_a_listed_origin_gets_a_local_preflight_and_exposed_headers(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", VIEWER)
    preflight = requests.options(
        f"{proxy.url}/v2/studies",
        headers={
            "Origin": VIEWER,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-dicom-proxy-key, cookie",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "content-type, x-dicom-proxy-key"
    assert int(preflight.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in preflight.headers["Vary"]
    assert upstream.seen == []

    response = requests.get(f"{proxy.url}/echo/x", headers={"Origin": VIEWER}, timeout=10)
    assert response.headers["Access-Control-Allow-Origin"] == VIEWER
    exposed = response.headers["Access-Control-Expose-Headers"]
    for name in ("Location", "Content-Location", "ETag", "Warning", "Content-Type", "Content-Length"):
        assert name in exposed


def test_an_unlisted_origin_cannot_write_or_read(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", VIEWER)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = requests.request(
            method, f"{proxy.url}/echo/v2/studies", headers={"Origin": "https://evil.example"}, data=b"x", timeout=10
        )
        assert response.status_code == 403, method
        assert response.json()["error"] == "forbidden"
    assert upstream.seen == []
    read = requests.get(f"{proxy.url}/echo/x", headers={"Origin": "https://evil.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in read.headers
    preflight = requests.options(
        f"{proxy.url}/v2/studies",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
        timeout=10,
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_a_literal_star_allows_any_origin_with_a_warning(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", "*")
    response = requests.get(f"{proxy.url}/echo/x", headers={"Origin": "https://anything.example"}, timeout=10)
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "CORS allows any origin" in proxy.output()


# 5. No open proxy, no smuggling ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /echo/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /echo/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /echo/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n0\r\n\r\n",
        b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n",
        b"POST /echo/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo/x HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=[
        "cl-and-te",
        "two-lengths",
        "te-not-chunked-last",
        "huge-header",
        "malformed-header",
        "tls-to-plain",
        "te-with-a-coding",
        "te-on-http-1.0",
    ],
)
def test_bad_framing_is_refused_and_the_proxy_keeps_serving(start_proxy, upstream, request_bytes):
    proxy = start_proxy()
    answer = raw_exchange(proxy.port, request_bytes)
    assert status_line(answer).startswith((b"HTTP/1.1 400", b"HTTP/1.1 431", b"HTTP/1.0 400"))
    assert upstream.seen == []
    assert requests.get(f"{proxy.url}/echo/after", timeout=10).status_code == 200


# 6. Method policy ------------------------------------------------------------------------------------


def test_read_only_lets_only_safe_methods_through(start_proxy, upstream):
    proxy = start_proxy("--read-only")
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        response = requests.request(method, f"{proxy.url}/echo/v2/studies/1.2.3", timeout=10)
        assert response.status_code == 403
        assert "--read-only" in response.json()["detail"]
    assert upstream.seen == []
    for method in ("GET", "HEAD", "OPTIONS"):
        assert requests.request(method, f"{proxy.url}/echo/v2/studies", timeout=10).status_code == 200
    assert [seen.method for seen in upstream.seen] == ["GET", "HEAD", "OPTIONS"]


# 8. Secrets stay secret ------------------------------------------------------------------------------


def test_query_strings_stay_out_of_the_access_log(start_proxy, upstream):
    proxy = start_proxy()
    assert requests.get(f"{proxy.url}/echo/v2/studies?PatientName=Doe%5EJane", timeout=10).status_code == 200
    proxy.stop()
    output = proxy.output()
    assert '"GET /echo/v2/studies" 200' in output
    assert "Doe" not in output


# 9. Property: nothing outside the policy reaches the upstream, and the proxy always answers -----------

METHODS = st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "PROPFIND"])
HOSTS = st.sampled_from(["localhost:1", "127.0.0.1", "[::1]", "evil.example", "localhost.evil", "", "dicom-proxy"])
SEGMENTS = st.sampled_from(["echo", "v2", "studies", "1.2.3", "..", ".", "%2e%2e", "a%2Fb", "%5C..", "-", "x:y"])
ORIGINS = st.sampled_from([None, VIEWER, "https://evil.example", "null"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=METHODS,
    host=HOSTS,
    segments=st.lists(SEGMENTS, min_size=1, max_size=5),
    origin=ORIGINS,
    with_key=st.booleans(),
    extra=st.dictionaries(
        st.sampled_from(["Cookie", "Proxy-Authorization", "X-Forwarded-For", "Forwarded", "Authorization"]),
        st.sampled_from(["a=1", "Basic Zm9vOmJhcg==", "203.0.113.9"]),
    ),
)
def test_nothing_outside_the_policy_reaches_the_upstream(
    policy_proxy, upstream, method, host, segments, origin, with_key, extra
):
    before = len(upstream.seen)
    path = "/" + "/".join(segments)
    headers = [f"{name}: {value}" for name, value in extra.items() if not (with_key and name == "Authorization")]
    if host:
        headers.append(f"Host: {host}")
    if origin:
        headers.append(f"Origin: {origin}")
    if with_key:
        headers.append(f"X-Dicom-Proxy-Key: {KEY}")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{line}\r\n" for line in headers) + "Connection: close\r\n\r\n"
    answer = raw_exchange(policy_proxy.port, head.encode())
    assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 400 ")), answer[:100]

    reached = upstream.seen[before:]
    decoded = path.replace("%2e", ".").replace("%2E", ".").replace("%5C", "/").replace("%2F", "/")
    allowed = (
        (host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]).lower()
        in ("localhost", "127.0.0.1", "[::1]", "dicom-proxy")
        and with_key
        and method in ("GET", "HEAD", "OPTIONS")
        and method not in ("TRACE", "CONNECT")
        and not any(part in (".", "..") for part in decoded.split("/"))
        and not path.startswith("/-/")
    )
    if not allowed:
        assert reached == [], (method, path, host, origin, with_key)
    for seen in reached:
        assert seen.method in ("GET", "HEAD", "OPTIONS")
        assert seen.header(
            "Authorization",
        ).startswith("Bearer ")
        assert seen.header_names().isdisjoint({"cookie", "proxy-authorization", "forwarded", "x-dicom-proxy-key"})
        assert seen.header("X-Forwarded-For") == "127.0.0.1"
    if allowed and not (origin == VIEWER and method == "OPTIONS"):
        # Inside the policy: forwarded, exactly once (a guard that refused everything would fail here).
        assert len(reached) == 1, (method, path, host, origin, status_line(answer))


@pytest.fixture
def policy_proxy(start_proxy, key_file):  # noqa: ANN201
    return start_proxy(
        "--read-only", "--access-key-file", str(key_file), "--allow-host", "dicom-proxy", "--cors-origin", VIEWER
    )


# Browsers and the local network (issue 10) -------------------------------------------------------------


def test_a_cross_site_page_cannot_make_the_proxy_fetch(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", "https://viewer.example.org")
    url = f"{proxy.url}/echo/v2/studies"
    # What <img src=...> or <script src=...> on a hostile page sends: no Origin, Sec-Fetch-Site cross-site.
    refused = requests.get(url, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "image"}, timeout=10)
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    unlisted = requests.get(url, headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, timeout=10)
    assert unlisted.status_code == 403
    assert upstream.seen == []
    for site in ("same-site", "same-origin", "none"):
        assert requests.get(url, headers={"Sec-Fetch-Site": site}, timeout=10).status_code == 200
    listed = requests.get(
        url, headers={"Sec-Fetch-Site": "cross-site", "Origin": "https://viewer.example.org"}, timeout=10
    )
    assert listed.status_code == 200
    assert listed.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"


def test_private_network_access_is_granted_to_listed_origins_only(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", "https://viewer.example.org")

    def preflight(origin: str) -> requests.Response:
        headers = {
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Private-Network": "true",
        }
        return requests.options(f"{proxy.url}/echo/v2/studies", headers=headers, timeout=10)

    listed = preflight("https://viewer.example.org")
    assert listed.status_code == 204
    assert listed.headers["Access-Control-Allow-Private-Network"] == "true"
    unlisted = preflight("https://evil.example")
    assert "Access-Control-Allow-Private-Network" not in unlisted.headers
    assert "Access-Control-Allow-Origin" not in unlisted.headers


def read_head(sock) -> bytes:  # noqa: ANN001
    """Bytes up to the end of the first response head."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (b"", b"HTTP/1.1 401"),
        (b"Host: evil.example\r\n", b"HTTP/1.1 421"),
        (b"Origin: https://evil.example\r\n", b"HTTP/1.1 403"),
    ],
    ids=["no-key", "wrong-host", "unlisted-origin"],
)
def test_100_continue_comes_only_after_the_checks(start_proxy, upstream, key_file, extra, expected):
    import socket

    proxy = start_proxy("--access-key-file", str(key_file))
    host = b"" if b"Host:" in extra else b"Host: localhost\r\n"
    head = (
        b"POST /echo/upload HTTP/1.1\r\n" + host + extra + b"Content-Length: 50000000\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head)
        answer = read_head(sock)
    assert status_line(answer).startswith(expected), answer
    assert upstream.seen == []

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(head.replace(b"Expect:", b"X-Dicom-Proxy-Key: " + KEY.encode() + b"\r\nExpect:"))
        answer = read_head(sock)
    if expected == b"HTTP/1.1 401":  # with the key, the body is invited
        assert status_line(answer) == b"HTTP/1.1 100 Continue"


@pytest.mark.parametrize("expect", [b"Expect: teapot\r\n", b"Expect: 100-continue\r\nExpect: teapot\r\n"])
def test_an_unknown_expectation_gets_417_json(start_proxy, upstream, expect):
    proxy = start_proxy()
    answer = raw_exchange(
        proxy.port,
        b"POST /echo/x HTTP/1.1\r\nHost: localhost\r\n" + expect + b"Content-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    assert status_line(answer) == b"HTTP/1.1 417 Expectation Failed"
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "expectation_failed"
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("host", "allowed"),
    [("localhost:8080", True), ("10.1.2.3:8080", True), ("[fd00::1]:8080", True), ("rebound.example", False)],
)
def test_probes_answer_loopback_names_and_addresses_but_no_other_dns_name(start_proxy, upstream, host, allowed):
    proxy = start_proxy()
    for probe in ("/-/health", "/-/ready"):
        response = requests.get(f"{proxy.url}{probe}", headers={"Host": host}, timeout=10)
        if allowed:
            assert response.status_code in (200, 503), (probe, response.status_code)
        else:
            assert response.status_code == 421
            assert response.json()["error"] == "host_not_allowed"


def test_only_the_probes_answer_an_ip_address_host(start_proxy, upstream):
    proxy = start_proxy()
    for path in ("/-/", "/-/status.json", "/-/metrics", "/-/nothing", "/echo/v2/studies"):
        response = requests.get(f"{proxy.url}{path}", headers={"Host": "10.1.2.3:8080"}, timeout=10)
        assert response.status_code == 421, path
        assert response.json()["error"] == "host_not_allowed"
    assert upstream.seen == []


async def test_the_access_key_is_compared_in_constant_time(az, upstream, ca_bundle, monkeypatch):
    """Answers alone cannot tell `==` from hmac.compare_digest, so the comparison itself is watched."""
    import hmac

    import aiohttp

    compared: list[tuple[bytes, bytes]] = []
    real_compare_digest = hmac.compare_digest

    def spy(presented: bytes, key: bytes) -> bool:
        compared.append((presented, key))
        return real_compare_digest(presented, key)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    monkeypatch.setenv("PATH", f"{az.directory}:{__import__('os').environ['PATH']}")
    wrong = KEY[:-1] + "x"
    async with in_process_proxy(upstream, ca_bundle, access_key=KEY) as url, aiohttp.ClientSession() as client:
        async with client.get(f"{url}/echo/x", headers={"X-Dicom-Proxy-Key": wrong}) as response:
            assert response.status == 401
        async with client.get(f"{url}/echo/x", headers={"X-Dicom-Proxy-Key": KEY}) as response:
            assert response.status == 200
    assert compared == [(wrong.encode(), KEY.encode()), (KEY.encode(), KEY.encode())]


def test_a_non_utf8_access_key_is_a_wrong_key(start_proxy, upstream, key_file):
    proxy = start_proxy("--access-key-file", str(key_file))
    answer = raw_exchange(
        proxy.port,
        b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\nX-Dicom-Proxy-Key: \xff\xfe\xfd\r\nConnection: close\r\n\r\n",
    )
    assert status_line(answer) == b"HTTP/1.1 401 Unauthorized"
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "access_key_required"
    assert upstream.seen == []


def test_two_origin_headers_are_refused(start_proxy, upstream):
    proxy = start_proxy("--cors-origin", "https://viewer.example.org")
    answer = raw_exchange(
        proxy.port,
        b"GET /echo/x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://viewer.example.org\r\n"
        b"Origin: https://evil.example\r\nConnection: close\r\n\r\n",
    )
    assert status_line(answer) == b"HTTP/1.1 400 Bad Request"
    assert upstream.seen == []


def test_a_preflight_needs_no_key_since_browsers_never_send_one(start_proxy, upstream, key_file):
    proxy = start_proxy("--access-key-file", str(key_file), "--cors-origin", "https://viewer.example.org")
    preflight = requests.options(
        f"{proxy.url}/echo/v2/studies",
        headers={
            "Origin": "https://viewer.example.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
    # The request itself still needs the key.
    get = requests.get(f"{proxy.url}/echo/v2/studies", headers={"Origin": "https://viewer.example.org"}, timeout=10)
    assert get.status_code == 401
    assert upstream.seen == []

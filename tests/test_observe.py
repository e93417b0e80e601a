"""Local endpoints, metrics, request ids, logs and graceful shutdown of a running proxy."""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import raw_exchange, wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_health_never_touches_the_token(start_proxy, az, upstream):
    # The start-up acquisition hangs, so no background retry can add az runs while health is probed.
    az.configure(mode="hang")
    proxy = start_proxy()
    wait_for(lambda: az.calls == 1, what="the start-up az run")
    for _ in range(5):
        response = requests.get(f"{proxy.url}/-/health", timeout=10)
        assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert az.calls == 1
    assert requests.get(f"{proxy.url}/-/ready", timeout=10).status_code == 503
    assert upstream.seen == []


def test_unknown_local_endpoints_are_not_forwarded(start_proxy, upstream):
    proxy = start_proxy()
    response = requests.get(f"{proxy.url}/-/studies", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert upstream.seen == []


def test_metrics_count_requests_bytes_errors_and_tokens(start_proxy, az, upstream):
    proxy = start_proxy()
    for _ in range(3):
        assert requests.get(f"{proxy.url}/bytes/1000", timeout=10).status_code == 200
    assert requests.post(f"{proxy.url}/echo/up", data=b"u" * 5000, timeout=10).status_code == 200
    assert requests.get(f"{proxy.url}/echo/x", headers={"Host": "evil.example"}, timeout=10).status_code == 421
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(f"{proxy.url}/reset/3000000", timeout=10)  # past the whole-answer limit: streamed, then cut
    response = requests.get(f"{proxy.url}/-/metrics", timeout=10)
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.text)
    assert found[("dicom_proxy_requests_total", (("method", "GET"), ("status", "2xx")))] >= 4
    assert found[("dicom_proxy_requests_total", (("method", "POST"), ("status", "2xx")))] == 1
    assert found[("dicom_proxy_requests_total", (("method", "GET"), ("status", "4xx")))] == 1
    assert found[("dicom_proxy_upstream_errors_total", (("kind", "reset"),))] == 1
    assert found[("dicom_proxy_received_bytes_total", ())] >= 5000
    assert found[("dicom_proxy_sent_bytes_total", ())] >= 3000
    assert found[("dicom_proxy_token_acquisitions_total", (("result", "ok"),))] == 1
    assert found[("dicom_proxy_token_acquisition_duration_seconds_count", ())] == 1
    assert 3000 < found[("dicom_proxy_token_expires_in_seconds", ())] <= 3600
    assert found[("dicom_proxy_requests_in_flight", ())] == 1  # this scrape itself
    assert found[("dicom_proxy_request_duration_seconds_count", ())] >= 6
    assert az.issued_tokens()[0].split(".")[1] not in response.text


def test_metrics_count_failed_token_acquisitions_and_connect_errors(start_proxy, az, upstream):
    az.configure(mode="logged_out")
    proxy = start_proxy(upstream_url="https://127.0.0.1:9")
    assert requests.get(f"{proxy.url}/v2/studies", timeout=10).status_code == 503
    found = samples(requests.get(f"{proxy.url}/-/metrics", timeout=10).text)
    assert found[("dicom_proxy_token_acquisitions_total", (("result", "error"),))] >= 1
    assert found[("dicom_proxy_token_expires_in_seconds", ())] == 0
    az.configure()
    wait_for(
        lambda: requests.get(f"{proxy.url}/-/ready", timeout=10).status_code == 200,
        timeout=20,
        what="the token to arrive",
    )
    assert requests.get(f"{proxy.url}/v2/studies", timeout=10).status_code == 502
    found = samples(requests.get(f"{proxy.url}/-/metrics", timeout=10).text)
    assert found[("dicom_proxy_upstream_errors_total", (("kind", "connect"),))] == 1


def test_request_ids_are_sent_back_and_logged(start_proxy, upstream):
    proxy = start_proxy()
    generated = requests.get(f"{proxy.url}/echo/x", timeout=10).headers["X-Request-Id"]
    following = requests.get(f"{proxy.url}/echo/x", timeout=10).headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{22}", generated) and following != generated
    viewer_id = "3f2b6a1c-8d4e-4f7a-9b0c-1d2e3f4a5b6c"  # a UUID, as viewers send
    kept = requests.get(f"{proxy.url}/echo/x", headers={"X-Request-Id": viewer_id}, timeout=10)
    assert kept.headers["X-Request-Id"] == viewer_id
    for text in ('a b" injected=1', "PatientID.DOE-JOHN.19700101"):  # free text could carry a name into the log
        replaced = requests.get(f"{proxy.url}/echo/x", headers={"X-Request-Id": text}, timeout=10)
        assert replaced.headers["X-Request-Id"] != text
    refused = requests.get(f"{proxy.url}/echo/x", headers={"Host": "evil.example"}, timeout=10)
    assert refused.headers["X-Request-Id"]
    proxy.stop()
    output = proxy.output()
    assert f"id={generated}" in output and f"id={viewer_id}" in output
    assert "DOE-JOHN" not in output


def test_the_banner_says_what_to_paste_and_who_is_signed_in(start_proxy, upstream):
    proxy = start_proxy()
    wait_for(lambda: "token acquired" in proxy.output(), what="the first token")
    output = proxy.output()
    assert f"DICOMweb base URL for viewers and scripts: http://127.0.0.1:{proxy.port}/v2" in output
    assert f"-> {upstream.url} (credential: cli" in output
    assert "radiologist@example.org in tenant tenant-one" in output
    assert "expires at 20" in output


def test_json_logs_are_one_object_per_line(start_proxy, upstream):
    proxy = start_proxy("--log-format", "json")
    assert requests.get(f"{proxy.url}/echo/v2/studies?PatientName=Doe", timeout=10).status_code == 200
    proxy.stop()
    entries = [json.loads(line) for line in proxy.output().splitlines() if line.strip()]
    access = [entry for entry in entries if entry.get("path") == "/echo/v2/studies"]
    assert len(access) == 1
    assert (access[0]["method"], access[0]["status"], access[0]["level"]) == ("GET", 200, "info")
    assert "Doe" not in proxy.output()


def test_token_failures_are_logged_with_reason_and_hint(start_proxy, az, upstream):
    az.configure(mode="logged_out")
    proxy = start_proxy()
    wait_for(lambda: "retrying in" in proxy.output(), what="the failure to be logged")
    line = next(line for line in proxy.output().splitlines() if "retrying in" in line)
    assert "Please run 'az login'" in line and "Hint: Sign in with 'az login'" in line


def test_sigterm_lets_in_flight_requests_finish(start_proxy, upstream):
    proxy = start_proxy()
    results: list[int] = []
    slow = threading.Thread(target=lambda: results.append(requests.get(f"{proxy.url}/slow/2", timeout=30).status_code))
    slow.start()
    wait_for(lambda: any(seen.raw_path == "/slow/2" for seen in upstream.seen), what="the slow request")
    proxy.process.send_signal(signal.SIGTERM)
    slow.join(30)
    assert results == [200]
    assert proxy.process.wait(30) == 0


def test_the_grace_period_bounds_the_wait(start_proxy, upstream):
    import time

    proxy = start_proxy("--shutdown-grace", "1")
    failures: list[type] = []

    def slow_request() -> None:
        try:
            requests.get(f"{proxy.url}/slow/60", timeout=60)
        except requests.exceptions.RequestException as error:
            failures.append(type(error))

    slow = threading.Thread(target=slow_request)
    slow.start()
    wait_for(lambda: any(seen.raw_path == "/slow/60" for seen in upstream.seen), what="the slow request")
    signalled = time.monotonic()
    proxy.process.send_signal(signal.SIGINT)
    assert proxy.process.wait(20) == 0
    assert time.monotonic() - signalled >= 1.0, "the request had its grace"
    # The grace once, cut by the proxy (aiohttp's own shutdown would wait it again after cancelling, and
    # no line would say so); a bound on the time would flake on a busy machine.
    assert "requests still in flight after --shutdown-grace 1s are cut" in proxy.output()
    slow.join(30)
    assert failures, "the request cut by shutdown must fail, not succeed"


# Logs are safe to share (issue 10) ---------------------------------------------------------------------

KEY = "k3y-for-the-log-tests-0123456789"
MALFORMED = [
    b"GET /v2/studies?PatientName=M\xc3\xbcller HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /v2/studies HTTP/1.1\r\nHost: localhost\r\nX-Dicom-Proxy-Key: " + KEY.encode() + b"\x00\r\n\r\n",
    b"GET /v2/studies HTTP/1.1\r\nHost: localhost\r\nX-Dicom-Proxy-Key: " + KEY.encode() + b"\nX-A: b\r\n\r\n",
    b"GET /v2/studies?PatientName=DOE^JOHN HTTP/1.1\r\nHost: localhost\r\nBad Header Doe\r\n\r\n",
]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_malformed_requests_get_json_and_leave_no_client_bytes_in_the_log(start_proxy, upstream, tmp_path, log_format):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    proxy = start_proxy("--access-key-file", str(key_file), "--log-format", log_format)
    for request_bytes in MALFORMED * 25:
        answer = raw_exchange(proxy.port, request_bytes)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0], answer
        assert b"Content-Type: application/json" in head
        assert json.loads(body)["error"] == "bad_request"
        for secret in (b"ller", KEY.encode(), b"DOE", b"Doe"):
            assert secret not in answer
    assert requests.get(f"{proxy.url}/-/health", timeout=10).status_code == 200
    proxy.stop()
    log = proxy.output()
    for secret in ("ller", KEY, "DOE", "Doe", "X-A"):
        assert secret not in log
    assert "Traceback" not in log
    assert "AssertionError" not in log
    lines = log.splitlines()
    assert len(lines) <= 100 + 10, "about one access line per refused request"
    refused = [line for line in lines if '"- -" 400' in line or ('"status": 400' in line and '"method": "-"' in line)]
    assert len(refused) == 100


def test_logged_paths_cannot_forge_lines_or_carry_terminal_escapes(start_proxy, upstream):
    proxy = start_proxy()
    forged = "2026-11-26 00:00:00,000 INFO aiohttp.access: FORGED"
    path = "/echo/x%0a" + forged.replace(" ", "%20") + "%1b[31m%0d%07%E2%80%A8%E2%80%AEevil"
    answer = raw_exchange(proxy.port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200")
    proxy.stop()
    log = proxy.output()
    assert not any(line.startswith(forged) for line in log.splitlines())
    assert "\x1b" not in log and "\x07" not in log and "\r" not in log
    assert "/echo/x\\x0a2026-11-26" in log
    assert "\u2028" not in log and "\u202e" not in log
    assert upstream.seen[0].raw_path == path, "the path itself is forwarded as it came"


def test_the_open_files_limit_is_raised_to_the_hard_limit(upstream, proxy_env, ca_bundle, tmp_path):
    import shutil

    from .conftest import ProxyProcess, free_port

    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is required by this test"
    port = free_port()
    arguments = ["serve", "--upstream", upstream.url, "--listen", f"127.0.0.1:{port}", "--ca-bundle", str(ca_bundle)]
    # Started with a soft limit below the hard one (prlimit execs the proxy, so the pid is the proxy's).
    proxy = ProxyProcess(arguments, proxy_env, tmp_path / "proxy.log", port, prefix=[prlimit, "--nofile=64:", "--"])
    try:
        proxy.wait_listening()
        limits = Path(f"/proc/{proxy.process.pid}/limits").read_text()
        soft, hard = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
    finally:
        proxy.stop()
    assert hard != "64", "the hard limit is above the lowered soft one"
    assert soft == hard


def test_with_an_access_key_ready_names_the_reason_but_not_who_is_signed_in(start_proxy, az, upstream, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    az.configure(audience="https://management.azure.com")
    proxy = start_proxy("--access-key-file", str(key_file))
    for _ in range(2):  # the start-up token and its replacement are both refused
        requests.get(f"{proxy.url}/echo/x", headers={"X-Dicom-Proxy-Key": KEY}, timeout=10)
    ready = requests.get(f"{proxy.url}/-/ready", headers={"Host": "10.0.0.1:8080"}, timeout=10)
    assert ready.status_code == 503
    assert ready.json()["error"] == "token_refused"
    assert "--audience" in ready.json()["hint"]
    assert "radiologist" not in ready.text and "tenant-one" not in ready.text and "audience '" not in ready.text


async def test_a_client_that_goes_away_mid_answer_still_gets_an_access_line(start_proxy, upstream):
    import aiohttp

    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/endless?PatientName=DOE") as response:
            await response.content.readexactly(65536)
    line = wait_for(
        lambda: next((line for line in proxy.output().splitlines() if '"GET /endless' in line), None),
        what="the access line of the cut answer",
    )
    # Without the query string (it can hold a name), and with the bytes that went out before the cut.
    assert '"GET /endless" - ' in line, line
    assert int(line.split('" - ')[1].split()[0]) > 65536, line
    assert "DOE" not in proxy.output()


def test_a_client_silent_before_its_request_ends_gets_an_access_line(start_proxy, upstream):
    proxy = start_proxy("--read-timeout", "0.5")
    answer = raw_exchange(proxy.port, b"GET /echo/x HTTP/1.1\r\nHost: loc")
    assert answer.startswith(b"HTTP/1.1 408")
    wait_for(lambda: '"- -" 408' in proxy.output(), what="the access line of the 408")


async def test_access_lines_are_written_as_requests_end_and_none_is_lost_at_shutdown(start_proxy, upstream):
    import asyncio

    import aiohttp

    proxy = start_proxy()
    # Lines are held for one turn of the event loop, not until something else is logged or the proxy stops.
    requests.get(f"{proxy.url}/echo/first", timeout=10)
    wait_for(lambda: '"GET /echo/first" 200' in proxy.output(), what="the access line while the proxy serves")
    # A burst answered in a few turns, then SIGTERM at once: every line is there, whole, one per request.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as client:

        async def fetch(number: int) -> int:
            async with client.get(f"{proxy.url}/echo/burst/{number}") as response:
                await response.read()
                return response.status

        assert await asyncio.gather(*(fetch(number) for number in range(300))) == [200] * 300
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(30) == 0
    lines = [line for line in proxy.output().splitlines() if "/echo/burst/" in line]
    assert len(lines) == 300
    assert all(re.fullmatch(r'\S+ \S+ INFO +aiohttp\.access: 127\.0\.0\.1 "GET /echo/burst/\d+" 200 \d+ .*', line)
               for line in lines)  # fmt: skip
    assert sorted(int(line.split("/echo/burst/")[1].split('"')[0]) for line in lines) == list(range(300))

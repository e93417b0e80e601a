"""Serving as a whole: several worker processes on one port, supervised."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import requests

from .conftest import wait_for


def processes_with(needle: str) -> list[int]:
    """Pids whose command line holds `needle` (forked workers share their supervisor's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_workers_share_the_port_each_with_its_own_token(start_proxy, az, upstream):
    proxy = start_proxy("--workers", "2")
    listen = f"127.0.0.1:{proxy.port}"
    wait_for(lambda: az.calls == 2, what="one token per worker")
    # A new connection each time: the kernel spreads connections over the workers by their addresses.
    statuses = [requests.get(f"{proxy.url}/echo/{number}", timeout=10).status_code for number in range(60)]
    assert statuses == [200] * 60
    assert az.calls == 2
    tokens = {f"Bearer {token}" for token in az.issued_tokens()}
    assert {seen.header("Authorization") for seen in upstream.seen} == tokens, "both workers served"
    assert len(processes_with(listen)) == 3  # the supervisor and two workers
    assert proxy.output().count("serving http://127.0.0.1") == 1, "one banner, not one per worker"
    assert proxy.stop() == 0
    assert processes_with(listen) == [], "a worker outlived the supervisor"


def test_workers_that_cannot_listen_end_the_supervisor_with_an_error(start_proxy, upstream):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proxy = start_proxy("--workers", "2", "--listen", f"127.0.0.1:{port}", wait=False)
        assert proxy.process.wait(30) == 1
    assert "cannot listen on 127.0.0.1" in proxy.output()
    assert processes_with(f"127.0.0.1:{port}") == []


async def test_the_proxy_runs_in_process_with_an_injected_credential_and_session(upstream, ca_bundle):
    """The seams: a credential and a session handed in, the real handler on a real socket."""
    import ssl

    import aiohttp
    from aiohttp import web
    from azure.core.credentials import AccessTokenInfo
    from yarl import URL

    from proxy.app import Proxy, build_server
    from proxy.settings import Settings

    from .az_stub import b64

    claims = {"aud": "https://dicom.healthcareapis.azure.com", "tid": "t", "exp": int(time.time()) + 3600}
    token = f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.in-process"

    class Credential:
        calls = 0

        async def get_token_info(self, *scopes: str, options: object = None) -> AccessTokenInfo:
            Credential.calls += 1
            return AccessTokenInfo(token, claims["exp"])

    upstream.issued_tokens = lambda: [token]  # the fake service admits what this credential gives
    credential = Credential()
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(ca_bundle)))
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        proxy = Proxy(Settings(upstream=URL(upstream.url)), credential=credential, session=session)
        await proxy.start()
        runner = web.ServerRunner(build_server(proxy))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as client:
                async with client.get(f"http://127.0.0.1:{port}/echo/v2/studies") as response:
                    assert response.status == 200
        finally:
            await runner.cleanup()
            await proxy.close()
        assert not session.closed, "a session handed in stays the caller's"
    assert upstream.seen[-1].header("Authorization") == f"Bearer {token}"
    assert credential.calls == 1


def test_a_request_line_without_a_version_gets_an_http_1_1_400(start_proxy, upstream):
    from .conftest import raw_exchange

    proxy = start_proxy()
    for request in (b"GET /x\r\n\r\n", b"GET /echo/x\r\nHost: localhost\r\n\r\n"):
        answer = raw_exchange(proxy.port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        assert json.loads(body)["error"] == "bad_request"
    assert upstream.seen == []


def test_the_aiohttp_internals_the_proxy_relies_on_exist():
    import aiohttp

    from proxy import internals

    assert internals.RELIED_ON, "nothing named: the test would prove nothing"
    missing = [f"{internal} ({internal.use})" for internal in internals.RELIED_ON if not internal.present()]
    assert not missing, f"aiohttp {aiohttp.__version__} no longer has: " + "; ".join(missing)


def test_a_missing_internal_is_reported_by_name():
    from aiohttp import web

    from proxy.internals import Internal

    gone = Internal(web.StreamResponse, "_no_such_thing", "nothing")
    assert not gone.present()
    assert str(gone) == "aiohttp.web_response.StreamResponse._no_such_thing"


async def test_an_upstream_request_carries_only_the_headers_it_was_given(upstream):
    import aiohttp

    from proxy.session import UpstreamRequest

    async with aiohttp.ClientSession(request_class=UpstreamRequest, auto_decompress=False) as client:
        # No token: the fake service answers 401, but records the request's headers first.
        async with client.post(f"{upstream.url}/echo/x", data=b"body", headers={"X-Kept": "1"}, ssl=False) as answer:
            await answer.read()
    names = upstream.seen[-1].header_names()
    assert "x-kept" in names
    assert not {"accept", "accept-encoding", "user-agent", "content-type"} & names


def test_the_app_imports_and_skips_the_open_files_step_where_resource_does_not_exist():
    # Windows has no `resource` module: importing the app must work there, and the limit step is skipped.
    import subprocess
    import sys

    script = (
        "import sys, psutil\n"  # psutil's Linux part needs `resource`; its Windows part does not
        "sys.modules['resource'] = None\n"
        "import proxy.app\n"
        "proxy.app.raise_open_file_limit()\n"
        "print('imported')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "imported\n", "")

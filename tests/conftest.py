"""Shared fixtures: the `az` stand-in, the fake TLS upstream and the proxy as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trustme

from .upstream import Upstream

HERE = Path(__file__).parent
# CI installs every Debian tool the suite can use and sets this: there, a test skipped for a missing tool (or
# for not being root) fails instead, so nothing is silently left unproven.
REQUIRE_ALL = os.environ.get("DICOM_PROXY_TEST_REQUIRE_ALL") == "1"


def needs(available: object, reason: str) -> None:
    """Skip the test unless `available`; `reason` names the Debian package to install (or root)."""
    if not available:
        pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
    """Under DICOM_PROXY_TEST_REQUIRE_ALL=1, every skip (ours or a plugin's) is a failure."""
    report = yield
    if REQUIRE_ALL and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but DICOM_PROXY_TEST_REQUIRE_ALL=1 forbids skips: {reason}"
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes exactly as given and return everything the proxy answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def end_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 15 s: a test's process never outlives it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):  # noqa: ANN001
    """Poll `condition` until it is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class AzStub:
    """A directory holding an executable `az` that the tests put first on PATH."""

    def __init__(self, directory: Path, interpreter: str = sys.executable) -> None:
        """`interpreter` goes on the shebang line: another one serves an `az` mounted into a container."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / "az"
        script.write_text(f"#!{interpreter}\n" + (HERE / "az_stub.py").read_text())
        script.chmod(0o755)
        (directory / "calls.log").touch()
        (directory / "pids.log").touch()
        (directory / "issued.log").touch()
        self.configure()

    def configure(self, **state: object) -> None:
        """Replace the stand-in's behaviour (see az_stub.py for the keys)."""
        staging = self.directory / "state.json.new"
        staging.write_text(json.dumps(state))
        staging.replace(self.directory / "state.json")

    @property
    def calls(self) -> int:
        return len((self.directory / "calls.log").read_text().splitlines())

    def call_arguments(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.directory / "calls.log").read_text().splitlines()]

    def issued_tokens(self) -> list[str]:
        return (self.directory / "issued.log").read_text().splitlines()

    def running(self) -> list[int]:
        """Pids of stand-in runs still alive (zombies count as ended)."""
        alive = []
        for line in (self.directory / "pids.log").read_text().splitlines():
            try:
                state = Path(f"/proc/{line}/stat").read_text().rpartition(")")[2].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                alive.append(int(line))
        return alive

    def stop_leftovers(self) -> None:
        for pid in self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class ProxyProcess:
    """`python -m proxy serve ...` in its own process, with its output kept for inspection."""

    def __init__(
        self, arguments: list[str], env: dict[str, str], log_path: Path, port: int, *, prefix: list[str] | None = None
    ) -> None:
        """`prefix` runs it elsewhere, e.g. `ip netns exec NAME` (which execs, so the pid stays the proxy's)."""
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "proxy", *arguments],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=HERE.parent,
        )

    def wait_listening(self, timeout: float = 20.0, probe: Callable[[int], bool] | None = None) -> None:
        """Until the port takes connections; `probe(port)` asks from elsewhere (another network namespace)."""

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the proxy exited with {self.process.returncode}:\n{self.output()}")
            if probe is not None:
                return probe(self.port)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(listening, timeout, what="the proxy to listen")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    def stop(self) -> int:
        end_process(self.process)
        self._log.close()
        return self.process.returncode


@contextlib.asynccontextmanager
async def in_process_proxy(upstream: Upstream, ca_bundle: Path, **settings: object) -> AsyncIterator[str]:
    """The real handler on a real socket in this process (for tests that watch a library call); yields its URL.

    The credential is the real one that Settings name (with `az` from PATH)."""
    from aiohttp import web
    from yarl import URL

    from proxy.app import Proxy, build_server
    from proxy.settings import Settings

    proxy = Proxy(Settings(upstream=URL(upstream.url), ca_bundle=ca_bundle, **settings))  # type: ignore[arg-type]
    await proxy.start()
    runner = web.ServerRunner(build_server(proxy))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
        await proxy.close()


@pytest.fixture(scope="session")
def certificate_authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_bundle(certificate_authority: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    certificate_authority.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def az(tmp_path: Path) -> Iterator[AzStub]:
    stub = AzStub(tmp_path / "az-bin")
    yield stub
    stub.stop_leftovers()  # a test that failed midway must not leave a hanging `az` behind


@pytest.fixture
def upstream(certificate_authority: trustme.CA, az: AzStub) -> Iterator[Upstream]:
    import ssl

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("127.0.0.1", "localhost").configure_cert(tls)
    server = Upstream(tls=tls, issued_tokens=az.issued_tokens)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def proxy_env(az: AzStub) -> dict[str, str]:
    return proxy_environment(az)


def proxy_environment(az: AzStub) -> dict[str, str]:
    """The proxy's environment: the `az` stand-in first on PATH, no DICOM_PROXY_* or proxy leaking in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("DICOM_PROXY_") and key.lower() not in ("https_proxy", "http_proxy", "no_proxy")
    }
    env["PATH"] = f"{az.directory}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def start_proxy(tmp_path: Path, proxy_env: dict[str, str], upstream: Upstream, ca_bundle: Path):  # noqa: ANN201
    """Start a proxy in front of the fake upstream: `start_proxy(*extra_flags, env=..., wait=True)`."""
    started: list[ProxyProcess] = []

    def start(
        *flags: str, env: dict[str, str] | None = None, upstream_url: str | None = None, wait: bool = True
    ) -> ProxyProcess:
        port = free_port()
        arguments = [
            "serve",
            "--upstream", upstream_url or upstream.url,
            "--listen", f"127.0.0.1:{port}",
            "--ca-bundle", str(ca_bundle),
            *flags,
        ]  # fmt: skip
        proxy = ProxyProcess(arguments, env or proxy_env, tmp_path / f"proxy-{len(started)}.log", port)
        started.append(proxy)
        if wait:
            proxy.wait_listening()
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
        leaked = [token for token in upstream.issued_tokens() if token.split(".")[1] in proxy.output()]
        assert not leaked, "a token appeared in the proxy's output"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Orthanc for the session, on loopback, admitting only ORTHANC_TOKEN; yields its base URL."""
    from .orthanc import Orthanc

    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port())
    server.wait_answering()
    yield server.url
    server.stop()


@pytest.fixture
def curl() -> str:
    path = shutil.which("curl")
    needs(path, "curl is not installed (apt-get install -y curl)")
    return str(path)

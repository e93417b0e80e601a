"""Which azure-identity credential each --credential value builds."""

from __future__ import annotations

import pytest
from azure.identity import aio
from yarl import URL

from proxy.credentials import build_credential
from proxy.errors import ConfigurationError
from proxy.settings import Settings


def settings(kind: str, tenant: str | None = None) -> Settings:
    return Settings(upstream=URL("https://ws.example"), credential=kind, tenant=tenant)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("cli", aio.AzureCliCredential),
        ("default", aio.DefaultAzureCredential),
        ("environment", aio.EnvironmentCredential),
        ("managed-identity", aio.ManagedIdentityCredential),
    ],
)
async def test_each_kind_builds_its_credential(kind, expected):
    credential = build_credential(settings(kind))
    assert isinstance(credential, expected)
    await credential.close()


async def test_workload_identity_builds_from_its_environment(monkeypatch, tmp_path):
    token_file = tmp_path / "federated-token"
    token_file.write_text("assertion")
    monkeypatch.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000001")
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
    credential = build_credential(settings("workload-identity", tenant="contoso.example"))
    assert isinstance(credential, aio.WorkloadIdentityCredential)
    await credential.close()


def test_workload_identity_without_its_environment_is_a_clear_error(monkeypatch):
    for name in ("AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_TENANT_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="--credential workload-identity"):
        build_credential(settings("workload-identity"))


def test_the_cli_credential_carries_the_tenant():
    credential = build_credential(settings("cli", tenant="contoso.example"))
    assert isinstance(credential, aio.AzureCliCredential)
    assert credential.tenant_id == "contoso.example"


async def test_a_program_embedding_the_proxy_keeps_its_own_children(az, upstream, ca_bundle, monkeypatch):
    """Only `serve`, which owns its process, ends the children left at shutdown (a hung az)."""
    import os
    import subprocess
    import sys

    from .conftest import in_process_proxy

    monkeypatch.setenv("PATH", f"{az.directory}{os.pathsep}{os.environ['PATH']}")
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        async with in_process_proxy(upstream, ca_bundle):
            pass
        assert mine.poll() is None, "closing the proxy ended a child process that was not its own"
    finally:
        mine.kill()
        mine.wait()

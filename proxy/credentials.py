"""Which azure-identity credential to build from Settings.

Only the asyncio credentials (`azure.identity.aio`) are used: the sync ones would block the event loop
for as long as `az` takes to answer.
"""

from __future__ import annotations

import contextlib

import psutil
from azure.core.credentials_async import AsyncSupportsTokenInfo
from azure.identity.aio import (
    AzureCliCredential,
    DefaultAzureCredential,
    EnvironmentCredential,
    ManagedIdentityCredential,
    WorkloadIdentityCredential,
)

from .errors import ConfigurationError
from .settings import Settings


def build_credential(settings: Settings) -> AsyncSupportsTokenInfo:
    """The credential named by `--credential`; it is the caller's to close."""
    tenant = settings.tenant
    # TokenSource asks for `tenant` on every request; credentials with a home tenant of their own must be
    # told that asking for it is allowed (azure-identity refuses other tenants by default).
    allowed = [tenant] if tenant else None
    kind = settings.credential
    if kind == "cli":
        return AzureCliCredential(tenant_id=tenant or "", process_timeout=settings.az_timeout)
    if kind == "default":
        return DefaultAzureCredential(process_timeout=settings.az_timeout, additionally_allowed_tenants=allowed)
    if kind == "environment":
        return EnvironmentCredential(additionally_allowed_tenants=allowed)
    if kind == "managed-identity":
        return ManagedIdentityCredential()
    if kind == "workload-identity":
        try:
            return WorkloadIdentityCredential(tenant_id=tenant)
        except ValueError as exc:
            # Raised when AZURE_CLIENT_ID / AZURE_FEDERATED_TOKEN_FILE are missing.
            raise ConfigurationError(f"--credential workload-identity: {exc}") from exc
    raise ConfigurationError(f"--credential: unknown credential {kind!r}")


def end_child_processes(grace: float = 2.0) -> None:
    """Stop every process this one started that still runs: an `az` cancelled mid-run goes on otherwise.

    azure-identity does not stop the CLI when the request for a token is cancelled (at shutdown), and the
    real `az` is a shell script (`az.cmd` on Windows) with a Python child, so the whole tree is stopped:
    terminated, then killed after `grace` seconds. psutil finds the tree on Linux, macOS and Windows alike.
    """
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=grace)

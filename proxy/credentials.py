"""Which azure-identity credential to build from Settings.

Only the asyncio credentials (`azure.identity.aio`) are used: the sync ones would block the event loop
for as long as `az` takes to answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

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
    real `az` is a shell script with a Python child, so the whole tree is stopped: SIGTERM, then SIGKILL
    after `grace` seconds. Linux only (it reads /proc); elsewhere it does nothing.
    """
    pids = _descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _running(pid)]
        if pids:
            time.sleep(0.02)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    waiting = [root]
    while waiting:
        children = parents.get(waiting.pop(), [])
        found.extend(children)
        waiting.extend(children)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"

"""A private network namespace for tests whose servers bind every interface (dcmtk's storescp, Orthanc).

Made with `ip netns add` as root, only its loopback up: nothing inside is reachable from any network, and its
ports cannot clash with anything outside. `prefix` runs a command inside; `ip netns exec` execs it, so the
pid of a process started that way is the program's own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence

from .conftest import needs

DCMTK = "/usr/bin"  # pynetdicom installs Python apps of the same names (echoscu, ...) into the venv


def dcmtk(name: str) -> str:
    """The path of one of Debian's dcmtk programs, never pynetdicom's look-alike on PATH."""
    path = os.path.join(DCMTK, name)
    needs(os.access(path, os.X_OK), f"dcmtk's {name} is not installed (apt-get install -y dcmtk)")
    return path


class Namespace:
    """One network namespace; `delete()` removes it (kill what runs inside first)."""

    def __init__(self) -> None:
        needs(os.geteuid() == 0, "needs root for a private network namespace (ip netns add)")
        needs(shutil.which("ip"), "ip is not installed (apt-get install -y iproute2)")
        self.name = f"dap-test-{os.getpid()}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.prefix = ["ip", "netns", "exec", self.name]
        self.run(["ip", "link", "set", "lo", "up"], check=True)

    def run(self, command: Sequence[str], *, timeout: float = 60, check: bool = False, **options: object):  # noqa: ANN201
        return subprocess.run(
            [*self.prefix, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **options,  # type: ignore[arg-type]
        )

    def listening(self, port: int) -> bool:
        return self.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], timeout=10).returncode == 0

    def http_status(self, url: str) -> str:
        return self.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url]).stdout

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], check=False)

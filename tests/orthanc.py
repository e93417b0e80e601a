"""Orthanc with its DICOMweb plugin, behind a Lua filter that admits only one bearer token: shared by the
DICOMweb tests (on loopback) and the DIMSE tests (inside a private network namespace).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from .conftest import end_process, needs, wait_for

ORTHANC_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _jwt(claims: dict[str, object]) -> str:
    def encode(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{encode({'alg': 'none', 'typ': 'JWT'})}.{encode(claims)}.orthanc-signature"


ORTHANC_TOKEN = _jwt(
    {
        "aud": "https://dicom.healthcareapis.azure.com",
        "tid": "tenant-one",
        "upn": "radiologist@example.org",
        "exp": 4102444800,
    }
)


class Orthanc:
    """One Orthanc process on `port`, its database in `home`; `prefix` runs it elsewhere (`ip netns exec ...`)."""

    def __init__(
        self, home: Path, port: int, *, prefix: Sequence[str] = (), refuse_uploads_over: int | None = None
    ) -> None:
        """`refuse_uploads_over`: bytes above which an upload is refused (403), so that one instance can fail."""
        executable = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        needs(
            Path(executable).exists() and Path(ORTHANC_PLUGIN).exists(),
            "Orthanc and its DICOMweb plugin are not installed (apt-get install -y orthanc orthanc-dicomweb)",
        )
        self.home = home
        self.url = f"http://127.0.0.1:{port}"
        (home / "filter.lua").write_text(
            "function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)\n"
            + (
                f"  if tonumber(httpHeaders['content-length'] or '0') > {refuse_uploads_over} then return false end\n"
                if refuse_uploads_over
                else ""
            )
            + f"  return httpHeaders['authorization'] == 'Bearer {ORTHANC_TOKEN}'\n"
            "end\n"
        )
        config = {
            "Name": "dicom-auth-proxy-tests",
            "HttpPort": port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(home / "db"),
            "IndexDirectory": str(home / "db"),
            "Plugins": [ORTHANC_PLUGIN],
            "LuaScripts": [str(home / "filter.lua")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (home / "orthanc.json").write_text(json.dumps(config))
        self._log = (home / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [*prefix, executable, str(home / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_answering(self, refused: Callable[[], bool] | None = None) -> None:
        """Until Orthanc refuses a tokenless search (403); `refused` asks it some other way than from here."""

        def answering() -> bool:
            assert self.process.poll() is None, (self.home / "orthanc.log").read_text()
            if refused is not None:
                return refused()
            try:
                return requests.get(f"{self.url}/dicom-web/studies", timeout=1).status_code == 403
            except requests.ConnectionError:
                return False

        wait_for(answering, timeout=30, interval=0.1, what="Orthanc to start")

    def stop(self) -> None:
        end_process(self.process)
        self._log.close()

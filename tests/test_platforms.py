"""The proxy on interpreters shaped like Windows' and macOS', on Linux (no Windows or Mac machine is at hand).

`tests/shapes/sitecustomize.py`, put on PYTHONPATH, hides what those platforms lack: for Windows the
Unix-only modules `resource` and `fcntl`, `os.fork`, `socket.SO_REUSEPORT`, /proc and the event loop's
signal handlers, with a console in cp1252; for macOS, /proc. The proxy must import, serve HTTP through the
`az` stand-in, run the DIMSE gateway's store and retrieve against Orthanc, log characters the console cannot
show, and stop gracefully on SIGINT (what Ctrl+C sends). This is a simulation, not a Windows CI: the README
says which platforms were run for real.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import requests
from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from .conftest import ProxyProcess, free_port
from .orthanc import ORTHANC_TOKEN

SHAPES = Path(__file__).parent / "shapes"
CT = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"


def shaped(environment: dict[str, str], shape: str, tmp_path: Path) -> dict[str, str]:
    """`environment` for an interpreter shaped like `shape`: the sitecustomize from a directory of its own."""
    directory = tmp_path / f"{shape}-shape"
    directory.mkdir()
    shutil.copy(SHAPES / "sitecustomize.py", directory)
    return dict(environment, PYTHONPATH=str(directory), DICOM_PROXY_TEST_SHAPE=shape, PYTHONIOENCODING="cp1252")


def test_every_module_imports_without_the_unix_only_modules(proxy_env, tmp_path):
    program = (  # every module but __main__, which would run the CLI
        "import importlib, pkgutil, proxy\n"
        "names = [m.name for m in pkgutil.walk_packages(proxy.__path__, 'proxy.') if m.name != 'proxy.__main__']\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print('imported', len(names))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        env=shaped(proxy_env, "windows", tmp_path),
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert "shaped like windows" in result.stderr, "the sitecustomize did not run"
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("imported ")


def store_and_get_back(port: int) -> tuple[int, list[bytes]]:
    """C-STORE CT_small through the gateway, then C-GET its study: the store status and the pixel data back."""
    dataset = pydicom.dcmread(CT)
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(CTImageStorage, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMPROXY")
    assert assoc.is_established
    stored = int(assoc.send_c_store(dataset).Status)
    assoc.release()

    received: list[bytes] = []

    def keep(event: evt.Event) -> int:
        received.append(bytes(event.dataset.PixelData))
        return 0x0000

    getter = AE(ae_title="WORKSTATION")
    getter.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    getter.add_requested_context(CTImageStorage, dataset.file_meta.TransferSyntaxUID)
    assoc = getter.associate(
        "127.0.0.1",
        port,
        ae_title="DICOMPROXY",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, keep)],
    )
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = dataset.StudyInstanceUID
    statuses = [
        int(status.Status) for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
    ]
    assoc.release()
    assert statuses[-1] == 0x0000, statuses
    return stored, received


@pytest.mark.parametrize("shape", ["windows", "macos"])
def test_the_proxy_serves_and_stops_on_ctrl_c_where_unix_facilities_are_missing(
    shape, proxy_env, az, orthanc, tmp_path
):
    az.configure(token=ORTHANC_TOKEN)
    port, dimse_port = free_port(), free_port()
    arguments = [
        "serve",
        "--upstream", f"{orthanc}/dicom-web",
        "--listen", f"127.0.0.1:{port}",
        "--dimse-listen", f"127.0.0.1:{dimse_port}",
        "--shutdown-grace", "1",
    ]  # fmt: skip
    proxy = ProxyProcess(arguments, shaped(proxy_env, shape, tmp_path), tmp_path / "proxy.log", port)
    try:
        proxy.wait_listening()
        assert f"shaped like {shape}" in proxy.output(), "the sitecustomize did not run"
        # HTTP through the az stand-in, with a path the cp1252 console cannot show (→ and Ω) in the log.
        assert requests.get(f"{proxy.url}/studies", timeout=30).status_code == 200
        assert requests.get(f"{proxy.url}/studies/→Ω", timeout=30).status_code in (400, 404)
        stored, received = store_and_get_back(dimse_port)
        assert stored == 0x0000
        expected = hashlib.sha256(bytes(pydicom.dcmread(CT).PixelData)).hexdigest()
        assert [hashlib.sha256(pixels).hexdigest() for pixels in received] == [expected]

        proxy.process.send_signal(signal.SIGINT)  # what Ctrl+C sends
        assert proxy.process.wait(30) == 0
    finally:
        proxy.stop()
    output = proxy.output()
    assert "Traceback" not in output and "Logging error" not in output, output
    assert '"GET /studies/\\u2192\\u03a9"' in output, "the characters the console cannot show are escaped"


def test_check_writes_what_a_cp1252_console_cannot_show_without_failing(proxy_env, az, upstream, ca_bundle, tmp_path):
    # What a localised CLI can print: characters outside the console's code page.
    az.configure(mode="fail", message="ERROR: AADSTS700082: サインインの有効期限が切れました → ")
    env = shaped(proxy_env, "windows", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--upstream", upstream.url, "--ca-bundle", str(ca_bundle)],
        env=env,
        capture_output=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    stdout, stderr = result.stdout.decode("cp1252"), result.stderr.decode("cp1252")
    assert "shaped like windows" in stderr, "the sitecustomize did not run"
    assert "Traceback" not in stdout + stderr and "Logging error" not in stdout + stderr, stdout + stderr
    assert "AADSTS700082: \\u30b5" in stdout, stdout
    assert result.returncode == 1


def test_more_than_one_worker_is_refused_in_one_line_where_there_is_no_so_reuseport(proxy_env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "https://ws-svc.dicom.azurehealthcareapis.com"]
        + ["--workers", "2"],
        env=shaped(proxy_env, "windows", tmp_path),
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--workers: more than 1 needs SO_REUSEPORT and fork, which this platform (Windows, for one)" in result.stderr

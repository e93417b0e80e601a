"""The DIMSE gateway end to end: Debian's dcmtk (echoscu, storescu, findscu, getscu, movescu, and storescp as the
move destination) and pynetdicom against the proxy, in front of Orthanc's DICOMweb behind its token filter.

storescp and Orthanc bind every interface, so everything here runs in a private network namespace (tests/netns.py)
where only loopback exists. storescu and getscu exit 0 even when an instance failed: the DIMSE statuses they log
are what the tests read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .conftest import HERE, AzStub, ProxyProcess, proxy_environment, wait_for
from .netns import Namespace, dcmtk
from .orthanc import ORTHANC_TOKEN, Orthanc

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
ORTHANC_PORT, DESTINATION_PORT, FORBIDDING_PORT, REFUSER_PORT = 8042, 11113, 8043, 11114
# What storescu must propose to send each file as it is (it sends one compressed family per run).
# Local files only: asking pydicom for one it does not ship would try to download it.
STORED = {
    "-x=": ["CT_small.dcm"],
    "-xw": ["JPEG2000.dcm", "693_J2KI.dcm"],
    "-xv": ["examples_jpeg2k.dcm"],
    "-xy": ["SC_rgb_jpeg_dcmtk.dcm"],
    "-xx": ["JPEG-lossy.dcm"],
    "-xs": ["SC_rgb_jpeg_gdcm.dcm"],
    "-xt": ["MR_small_jpeg_ls_lossless.dcm"],
    "-xd": ["image_dfl.dcm"],
}
# Orthanc refuses uploads larger than this (403), so that one C-STORE of an association can fail.
REFUSED_SIZE = 1_000_000
# 0x0124 Refused: Not authorized (PS3.7 C.5.x), a general status dcmtk's storescu has no name for.
REFUSED = "Unknown Status: 0x124"
PAGED_STUDY_INSTANCES = 30
LARGE_STUDY_INSTANCES, LARGE_INSTANCE_SIDE = 12, 2048  # 8 MiB each
# What the gateway's memory may grow by during a retrieve, in instances: pynetdicom encodes each C-STORE whole
# (the value read from the file, the encoded dataset and its copy: about three), never the study.
MEMORY_PER_INSTANCE = 5
PATIENT_NAMES = ("CompressedSamples", "Lestrade", "Synthetic^Large")


class World:
    """Orthanc, storescp and proxies in one network namespace; `close()` ends them and removes it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.namespace = Namespace()
        self._processes: list[subprocess.Popen[bytes]] = []
        self.proxies: list[ProxyProcess] = []
        self._next_port = 8080
        self.orthanc: Orthanc | None = None
        self.destination = home / "destination"
        self.destination.mkdir()
        self.az = AzStub(home / "az-bin")
        self.az.configure(token=ORTHANC_TOKEN)

    def start(self) -> None:
        (self.home / "orthanc").mkdir()
        self.orthanc = Orthanc(
            self.home / "orthanc", ORTHANC_PORT, prefix=self.namespace.prefix, refuse_uploads_over=REFUSED_SIZE
        )
        self.orthanc.wait_answering(lambda: self.namespace.http_status(f"{self.orthanc_url}/studies") == "403")
        with (self.home / "storescp.log").open("wb") as log:
            self._processes.append(
                subprocess.Popen(
                    [*self.namespace.prefix, dcmtk("storescp"), "-v", "+xa", "-aet", "MOVEDEST"]
                    + ["-od", str(self.destination), str(DESTINATION_PORT)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        wait_for(lambda: self.namespace.listening(DESTINATION_PORT), 20, 0.1, "storescp to listen")

    @property
    def orthanc_url(self) -> str:
        return f"http://127.0.0.1:{ORTHANC_PORT}/dicom-web"

    def proxy(
        self, *flags: str, az: AzStub | None = None, upstream: str | None = None, env: dict[str, str] | None = None
    ) -> ProxyProcess:
        """A proxy inside the namespace, its DIMSE gateway on its HTTP port + 1000."""
        port = self._next_port
        self._next_port += 1
        arguments = ["serve", "--upstream", upstream or self.orthanc_url, "--listen", f"127.0.0.1:{port}"]
        arguments += ["--dimse-listen", f"127.0.0.1:{port + 1000}", *flags]
        proxy = ProxyProcess(
            arguments,
            {**proxy_environment(az or self.az), **(env or {})},
            self.home / f"proxy-{port}.log",
            port,
            prefix=self.namespace.prefix,
        )
        self.proxies.append(proxy)
        proxy.wait_listening(probe=self.namespace.listening)
        wait_for(lambda: self.namespace.listening(port + 1000), 20, 0.1, "the DIMSE gateway to listen")
        proxy.dimse_port = port + 1000  # type: ignore[attr-defined]
        return proxy

    def background(self, *command: str) -> None:
        """A process inside the namespace for the rest of the module, ended by `close()`."""
        self._processes.append(
            subprocess.Popen([*self.namespace.prefix, *command], cwd=HERE.parent, stdout=subprocess.DEVNULL)
        )

    def tool(self, name: str, *arguments: str, cwd: Path | None = None, timeout: float = 120) -> str:
        """A dcmtk tool run inside the namespace: everything it printed."""
        result = self.namespace.run([dcmtk(name), *arguments], timeout=timeout, cwd=cwd)
        return result.stdout + result.stderr

    def python(self, *arguments: str, timeout: float = 120) -> dict[str, object]:
        command = [sys.executable, "-m", "tests.dimse_peer", *arguments]
        result = self.namespace.run(command, timeout=timeout, cwd=HERE.parent)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def http(self, url: str) -> str:
        return self.namespace.run(["curl", "-sS", "--max-time", "30", url]).stdout

    def close(self) -> None:
        # Every proxy told to stop at once: each takes a moment to close its gateway, and they add up.
        stopping = [proxy.process for proxy in self.proxies if proxy.process.poll() is None]
        for process in stopping:
            process.send_signal(signal.SIGTERM)
        for process in stopping:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(15)
        for proxy in self.proxies:
            proxy.stop()
        for process in self._processes:
            process.terminate()
            process.wait(15)
        if self.orthanc is not None:
            self.orthanc.stop()
        self.az.stop_leftovers()
        self.namespace.delete()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("dimse"))
    try:
        world.start()
        yield world
    finally:
        world.close()


@pytest.fixture(scope="module")
def gateway(world: World) -> ProxyProcess:
    return world.proxy(
        "--move-destination", f"MOVEDEST=127.0.0.1:{DESTINATION_PORT}",
        "--move-destination", "GONE=127.0.0.1:9",
        "--move-destination", f"REFUSER=127.0.0.1:{REFUSER_PORT}",
    )  # fmt: skip


def scu(proxy: ProxyProcess, calling: str = "TESTSCU", called: str = "DICOMPROXY") -> list[str]:
    return ["-aet", calling, "-aec", called, "127.0.0.1", str(proxy.dimse_port)]  # type: ignore[attr-defined]


def store_statuses(output: str) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


@pytest.fixture(scope="module")
def extras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second modality in CT_small's study (ModalitiesInStudy with two values), and an instance Orthanc refuses."""
    home = tmp_path_factory.mktemp("extras")
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ct.Modality, ct.SeriesInstanceUID, ct.SOPInstanceUID = "MR", generate_uid(), generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct.save_as(home / "second_modality.dcm")
    refused = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    refused.add_new(0x00091010, "OB", b"\0" * REFUSED_SIZE)  # a private value that makes it too large
    refused.StudyInstanceUID = generate_uid()
    refused.SeriesInstanceUID, refused.SOPInstanceUID = generate_uid(), generate_uid()
    refused.file_meta.MediaStorageSOPInstanceUID = refused.SOPInstanceUID
    refused.save_as(home / "refused.dcm")
    return {"second_modality": home / "second_modality.dcm", "refused": home / "refused.dcm"}


@pytest.fixture(scope="module")
def stored(world: World, gateway: ProxyProcess, extras: dict[str, Path]) -> dict[str, str]:
    """storescu of every test file, each in its own transfer syntax: what each run printed, by proposal."""
    outputs = {}
    for proposal, names in STORED.items():
        files = [str(TEST_FILES / name) for name in names]
        outputs[proposal] = world.tool("storescu", "-v", "-R", proposal, *scu(gateway), *files)
    outputs["mixed"] = world.tool(
        "storescu", "-v", *scu(gateway), str(extras["second_modality"]), str(extras["refused"])
    )
    return outputs


def originals() -> dict[str, pydicom.Dataset]:
    datasets = (pydicom.dcmread(TEST_FILES / name) for names in STORED.values() for name in names)
    return {dataset.SOPInstanceUID: dataset for dataset in datasets}


def test_echoscu_is_answered_through_the_whole_chain(world, gateway):
    output = world.tool("echoscu", "-v", *scu(gateway))
    assert "Received Echo Response (Success)" in output


def test_storescu_stores_every_instance_as_it_came_one_status_each(world, gateway, stored):
    for proposal, names in STORED.items():
        assert store_statuses(stored[proposal]) == ["Success"] * len(names), stored[proposal]
    # In one association, the instance the service refuses fails alone.
    assert store_statuses(stored["mixed"]) == ["Success", REFUSED], stored["mixed"]
    # Every one is in the service (that each is unchanged, getscu and movescu show by bringing it back).
    for uid in originals():
        assert uid in gateway_search(world, gateway, f"instances?SOPInstanceUID={uid}")


def gateway_search(world: World, proxy: ProxyProcess, query: str) -> str:
    """A QIDO-RS search through the proxy's HTTP side (the same token, the same service)."""
    return world.http(f"{proxy.url}/{query}")


def find(world: World, proxy: ProxyProcess, directory: Path, *keys: str) -> tuple[str, list[pydicom.Dataset]]:
    directory.mkdir()
    arguments = [item for key in keys for item in ("-k", key)]
    output = world.tool("findscu", "-v", "-S", "-X", *arguments, *scu(proxy), cwd=directory)
    answers = [pydicom.dcmread(path) for path in sorted(directory.glob("rsp*.dcm"))]
    return output, answers


def test_findscu_at_each_level_finds_what_qido_finds_with_the_keys_asked_for(world, gateway, stored, tmp_path):
    output, studies = find(
        world, gateway, tmp_path / "studies",
        "QueryRetrieveLevel=STUDY", "PatientName=Compressed*", "StudyInstanceUID", "StudyDate", "StudyTime",
        "PatientID", "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "AccessionNumber",
    )  # fmt: skip
    assert "Received Final Find Response (Success)" in output, output
    qido = json.loads(gateway_search(world, gateway, "studies?PatientName=Compressed*"))
    assert {answer.StudyInstanceUID for answer in studies} == {item["0020000D"]["Value"][0] for item in qido}
    assert len(studies) == 4
    wanted = {"StudyInstanceUID", "StudyDate", "StudyTime", "PatientName", "PatientID", "ModalitiesInStudy"}
    wanted |= {"NumberOfStudyRelatedInstances", "AccessionNumber", "QueryRetrieveLevel", "SpecificCharacterSet"}
    # Retrieve AE Title in every answer, asked for or not (PS3.4 C.4.1.1.3.2), as native archives send it.
    wanted |= {"RetrieveAETitle"}
    for answer in studies:
        assert {element.keyword for element in answer} == wanted
        assert answer.RetrieveAETitle == "DICOMPROXY"
        vrs = {element.keyword: element.VR for element in answer}
        assert (vrs["PatientName"], vrs["StudyDate"], vrs["StudyTime"]) == ("PN", "DA", "TM")
        assert (vrs["StudyInstanceUID"], vrs["NumberOfStudyRelatedInstances"]) == ("UI", "IS")
        assert str(answer.PatientName).startswith("CompressedSamples^")
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ct_study = next(answer for answer in studies if answer.StudyInstanceUID == ct.StudyInstanceUID)
    assert sorted(ct_study.ModalitiesInStudy) == ["CT", "MR"]
    assert ct_study.NumberOfStudyRelatedInstances == 2 and ct_study.StudyDate == ct.StudyDate

    _output, series = find(
        world, gateway, tmp_path / "series",
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={ct.StudyInstanceUID}", "SeriesInstanceUID", "Modality",
        "SeriesNumber",
    )  # fmt: skip
    assert sorted(answer.Modality for answer in series) == ["CT", "MR"]
    assert all(answer["SeriesNumber"].VR == "IS" for answer in series)

    _output, images = find(
        world, gateway, tmp_path / "images",
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={ct.StudyInstanceUID}",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
    )  # fmt: skip
    assert [(answer.SOPInstanceUID, answer.InstanceNumber) for answer in images] == [
        (ct.SOPInstanceUID, ct.InstanceNumber)
    ]
    assert all(answer.RetrieveAETitle == "DICOMPROXY" for answer in (*series, *images))
    output, nothing = find(world, gateway, tmp_path / "none", "QueryRetrieveLevel=STUDY", "PatientName=Nobody*")
    assert nothing == [] and "Received Final Find Response (Success)" in output
    output, _bad = find(world, gateway, tmp_path / "bad", "QueryRetrieveLevel=WARD", "PatientName")
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in output, output  # 0xA900


def assert_same_pixels(received: Path, original: pydicom.Dataset) -> None:
    dataset = pydicom.dcmread(received)
    assert dataset.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, received.name
    assert dataset.PixelData == original.PixelData, received.name


def test_getscu_brings_instances_back_byte_identical_in_their_stored_transfer_syntax(world, gateway, stored, tmp_path):
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    (tmp_path / "ct").mkdir()
    output = world.tool(
        "getscu", "-v", "-S", "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={ct.StudyInstanceUID}",
        "-k", f"SeriesInstanceUID={ct.SeriesInstanceUID}", "-od", str(tmp_path / "ct"), *scu(gateway),
    )  # fmt: skip
    assert "Received C-GET Response (Success)" in output, output
    assert_same_pixels(next((tmp_path / "ct").iterdir()), ct)

    jpeg = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm")
    (tmp_path / "jpeg").mkdir()
    output = world.tool(
        "getscu", "-v", "-S", "+xy", "-k", "QueryRetrieveLevel=IMAGE",
        "-k", f"StudyInstanceUID={jpeg.StudyInstanceUID}", "-k", f"SeriesInstanceUID={jpeg.SeriesInstanceUID}",
        "-k", f"SOPInstanceUID={jpeg.SOPInstanceUID}",
        "-od", str(tmp_path / "jpeg"), *scu(gateway),
    )  # fmt: skip
    assert "Received C-GET Response (Success)" in output, output
    assert_same_pixels(next((tmp_path / "jpeg").iterdir()), jpeg)

    # Asked for uncompressed only, the JPEG instances of that study cannot be sent: each is a failed sub-operation.
    (tmp_path / "refused").mkdir()
    output = world.tool(
        "getscu", "-v", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={jpeg.StudyInstanceUID}",
        "-od", str(tmp_path / "refused"), *scu(gateway),
    )  # fmt: skip
    assert "Number of Failed Suboperations    : 2" in output, output
    assert list((tmp_path / "refused").iterdir()) == []
    # dcmtk's getscu releases cleanly after a retrieve with failures (the final answer is the one it expects).
    assert "Association Release Failed" not in output and "Releasing Association" in output, output
    # Decided before sending: one gateway line says why, and pynetdicom never tries (nor logs) those sends.
    log = gateway.output()
    assert re.search(r"C-GET from TESTSCU: 2 not sent: the requester accepts no JPEG", log), log[-3000:]
    assert "Unable to determine the presentation context" not in log
    assert "C-STORE sub-operation failed" not in log


def operations_counted(world: World, proxy: ProxyProcess, operation: str) -> Counter[str]:
    """The gateway's dicom_proxy_dimse_operations_total for `operation`, by status."""
    metrics = world.http(f"{proxy.url}/-/metrics")
    pattern = rf'dicom_proxy_dimse_operations_total\{{operation="{operation}",status="([^"]+)"\}} (\S+)'
    return Counter({status: int(float(count)) for status, count in re.findall(pattern, metrics)})


def test_c_stores_the_requester_refuses_are_in_the_final_status_the_failed_list_the_log_and_the_metrics(
    world, gateway, stored
):
    """pynetdicom as the C-GET requester refuses its first C-STOREs (0xA700). It is told 0xB000 (0xA702 when every
    sub-operation failed) with every failed UID, those the gateway held back (JPEG, which it does not accept)
    and those it refused alike; the gateway's log line and metrics say the status it was told."""
    ct, jpeg = (pydicom.dcmread(TEST_FILES / name) for name in ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm"))
    held_back = sorted(uid for uid, dataset in originals().items() if dataset.StudyInstanceUID == jpeg.StudyInstanceUID)
    assert len(held_back) == 2
    port = str(gateway.dimse_port)  # type: ignore[attr-defined]
    before_log, before = len(gateway.output()), operations_counted(world, gateway, "C-GET")
    failed = set()
    for refuse, studies, held, status in (
        (1, [ct.StudyInstanceUID], [], 0xB000),  # refusals only, nothing held back
        (1, [ct.StudyInstanceUID, jpeg.StudyInstanceUID], held_back, 0xB000),  # both
        (2, [ct.StudyInstanceUID, jpeg.StudyInstanceUID], held_back, 0xA702),  # every sub-operation failed
    ):
        got = world.python("get-refusing", port, str(refuse), *studies)
        assert got["status"] == status and len(got["refused"]) == refuse, got
        assert sorted(got["failed"]) == sorted([*got["refused"], *held]), got
        assert got["NumberOfFailedSuboperations"] == refuse + len(held), got
        assert got["NumberOfCompletedSuboperations"] == len(got["stored"]) == 2 - refuse, got
        failed |= set(got["failed"])
    log = gateway.output()[before_log:]
    assert re.findall(r" PEERGET C-GET STUDY count=\d+ status=(\S+)", log) == ["0xB000", "0xB000", "0xA702"], log
    assert log.count("refused by the requester: 0xA700") == 3, log
    counted = operations_counted(world, gateway, "C-GET")
    counted.subtract(before)
    assert +counted == Counter({"0xB000": 2, "0xA702": 1}), counted
    assert not [uid for uid in failed if uid in log], log


def test_movescu_sends_every_instance_on_one_association_with_pending_counts(world, gateway, stored):
    wanted = originals()
    studies = sorted({dataset.StudyInstanceUID for dataset in wanted.values()})
    before = (world.home / "storescp.log").read_text().count("Association Received")
    output = world.tool(
        "movescu", "-v", "-S", "-aem", "MOVEDEST", "-k", "QueryRetrieveLevel=STUDY",
        "-k", "StudyInstanceUID=" + "\\".join(studies), *scu(gateway),
    )  # fmt: skip
    assert "Received Final Move Response (Success)" in output, output
    pending = re.findall(r"Received Move Response (\d+) \(Pending\)", output)
    assert [int(number) for number in pending] == list(range(1, len(pending) + 1)) and len(pending) >= len(wanted)
    received = {pydicom.dcmread(path).SOPInstanceUID: path for path in world.destination.iterdir()}
    for uid, original in wanted.items():
        assert_same_pixels(received[uid], original)
    after = (world.home / "storescp.log").read_text().count("Association Received")
    assert after - before == 1, "one association to the destination for the whole move"


def test_c_stores_the_destination_refuses_are_in_the_final_move_status_the_log_and_the_metrics(world, gateway, stored):
    """A C-MOVE destination (pynetdicom) refuses the first of CT_small's study's two instances: movescu is told
    0xB000 (pynetdicom's count), and the gateway's log line and metrics say 0xB000 too, not success."""
    world.background(sys.executable, "-m", "tests.dimse_peer", "refusing-destination", str(REFUSER_PORT), "1")
    wait_for(lambda: world.namespace.listening(REFUSER_PORT), 20, 0.1, "the refusing destination to listen")
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    before_log, before = len(gateway.output()), operations_counted(world, gateway, "C-MOVE")
    output = world.tool(
        "movescu", "-v", "-S", "-aem", "REFUSER", "-k", "QueryRetrieveLevel=STUDY",
        "-k", f"StudyInstanceUID={ct.StudyInstanceUID}", *scu(gateway),
    )  # fmt: skip
    assert "Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in output, output
    log = gateway.output()[before_log:]
    assert re.findall(r" TESTSCU C-MOVE STUDY count=2 status=(\S+)", log) == ["0xB000"], log
    assert "1 refused by the destination: 0xA700 (1)" in log, log
    counted = operations_counted(world, gateway, "C-MOVE")
    counted.subtract(before)
    assert +counted == Counter({"0xB000": 1}), counted


def test_movescu_to_an_unknown_or_unreachable_destination_fails(world, gateway, stored):
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    for destination in ("NOWHERE", "GONE"):
        output = world.tool(
            "movescu", "-v", "-S", "-aem", destination, "-k", "QueryRetrieveLevel=STUDY",
            "-k", f"StudyInstanceUID={ct.StudyInstanceUID}", *scu(gateway),
        )  # fmt: skip
        assert "Refused: MoveDestinationUnknown" in output, output
    # The log and the metrics say so too, not success; the unreachable one names where it was sought.
    log = gateway.output()
    moves = re.findall(r"TESTSCU C-MOVE \S+ count=\d+ status=(\S+)", log)
    assert moves[-2:] == ["0xA801", "0xA801"], moves
    assert "could not open an association to its destination at 127.0.0.1:9" in log


def every_operation(world: World, proxy: ProxyProcess, directory: Path) -> dict[str, str]:
    """Each DIMSE operation once against `proxy`: what each tool printed.

    "Quickly" is proved by the tool's timeout, not by timing it: an operation that waited on the service would
    wait for the gateway's own limit (connect + read timeout, 310 s), and 60 s ends the tool (and fails the
    test) long before that, while a busy 2-core machine still fails an operation in well under 60 s.
    """
    ct = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    study = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ct.StudyInstanceUID}"]
    outputs = {}
    for name, arguments in {
        "echo": ["echoscu", "-v"],
        "store": ["storescu", "-v"],
        "find": ["findscu", "-v", "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName"],
        "get": ["getscu", "-v", "-S", *study, "-od", str(directory)],
        "move": ["movescu", "-v", "-S", "-aem", "MOVEDEST", *study],
    }.items():
        files = [str(TEST_FILES / "CT_small.dcm")] if name == "store" else []
        outputs[name] = world.tool(arguments[0], *arguments[1:], *scu(proxy), *files, timeout=60)
    return outputs


def test_logged_out_or_service_down_fails_every_operation_quickly_and_keeps_serving(world, tmp_path):
    logged_out = AzStub(tmp_path / "logged-out-az")
    logged_out.configure(mode="logged_out")
    for proxy, hint in (
        (world.proxy("--move-destination", f"MOVEDEST=127.0.0.1:{DESTINATION_PORT}", az=logged_out), "az login"),
        (
            world.proxy("--move-destination", f"MOVEDEST=127.0.0.1:{DESTINATION_PORT}", upstream="http://127.0.0.1:9"),
            "Check the --upstream URL",
        ),
    ):
        (tmp_path / "got").mkdir(exist_ok=True)
        outputs = every_operation(world, proxy, tmp_path / "got")
        assert "Received Echo Response (Success)" not in outputs["echo"], outputs["echo"]
        assert store_statuses(outputs["store"]) == ["Refused: OutOfResources"], outputs["store"]
        assert "Out of Resources" in outputs["find"] or "OutOfResources" in outputs["find"], outputs["find"]
        assert "Received C-GET Response (Success)" not in outputs["get"], outputs["get"]
        assert "Received Final Move Response (Success)" not in outputs["move"], outputs["move"]
        # And after every one of them failed, the gateway keeps serving: an association is answered as before.
        again = world.tool("echoscu", "-v", *scu(proxy), timeout=60)
        assert "Received Echo Response (Unknown Status: 0x110)" in again, again
        log = proxy.output()
        assert hint in log
        # The statuses PS3.4 defines for each service, which dcmtk and pynetdicom know by name.
        statuses = dict(re.findall(r" TESTSCU (C-\w+) \S+ count=\d+ status=(\S+)", log))
        assert statuses == {
            "C-ECHO": "0x0110",
            "C-STORE": "0xA700",
            "C-FIND": "0xA700",
            "C-GET": "0xA701",
            "C-MOVE": "0xA701",
        }, statuses
        # echoscu names no failure status at all (it prints 0x0110, a general status of PS3.7 C.5, as unknown);
        # the others name every status their service defines.
        assert "Received Echo Response (Unknown Status: 0x110)" in outputs["echo"], outputs["echo"]
        unknown = [line for name, output in outputs.items() if name != "echo" for line in output.splitlines()]
        assert not [line for line in unknown if "Unknown Status" in line], outputs
        assert "Unknown status" not in log
    logged_out.stop_leftovers()


def test_read_only_refuses_store_and_the_association_policy_holds(world, tmp_path):
    proxy = world.proxy("--read-only", "--dimse-aet", "ARCHIVE", "--dimse-allow", "MODALITY", "--dimse-allow",
                        "ELSEWHERE@192.0.2.7")  # fmt: skip
    assert "Association Accepted" in world.tool("echoscu", "-v", *scu(proxy, "MODALITY", "ARCHIVE"))
    wrong_called = world.tool("echoscu", "-v", *scu(proxy, "MODALITY", "DICOMPROXY"))
    assert "Called AE Title Not Recognized" in wrong_called, wrong_called
    for calling in ("STRANGER", "ELSEWHERE"):  # not listed; listed, but only from another address
        refused = world.tool("echoscu", "-v", *scu(proxy, calling, "ARCHIVE"))
        assert "Calling AE Title Not Recognized" in refused, refused
    # A title no AE may have (a backslash) is rejected the same way, with one line and no traceback.
    malformed = world.tool("echoscu", "-v", *scu(proxy, "A\\B^C", "ARCHIVE"))
    assert "Calling AE Title Not Recognized" in malformed, malformed
    log = proxy.output()
    assert "Traceback" not in log and len(re.findall(r"calling AE A\\B\^C.* rejected", log)) == 1, log
    output = world.tool("storescu", "-v", *scu(proxy, "MODALITY", "ARCHIVE"), str(TEST_FILES / "CT_small.dcm"))
    assert store_statuses(output) == [REFUSED], output
    assert "--read-only" in proxy.output()


def test_a_gateway_beyond_loopback_without_an_allow_list_refuses_to_start():
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "https://ws.example", "--dimse-listen", "0.0.0.0:11112"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=HERE.parent,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--dimse-allow" in result.stderr, result.stderr


def test_metrics_count_operations_and_the_access_log_has_one_line_each_without_patients(world, gateway, stored):
    metrics = world.http(f"{gateway.url}/-/metrics")
    stores = re.search(r'dicom_proxy_dimse_operations_total\{operation="C-STORE",status="0x0000"\} (\d+)', metrics)
    assert stores and int(float(stores.group(1))) >= sum(len(names) for names in STORED.values()), metrics
    assert 'dicom_proxy_dimse_associations_total{result="accepted"}' in metrics
    log = gateway.output()
    lines = [line for line in log.splitlines() if "proxy.dimse:" in line and " count=" in line]
    assert any(re.search(r" TESTSCU C-FIND STUDY count=4 status=0x0000 \d+\.\d+s$", line) for line in lines), lines
    assert any(" C-STORE IMAGE count=1 status=0x0000 " in line for line in lines)
    for secret in (*PATIENT_NAMES, "13US1", "4MR1"):
        assert secret not in log


Study = tuple[str, list[Path]]


def synthetic_study(home: Path, count: int, size: int) -> Study:
    """`count` CT instances of `size` x `size` 16-bit pixels in three series of one new study, as files."""
    study = generate_uid()
    series = [generate_uid() for _ in range(3)]
    files = []
    for number in range(count):
        dataset = pydicom.Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series[number % 3]
        dataset.PatientName, dataset.PatientID, dataset.Modality = "Synthetic^Large", "LARGE1", "CT"
        dataset.InstanceNumber = number + 1
        dataset.Rows = dataset.Columns = size
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 0
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.PixelData = number.to_bytes(2, "little") * (size * size)
        path = home / f"{number:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    return study, files


def store_all(world: World, proxy: ProxyProcess, files: list[Path]) -> None:
    output = world.tool("storescu", "-v", *scu(proxy), *map(str, files), timeout=300)
    assert store_statuses(output) == ["Success"] * len(files), output[-2000:]


@pytest.fixture(scope="module")
def paged_study(world: World, gateway: ProxyProcess, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """30 small instances: three pages and more for a gateway with --dimse-page-size 10; cancellation."""
    study, files = synthetic_study(tmp_path_factory.mktemp("paged"), PAGED_STUDY_INSTANCES, 64)
    store_all(world, gateway, files)
    return study, files


@pytest.fixture(scope="module")
def large_study(world: World, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """A few large instances, together larger than what the gateway may hold in memory. They go to Orthanc's
    REST API directly, chunked: the filter refuses an upload whose Content-Length is over REFUSED_SIZE."""
    study, files = synthetic_study(tmp_path_factory.mktemp("large"), LARGE_STUDY_INSTANCES, LARGE_INSTANCE_SIDE)
    for path in files:
        upload = ["curl", "-sS", "--fail", "--max-time", "60", "-H", f"Authorization: Bearer {ORTHANC_TOKEN}"]
        # Without Expect: 100-continue, which Orthanc leaves unanswered: curl would wait a second each time.
        upload += ["-H", "Expect:", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}"]
        upload.append(f"http://127.0.0.1:{ORTHANC_PORT}/instances")
        result = world.namespace.run(upload)
        assert result.returncode == 0, result.stdout + result.stderr
    return study, files


def test_a_retrieve_and_a_search_follow_qido_pages_with_offset_until_the_results_end(world, paged_study, tmp_path):
    study, files = paged_study
    proxy = world.proxy("--dimse-page-size", "10")
    # 30 results are three pages of 10 (and the empty one that ends them): the rest come with offset.
    _output, images = find(
        world, proxy, tmp_path / "images", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}", "SOPInstanceUID"
    )
    originals = {pydicom.dcmread(path).SOPInstanceUID: path for path in files}
    assert sorted(answer.SOPInstanceUID for answer in images) == sorted(originals)
    (tmp_path / "got").mkdir()
    output = world.tool(
        "getscu", "-S", "-v", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "-od", str(tmp_path / "got"), *scu(proxy),
    )  # fmt: skip
    assert f"Number of Completed Suboperations : {PAGED_STUDY_INSTANCES}" in output, output[-2000:]
    assert len(re.findall(r"Received C-GET Response \(Pending\)", output)) == PAGED_STUDY_INSTANCES
    for path in tmp_path.joinpath("got").iterdir():
        received = pydicom.dcmread(path)
        assert received.PixelData == pydicom.dcmread(originals[received.SOPInstanceUID]).PixelData


def test_a_large_study_streams_through_in_flat_memory(world, large_study, tmp_path):
    """The gateway holds an instance or two at a time, never the study: its memory grows by far less."""
    study, files = large_study
    proxy = world.proxy()
    assert "Received Echo Response (Success)" in world.tool("echoscu", "-v", *scu(proxy))
    before = proxy.peak_rss_mib()
    (tmp_path / "got").mkdir()
    output = world.tool(
        "getscu", "-S", "-v", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "-od", str(tmp_path / "got"), *scu(proxy), timeout=300,
    )  # fmt: skip
    assert f"Number of Completed Suboperations : {LARGE_STUDY_INSTANCES}" in output, output[-2000:]
    by_uid = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in files}
    got = sorted(tmp_path.joinpath("got").iterdir())
    assert len(got) == LARGE_STUDY_INSTANCES
    for path in got:
        received = pydicom.dcmread(path)
        assert received.PixelData == pydicom.dcmread(by_uid[received.SOPInstanceUID]).PixelData
    study_mib = sum(path.stat().st_size for path in files) / 1024 / 1024
    instance_mib = study_mib / LARGE_STUDY_INSTANCES
    growth = proxy.peak_rss_mib() - before
    assert growth < MEMORY_PER_INSTANCE * instance_mib < study_mib, (
        f"grew {growth:.0f} MiB for a {study_mib:.0f} MiB study"
    )


def test_cancel_of_get_and_move_and_ten_concurrent_associations_with_pynetdicom(world, gateway, paged_study, stored):
    study, files = paged_study
    port = str(gateway.dimse_port)  # type: ignore[attr-defined]
    got = world.python("cancel-get", port, study)
    assert got["statuses"][-1] == 0xFE00, got
    assert 0 < got["stored"] < PAGED_STUDY_INSTANCES and got["NumberOfRemainingSuboperations"] > 0, got
    moved = world.python("cancel-move", port, study, "MOVEDEST")
    assert moved["statuses"][-1] == 0xFE00, moved
    assert moved["NumberOfRemainingSuboperations"] > 0, moved

    concurrent = world.python("store-concurrently", port, "10", *map(str, files[:3]))
    assert concurrent["statuses"] == [[0, 0, 0]] * 10, concurrent


def test_an_instance_cut_off_mid_transfer_leaves_no_copy_behind(world, tmp_path):
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    proxy = world.proxy(env={"TMPDIR": str(temporary)})
    big = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    big.Rows = big.Columns = 4096
    big.PixelData = os.urandom(4096 * 4096 * 2)  # 32 MiB: still arriving when the sender is killed
    big.SOPInstanceUID = big.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    big.save_as(tmp_path / "big.dcm")
    sender = subprocess.Popen(
        [*world.namespace.prefix, dcmtk("storescu"), *scu(proxy), str(tmp_path / "big.dcm")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(temporary.iterdir()), timeout=20, interval=0.01, what="the instance to start arriving")
    finally:
        sender.kill()
        sender.wait(10)
    # The partial copy holds patient data: it must not outlive the association.
    wait_for(lambda: not any(temporary.iterdir()), timeout=20, what="the partial copy to be deleted")
    # The line is written just after the deletion, from pynetdicom's thread: under load, a moment later.
    wait_for(lambda: "partial copy was deleted" in proxy.output(), timeout=10, what="the gateway to say so")


def test_the_gateway_log_carries_no_identifier_value_and_no_uid(world, tmp_path):
    """A name where the level goes, and a study the service refuses (403): the log says what happened (the
    operation, its level, the statuses) and never the name or the UID."""
    world.background(sys.executable, "-m", "tests.dimse_peer", "forbidding-service", str(FORBIDDING_PORT))
    wait_for(lambda: world.namespace.listening(FORBIDDING_PORT), 20, 0.1, "the forbidding service to listen")
    proxy = world.proxy(
        "--move-destination", f"MOVEDEST=127.0.0.1:{DESTINATION_PORT}",
        upstream=f"http://127.0.0.1:{FORBIDDING_PORT}/dicom-web",
    )  # fmt: skip
    study = "1.2.840.99.1.777"
    output, _answers = find(world, proxy, tmp_path / "name", "QueryRetrieveLevel=DOE^JANE", "PatientName")
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in output, output
    output, _answers = find(
        world, proxy, tmp_path / "series", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study}", "Modality"
    )
    assert "0x124" in output, output
    retrieve = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", *scu(proxy)]
    world.tool("getscu", "-v", "-S", "-od", str(tmp_path), *retrieve)
    world.tool("movescu", "-v", "-S", "-aem", "MOVEDEST", *retrieve)
    log = proxy.output()
    statuses = re.findall(r" TESTSCU (C-\w+) (\S+) count=\d+ status=(\S+)", log)
    assert statuses == [
        ("C-FIND", "-", "0xA900"),
        ("C-FIND", "SERIES", "0x0124"),
        ("C-GET", "STUDY", "0x0124"),
        ("C-MOVE", "STUDY", "0x0124"),
    ], statuses
    assert "403" in log, log
    for secret in ("DOE", "JANE", study, "99.1.777"):
        assert secret not in log, log


def test_a_retrieve_that_matches_nothing_or_cannot_be_read_is_logged_as_what_the_peer_was_told(
    world, gateway, tmp_path
):
    """An empty C-MOVE is a success, not a failed destination; an empty or refused C-GET is not 'aborted'."""

    def aborted() -> float:
        metrics = world.http(f"{gateway.url}/-/metrics")
        counts = re.findall(
            r'dicom_proxy_dimse_operations_total\{operation="C-(?:GET|MOVE)",status="aborted"\} (\S+)', metrics
        )
        return sum(float(count) for count in counts)

    before_log, before_aborted = len(gateway.output()), aborted()
    nothing = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.840.99.2.1", *scu(gateway)]
    move = world.tool("movescu", "-v", "-S", "-aem", "MOVEDEST", *nothing)
    assert "Received Final Move Response (Success)" in move, move
    get = world.tool("getscu", "-v", "-S", "-od", str(tmp_path), *nothing)
    assert "Received C-GET Response (Success)" in get, get
    bad = ["-k", "QueryRetrieveLevel=WARD", "-k", "StudyInstanceUID=1.2.840.99.2.1", *scu(gateway)]
    get = world.tool("getscu", "-v", "-S", "-od", str(tmp_path), *bad)
    assert "Received C-GET Response (Error: DataSetDoesNotMatchSOPClass)" in get, get  # 0xA900
    assert "Association Release Failed" not in get, get
    log = gateway.output()[before_log:]
    statuses = re.findall(r" TESTSCU (C-MOVE|C-GET) \S+ count=\d+ status=(\S+)", log)
    assert statuses == [("C-MOVE", "0x0000"), ("C-GET", "0x0000"), ("C-GET", "0xA900")], log
    assert "0xA801" not in log and "could not open an association" not in log, log
    assert aborted() == before_aborted

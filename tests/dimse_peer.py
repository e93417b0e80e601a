"""pynetdicom as a DIMSE client, for what dcmtk's tools cannot show; run inside the test's network namespace
as `python -m tests.dimse_peer COMMAND ...`, it prints one JSON object.

  store-concurrently PORT N FILE...   N associations at once, each storing every FILE; their statuses
  cancel-get PORT STUDY               C-GET of a study, C-CANCEL after the first pending response
  cancel-move PORT STUDY DESTINATION  the same with C-MOVE
  get-refusing PORT N STUDY...        C-GET of the studies, offering CT and Secondary Capture uncompressed only,
                                      its C-STORE handler refusing the first N instances with 0xA700
  refusing-destination PORT N         a C-STORE SCP (AE REFUSER) that refuses the first N instances with 0xA700,
                                      then stores the rest (runs until killed)
  forbidding-service PORT             an HTTP service that answers 403 to everything (runs until killed)
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

CALLED = "DICOMPROXY"


def store_concurrently(port: int, count: int, files: list[str]) -> dict[str, Any]:
    datasets = [dcmread(name) for name in files]
    results: list[list[int]] = [[] for _ in range(count)]
    barrier = threading.Barrier(count)

    def one(index: int) -> None:
        ae = AE(ae_title=f"PEER{index}")
        # pynetdicom's 30 s for a response was seen to pass once under a loaded CI run (every other test at
        # once on two cores); the statuses are what is checked, not the time.
        ae.dimse_timeout = 120
        for dataset in datasets:
            ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        barrier.wait()
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
        if not assoc.is_established:
            results[index].append(-1)
            return
        for dataset in datasets:
            status = assoc.send_c_store(dataset)
            # -2: no answer in time; -3: the association was aborted (by the gateway or the network).
            missing = -3 if assoc.is_aborted else -2
            results[index].append(int(status.Status) if "Status" in status else missing)
        assoc.release()

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return {"statuses": results}


def _responses(assoc: Any, responses: Any) -> dict[str, Any]:
    statuses: list[int] = []
    final: Dataset | None = None
    cancelled = False
    for status, _identifier in responses:
        if "Status" not in status:
            break
        statuses.append(int(status.Status))
        final = status
        if status.Status == 0xFF00 and not cancelled:
            assoc.send_c_cancel(1, query_model=assoc.accepted_contexts[0].abstract_syntax)
            cancelled = True
    assoc.release()
    counts = (
        {
            key: int(final.get(key, -1))
            for key in (
                "NumberOfRemainingSuboperations",
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
            )
        }
        if final is not None
        else {}
    )
    return {"statuses": statuses, **counts}


def _identifier(study: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    return identifier


def cancel_get(port: int, study: str) -> dict[str, Any]:
    stored: list[int] = []
    ae = AE(ae_title="PEERGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    handlers = [(evt.EVT_C_STORE, lambda event: stored.append(1) or 0x0000)]
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=CALLED, ext_neg=[build_role(CTImageStorage, scp_role=True)], evt_handlers=handlers
    )
    assert assoc.is_established
    result = _responses(assoc, assoc.send_c_get(_identifier(study), StudyRootQueryRetrieveInformationModelGet))
    return {**result, "stored": len(stored)}


def cancel_move(port: int, study: str, destination: str) -> dict[str, Any]:
    ae = AE(ae_title="PEERMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED)
    assert assoc.is_established
    return _responses(
        assoc, assoc.send_c_move(_identifier(study), destination, StudyRootQueryRetrieveInformationModelMove)
    )


def get_refusing(port: int, refuse: int, studies: list[str]) -> dict[str, Any]:
    refused: list[str] = []
    stored: list[str] = []

    def store(event: Any) -> int:
        uid = str(event.dataset.SOPInstanceUID)
        if len(refused) < refuse:
            refused.append(uid)
            return 0xA700
        stored.append(uid)
        return 0x0000

    ae = AE(ae_title="PEERGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for storage in (CTImageStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(storage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        roles.append(build_role(storage, scp_role=True))
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store)])
    assert assoc.is_established
    identifier = _identifier("\\".join(studies))
    final: Dataset = Dataset()
    failed: list[str] = []
    for status, answer in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
        final = status
        if answer is not None and "FailedSOPInstanceUIDList" in answer:
            value = answer.FailedSOPInstanceUIDList
            failed = [str(uid) for uid in ([value] if isinstance(value, str) else value)]
    assoc.release()
    counts = {key: int(final.get(key, -1)) for key in ("NumberOfFailedSuboperations", "NumberOfCompletedSuboperations")}
    return {"status": int(final.get("Status", -1)), "failed": failed, "refused": refused, "stored": stored, **counts}


def refusing_destination(port: int, refuse: int) -> None:
    answered: list[int] = []

    def store(event: Any) -> int:
        answered.append(0xA700 if len(answered) < refuse else 0x0000)
        return answered[-1]

    ae = AE(ae_title="REFUSER")
    ae.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, store)])


class _Forbidding(http.server.BaseHTTPRequestHandler):
    """A DICOM service that refuses every request with 403, as one does for a study the caller may not read."""

    def do_GET(self) -> None:
        body = b'{"error": "forbidden"}'
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def main(argv: list[str]) -> int:
    command, port = argv[0], int(argv[1])
    if command == "refusing-destination":
        refusing_destination(port, int(argv[2]))
        return 0
    if command == "forbidding-service":
        http.server.ThreadingHTTPServer(("127.0.0.1", port), _Forbidding).serve_forever()
        return 0
    if command == "store-concurrently":
        result = store_concurrently(port, int(argv[2]), argv[3:])
    elif command == "cancel-get":
        result = cancel_get(port, argv[2])
    elif command == "get-refusing":
        result = get_refusing(port, int(argv[2]), argv[3:])
    elif command == "cancel-move":
        result = cancel_move(port, argv[2], argv[3])
    else:
        raise SystemExit(f"unknown command {command}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

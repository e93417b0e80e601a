"""One retrieve pipeline for C-GET and C-MOVE: list the instances (QIDO-RS), fetch them (WADO-RS) into
temporary files, hand each to a sink. What differs is where an instance goes: back on the requester's own
association (`get`), or on one new association to the configured destination (`move`).

Both speak pynetdicom's generator protocol (PS3.4 C.4.2, C.4.3): the count, pending (status, instance) pairs,
then a final status when something failed. Instances that cannot be sent are decided before sending and never
handed over; those the receiving side refuses are seen as it answers each C-STORE (proxy/dimse/suboperations.py).
Both are failed sub-operations of the final status, with their UIDs in its Failed SOP Instance UID List, and
gateway lines say why. `Operation.answer` records each final status as the peer is told it, so the log and the
metrics say the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from .bridge import LoopBridge
from .client import DicomWebClient
from .mapping import IdentifierError, InstanceRef, instance_ref, retrieval_for, retrieve_paths
from .report import Operation, Report
from .status import CANCEL, MOVE_DESTINATION_UNKNOWN, SUCCESS, Failure, for_service
from .suboperations import SubOperations
from .syntaxes import UNCOMPRESSED, VERIFICATION

# Values larger than this stay in the temporary file until pynetdicom encodes them for the C-STORE.
_DEFER_SIZE = "256 KB"
# A presentation context list may hold at most 128 contexts (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128
_CONVERTIBLE = frozenset(str(uid) for uid in UNCOMPRESSED)
_NOT_SENT_BY_SERVICE = "the service did not send them"


@dataclass(frozen=True)
class Fetched:
    """An instance written to a temporary file by a retrieve, with what its file meta says."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def identifier_of(event: Any) -> Dataset:
    """The request's identifier, or IdentifierError (0xA900) when its bytes cannot be decoded."""
    try:
        return event.identifier  # type: ignore[no-any-return]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bytes it cannot decode
        raise IdentifierError(f"the identifier cannot be decoded ({type(exc).__name__})") from exc


class Pipeline:
    """One retrieve's instances: listed, then fetched series by series into `directory`, each once."""

    def __init__(
        self, bridge: LoopBridge, client: DicomWebClient, report: Report, operation: Operation, directory: Path
    ) -> None:
        self._bridge, self._client, self._report = bridge, client, report
        self._operation, self._directory = operation, directory
        self.received: set[str] = set()

    def listed(self, identifier: Callable[[], Dataset]) -> tuple[str, list[InstanceRef]]:
        """The level and the instances a retrieve identifier names, listed with QIDO-RS (every page)."""
        try:
            level, searches = retrieval_for(identifier())
            self._operation.level = level
            instances: dict[str, InstanceRef] = {}
            for search in searches:
                for page in self._bridge.iterate(self._client.qido(search.path, search.params)):
                    for item in page:
                        ref = instance_ref(item)
                        instances.setdefault(ref.instance, ref)
        except IdentifierError as error:
            raise Failure(error.status, f"the identifier cannot be retrieved: {error.detail}") from error
        self._operation.count = len(instances)
        return level, list(instances.values())

    def fetch(self, level: str, instances: list[InstanceRef], cancelled: Callable[[], bool]) -> Iterator[Fetched]:
        """Each listed instance the service sends, once; stops early when the requester cancels."""
        for path, group in retrieve_paths(level, instances):
            wanted = {ref.instance for ref in group}
            for fetched in self._fetch(path):
                if fetched.sop_instance not in wanted or fetched.sop_instance in self.received:
                    fetched.path.unlink()
                    continue
                self.received.add(fetched.sop_instance)
                yield fetched
                if cancelled():
                    return

    def missing(self, instances: list[InstanceRef]) -> list[str]:
        return [ref.instance for ref in instances if ref.instance not in self.received]

    def _fetch(self, path: str) -> Iterator[Fetched]:
        """The instances of one WADO-RS retrieve, each in its temporary file; a broken retrieve ends early."""
        try:
            for file in self._bridge.iterate(self._client.retrieve(path, self._directory)):
                try:
                    meta = read_file_meta_info(file)
                    yield Fetched(
                        file,
                        str(meta.MediaStorageSOPClassUID),
                        str(meta.MediaStorageSOPInstanceUID),
                        str(meta.TransferSyntaxUID),
                    )
                except (InvalidDicomError, AttributeError, OSError):
                    self._report.note(self._operation, "the service sent a part that is not a DICOM file; skipped")
                    with contextlib.suppress(OSError):
                        file.unlink()
        except Failure as error:
            # The instances it would have brought are reported as failed sub-operations.
            self._report.note(self._operation, error.detail + (f". Hint: {error.hint}" if error.hint else ""))


class Cancelled:
    """Whether the requester sent C-CANCEL: pynetdicom's `event.is_cancelled` says True once, then forgets."""

    def __init__(self, event: Any) -> None:
        self._event = event
        self._seen = False

    def __call__(self) -> bool:
        self._seen = self._seen or bool(self._event.is_cancelled)
        return self._seen


def _count(operation: Operation, report: Report, count: int, destination: str = "") -> Iterator[Any]:
    """The number of sub-operations. pynetdicom answers 0 with Success itself, and (C-MOVE) answers 0xA801
    when it cannot associate with the destination; either way it closes the handler here."""
    if count == 0:
        operation.answer(SUCCESS)
    try:
        yield count
    except GeneratorExit:
        if count and destination and not operation.answered:
            where = f"could not open an association to its destination at {destination}"
            hint = "Check that the destination listens there and accepts the gateway's AE title"
            report.fail(operation, Failure(MOVE_DESTINATION_UNKNOWN, where, hint))
        raise


def _refuse(operation: Operation, report: Report, failure: Failure, destination: str = "") -> Iterator[Any]:
    """A retrieve that failed before its count: one sub-operation, which fails with the service's status."""
    yield from _count(operation, report, 1, destination)
    yield report.fail(operation, failure, for_service(operation.name, failure.status)), None


def _finish(
    operation: Operation, report: Report, outcome: SubOperations, missing: list[str], cancelled: Cancelled
) -> Iterator[Any]:
    """The final (status, identifier) after the sub-operations, as pynetdicom counts them, and the lines saying
    why some failed. Success is pynetdicom's own final answer, given when the handler ends without one."""
    if cancelled():
        yield operation.answer(CANCEL), _failed_list(outcome.failed)
        return
    outcome.hold_back(_NOT_SENT_BY_SERVICE, missing)
    for line in outcome.reasons():
        report.note(operation, line)
    status = operation.answer(outcome.final())
    if status != SUCCESS:
        yield status, _failed_list(outcome.failed)


def get(pipeline: Pipeline, event: Any, operation: Operation, report: Report) -> Iterator[Any]:
    """C-GET: each instance back on the requester's association as it arrives, where it accepts its syntax."""
    try:
        level, instances = pipeline.listed(lambda: identifier_of(event))
    except Failure as failure:
        yield from _refuse(operation, report, failure)
        return
    yield from _count(operation, report, len(instances))
    if not instances:
        return
    outcome, cancelled = SubOperations(len(instances), "the requester"), Cancelled(event)
    # The requester's answers to the C-STOREs arrive on its own association.
    event.assoc.bind(evt.EVT_DIMSE_RECV, outcome.received)
    try:
        for fetched in pipeline.fetch(level, instances, cancelled):
            reason = _refusal(event.assoc.accepted_contexts, fetched)
            if reason is None:
                yield from outcome.send(fetched.sop_instance, _dataset(fetched.path))
            else:
                outcome.hold_back(reason, [fetched.sop_instance])
            fetched.path.unlink()
    finally:
        event.assoc.unbind(evt.EVT_DIMSE_RECV, outcome.received)
    yield from _finish(operation, report, outcome, pipeline.missing(instances), cancelled)


def move(pipeline: Pipeline, event: Any, operation: Operation, report: Report, host: str, port: int) -> Iterator[Any]:
    """C-MOVE: every instance fetched first (its contexts are known then), then sent on one association."""
    destination, failure, cancelled = f"{host}:{port}", None, Cancelled(event)
    files: list[Fetched] = []
    instances: list[InstanceRef] = []
    try:
        level, instances = pipeline.listed(lambda: identifier_of(event))
        files = list(pipeline.fetch(level, instances, cancelled))
    except Failure as error:
        failure = error
    outcome = SubOperations(len(instances), "the destination")
    # pynetdicom opens the association after the count; a failure still needs a destination to yield. The
    # destination's answers to the C-STOREs arrive on that association.
    yield host, port, {"contexts": _contexts(files), "evt_handlers": [(evt.EVT_DIMSE_RECV, outcome.received)]}
    if failure is not None:
        yield from _refuse(operation, report, failure, destination)
        return
    yield from _count(operation, report, len(instances), destination)
    if not instances:
        return
    for fetched in files:
        if cancelled():
            break
        yield from outcome.send(fetched.sop_instance, _dataset(fetched.path))
        fetched.path.unlink()
    yield from _finish(operation, report, outcome, pipeline.missing(instances), cancelled)


def _refusal(contexts: list[PresentationContext], fetched: Fetched) -> str | None:
    """Why the requester cannot take this instance (no context for its SOP class, or for its stored transfer
    syntax; uncompressed ones convert among themselves), or None when it can."""
    classes = [context for context in contexts if context.abstract_syntax == fetched.sop_class and context.as_scu]
    if not classes:
        return f"the requester accepts no {UID(fetched.sop_class).name}"
    for context in classes:
        agreed = str(context.transfer_syntax[0]) if context.transfer_syntax else ""
        if agreed == fetched.transfer_syntax or (agreed in _CONVERTIBLE and fetched.transfer_syntax in _CONVERTIBLE):
            return None
    return f"the requester accepts no {UID(fetched.transfer_syntax).name}"


def _dataset(path: Path) -> Dataset:
    """The instance for pynetdicom to send; its large values (pixel data) are read from the file only then."""
    return dcmread(path, defer_size=_DEFER_SIZE)


def _failed_list(failed: list[str]) -> Dataset:
    """The final response's identifier: the Failed SOP Instance UID List (PS3.4 C.4.3.1.3.1)."""
    identifier = Dataset()
    identifier.FailedSOPInstanceUIDList = failed
    return identifier


def _contexts(files: list[Fetched]) -> list[PresentationContext]:
    """One context per SOP class and stored transfer syntax; uncompressed ones may also go as the other two."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for fetched in files:
        syntaxes = [fetched.transfer_syntax]
        if fetched.transfer_syntax in _CONVERTIBLE:
            syntaxes += [str(uid) for uid in UNCOMPRESSED[:2] if str(uid) != fetched.transfer_syntax]
        wanted.setdefault((fetched.sop_class, fetched.transfer_syntax), syntaxes)
    contexts = [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]
    return contexts[:_MAX_CONTEXTS] or [build_context(VERIFICATION)]

"""The DIMSE services, one thin pynetdicom event handler each, over the gateway's DICOMweb client.

C-ECHO asks the service (token and all); C-STORE sends pynetdicom's temporary file as it came with STOW-RS;
C-FIND answers each QIDO-RS result as it arrives; C-GET and C-MOVE list the instances with QIDO-RS, fetch them
with WADO-RS into temporary files and send them with C-STORE, on the same association (GET) or on one new
association to the configured destination (MOVE). Handlers run in pynetdicom's threads and reach the event
loop only through the gateway's bridge.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, build_context
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext

from .mapping import IdentifierError, InstanceRef, answer, instance_ref, retrieval_for, retrieve_paths, search_for
from .status import (
    CANCEL,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES_SUBOPERATIONS,
    PENDING,
    REFUSED_NOT_AUTHORIZED,
    SUBOPERATIONS_COMPLETE_WITH_FAILURES,
    SUCCESS,
    Failure,
)

if TYPE_CHECKING:
    from .gateway import Gateway, LoopBridge, Operation

logger = logging.getLogger("proxy.dimse")

# pynetdicom names its SOP classes at import time, where a type checker cannot see them; this is PS3.4's UID.
VERIFICATION = UID("1.2.840.10008.1.1")
# Accepted for storage and offered for retrieval, as the instance came (PS3.5 Annex A).
# Explicit VR little endian first: where a peer offers several in one context, the gateway picks in this order,
# and never one that would make the sender compress (with loss, perhaps) what it holds uncompressed.
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
TRANSFER_SYNTAXES = (
    *UNCOMPRESSED,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# Values larger than this stay in the temporary file until pynetdicom encodes them for the C-STORE.
_DEFER_SIZE = "256 KB"
# A presentation context list may hold at most 128 contexts (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Fetched:
    """An instance written to a temporary file by a retrieve, with what its file meta says."""

    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str


class Services:
    """evt.EVT_C_ECHO, _STORE, _FIND, _GET and _MOVE handlers of one gateway."""

    def __init__(self, gateway: Gateway, ae: AE) -> None:
        assert gateway.bridge is not None
        self._gateway = gateway
        self._bridge: LoopBridge = gateway.bridge
        self._client = gateway.client
        self._settings = gateway.settings
        self._ae = ae
        self._convertible = {str(uid) for uid in UNCOMPRESSED}
        self._destinations = {title: (host, port) for title, host, port in gateway.settings.move_destinations}

    def echo(self, event: Event) -> int:
        """Verification that reaches the service: success only while it accepts the proxy's token."""
        operation = self._gateway.begin(event, "C-ECHO")
        failure = None
        try:
            self._bridge.run(self._client.ping())
        except Failure as error:
            failure = error
        return self._finish(operation, failure)

    def store(self, event: Event) -> int:
        """One instance, exactly as it came (pynetdicom wrote it to a file unparsed), sent with STOW-RS."""
        operation = self._gateway.begin(event, "C-STORE")
        operation.level, operation.count = "IMAGE", 1
        if self._settings.read_only:
            return self._finish(
                operation,
                Failure(REFUSED_NOT_AUTHORIZED, "C-STORE refused: the proxy runs with --read-only"),
            )
        failure = None
        try:
            operation.status = self._bridge.run(self._client.stow(Path(event.dataset_path)))
        except Failure as error:
            failure = error
        return self._finish(operation, failure)

    def find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        operation = self._gateway.begin(event, "C-FIND")
        failure = None
        try:
            search = search_for(self._identifier(event))
            operation.level = search.level
            for page in self._bridge.iterate(self._client.qido(search.path, search.params)):
                for item in page:
                    if event.is_cancelled:
                        operation.status = CANCEL
                        yield CANCEL, None
                        return
                    operation.count += 1
                    yield PENDING, answer(item, search, retrieve_aet=self._settings.dimse_aet)
        except IdentifierError as error:
            failure = Failure(error.status, f"the identifier cannot be searched for: {error.detail}")
        except Failure as error:
            failure = error
        except GeneratorExit:
            operation.aborted = True  # pynetdicom stopped asking: the peer went away
            raise
        finally:
            self._finish(operation, failure)
        if failure is not None:
            yield failure.status, None

    def get(self, event: Event) -> Iterator[Any]:
        """C-GET: the count, then one C-STORE per instance on this association, each as it arrives."""
        operation = self._gateway.begin(event, "C-GET")
        failed: list[InstanceRef] = []
        try:
            try:
                level, instances = self._list(event, operation)
            except Failure as error:
                # pynetdicom wants a count before any status: one sub-operation, which fails.
                self._fail(operation, error)
                yield 1
                yield error.status, None
                return
            yield len(instances)
            received: set[str] = set()
            with tempfile.TemporaryDirectory(prefix="dicom-proxy-get-") as directory:
                for path, group in retrieve_paths(level, instances):
                    wanted = {ref.instance for ref in group}
                    for fetched in self._fetch(path, Path(directory), operation):
                        if fetched.sop_instance not in wanted or fetched.sop_instance in received:
                            fetched.path.unlink()
                            continue
                        if event.is_cancelled:
                            operation.status = CANCEL
                            yield CANCEL, None
                            return
                        received.add(fetched.sop_instance)
                        if not self._sendable(event.assoc.accepted_contexts, fetched):
                            failed.append(_ref(fetched))
                            yield PENDING, _failed(fetched.sop_instance)
                            continue
                        yield PENDING, _dataset(fetched.path)
                        fetched.path.unlink()
            for ref in instances:
                if ref.instance not in received:
                    failed.append(ref)
                    yield PENDING, _failed(ref.instance)
            operation.status = _final(len(instances), len(failed))
        except GeneratorExit:
            operation.aborted = True  # pynetdicom stopped asking: the peer went away
            raise
        finally:
            self._gateway.end(operation)

    def move(self, event: Event) -> Iterator[Any]:
        """C-MOVE: every instance fetched first, then sent on one association to the configured destination."""
        operation = self._gateway.begin(event, "C-MOVE")
        try:
            destination = self._destinations.get(str(event.move_destination or "").strip())
            if destination is None:
                self._fail(
                    operation,
                    Failure(
                        MOVE_DESTINATION_UNKNOWN,
                        f"C-MOVE to the unknown destination AE {str(event.move_destination or '')[:16]!r}",
                        "Name it with --move-destination AET=HOST:PORT",
                    ),
                )
                yield None, None
                return
            with tempfile.TemporaryDirectory(prefix="dicom-proxy-move-") as directory:
                yield from self._move(event, operation, destination, Path(directory))
        except GeneratorExit:
            if operation.status == SUCCESS:
                operation.aborted = True  # pynetdicom stopped asking: the peer went away
            raise
        finally:
            self._gateway.end(operation)

    def _move(self, event: Event, operation: Operation, destination: tuple[str, int], directory: Path) -> Iterator[Any]:
        host, port = destination
        files: list[Fetched] = []
        failure: Failure | None = None
        cancelled = False
        instances: list[InstanceRef] = []
        try:
            level, instances = self._list(event, operation)
            for path, group in retrieve_paths(level, instances):
                wanted = {ref.instance for ref in group}
                for fetched in self._fetch(path, directory, operation):
                    if fetched.sop_instance in wanted and fetched.sop_instance not in {f.sop_instance for f in files}:
                        files.append(fetched)
                    else:
                        fetched.path.unlink()
                    if event.is_cancelled:
                        cancelled = True
                        break
                if cancelled:
                    break
        except Failure as error:
            failure = error
        # pynetdicom opens the association after the count; a failure still needs a destination to yield.
        yield host, port, {"contexts": _contexts(files)}
        if failure is not None:
            self._fail(operation, failure)
            yield 1
            yield failure.status, None
            return
        try:
            yield len(instances)
        except GeneratorExit:
            # pynetdicom associates with the destination after taking the count; when that fails it answers
            # 0xA801 and drops this generator here.
            self._fail(
                operation,
                Failure(
                    MOVE_DESTINATION_UNKNOWN,
                    f"C-MOVE could not open an association to its destination at {host}:{port}",
                    "Check that the destination listens there and accepts the gateway's AE title",
                ),
            )
            raise
        if cancelled:
            operation.status = CANCEL
            yield CANCEL, None
            return
        sent = set()
        for fetched in files:
            if event.is_cancelled:
                operation.status = CANCEL
                yield CANCEL, None
                return
            sent.add(fetched.sop_instance)
            yield PENDING, _dataset(fetched.path)
            fetched.path.unlink()
        missing = [ref for ref in instances if ref.instance not in sent]
        for ref in missing:
            yield PENDING, _failed(ref.instance)
        operation.status = _final(len(instances), len(missing))

    def _identifier(self, event: Event) -> Dataset:
        try:
            return event.identifier
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for bytes it cannot decode
            raise IdentifierError(f"the identifier cannot be decoded ({type(exc).__name__})") from exc

    def _list(self, event: Event, operation: Operation) -> tuple[str, list[InstanceRef]]:
        """The instances a retrieve names, listed with QIDO-RS (every page)."""
        try:
            level, searches = retrieval_for(self._identifier(event))
            operation.level = level
            instances: dict[str, InstanceRef] = {}
            for search in searches:
                for page in self._bridge.iterate(self._client.qido(search.path, search.params)):
                    for item in page:
                        ref = instance_ref(item)
                        instances.setdefault(ref.instance, ref)
        except IdentifierError as error:
            raise Failure(error.status, f"the identifier cannot be retrieved: {error.detail}") from error
        operation.count = len(instances)
        return level, list(instances.values())

    def _fetch(self, path: str, directory: Path, operation: Operation) -> Iterator[Fetched]:
        """The instances of one WADO-RS retrieve, each in its temporary file; a broken retrieve ends early."""
        try:
            for file in self._bridge.iterate(self._client.retrieve(path, directory)):
                try:
                    meta = read_file_meta_info(file)
                    yield Fetched(
                        file,
                        str(meta.MediaStorageSOPClassUID),
                        str(meta.MediaStorageSOPInstanceUID),
                        str(meta.TransferSyntaxUID),
                    )
                except (InvalidDicomError, AttributeError, OSError):
                    logger.warning("%s: the service sent a part that is not a DICOM file; skipped", operation.name)
                    with contextlib.suppress(OSError):
                        file.unlink()
        except Failure as error:
            # The instances it would have brought are reported as failed sub-operations.
            logger.warning("%s: %s%s", operation.name, error.detail, f". Hint: {error.hint}" if error.hint else "")

    def _sendable(self, contexts: list[PresentationContext], fetched: Fetched) -> bool:
        """Whether the requester accepted this SOP class in a transfer syntax the instance can be sent in."""
        for context in contexts:
            if context.abstract_syntax != fetched.sop_class or not context.as_scu:
                continue
            agreed = str(context.transfer_syntax[0]) if context.transfer_syntax else ""
            if agreed == fetched.transfer_syntax or (
                agreed in self._convertible and fetched.transfer_syntax in self._convertible
            ):
                return True
        return False

    def _fail(self, operation: Operation, failure: Failure) -> None:
        operation.status = failure.status
        logger.warning(
            "%s from %s failed with 0x%04X: %s%s",
            operation.name,
            operation.calling_ae,
            failure.status,
            failure.detail,
            f". Hint: {failure.hint}" if failure.hint else "",
        )

    def _finish(self, operation: Operation, failure: Failure | None) -> int:
        if failure is not None:
            self._fail(operation, failure)
        self._gateway.end(operation)
        return operation.status


def _dataset(path: Path) -> Dataset:
    """The instance for pynetdicom to send; its large values (pixel data) are read from the file only then."""
    return dcmread(path, defer_size=_DEFER_SIZE)


def _failed(sop_instance: str) -> Dataset:
    """A stand-in that pynetdicom cannot send (it has no file meta): it counts as a failed sub-operation and
    its SOP Instance UID lands in the Failed SOP Instance UID List."""
    stand_in = Dataset()
    stand_in.SOPClassUID = VERIFICATION
    stand_in.SOPInstanceUID = sop_instance
    return stand_in


def _ref(fetched: Fetched) -> InstanceRef:
    return InstanceRef("", "", fetched.sop_instance, fetched.sop_class)


def _final(total: int, failed: int) -> int:
    """The final status pynetdicom sends after the sub-operations (PS3.4 C.4.2.1.4, C.4.3.1.4)."""
    if not failed:
        return SUCCESS
    return OUT_OF_RESOURCES_SUBOPERATIONS if failed == total else SUBOPERATIONS_COMPLETE_WITH_FAILURES


def _contexts(files: list[Fetched]) -> list[PresentationContext]:
    """One context per SOP class and stored transfer syntax; uncompressed ones may also go as the other two."""
    wanted: dict[tuple[str, str], list[str]] = {}
    for fetched in files:
        syntaxes = [fetched.transfer_syntax]
        if fetched.transfer_syntax in {str(uid) for uid in UNCOMPRESSED}:
            syntaxes += [str(uid) for uid in UNCOMPRESSED[:2] if str(uid) != fetched.transfer_syntax]
        wanted.setdefault((fetched.sop_class, fetched.transfer_syntax), syntaxes)
    contexts = [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]
    return contexts[:_MAX_CONTEXTS] or [build_context(VERIFICATION)]

"""The DIMSE services, one thin pynetdicom event handler each, over the gateway's DICOMweb client.

C-ECHO asks the service (token and all); C-STORE sends pynetdicom's temporary file as it came with STOW-RS;
C-FIND answers each QIDO-RS result as it arrives; C-GET and C-MOVE run the one retrieve pipeline
(proxy/dimse/retrieve.py). Handlers run in pynetdicom's threads and reach the event loop only through the
bridge; each operation's final status is recorded as the peer is told it, and an operation whose handler
pynetdicom closes before that is the only one counted as aborted.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pynetdicom.events import Event

from ..settings import Settings
from . import retrieve
from .bridge import LoopBridge
from .client import DicomWebClient
from .mapping import IdentifierError, answer, search_for
from .report import Operation, Report
from .status import CANCEL, MOVE_DESTINATION_UNKNOWN, PENDING, REFUSED_NOT_AUTHORIZED, SUCCESS, Failure, for_service


class Services:
    """evt.EVT_C_ECHO, _STORE, _FIND, _GET and _MOVE handlers, given what they use by the gateway."""

    def __init__(self, settings: Settings, *, bridge: LoopBridge, client: DicomWebClient, report: Report) -> None:
        self._settings = settings
        self._bridge = bridge
        self._client = client
        self._report = report
        self._destinations = {title: (host, port) for title, host, port in settings.move_destinations}

    def echo(self, event: Event) -> int:
        """Verification that reaches the service: success only while it accepts the proxy's token."""
        operation = self._report.begin(event, "C-ECHO")
        try:
            self._bridge.run(self._client.ping())
            operation.answer(SUCCESS)
        except Failure as failure:
            self._report.fail(operation, failure, for_service(operation.name, failure.status))
        self._report.end(operation)
        return operation.status

    def store(self, event: Event) -> int:
        """One instance, exactly as it came (pynetdicom wrote it to a file unparsed), sent with STOW-RS."""
        operation = self._report.begin(event, "C-STORE")
        operation.level, operation.count = "IMAGE", 1
        try:
            if self._settings.read_only:
                raise Failure(REFUSED_NOT_AUTHORIZED, "C-STORE refused: the proxy runs with --read-only")
            operation.answer(self._bridge.run(self._client.stow(Path(event.dataset_path))))
        except Failure as failure:
            self._report.fail(operation, failure)
        self._report.end(operation)
        return operation.status

    def find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: one pending answer per QIDO-RS result, as each page arrives."""

        def body(operation: Operation) -> Iterator[tuple[int, Dataset | None]]:
            try:
                search = search_for(retrieve.identifier_of(event))
                operation.level = search.level
                for page in self._bridge.iterate(self._client.qido(search.path, search.params)):
                    for item in page:
                        if event.is_cancelled:
                            yield operation.answer(CANCEL), None
                            return
                        operation.count += 1
                        yield PENDING, answer(item, search, retrieve_aet=self._settings.dimse_aet)
            except IdentifierError as error:
                failure = Failure(error.status, f"the identifier cannot be searched for: {error.detail}")
            except Failure as error:
                failure = error
            else:
                operation.answer(SUCCESS)
                return
            yield self._report.fail(operation, failure), None

        return self._handle(event, "C-FIND", body)

    def get(self, event: Event) -> Iterator[Any]:
        """C-GET: the count, then one C-STORE per instance on this association, each as it arrives."""

        def body(operation: Operation) -> Iterator[Any]:
            with tempfile.TemporaryDirectory(prefix="dicom-proxy-get-") as directory:
                pipeline = retrieve.Pipeline(self._bridge, self._client, self._report, operation, Path(directory))
                yield from retrieve.get(pipeline, event, operation, self._report)

        return self._handle(event, "C-GET", body)

    def move(self, event: Event) -> Iterator[Any]:
        """C-MOVE: every instance fetched first, then sent on one association to the configured destination."""

        def body(operation: Operation) -> Iterator[Any]:
            title = str(event.move_destination or "").strip()
            destination = self._destinations.get(title)
            if destination is None:
                unknown = Failure(
                    MOVE_DESTINATION_UNKNOWN,
                    f"C-MOVE to an unknown destination AE {title[:16]}",
                    "Name it with --move-destination AET=HOST:PORT",
                )
                self._report.fail(operation, unknown)
                yield None, None
                return
            with tempfile.TemporaryDirectory(prefix="dicom-proxy-move-") as directory:
                pipeline = retrieve.Pipeline(self._bridge, self._client, self._report, operation, Path(directory))
                yield from retrieve.move(pipeline, event, operation, self._report, *destination)

        return self._handle(event, "C-MOVE", body)

    def _handle(self, event: Event, name: str, body: Callable[[Operation], Iterator[Any]]) -> Iterator[Any]:
        """One operation's generator: its access line at the end, and `aborted` only when pynetdicom stopped
        asking before the final status (the peer went away), never after it was told one."""
        operation = self._report.begin(event, name)
        try:
            yield from body(operation)
        except GeneratorExit:
            operation.aborted = not operation.answered
            raise
        finally:
            self._report.end(operation)

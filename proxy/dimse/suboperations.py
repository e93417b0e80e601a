"""A retrieve's sub-operations as pynetdicom counts them, so that the final status the gateway records and
the Failed SOP Instance UID List it hands over are what the peer is told (PS3.4 C.4.2.3.1, C.4.3.3.1).

pynetdicom sends each instance a C-GET or C-MOVE handler yields with a C-STORE and counts that C-STORE's
answer into the final response: a failure or a warning by the Storage service's statuses, and an answer with
no known status, or none, as a failure. Its notification event EVT_DIMSE_RECV shows the handler each answer
on the association that carries the C-STOREs (the requester's own for C-GET, the one to the destination for
C-MOVE), before pynetdicom's send returns and so before the handler resumes. Instances the gateway held back
are failed sub-operations too; the final status counts both, by pynetdicom's rule: 0xA702 when every one
failed, 0xB000 when some failed or warned, success otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.status import STATUS_FAILURE, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

from .status import OUT_OF_RESOURCES_SUBOPERATIONS, PENDING, SUBOPERATIONS_COMPLETE_WITH_FAILURES, SUCCESS

_NO_ANSWER = -1


class SubOperations:
    """The C-STOREs of one retrieve: failed (held back or refused, their UIDs in order), warned, and why."""

    def __init__(self, total: int, receiver: str) -> None:
        self.total, self._receiver = total, receiver
        self.failed: list[str] = []
        self.warnings = 0
        # Why instances were held back, and the statuses the receiving side refused others with.
        self.held_back: Counter[str] = Counter()
        self.refused: Counter[int] = Counter()
        self._answer = _NO_ANSWER

    def received(self, event: Any) -> None:
        """EVT_DIMSE_RECV on the association that carries the C-STOREs: keep the status of a C-STORE answer."""
        message = event.message
        if isinstance(message, C_STORE_RSP):
            status = message.command_set.get("Status")
            self._answer = _NO_ANSWER if status is None else int(status)

    def send(self, instance: str, dataset: Dataset) -> Iterator[tuple[int, Dataset]]:
        """Hand one instance to pynetdicom, then count its C-STORE's answer as pynetdicom does."""
        self._answer = _NO_ANSWER
        yield PENDING, dataset
        category = STORAGE_SERVICE_CLASS_STATUS.get(self._answer, (STATUS_FAILURE, ""))[0]
        if category == STATUS_FAILURE:
            self.failed.append(instance)
            self.refused[self._answer] += 1
        elif category == STATUS_WARNING:
            self.warnings += 1

    def hold_back(self, reason: str, instances: list[str]) -> None:
        """Instances never handed to pynetdicom: failed sub-operations, for `reason`."""
        if instances:
            self.failed.extend(instances)
            self.held_back[reason] += len(instances)

    def final(self) -> int:
        if not self.failed and not self.warnings:
            return SUCCESS
        every = len(self.failed) == self.total
        return OUT_OF_RESOURCES_SUBOPERATIONS if every else SUBOPERATIONS_COMPLETE_WITH_FAILURES

    def reasons(self) -> list[str]:
        """What the log says about failed sub-operations: why some were held back, how others were refused."""
        lines = []
        if self.held_back:
            held = sum(self.held_back.values())
            why = [f"{reason} ({count})" for reason, count in self.held_back.items()]
            lines.append(f"{held} not sent: " + (next(iter(self.held_back)) if len(why) == 1 else ", ".join(why)))
        if self.refused:
            statuses = ", ".join(
                f"{'no status' if status == _NO_ANSWER else f'0x{status:04X}'} ({count})"
                for status, count in self.refused.items()
            )
            lines.append(f"{sum(self.refused.values())} refused by {self._receiver}: {statuses}")
        if self.warnings:
            lines.append(f"{self.warnings} stored by {self._receiver} with a warning")
        return lines

"""What the gateway's log and metrics may say, and the one place that says it.

A gateway message carries the operation, its level, counts, DIMSE statuses, HTTP statuses, AE titles and
configured addresses: never a value from an identifier (a patient's name where a level should be) nor a UID
(from a path, a search or a failed sub-operation). Messages are written without such values, and every one
still passes `safe`, which removes what looks like them, so that a careless detail cannot leak one.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from pynetdicom.events import Event

from ..errors import loggable
from ..metrics import Metrics
from .status import Failure

logger = logging.getLogger("proxy.dimse")

# Quoted text is what some libraries quote from their input (pydicom, pynetdicom): it may be anything a peer sent.
# A quote opens only after a non-word character, so that an apostrophe ("the service's") opens nothing.
_QUOTED = re.compile(r"(?<!\w)'[^']*'|(?<!\w)\"[^\"]*\"")
# A UID (PS3.5 9.1): digits in at least three dot-separated components. An IPv4 address is kept (see `_uid`).
# A full stop after it ends a sentence, not the UID.
_DOTTED = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){2,}(?!\w|\.[0-9])")


def _uid(match: re.Match[str]) -> str:
    parts = match.group().split(".")
    if len(parts) == 4 and all(len(part) <= 3 and int(part) <= 255 for part in parts):
        return match.group()  # a peer's or a destination's address, which the log names on purpose
    return "<UID>"


def safe(text: str) -> str:
    """The rule every gateway message passes: no quoted value, no UID, no control character."""
    return loggable(_DOTTED.sub(_uid, _QUOTED.sub("<value>", text)), 500)


@dataclass
class Operation:
    """One DIMSE operation as the access log and /-/metrics see it."""

    calling_ae: str
    address: str
    name: str
    level: str = "-"
    count: int = 0
    status: int = 0
    # The final status has been handed to pynetdicom: what follows (it closing the handler) is no abort.
    answered: bool = False
    # The peer went away (or pynetdicom stopped asking) before the operation's final status.
    aborted: bool = False
    started: float = field(default_factory=time.perf_counter)

    def answer(self, status: int) -> int:
        """Record the final status the peer is told, and return it for the handler to hand over."""
        self.status, self.answered = status, True
        return status


class Report:
    """The gateway's log lines and metrics: each operation's access line, its failures and notes."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def begin(self, event: Event, name: str) -> Operation:
        requestor = event.assoc.requestor
        return Operation(loggable(str(requestor.ae_title).strip(), 16), str(requestor.address), name)

    def warn(self, text: str) -> None:
        """A gateway warning that belongs to no operation (an association, a partial copy)."""
        logger.warning("%s", safe(text))

    def note(self, operation: Operation, text: str) -> None:
        """Something the peer is not told in words, e.g. why sub-operations failed."""
        logger.warning("%s from %s: %s", operation.name, operation.calling_ae, safe(text))

    def fail(self, operation: Operation, failure: Failure, status: int | None = None) -> int:
        """The operation ends with `status` (the failure's own by default): one warning saying why."""
        operation.answer(failure.status if status is None else status)
        hint = f". Hint: {failure.hint}" if failure.hint else ""
        logger.warning(
            "%s from %s failed with 0x%04X: %s",
            operation.name,
            operation.calling_ae,
            operation.status,
            safe(failure.detail + hint),
        )
        return operation.status

    def end(self, operation: Operation) -> None:
        """Count the operation and write its access-log line."""
        seconds = time.perf_counter() - operation.started
        status = "aborted" if operation.aborted else f"0x{operation.status:04X}"
        self._metrics.dimse_operations.labels(operation=operation.name, status=status).inc()
        fields = {
            "calling_ae": operation.calling_ae,
            "client": operation.address,
            "operation": operation.name,
            "level": operation.level,
            "count": operation.count,
            "status": status,
            "seconds": round(seconds, 4),
        }
        logger.info(
            "%s %s %s %s count=%d status=%s %.3fs",
            operation.address,
            operation.calling_ae,
            operation.name,
            operation.level,
            operation.count,
            status,
            seconds,
            extra={"access": fields},
        )

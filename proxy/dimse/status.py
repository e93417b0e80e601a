"""DIMSE status codes, named once as PS3.4 and PS3.7 name them, and the one failure the gateway raises.

Every failure the DICOMweb side can give (no token, service unreachable, refused, a bad identifier) becomes a
`Failure` carrying the status a legacy client understands, the detail for the log and what to do about it.
"""

from __future__ import annotations

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
# PS3.7 C.5: general statuses.
PROCESSING_FAILURE = 0x0110
REFUSED_NOT_AUTHORIZED = 0x0124
# PS3.4 B.2.3 (Storage) and C.4 (Query/Retrieve).
OUT_OF_RESOURCES = 0xA700
# C-GET and C-MOVE have no 0xA700 (PS3.4 C.4.2.1.5, C.4.3.1.5): these two say which step ran out.
OUT_OF_RESOURCES_MATCHES = 0xA701
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
SUBOPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
COERCION_OF_DATA_ELEMENTS = 0xB000
UNABLE_TO_PROCESS = 0xC000

# Failure reasons a STOW-RS answer may carry (PS3.18 Table 10.5.3-1) that are storage statuses already.
_STORAGE_FAILURE_RANGES = ((0xA700, 0xA7FF), (0xA900, 0xA9FF), (0xC000, 0xCFFF), (0x0110, 0x0124))


def for_service(operation: str, status: int, *, matched: bool = False) -> int:
    """`status` as the service `operation` defines it (PS3.4): the client's 0xA700 ("the service is out of
    reach") is C-ECHO's processing failure and C-GET's and C-MOVE's 0xA701, or 0xA702 once they `matched`."""
    if status == OUT_OF_RESOURCES and operation in ("C-GET", "C-MOVE"):
        return OUT_OF_RESOURCES_SUBOPERATIONS if matched else OUT_OF_RESOURCES_MATCHES
    if operation == "C-ECHO" and status not in (SUCCESS, REFUSED_NOT_AUTHORIZED):
        return PROCESSING_FAILURE
    return status


def storage_status(failure_reason: int | None) -> int:
    """The C-STORE status for a STOW-RS FailureReason: itself when it is a storage status, else processing failure."""
    if failure_reason is not None and any(low <= failure_reason <= high for low, high in _STORAGE_FAILURE_RANGES):
        return failure_reason
    return PROCESSING_FAILURE


class Failure(Exception):
    """An operation failed with `status`; `detail` and `hint` go to the log, never to the peer."""

    def __init__(self, status: int, detail: str, hint: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.hint = hint

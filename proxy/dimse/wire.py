"""The one wire habit of native archives that the gateway adds to pynetdicom, kept here because it relies on
pynetdicom's DIMSE provider (`assoc.dimse`: `send_msg`, `maximum_pdu_size`, `dul.send_pdu`), and the names of
every private part of pynetdicom the gateway relies on. Each is checked by a test that names it
(tests/test_dimse_mapping.py::test_the_pynetdicom_internals_the_gateway_relies_on_exist), so a pynetdicom
upgrade that removes one fails there, by name, rather than silently in a fallback.

dcmtk 3.6.7's getscu does not read the identifier of a final C-GET response, which carries the Failed SOP
Instance UID List (0008,0058) after failures (PS3.4 C.4.3.1.3.1). An archive built on dcmtk's DIMSE layer (Orthanc)
sends that command and its identifier as two PDVs of one P-DATA-TF PDU, which getscu reads whole; pynetdicom
sends them as two PDUs, and getscu finds the second waiting when it asks to release ("Association Release
Failed: DUL P-Data PDU arrived"). So a final C-GET response that fits one PDU goes as one.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_messages import C_GET_RSP
from pynetdicom.dimse_primitives import C_GET
from pynetdicom.pdu_primitives import P_DATA

from .status import PENDING

logger = logging.getLogger("proxy.dimse")

# The association's DIMSE provider, what this module uses of it, and what it uses of the provider's DUL.
DIMSE_PROVIDER = "dimse"
DIMSE_PROVIDER_ATTRIBUTES = ("send_msg", "maximum_pdu_size", "dul")
DUL_ATTRIBUTES = ("send_pdu",)
# The DIMSE message being received (the provider's `message`) and its temporary file, which the gateway
# deletes when an association breaks while an instance arrives (gateway.py, `_discard_partial_store`).
RECEIVING_MESSAGE = "message"
RECEIVING_MESSAGE_ATTRIBUTES = ("_data_set_file", "_data_set_path")
# pynetdicom's validator of AE titles (`_config.VALIDATORS`), which the gateway replaces (gateway.py, `_any_ae`).
AE_VALIDATOR = "AE"

# A PDV's item header: its length (4 bytes), presentation context ID and message control header (PS3.8 9.3.5.1).
_PDV_HEADER = 6


def pack_final_get_responses(assoc: Any) -> None:
    """Send this association's final C-GET responses as one PDU each; pynetdicom's own send otherwise."""
    dimse = getattr(assoc, DIMSE_PROVIDER, None)
    if dimse is None or not all(hasattr(dimse, name) for name in DIMSE_PROVIDER_ATTRIBUTES):
        return  # another pynetdicom: its own send stands
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        final_get = (
            isinstance(primitive, C_GET)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status not in (None, PENDING)
            and primitive.Identifier is not None
        )
        if not final_get:
            send(primitive, context_id)
            return
        message = C_GET_RSP()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        evt.trigger(assoc, evt.EVT_DIMSE_SENT, {"message": message})
        pdus = list(message.encode_msg(context_id, dimse.maximum_pdu_size))
        packed = P_DATA()
        for pdu in pdus:
            packed.presentation_data_value_list.extend(pdu.presentation_data_value_list)
        size = sum(len(value) + _PDV_HEADER for _id, value in packed.presentation_data_value_list)
        if dimse.maximum_pdu_size and size > dimse.maximum_pdu_size:
            for pdu in pdus:
                dimse.dul.send_pdu(pdu)
            return
        dimse.dul.send_pdu(packed)

    dimse.send_msg = send_msg

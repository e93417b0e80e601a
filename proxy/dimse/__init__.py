"""The DIMSE gateway: classic DICOM networking (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) in front of DICOMweb.

mapping.py   identifiers <-> QIDO-RS parameters, DICOM JSON -> datasets (pure)
client.py    the one DICOMweb client, on the proxy's loop, with its TokenSource and upstream session
status.py    DIMSE status codes, per service, and the Failure they travel in
report.py    what a gateway log line may carry (the one rule), the access line and the metrics
bridge.py    from pynetdicom's threads to the loop
retrieve.py  the one retrieve pipeline (list, fetch, hand over) with its C-GET and C-MOVE sinks
suboperations.py  a retrieve's C-STOREs as pynetdicom counts them: its final status and failed UIDs
services.py  the pynetdicom event handlers, one per operation
wire.py      final C-GET responses in one PDU, as native archives send them; the pynetdicom internals used
syntaxes.py  the SOP classes and transfer syntaxes the gateway names
gateway.py   the AE, its association policy; builds the services and hands them what they need
"""

from __future__ import annotations

from .client import DicomWebClient
from .gateway import Gateway

__all__ = ["DicomWebClient", "Gateway"]

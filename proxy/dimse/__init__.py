"""The DIMSE gateway: classic DICOM networking (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE) in front of DICOMweb.

mapping.py   identifiers <-> QIDO-RS parameters, DICOM JSON -> datasets (pure)
client.py    the one DICOMweb client, on the proxy's loop, with its TokenSource and upstream session
status.py    DIMSE status codes and the Failure they travel in
services.py  the pynetdicom event handlers, one per operation
gateway.py   the AE, its association policy, the bridge from pynetdicom's threads to the loop
"""

from __future__ import annotations

from .client import DicomWebClient
from .gateway import Gateway

__all__ = ["DicomWebClient", "Gateway"]

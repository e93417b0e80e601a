"""The SOP classes and transfer syntaxes the gateway names itself (PS3.4, PS3.5 Annex A)."""

from __future__ import annotations

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

# pynetdicom names its SOP classes at import time, where a type checker cannot see them; this is PS3.4's UID.
VERIFICATION = UID("1.2.840.10008.1.1")
# Study Root and Patient Root Query/Retrieve: FIND, MOVE and GET (PS3.4 C.6).
QUERY_RETRIEVE = tuple(UID(f"1.2.840.10008.5.1.4.1.2.{root}.{operation}") for root in (2, 1) for operation in (1, 2, 3))
# Accepted for storage and offered for retrieval, as the instance came.
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

"""Identifiers and DICOMweb, both ways: pure functions over pydicom Datasets and DICOM JSON, no network.

A C-FIND identifier becomes one QIDO-RS search (`search_for`): keys with values are match parameters, empty
keys `includefield`, wildcards and ranges pass through as they are (PS3.18 8.3.4). Each QIDO result becomes
the answer identifier with exactly the keys asked for, in the VRs the service gave (`answer`). A C-GET or
C-MOVE identifier becomes the QIDO-RS searches that list its instances (`retrieval_for`), and the listed
instances the WADO-RS paths that fetch them (`retrieve_paths`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, datadict
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from .status import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, UNABLE_TO_PROCESS

LEVELS = ("STUDY", "SERIES", "IMAGE")
# The unique key of each level (PS3.4 C.4.1.2.2): answers carry those of their level and the levels above.
_UNIQUE_KEYS = {
    "STUDY": (0x0020000D,),
    "SERIES": (0x0020000D, 0x0020000E),
    "IMAGE": (0x0020000D, 0x0020000E, 0x00080018),
}
_QUERY_RETRIEVE_LEVEL = 0x00080052
_SPECIFIC_CHARACTER_SET = 0x00080005
_RETRIEVE_AE_TITLE = 0x00080054
_STUDY, _SERIES, _INSTANCE, _SOP_CLASS = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016
# A UID as PS3.5 9.1 allows it; anything else never reaches a URL path.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_WILDCARDS = ("*", "?")
# VRs whose values are text, the only ones a UN value is decoded as (PS3.5 6.2).
_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
# SOP Instance UIDs asked for in one QIDO request, so that the query string stays short.
UIDS_PER_SEARCH = 50


class IdentifierError(ValueError):
    """The identifier cannot be turned into a search; `status` is what the peer is answered."""

    def __init__(self, detail: str, status: int = IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


@dataclass(frozen=True)
class Search:
    """One QIDO-RS search: `path` below the DICOMweb base, its query parameters, and the keys to answer with."""

    level: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    keys: tuple[tuple[BaseTag, str], ...] = ()


@dataclass(frozen=True)
class InstanceRef:
    """One instance as a QIDO-RS result names it."""

    study: str
    series: str
    instance: str
    sop_class: str = ""


def query_level(identifier: Dataset) -> str:
    """The identifier's Query/Retrieve Level, upper case; PATIENT is understood but not served."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level == "PATIENT":
        raise IdentifierError("PATIENT level is not supported; query at STUDY level instead", UNABLE_TO_PROCESS)
    if level not in LEVELS:
        # The value is not repeated: a peer may put anything there, a patient's name included.
        raise IdentifierError("Query/Retrieve Level must be STUDY, SERIES or IMAGE")
    return level


def search_for(identifier: Dataset) -> Search:
    """The QIDO-RS search a C-FIND identifier asks for (Study Root and Patient Root alike)."""
    level = query_level(identifier)
    study = _single_uid(identifier, _STUDY) if level in ("SERIES", "IMAGE") else None
    series = _single_uid(identifier, _SERIES) if level == "IMAGE" and study else None
    if study and series:
        path = f"studies/{study}/series/{series}/instances"
    elif study:
        path = f"studies/{study}/{'series' if level == 'SERIES' else 'instances'}"
    else:
        path = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}[level]
    in_path = {tag for tag, uid in ((_STUDY, study), (_SERIES, series)) if uid}

    params: list[tuple[str, str]] = []
    keys: list[tuple[BaseTag, str]] = []
    for element in identifier:
        tag = element.tag
        if tag in (_QUERY_RETRIEVE_LEVEL, _SPECIFIC_CHARACTER_SET) or tag.element == 0:
            continue
        vr, value = _decoded(identifier, element)
        keys.append((tag, vr))
        if tag in in_path or tag == _RETRIEVE_AE_TITLE:
            continue
        text = _match_text(vr, value)
        if vr == "SQ" or not text:
            # Sequence matching is not offered by QIDO-RS: a sequence is only asked for, never matched.
            params.append(("includefield", f"{tag:08X}"))
        else:
            params.append((f"{tag:08X}", text))
    known = {tag for tag, _vr in keys}
    for unique in _UNIQUE_KEYS[level]:
        if unique not in known:
            keys.append((Tag(unique), datadict.dictionary_VR(unique)))
    return Search(level, path, tuple(params), tuple(keys))


def answer(item: Mapping[str, Any], search: Search, *, retrieve_aet: str) -> Dataset:
    """A QIDO-RS result (DICOM JSON, PS3.18 F.2) as the C-FIND answer: the keys asked for, nothing else."""
    chosen: dict[str, Any] = {}
    for tag, _vr in search.keys:
        attribute = item.get(f"{tag:08X}")
        # Bulk data is never fetched for an answer; such a key is answered empty.
        if isinstance(attribute, dict) and "BulkDataURI" not in attribute and "InlineBinary" not in attribute:
            chosen[f"{tag:08X}"] = attribute
    found = Dataset.from_json(chosen)
    result = Dataset()
    result.QueryRetrieveLevel = search.level
    # DICOM JSON is UTF-8, and so are the answers.
    result.SpecificCharacterSet = "ISO_IR 192"
    for tag, vr in search.keys:
        if tag in found:
            result[tag] = found[tag]
        elif tag != _RETRIEVE_AE_TITLE:
            result.add_new(tag, vr, [] if vr == "SQ" else None)
    # In every answer, asked for or not: where to retrieve from (PS3.4 C.4.1.1.3.2), as native archives do.
    result.RetrieveAETitle = retrieve_aet
    return result


def retrieval_for(identifier: Dataset) -> tuple[str, list[Search]]:
    """The level of a C-GET/C-MOVE identifier and the instance-level searches that list what it names."""
    level = query_level(identifier)
    studies = _uids(identifier, _STUDY)
    if not studies:
        raise IdentifierError("a retrieve needs Study Instance UID")
    if level == "STUDY":
        return level, [Search("IMAGE", f"studies/{study}/instances") for study in studies]
    if len(studies) != 1:
        raise IdentifierError(f"a {level} level retrieve names exactly one Study Instance UID")
    series_list = _uids(identifier, _SERIES)
    if not series_list:
        raise IdentifierError(f"a {level} level retrieve needs Series Instance UID")
    if level == "SERIES":
        return level, [Search("IMAGE", f"studies/{studies[0]}/series/{series}/instances") for series in series_list]
    if len(series_list) != 1:
        raise IdentifierError("an IMAGE level retrieve names exactly one Series Instance UID")
    instances = _uids(identifier, _INSTANCE)
    if not instances:
        raise IdentifierError("an IMAGE level retrieve needs SOP Instance UID")
    path = f"studies/{studies[0]}/series/{series_list[0]}/instances"
    return level, [
        Search("IMAGE", path, (("00080018", ",".join(instances[start : start + UIDS_PER_SEARCH])),))
        for start in range(0, len(instances), UIDS_PER_SEARCH)
    ]


def instance_ref(item: Mapping[str, Any]) -> InstanceRef:
    """The UIDs of one instance-level QIDO-RS result; raises IdentifierError when one is missing or malformed."""

    def value(tag: int, required: bool = True) -> str:
        values = item.get(f"{tag:08X}", {}).get("Value") or [""]
        text = str(values[0])
        if required and not _UID.match(text):
            raise IdentifierError(f"the service listed an instance without a valid {_tag_text(tag)}")
        return text

    return InstanceRef(value(_STUDY), value(_SERIES), value(_INSTANCE), value(_SOP_CLASS, required=False))


def retrieve_paths(level: str, instances: Iterable[InstanceRef]) -> list[tuple[str, list[InstanceRef]]]:
    """WADO-RS paths fetching `instances`: one per series, or one per instance for an IMAGE level retrieve."""
    groups: dict[str, list[InstanceRef]] = {}
    for ref in instances:
        series_path = f"studies/{ref.study}/series/{ref.series}"
        path = f"{series_path}/instances/{ref.instance}" if level == "IMAGE" else series_path
        groups.setdefault(path, []).append(ref)
    return list(groups.items())


def _decoded(identifier: Dataset, element: DataElement) -> tuple[str, Any]:
    """The VR and value of a key; one that came as UN (too long for its VR, or from a sender that does not know
    the tag) is decoded as text in the dictionary's VR, and one of no text VR cannot be matched (0xA900)."""
    if element.VR != "UN":
        return element.VR, element.value
    vr = datadict.dictionary_VR(element.tag) if datadict.dictionary_has_tag(element.tag) else "UN"
    vr = "UN" if " or " in vr else vr  # e.g. "US or SS": no one VR to answer in
    raw = element.value or b""
    if not raw:
        return vr, None
    if vr not in _TEXT_VRS or not isinstance(raw, bytes):
        raise IdentifierError(f"the key {_tag_text(element.tag)} came as UN, of no VR it can be matched in")
    charset = identifier.get("SpecificCharacterSet") or "ISO_IR 6"
    text = decode_bytes(raw, convert_encodings(charset), {0x5C}).rstrip("\0 ")
    values = text.split("\\")
    return vr, values if len(values) > 1 else values[0]


def _match_text(vr: str, value: Any) -> str:
    """A matching key's value as a QIDO-RS parameter; a UID list is comma-separated (PS3.18 8.3.4.1)."""
    if value is None:
        return ""
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    texts = [str(item).strip() if vr != "PN" else str(item) for item in values]
    texts = [text for text in texts if text]
    return ",".join(texts) if vr == "UI" else "\\".join(texts)


def _uids(identifier: Dataset, tag: int) -> list[str]:
    element = identifier.get(tag)
    if element is None or element.value in (None, ""):
        return []
    values = element.value if isinstance(element.value, MultiValue | list | tuple) else [element.value]
    uids = [str(uid).strip() for uid in values if str(uid).strip()]
    for uid in uids:
        if not _UID.match(uid) or len(uid) > 64:
            # The UID itself is not repeated: a malformed one may be anything a client typed.
            raise IdentifierError(f"{_tag_text(tag)} holds a value that is not a UID")
    return uids


def _single_uid(identifier: Dataset, tag: int) -> str | None:
    """A key's UID when it names exactly one (no list, no wildcard), so the search can go below it in the path."""
    element = identifier.get(tag)
    if element is None or isinstance(element.value, MultiValue | list | tuple):
        return None
    text = str(element.value or "").strip()
    if not text or any(char in text for char in _WILDCARDS) or not _UID.match(text) or len(text) > 64:
        return None
    return text


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"

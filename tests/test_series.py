"""What read-ahead learns of a series from its metadata, whatever the service's JSON looks like."""

from __future__ import annotations

import gzip
import json

from hypothesis import given
from hypothesis import strategies as st

from proxy.series import Instance, InstanceScanner, Series

_UIDS = st.from_regex(r"[1-9][0-9]{0,5}(\.[0-9]{1,8}){1,6}", fullmatch=True)


@st.composite
def series_metadata(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, int | None, int]]]:
    """DICOM JSON for some instances (uid, Instance Number or None, Number of Frames), as a service might
    write it: keys in tag order, with or without spaces, "vr" before or after "Value", numbers or strings."""
    uids = draw(st.lists(_UIDS, min_size=1, max_size=12, unique=True))
    numbered = draw(st.booleans())
    instances = [(uid, draw(st.integers(1, 5000)) if numbered else None, draw(st.integers(1, 40))) for uid in uids]
    spaced, vr_last, quoted = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())

    def attribute(vr: str, value: object) -> dict[str, object]:
        return {"Value": [value], "vr": vr} if vr_last else {"vr": vr, "Value": [value]}

    documents = []
    for uid, number, frames in instances:
        document = {
            "00080016": attribute("UI", "1.2.840.10008.5.1.4.1.1.2"),
            "00080018": attribute("UI", uid),
            "0020000E": attribute("UI", "1.2.3.4"),
        }
        if number is not None:
            document["00200013"] = attribute("IS", str(number) if quoted else number)
        if frames > 1:
            document["00280008"] = attribute("IS", str(frames) if quoted else frames)
        document["7FE00010"] = {"vr": "OB", "BulkDataURI": f"https://service.example/v2/instances/{uid}/frames/1"}
        documents.append(document)
    text = json.dumps(documents, indent=2 if spaced else None, separators=None if spaced else (",", ":"))
    return text.encode(), instances


@given(series_metadata(), st.lists(st.integers(1, 400), max_size=20))
def test_the_scanner_finds_every_instance_wherever_the_chunks_break(metadata, cuts):
    body, instances = metadata
    scanner = InstanceScanner()
    start = 0
    for cut in cuts:
        scanner.feed(body[start : start + cut])
        start += cut
    scanner.feed(body[start:])
    found = [(instance.uid, instance.number, instance.frames) for instance in scanner.finish()]
    expected = sorted(instances, key=lambda item: item[1] or 0) if instances[0][1] is not None else instances
    assert found == expected


@given(series_metadata(), st.integers(1, 5000))
def test_gzip_metadata_is_read_as_well_in_any_pieces(metadata, piece):
    body, instances = metadata
    compressed = gzip.compress(body)
    scanner = InstanceScanner("gzip")
    for start in range(0, len(compressed), piece):
        scanner.feed(compressed[start : start + piece])
    assert [instance.uid for instance in scanner.finish()] == [
        uid for uid, _, _ in (sorted(instances, key=lambda item: item[1] or 0) if instances[0][1] else instances)
    ]


def test_metadata_in_an_encoding_that_cannot_be_undone_teaches_nothing():
    scanner = InstanceScanner("br")
    scanner.feed(b'[{"00080018":{"vr":"UI","Value":["1.2.3"]}}]')
    assert scanner.finish() == []


def test_frames_are_numbered_through_the_series_and_found_again_from_their_path():
    series = Series("/v2/studies/1/series/2", [Instance("2.1", 1, 3), Instance("2.2", 2, 1), Instance("2.3", 3, 2)])
    paths = [series.path(position, True) for position in range(series.count(True))]
    assert paths == [f"/v2/studies/1/series/2/instances/{uid}/frames/{frame}" for uid, frame in
                     [("2.1", 1), ("2.1", 2), ("2.1", 3), ("2.2", 1), ("2.3", 1), ("2.3", 2)]]  # fmt: skip
    assert [series.position(path.split("/")[7], int(path.rsplit("/", 1)[1])) for path in paths] == list(range(6))
    assert series.position("2.2", 2) is None and series.position("9.9", 1) is None
    assert series.count(False) == 3 and series.path(2, False) == "/v2/studies/1/series/2/instances/2.3"

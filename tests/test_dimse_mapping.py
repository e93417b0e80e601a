"""The DIMSE gateway's attribute mapping, with datasets and DICOM JSON only: no network."""

from __future__ import annotations

import warnings
from io import BytesIO

import pytest
from pydicom import Dataset
from pynetdicom.dsutils import decode, encode

from proxy.dimse.mapping import (
    IdentifierError,
    InstanceRef,
    answer,
    instance_ref,
    retrieval_for,
    retrieve_paths,
    search_for,
)
from proxy.dimse.status import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, UNABLE_TO_PROCESS


def identifier(level: str, **keys: object) -> Dataset:
    dataset = Dataset()
    dataset.QueryRetrieveLevel = level
    with warnings.catch_warnings():
        # Peers send what they like (a wildcard in a UID): pydicom's warning about it is not the point here.
        warnings.simplefilter("ignore", UserWarning)
        for keyword, value in keys.items():
            setattr(dataset, keyword, value)
    return dataset


def test_values_match_empty_keys_are_included_and_wildcards_and_ranges_pass_through():
    search = search_for(
        identifier("STUDY", PatientName="Doe^J*", StudyDate="20200101-20201231", PatientID="", StudyInstanceUID="",
                   ModalitiesInStudy="", AccessionNumber="A?1")
    )  # fmt: skip
    assert search.path == "studies"
    assert search.params == (
        ("00080020", "20200101-20201231"),
        ("00080050", "A?1"),
        ("includefield", "00080061"),
        ("00100010", "Doe^J*"),
        ("includefield", "00100020"),
        ("includefield", "0020000D"),
    )


def test_a_single_study_uid_goes_into_the_path_and_a_uid_list_is_comma_separated():
    series = search_for(identifier("SERIES", StudyInstanceUID="1.2.3", SeriesInstanceUID="", Modality="CT"))
    assert series.path == "studies/1.2.3/series"
    assert series.params == (("00080060", "CT"), ("includefield", "0020000E"))
    images = search_for(identifier("IMAGE", StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4", SOPInstanceUID=""))
    assert images.path == "studies/1.2.3/series/1.2.3.4/instances"
    listed = search_for(identifier("SERIES", StudyInstanceUID=["1.2.3", "1.2.4"], SeriesInstanceUID=""))
    assert listed.path == "series" and ("0020000D", "1.2.3,1.2.4") in listed.params
    wildcard = search_for(identifier("IMAGE", StudyInstanceUID="1.2.*"))
    assert wildcard.path == "instances" and ("0020000D", "1.2.*") in wildcard.params


def test_answers_carry_exactly_the_keys_asked_for_in_the_services_vrs():
    search = search_for(
        identifier("STUDY", PatientName="Doe*", StudyDate="", StudyTime="", ModalitiesInStudy="",
                   NumberOfStudyRelatedInstances="", ReferringPhysicianName="", RetrieveAETitle="")
    )  # fmt: skip
    item = {
        "00080020": {"vr": "DA", "Value": ["20240229"]},
        "00080030": {"vr": "TM", "Value": ["101010.5"]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00100020": {"vr": "LO", "Value": ["not asked for"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00201208": {"vr": "IS", "Value": [7]},
        "00081190": {"vr": "UR", "Value": ["https://service/studies/1.2.3"]},
    }
    result = answer(item, search, retrieve_aet="DICOMPROXY")
    assert {element.keyword for element in result} == {
        "QueryRetrieveLevel", "SpecificCharacterSet", "PatientName", "StudyDate", "StudyTime", "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances", "ReferringPhysicianName", "RetrieveAETitle", "StudyInstanceUID",
    }  # fmt: skip
    assert str(result.PatientName) == "Doe^Jane" and result["PatientName"].VR == "PN"
    assert (result.StudyDate, result["StudyDate"].VR, result["StudyTime"].VR) == ("20240229", "DA", "TM")
    assert list(result.ModalitiesInStudy) == ["CT", "MR"]
    assert result.NumberOfStudyRelatedInstances == 7 and result["NumberOfStudyRelatedInstances"].VR == "IS"
    assert result.StudyInstanceUID == "1.2.3" and result["StudyInstanceUID"].VR == "UI"
    assert result.ReferringPhysicianName in (None, "") and result["ReferringPhysicianName"].VR == "PN"
    assert result.RetrieveAETitle == "DICOMPROXY" and result.SpecificCharacterSet == "ISO_IR 192"


def test_bulk_data_is_never_part_of_an_answer():
    search = search_for(identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3", IconImageSequence=[]))
    result = answer({"00880200": {"vr": "SQ", "BulkDataURI": "https://x"}}, search, retrieve_aet="A")
    assert result.IconImageSequence == []


@pytest.mark.parametrize(
    ("dataset", "status"),
    [
        (identifier("WARD"), IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        (Dataset(), IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS),
        (identifier("PATIENT", PatientID="1"), UNABLE_TO_PROCESS),
    ],
)
def test_levels_that_cannot_be_searched(dataset, status):
    with pytest.raises(IdentifierError) as refused:
        search_for(dataset)
    assert refused.value.status == status


def test_retrieves_list_instances_per_study_series_or_uid_batch():
    assert retrieval_for(identifier("STUDY", StudyInstanceUID=["1.2", "1.3"]))[1][1].path == "studies/1.3/instances"
    level, searches = retrieval_for(identifier("SERIES", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3"))
    assert (level, [search.path for search in searches]) == ("SERIES", ["studies/1.2/series/1.2.3/instances"])
    uids = [f"1.2.3.{number}" for number in range(120)]
    level, searches = retrieval_for(
        identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3", SOPInstanceUID=uids)
    )
    assert [len(search.params[0][1].split(",")) for search in searches] == [50, 50, 20]


@pytest.mark.parametrize(
    "dataset",
    [
        identifier("STUDY"),
        identifier("STUDY", StudyInstanceUID="1.2.*"),  # no wildcard in a retrieve
        identifier("STUDY", StudyInstanceUID="../../admin"),  # never a path from the peer
        identifier("SERIES", StudyInstanceUID=["1.2", "1.3"], SeriesInstanceUID="1.2.3"),
        identifier("IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3"),
    ],
)
def test_retrieve_identifiers_that_are_refused(dataset):
    with pytest.raises(IdentifierError):
        retrieval_for(dataset)


def test_listed_instances_become_wado_paths_per_series_or_per_instance():
    refs = [
        InstanceRef("1.2", "1.2.3", "1.2.3.1"),
        InstanceRef("1.2", "1.2.3", "1.2.3.2"),
        InstanceRef("1.2", "1.2.4", "9"),
    ]
    assert [(path, len(group)) for path, group in retrieve_paths("STUDY", refs)] == [
        ("studies/1.2/series/1.2.3", 2),
        ("studies/1.2/series/1.2.4", 1),
    ]
    assert retrieve_paths("IMAGE", refs[:1])[0][0] == "studies/1.2/series/1.2.3/instances/1.2.3.1"
    item = {
        "0020000D": {"vr": "UI", "Value": ["1.2"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3"]},
        "00080018": {"vr": "UI", "Value": ["1.2.3.1"]},
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
    }
    assert instance_ref(item) == InstanceRef("1.2", "1.2.3", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2")
    with pytest.raises(IdentifierError):
        instance_ref({**item, "0020000E": {"vr": "UI", "Value": ["../x"]}})


def test_a_matching_value_sent_as_un_is_decoded_and_one_of_unknown_vr_is_refused():
    """pydicom sends a value too long for its VR as UN, and so do senders that do not know the tag: decoded with
    the dictionary's VR it matches as text; without one it cannot be searched (0xA900), never as a bytes repr."""
    sent = identifier("STUDY", StudyDescription="CT+HEAD+" * 9000, StudyInstanceUID="")
    sent.add_new(0x00100020, "UN", b"PAT\\ID2 ")  # a short UN of a known tag, as a sender that knows no VR sends it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom warns that the value is too long for LO
        received = decode(BytesIO(encode(sent, False, True)), False, True)
    assert received[0x00081030].VR == "UN"  # what pynetdicom hands the handler
    params = dict(search_for(received).params)
    assert params["00081030"] == "CT+HEAD+" * 9000
    assert params["00100020"] == "PAT\\ID2"
    unknown = identifier("STUDY")
    unknown.add_new(0x00091001, "UN", b"DOE^JANE")
    with pytest.raises(IdentifierError) as refused:
        search_for(decode(BytesIO(encode(unknown, False, True)), False, True))
    assert refused.value.status == IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS and "DOE" not in refused.value.detail


def test_every_answer_carries_the_retrieve_ae_title_asked_for_or_not():
    search = search_for(identifier("STUDY", StudyInstanceUID=""))
    result = answer({"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}, search, retrieve_aet="DICOMPROXY")
    assert result.RetrieveAETitle == "DICOMPROXY" and result["RetrieveAETitle"].VR == "AE"


def test_a_level_that_is_not_one_is_refused_without_repeating_it():
    with pytest.raises(IdentifierError) as refused, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom's own, about the value
        search_for(identifier("DOE^JANE"))
    assert "DOE" not in refused.value.detail and "JANE" not in refused.value.detail


def test_the_pynetdicom_internals_the_gateway_relies_on_exist():
    """Each private part of pynetdicom the gateway uses (proxy/dimse/wire.py names them) exists on the objects
    pynetdicom makes, and the AE validator keeps its call: a pynetdicom upgrade that removes one fails here, by
    name, instead of the gateway falling back without a word."""
    from pynetdicom import AE, _config
    from pynetdicom.association import Association
    from pynetdicom.dimse_messages import DIMSEMessage

    from proxy.dimse import wire

    validators = getattr(_config, "VALIDATORS", {})
    assert wire.AE_VALIDATOR in validators, f"pynetdicom's _config.VALIDATORS has no {wire.AE_VALIDATOR!r} (gateway.py)"
    assert validators[wire.AE_VALIDATOR]("STORESCU") == (True, ""), "pynetdicom's AE validator changed its answer"
    association = Association(AE(), "requestor")
    dimse = getattr(association, wire.DIMSE_PROVIDER, None)
    assert dimse is not None, f"pynetdicom's Association has no {wire.DIMSE_PROVIDER!r} (wire.py, gateway.py)"
    for name in (*wire.DIMSE_PROVIDER_ATTRIBUTES, wire.RECEIVING_MESSAGE):
        assert hasattr(dimse, name), f"pynetdicom's DIMSE provider has no {name!r} (wire.py, gateway.py)"
    for name in wire.DUL_ATTRIBUTES:
        assert callable(getattr(dimse.dul, name, None)), f"pynetdicom's DUL provider has no {name!r} (wire.py)"
    message = DIMSEMessage()
    for name in wire.RECEIVING_MESSAGE_ATTRIBUTES:
        assert hasattr(message, name), f"pynetdicom's DIMSEMessage has no {name!r} (gateway.py)"


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("failed for 1.2.840.113619.2.55.3.", "failed for <UID>."),
        ("the service's answer for level 'DOE^JOHN' was empty", "the service's answer for level <value> was empty"),
        ('a "DOE^JANE" from 127.0.0.1', "a <value> from 127.0.0.1"),
        ("study 1.2.3 and series 1.2.3.4.5", "study <UID> and series <UID>"),
    ],
)
def test_a_gateway_message_carries_no_uid_or_quoted_value_whatever_surrounds_it(message, shown):
    from proxy.dimse.report import safe

    assert safe(message) == shown

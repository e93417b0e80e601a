"""End to end with software no one here wrote: Orthanc with its DICOMweb plugin behind the proxy, and
dicomweb-client in front of it.

Orthanc runs on loopback with a Lua filter that admits only the bearer token the `az` stand-in hands out,
so every call that succeeds proves the proxy put the token there; the same calls made directly are
refused. Orthanc writes RetrieveURLs from the Host it was sent, so following them proves the rewriting.
"""

from __future__ import annotations

import hashlib
import json
from email import message_from_bytes
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import requests
from dicomweb_client import DICOMwebClient

from .orthanc import ORTHANC_TOKEN

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
# Local files only: asking pydicom for one it does not ship would try to download it.
STORED = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm", "rtdose.dcm", "rtplan.dcm"]


@pytest.fixture
def through_proxy(start_proxy, az, orthanc):  # noqa: ANN201
    """A proxy whose upstream is Orthanc's DICOMweb root, handing out the token Orthanc accepts."""
    az.configure(token=ORTHANC_TOKEN)
    return start_proxy(upstream_url=f"{orthanc}/dicom-web")


@pytest.fixture
def datasets() -> dict[str, pydicom.Dataset]:
    return {name: pydicom.dcmread(TEST_FILES / name) for name in STORED}


@pytest.fixture
def client(through_proxy, datasets) -> DICOMwebClient:
    client = DICOMwebClient(url=through_proxy.url)
    client.store_instances(list(datasets.values()))
    return client


def retrieve_urls(node: object) -> list[str]:
    """Every RetrieveURL (0008,1190) anywhere in a DICOM JSON document."""
    found: list[str] = []
    if isinstance(node, list):
        for item in node:
            found += retrieve_urls(item)
    elif isinstance(node, dict):
        for tag, value in node.items():
            if tag == "00081190":
                found += value.get("Value", [])
            elif isinstance(value, dict | list):
                found += retrieve_urls(value)
    return found


def test_stow_answers_point_at_the_proxy(through_proxy, datasets):
    client = DICOMwebClient(url=through_proxy.url)
    answer = client.store_instances([datasets["CT_small.dcm"]])
    urls = retrieve_urls(answer.to_json_dict())
    study = datasets["CT_small.dcm"].StudyInstanceUID
    assert f"{through_proxy.url}/studies/{study}" in urls
    assert len(urls) == 2 and all(url.startswith(f"{through_proxy.url}/studies/") for url in urls)


def test_qido_results_point_at_the_proxy_and_work_when_followed(client, through_proxy, orthanc, datasets):
    studies = client.search_for_studies()
    ours = {dataset.StudyInstanceUID for dataset in datasets.values()}
    found = {study["0020000D"]["Value"][0] for study in studies}
    assert ours <= found
    urls = retrieve_urls(studies)
    assert urls and all(url.startswith(f"{through_proxy.url}/studies/") for url in urls)
    assert orthanc not in json.dumps(studies)
    for url in urls:
        answer = requests.get(f"{url}/metadata", headers={"Accept": "application/dicom+json"}, timeout=30)
        assert answer.status_code == 200, url
        assert answer.json()[0]["0020000D"]["Value"][0] == url.rsplit("/", 1)[1]

    ct = datasets["CT_small.dcm"]
    series = client.search_for_series(ct.StudyInstanceUID)
    assert [item["0020000E"]["Value"][0] for item in series] == [ct.SeriesInstanceUID]
    instances = client.search_for_instances(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert [item["00080018"]["Value"][0] for item in instances] == [ct.SOPInstanceUID]
    assert all(url.startswith(through_proxy.url) for url in retrieve_urls(series + instances))


def test_wado_retrieves_study_series_instance_metadata_frames_and_rendered(client, datasets):
    ct = datasets["CT_small.dcm"]
    study = client.retrieve_study(ct.StudyInstanceUID)
    assert [item.SOPInstanceUID for item in study] == [ct.SOPInstanceUID]
    series = client.retrieve_series(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert series[0].PixelData == ct.PixelData
    instance = client.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    assert instance.PixelData == ct.PixelData
    metadata = client.retrieve_study_metadata(ct.StudyInstanceUID)
    assert metadata[0]["00100010"]["Value"][0]["Alphabetic"] == str(ct.PatientName)

    dose = datasets["rtdose.dcm"]
    frames = client.retrieve_instance_frames(
        dose.StudyInstanceUID,
        dose.SeriesInstanceUID,
        dose.SOPInstanceUID,
        frame_numbers=[1, 15],
        media_types=("application/octet-stream",),  # Orthanc's plugin refuses the default */*
    )
    frame_size = len(dose.PixelData) // int(dose.NumberOfFrames)
    assert frames == [dose.PixelData[:frame_size], dose.PixelData[-frame_size:]]

    rendered = client.retrieve_instance_rendered(
        ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID, media_types=("image/png",)
    )
    assert rendered.startswith(b"\x89PNG\r\n\x1a\n")


def test_retrieved_bytes_are_identical_to_what_was_stored(client, through_proxy, datasets):
    for name, dataset in datasets.items():
        url = (
            f"{through_proxy.url}/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
            f"/instances/{dataset.SOPInstanceUID}"
        )
        answer = requests.get(
            url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}, timeout=30
        )
        assert answer.status_code == 200
        message = message_from_bytes(
            b"Content-Type: " + answer.headers["Content-Type"].encode() + b"\r\n\r\n" + answer.content
        )
        parts = [part.get_payload(decode=True) for part in message.get_payload()]
        assert len(parts) == 1
        original = (TEST_FILES / name).read_bytes()
        assert hashlib.sha256(parts[0]).hexdigest() == hashlib.sha256(original).hexdigest(), name


def test_the_same_calls_without_the_proxy_are_refused(client, orthanc, datasets):
    direct = DICOMwebClient(url=f"{orthanc}/dicom-web")
    with pytest.raises(requests.HTTPError) as refused:
        direct.search_for_studies()
    assert refused.value.response.status_code == 403
    ct = datasets["CT_small.dcm"]
    with pytest.raises(requests.HTTPError):
        direct.retrieve_instance(ct.StudyInstanceUID, ct.SeriesInstanceUID, ct.SOPInstanceUID)
    with pytest.raises(requests.HTTPError):
        direct.store_instances([ct])


def test_delete_through_the_proxy(start_proxy, az, orthanc, datasets):
    """Orthanc's DICOMweb plugin has no DELETE (405 passes through); its REST API deletes through the proxy."""
    az.configure(token=ORTHANC_TOKEN)
    proxy = start_proxy(upstream_url=orthanc)
    client = DICOMwebClient(url=f"{proxy.url}/dicom-web")
    plan = datasets["rtplan.dcm"]
    client.store_instances([plan])
    with pytest.raises(requests.HTTPError) as unsupported:
        client.delete_study(plan.StudyInstanceUID)
    assert unsupported.value.response.status_code == 405

    lookup = requests.post(f"{proxy.url}/tools/lookup", data=plan.StudyInstanceUID, timeout=30).json()
    deleted = requests.delete(f"{proxy.url}/studies/{lookup[0]['ID']}", timeout=30)
    assert deleted.status_code == 200
    assert client.search_for_studies(search_filters={"StudyInstanceUID": plan.StudyInstanceUID}) == []

"""Ready-to-copy settings for each client, with this proxy's DICOMweb base URL filled in.

Never the access key: only where it goes, with a placeholder in its place.
"""

from __future__ import annotations

from typing import TypedDict

from ..guard import ACCESS_KEY_HEADER

KEY_PLACEHOLDER = "<access key>"
STUDY_PLACEHOLDER = "<StudyInstanceUID>"
_KEY_HEADER_LINE = f"{ACCESS_KEY_HEADER}: {KEY_PLACEHOLDER}"


class Client(TypedDict):
    name: str
    where: str
    code: str
    note: str


def client_settings(base_url: str, *, key_required: bool, cors_origins: list[str]) -> list[Client]:
    """What to paste where, for each client."""
    return [
        _ohif(base_url, key_required=key_required, cors_origins=cors_origins),
        _weasis(base_url, key_required=key_required),
        _slicer(base_url, key_required=key_required),
        _dicomweb_client(base_url, key_required=key_required),
        _curl(base_url, key_required=key_required),
    ]


def _ohif(base_url: str, *, key_required: bool, cors_origins: list[str]) -> Client:
    code = f"""defaultDataSourceName: 'azure',
dataSources: [
  {{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'azure',
    configuration: {{
      friendlyName: 'Azure DICOM service (dicom-auth-proxy)',
      name: 'azure',
      wadoUriRoot: '{base_url}',
      qidoRoot: '{base_url}',
      wadoRoot: '{base_url}',
      qidoSupportsIncludeField: false,
      supportsReject: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
    }},
  }},
],"""
    origins = ", ".join(cors_origins) if cors_origins else "none yet"
    note = (
        "Start the proxy with --cors-origin set to the origin OHIF is served from, exactly as the "
        "browser's address bar shows it (http://127.0.0.1:3000 is not http://localhost:3000). "
        f"Allowed origins now: {origins}. omitQuotationForMultipartRequest: false works too, but its quoted "
        "Accept header costs a CORS preflight per request."
    )
    if key_required:
        note += (
            " OHIF sends no fixed header or password (only its own sign-in token): it cannot present the "
            "access key, so run it against a proxy without one."
        )
    where = "in OHIF's app-config.js, replacing its dataSources (they point at a public demo server)"
    return {"name": "OHIF Viewer", "where": where, "code": code, "note": note}


def _weasis(base_url: str, *, key_required: bool) -> Client:
    code = f'$dicom:rs --url "{base_url}" -r "studyUID={STUDY_PLACEHOLDER}"'
    if key_required:
        code += f' -H "{_KEY_HEADER_LINE}"'
    where = "as a DICOMweb node with this URL, or launched with this command (URL-encoded after weasis:// in a link)"
    return {"name": "Weasis", "where": where, "code": code, "note": ""}


def _slicer(base_url: str, *, key_required: bool) -> Client:
    code = (
        "from DICOMLib import DICOMUtils\n"
        f'DICOMUtils.importFromDICOMWeb(dicomWebEndpoint="{base_url}", studyInstanceUID="{STUDY_PLACEHOLDER}")'
    )
    note = (
        "importFromDICOMWeb sends its accessToken as a Bearer header, which is not the access key: "
        "with a key set, use dicomweb-client in Slicer's Python console instead."
        if key_required
        else ""
    )
    where = "in Slicer's Python console (or the DICOMweb Browser extension: server URL above)"
    return {"name": "3D Slicer", "where": where, "code": code, "note": note}


def _dicomweb_client(base_url: str, *, key_required: bool) -> Client:
    headers = f', headers={{"{ACCESS_KEY_HEADER}": "{KEY_PLACEHOLDER}"}}' if key_required else ""
    code = (
        "from dicomweb_client import DICOMwebClient\n"
        f'client = DICOMwebClient(url="{base_url}"{headers})\n'
        "studies = client.search_for_studies(limit=10)"
    )
    return {"name": "dicomweb-client (Python)", "where": "in a script or notebook", "code": code, "note": ""}


def _curl(base_url: str, *, key_required: bool) -> Client:
    header = f"-H '{_KEY_HEADER_LINE}' " if key_required else ""
    code = f"curl -H 'Accept: application/dicom+json' {header}'{base_url}/studies?limit=10'"
    return {"name": "curl", "where": "in a terminal", "code": code, "note": ""}

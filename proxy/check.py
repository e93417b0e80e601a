"""`dicom-auth-proxy check`: tell a newcomer, one line per step, what works and how to fix what does not.

Each step builds on the one before (no token, no audience to check), but the upstream is probed even
without a token so that network and TLS problems show up too. The token itself is never printed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

import aiohttp
from azure.core.credentials import TokenRequestOptions
from azure.core.exceptions import AzureError

from .credentials import build_credential
from .errors import ConfigurationError
from .session import upstream_session
from .settings import Settings
from .tokens import describe_identity, expiry_text, failure_reason, token_claims

_DESCRIPTION = re.compile(r'error_description="([^"]*)"')
# azure-identity's AzureCliCredential, when az's output does not parse: "Unexpected output from Azure CLI: '...'."
ROLE_HINT = (
    "give the signed-in identity a DICOM role (DICOM Data Reader, or DICOM Data Owner to write) "
    "on the DICOM service in the Azure portal (Access control (IAM))"
)


@dataclass(frozen=True)
class Finding:
    """One step's outcome; a `warning` passes (exit code 0) but is not shown as ok."""

    ok: bool
    step: str
    detail: str
    fix: str = ""
    warning: bool = False

    def line(self) -> str:
        label = "FAIL" if not self.ok else "warn" if self.warning else "ok  "
        text = f"{label}  {self.step}: {self.detail}"
        return text + (f" -> fix: {self.fix}" if self.fix and label != "ok  " else "")


def probe_url(settings: Settings) -> str:
    """An authorised, cheap QIDO-RS query at the base a viewer uses (/v2 added only to a bare service root)."""
    return f"{str(settings.upstream_dicomweb).rstrip('/')}/studies?limit=1"


async def diagnose(settings: Settings, *, which: Callable[[str], str | None] = shutil.which) -> list[Finding]:
    findings: list[Finding] = []
    token_value = await _check_token(settings, findings, which)
    await _check_upstream(settings, findings, token_value)
    return findings


async def _check_token(settings: Settings, findings: list[Finding], which: Callable[[str], str | None]) -> str | None:
    if settings.credential == "cli":
        az = which("az")
        if az is None:
            findings.append(Finding(False, "az found", "no 'az' on PATH", "install the Azure CLI, then run 'az login'"))
            return None
        findings.append(Finding(True, "az found", az))
    try:
        credential = build_credential(settings)
    except ConfigurationError as error:
        findings.append(Finding(False, "credential", error.detail, error.hint))
        return None
    options: TokenRequestOptions = {"tenant_id": settings.tenant} if settings.tenant else {}
    try:
        async with credential:
            info = await credential.get_token_info(settings.scope, options=options)
    except AzureError as error:
        findings.append(_signin_failure(settings, error.message or str(error)))
        return None
    findings.append(Finding(True, "signed in", f"the {settings.credential} credential gave a token"))
    claims = token_claims(info.token)
    findings.append(_audience(settings, str(claims.get("aud", "")).rstrip("/")))
    tenant = str(claims.get("tid", ""))
    if settings.tenant and tenant and settings.tenant != tenant:
        findings.append(Finding(False, "identity", describe_identity(claims), f"sign in to tenant {settings.tenant}"))
    else:
        findings.append(Finding(True, "identity", describe_identity(claims)))
    minutes = (info.expires_on - time.time()) / 60
    when = f"expires at {expiry_text(info.expires_on)} (in {minutes:.0f} min)"
    if minutes < 1:
        findings.append(Finding(False, "expiry", f"the token {when}", "check this machine's clock, then 'az login'"))
    else:
        findings.append(Finding(True, "expiry", f"the token {when}"))
    return info.token


def _audience(settings: Settings, audience: str) -> Finding:
    """The token's audience against the one asked for, then the one asked for against the DICOM service's."""
    if audience != settings.audience.rstrip("/"):
        return Finding(
            False,
            "audience",
            f"the token is for {audience or 'an unknown audience'}, not {settings.audience}",
            "use --audience https://dicom.healthcareapis.azure.com (the DICOM service's audience)",
        )
    if settings.audience_warning:
        return Finding(True, "audience", settings.audience_warning, warning=True)
    return Finding(True, "audience", audience)


def _signin_failure(settings: Settings, message: str) -> Finding:
    """What the credential said, and its fix: `az login`, unless az itself is broken (tokens.failure_reason)."""
    reason, fix = failure_reason(message)
    if fix is None:
        fix = "run 'az login'" if settings.credential == "cli" else f"check the {settings.credential} credential"
    return Finding(False, "signed in", reason, fix)


async def _check_upstream(settings: Settings, findings: list[Finding], token: str | None) -> None:
    url = probe_url(settings)
    headers = {"Accept": "application/dicom+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with upstream_session(settings) as session:
        try:
            async with session.get(
                url, headers=headers, allow_redirects=False, proxy=settings.upstream_proxy
            ) as answer:
                status = answer.status
                challenge = answer.headers.get("WWW-Authenticate", "")
        except aiohttp.ClientSSLError as error:
            findings.append(
                Finding(False, "upstream reachable", f"TLS failed: {error}", "pass your network's CA with --ca-bundle")
            )
            return
        except (aiohttp.ClientError, TimeoutError) as error:
            findings.append(
                Finding(
                    False,
                    "upstream reachable",
                    f"{settings.upstream.host}: {error or type(error).__name__}",
                    "check --upstream, your network and HTTPS_PROXY",
                )
            )
            return
    scheme = "over TLS" if settings.upstream.scheme == "https" else "over plain HTTP"
    findings.append(Finding(True, "upstream reachable", f"{settings.upstream.host} {scheme}"))
    if token is None:
        return
    findings.append(_judge(status, challenge, url))


def _judge(status: int, challenge: str, url: str) -> Finding:
    step = "upstream accepts the token"
    if status in (200, 204):
        return Finding(True, step, f"GET {url} answered {status}")
    found = _DESCRIPTION.search(challenge)
    description = found.group(1) if found else challenge or "no reason given"
    if status == 401:
        if "audience" in description.lower():
            return Finding(
                False,
                step,
                f"401, wrong audience: {description}",
                "use --audience https://dicom.healthcareapis.azure.com",
            )
        return Finding(False, step, f"401: {description}", "run 'az login' again, and check --tenant")
    if status == 403:
        return Finding(False, step, f"403, the identity has no DICOM role: {description}", ROLE_HINT)
    if status == 404:
        return Finding(False, step, f"404 for {url}", "check the --upstream URL (workspace and service names)")
    return Finding(False, step, f"unexpected status {status} for {url}", "see the service's answer with curl")


def run_check(settings: Settings, out: TextIO) -> int:
    # azure-identity logs its own "get_token_info failed" warnings; the findings already say it, once.
    logging.getLogger("azure").setLevel(logging.CRITICAL)
    findings = asyncio.run(diagnose(settings))
    for finding in findings:
        print(finding.line(), file=out)
    failed = sum(not finding.ok for finding in findings)
    warned = sum(finding.warning for finding in findings)
    warnings = f", {warned} warning{'s' if warned > 1 else ''}" if warned else ""
    print(("all checks passed" if not failed else f"{failed} check(s) failed") + warnings, file=out)
    return 0 if not failed else 1

"""Validation: the merged raw values (flag > env > file) become the keyword arguments of Settings.

Each value is parsed by its kind's one parser in values.py; what is left here are the rules that tie
options together (an open port needs a key, the gateway needs one process). A missing value is left out,
so that the Settings field's own default applies (defaults are written once, on the dataclass).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Untyped in typeshed, but public and documented; it reads only the mapping it is given.
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

from yarl import URL

from . import values
from .errors import ConfigurationError
from .options import CREDENTIAL_KINDS, DEFAULT_AUDIENCE, DEFAULT_DIMSE_AET, LOG_FORMATS, MIB, OPTIONS

DEFAULT_LISTEN = "127.0.0.1:8080"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_TENANT = re.compile(r"^[0-9A-Za-z.-]+$")
_NOT_A_PLAIN_URL = re.compile(r"[\s\"'<>\\]")


def settings_fields(raw: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for Settings; raise ConfigurationError naming the option at the first bad value."""
    insecure_upstream = bool(raw.get("insecure_upstream", False))
    upstream = _upstream_url(raw.get("upstream"), insecure_upstream)
    listen_host, listen_port = values.host_port(str(raw.get("listen", DEFAULT_LISTEN)), "--listen")
    log_format = str(raw.get("log_format", "text"))
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"--log-format: expected text or json, got {log_format!r}")
    access_key = _access_key(raw)
    allow_remote = bool(raw.get("allow_unauthenticated_remote", False))
    if not values.is_loopback(listen_host) and access_key is None and not allow_remote:
        raise ConfigurationError(
            f"--listen: {listen_host} is reachable from other machines; set an access key "
            "(--access-key-file or DICOM_PROXY_ACCESS_KEY) or pass --allow-unauthenticated-remote"
        )
    fields: dict[str, Any] = {
        "upstream": upstream,
        "listen_host": listen_host,
        "listen_port": listen_port,
        "ca_bundle": values.ca_bundle(Path(raw["ca_bundle"])) if raw.get("ca_bundle") else None,
        "read_only": bool(raw.get("read_only", False)),
        "cors_origins": tuple(_cors_origin(origin) for origin in raw.get("cors_origins", [])),
        "allowed_hosts": _allowed_hosts(raw.get("allowed_hosts", []), listen_host),
        "access_key": access_key,
        "allow_unauthenticated_remote": allow_remote,
        "insecure_upstream": insecure_upstream,
        "log_format": log_format,
        "upstream_proxy": _environment_proxy(upstream, environ),
        **_numbers(raw),
        **_credential_settings(raw),
    }
    if "rewrite" in raw:
        fields["rewrite"] = bool(raw["rewrite"])
    return fields | _dimse_settings(raw, fields.get("workers", 1))


def _numbers(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Every numeric option given, through the one number parser with its option's bounds."""
    found: dict[str, Any] = {}
    for item in OPTIONS:
        if item.kind not in ("float", "int") or item.name not in raw:
            continue
        low, high = item.limits
        value = values.number(raw[item.name], str(item.flag), whole=item.kind == "int", low=low, high=high)
        if item.bytes_of is not None:
            found[item.bytes_of] = int(value * MIB)
        else:
            found[item.name] = int(value) if item.kind == "int" else value
    if "workers" in found:
        if found["workers"] > 1 and not (hasattr(socket, "SO_REUSEPORT") and hasattr(os, "fork")):
            raise ConfigurationError(
                "--workers: more than 1 needs SO_REUSEPORT and fork, which this platform (Windows, for one) "
                "lacks; run one process (--workers 1, the default)"
            )
    return found


def _credential_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Which identity, for which tenant and audience."""
    credential = str(raw.get("credential", "cli"))
    if credential not in CREDENTIAL_KINDS:
        raise ConfigurationError(
            f"--credential: unknown credential {credential!r}; choose one of {', '.join(CREDENTIAL_KINDS)}"
        )
    tenant = raw.get("tenant") or None
    if tenant is not None and not _TENANT.match(tenant):
        raise ConfigurationError(f"--tenant: {tenant!r} is not a tenant ID or domain")
    audience = str(raw.get("audience", DEFAULT_AUDIENCE))
    parsed = values.url(audience, "--audience")
    if parsed.scheme != "https" or not parsed.host:
        raise ConfigurationError(f"--audience: {audience!r} must be an https:// URL")
    return {"credential": credential, "tenant": tenant, "audience": audience}


def _dimse_settings(raw: Mapping[str, Any], workers: int) -> dict[str, Any]:
    """The DIMSE gateway's settings, refused where they would open it to other machines."""
    dimse_listen = values.host_port(str(raw["dimse_listen"]), "--dimse-listen") if raw.get("dimse_listen") else None
    dimse_allow = tuple(_dimse_allow(entry) for entry in raw.get("dimse_allow", []))
    if dimse_listen is not None:
        # Like the HTTP side without an access key: an open DIMSE port would store and retrieve as you.
        if not values.is_loopback(dimse_listen[0]) and not dimse_allow:
            raise ConfigurationError(
                f"--dimse-listen: {dimse_listen[0]} is reachable from other machines; list the calling AE titles "
                "allowed with --dimse-allow AET[@HOST] (DICOM_PROXY_DIMSE_ALLOW)"
            )
        if workers > 1:
            raise ConfigurationError("--dimse-listen: the DIMSE gateway runs in one process; use --workers 1")
    return {
        "dimse_listen": dimse_listen,
        "dimse_aet": values.ae_title(str(raw.get("dimse_aet", DEFAULT_DIMSE_AET)), "--dimse-aet"),
        "dimse_allow": dimse_allow,
        "move_destinations": tuple(_move_destination(entry) for entry in raw.get("move_destinations", [])),
    }


def _upstream_url(value: Any, insecure: bool) -> URL:
    if not value:
        raise ConfigurationError(
            "--upstream: required (or set DICOM_PROXY_UPSTREAM), e.g. "
            "https://<workspace>-<service>.dicom.azurehealthcareapis.com"
        )
    url = values.url(str(value), "--upstream")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"--upstream: {value!r} must be an https:// URL with a host")
    if url.query_string or url.fragment or url.user or url.password:
        raise ConfigurationError(f"--upstream: {value!r} must not carry credentials, a query or a fragment")
    if _NOT_A_PLAIN_URL.search(str(url)):
        # Such a base could not be told apart from the text around it in a body, so links could not be rewritten.
        raise ConfigurationError(f"--upstream: {value!r} holds a quote, bracket, backslash or space")
    if url.scheme == "http" and not values.is_loopback(url.host) and not insecure:
        raise ConfigurationError(
            f"--upstream: {value!r} is plain http to another machine, which would send the token in "
            "clear; use https:// (or --insecure-upstream if you really mean it)"
        )
    return url.with_path(url.raw_path.rstrip("/"), encoded=True)


def _environment_proxy(upstream: URL, environ: Mapping[str, str]) -> URL | None:
    """The forward proxy that curl would use for the upstream, honouring NO_PROXY."""

    def variable(name: str) -> str:
        return environ.get(name) or environ.get(name.lower()) or ""

    chosen = variable("HTTPS_PROXY") if upstream.scheme == "https" else variable("HTTP_PROXY")
    if not chosen or not upstream.host:
        return None
    if proxy_bypass_environment(upstream.host, {"no": variable("NO_PROXY")}):
        return None
    url = values.url(chosen if "://" in chosen else f"http://{chosen}", "HTTPS_PROXY")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"HTTPS_PROXY: {values.shown(chosen)!r} is not an http:// proxy URL")
    return url


def _access_key(raw: Mapping[str, Any]) -> str | None:
    path = raw.get("access_key_file")
    if raw.get("access_key"):
        key, where = str(raw["access_key"]).strip(), "DICOM_PROXY_ACCESS_KEY"
    elif path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"--access-key-file: cannot read {path}") from exc
        where = f"--access-key-file: the key in {path}"
    else:
        return None
    # The key is never echoed: only its length is judged.
    if len(key) < 16:
        raise ConfigurationError(f"{where} is shorter than 16 characters; use a long random key")
    return key


def _cors_origin(origin: str) -> str:
    if origin == "*":
        return origin
    url = values.url(origin, "--cors-origin")
    if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
        raise ConfigurationError(f"--cors-origin: {origin!r} must look like https://viewer.example.org")
    return origin.rstrip("/")


def _allowed_hosts(extra: list[str], listen_host: str) -> tuple[str, ...]:
    names = list(LOOPBACK_NAMES)
    if listen_host not in ("0.0.0.0", "::"):
        names.append(f"[{listen_host}]" if ":" in listen_host else listen_host)
    names.extend(name.lower() for name in extra)
    return tuple(dict.fromkeys(names))


def _dimse_allow(entry: str) -> tuple[str, str | None]:
    title, at, host = entry.partition("@")
    if not at:
        return values.ae_title(title, "--dimse-allow"), None
    try:
        address = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError as exc:
        raise ConfigurationError(f"--dimse-allow: {host!r} in {entry!r} is not an IP address") from exc
    return values.ae_title(title, "--dimse-allow"), address


def _move_destination(entry: str) -> tuple[str, str, int]:
    title, equals, address = entry.partition("=")
    if not equals:
        raise ConfigurationError(f"--move-destination: expected AET=HOST:PORT, got {entry!r}")
    host, port = values.host_port(address.strip(), "--move-destination")
    return values.ae_title(title, "--move-destination"), host, port

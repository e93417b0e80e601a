"""Parsers for one value of one kind (a number, a HOST:PORT, a URL, an AE title, a CA bundle).

Each kind is parsed in exactly one place, so a weakness found in one option is fixed for every option of
that kind. Every failure is a ConfigurationError naming the option: one line for the user, never a traceback.
"""

from __future__ import annotations

import ipaddress
import math
import re
import ssl
from pathlib import Path
from typing import Any

from yarl import URL

from .errors import ConfigurationError

# ASCII only: str.isdigit() and float() also take '²' or Arabic-Indic digits, which nobody means.
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)
_HOST_PORT = re.compile(r"(?P<host>\[[^\[\]]*\]|[^\[\]]*):(?P<port>[0-9]{1,5})", re.ASCII)
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


def number(value: Any, flag: str, *, whole: bool, low: float, high: float) -> float:
    """A finite number with low < value <= high, from a flag or variable (text) or the file (a number)."""
    if isinstance(value, str):
        text = value.strip()
        if not (_INTEGER if whole else _DECIMAL).fullmatch(text):
            kind = "a whole number" if whole else "a number"
            raise ConfigurationError(f"{flag}: expected {kind}, got {value!r}")
        parsed: float = int(text) if whole else float(text)  # '1e400' becomes inf: out of bounds below
    elif isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        parsed = value  # TOML's nan is refused above, its inf by the bounds
    else:
        raise ConfigurationError(f"{flag}: expected a number, got {value!r}")
    if not low < parsed <= high:
        bounds = f"expected {low + 1:g} to {high:g}" if whole else f"must be more than {low:g} and at most {high:g}"
        raise ConfigurationError(f"{flag}: {bounds}, got {value!r}")
    return parsed


def host_port(value: str, flag: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (loopback); the host a name or an IP address."""
    found = _HOST_PORT.fullmatch(value.strip())
    if found is None:
        raise ConfigurationError(f"{flag}: expected HOST:PORT, got {value!r}")
    port = int(found["port"])
    if not 0 < port < 65536:
        raise ConfigurationError(f"{flag}: port {port} is outside 1-65535")
    host = found["host"]
    bracketed = host.startswith("[")
    host = host.strip("[]") or "127.0.0.1"
    if bracketed or ":" in host:
        try:
            return str(ipaddress.IPv6Address(host)), port
        except ValueError as exc:
            raise ConfigurationError(f"{flag}: {host!r} is not an IPv6 address") from exc
    if not _HOST_NAME.fullmatch(host):
        raise ConfigurationError(f"{flag}: {host!r} is not a host name or IP address")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url(value: str, flag: str) -> URL:
    """A URL that yarl can take apart; a password in it is never echoed."""
    try:
        parsed = URL(value)
        parsed.host  # noqa: B018 - yarl decodes the host lazily; make it fail here, not later
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"{flag}: {shown(value)!r} is not a URL") from exc
    return parsed


def shown(value: str) -> str:
    """`value` with any user:password@ masked, so that an error line can quote it safely."""
    scheme, sep, rest = value.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return value


def ae_title(value: str, flag: str) -> str:
    """An AE title as PS3.5 allows it: 1 to 16 characters of printable ASCII but the backslash, not all spaces."""
    title = value.strip()
    if not 0 < len(title) <= 16 or "\\" in title or not all(" " <= char <= "~" for char in title):
        raise ConfigurationError(
            f"{flag}: {value!r} is not an AE title (1 to 16 printable ASCII characters, no backslash)"
        )
    return title


def ca_bundle(path: Path) -> Path:
    """Load it now, as the upstream pool will: a bad bundle stops start-up naming --ca-bundle, not the listener."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"--ca-bundle: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigurationError(f"--ca-bundle: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc).split("]", 1)[-1].split("(", 1)[0].strip()
        raise ConfigurationError(f"--ca-bundle: {path} holds no certificate that can be loaded ({reason})") from exc
    return path

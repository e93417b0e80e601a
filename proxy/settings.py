"""Settings: every knob of the proxy, merged once from flags > environment > config file > defaults.

The CLI parses flags and hands them here with the environment; nothing else in the package reads the
environment or the config file, and everything downstream receives the frozen `Settings`. The options
themselves are declared in options.py, each value's kind is parsed in values.py, and the rules between
options live in validate.py.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

from .errors import ConfigurationError
from .options import (
    CONFIG_ENV,
    CONFIG_FLAG,
    DEFAULT_AUDIENCE,
    DEFAULT_DIMSE_AET,
    DEFAULT_DIMSE_PAGE_SIZE,
    MIB,
    OPTIONS,
    Option,
)
from .validate import DEFAULT_LISTEN, LOOPBACK_NAMES, settings_fields
from .values import is_loopback

__all__ = ["CONFIG_ENV", "CONFIG_FLAG", "OPTIONS", "Settings", "build_settings", "default_text", "is_loopback"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Settings:
    """One validated, immutable view of the configuration; build it with `build_settings()`."""

    upstream: URL
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    credential: str = "cli"
    tenant: str | None = None
    audience: str = DEFAULT_AUDIENCE
    ca_bundle: Path | None = None
    read_only: bool = False
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES
    access_key: str | None = field(default=None, repr=False)
    allow_unauthenticated_remote: bool = False
    insecure_upstream: bool = False
    log_format: str = "text"
    # From HTTPS_PROXY/HTTP_PROXY unless NO_PROXY exempts the upstream; decided once, here.
    upstream_proxy: URL | None = None
    connect_timeout: float = 10.0
    # Idle time between two reads from the upstream; there is deliberately no total timeout, which
    # would cut a long WADO-RS retrieve of a large study.
    read_timeout: float = 300.0
    # Idle upstream connections are kept this long: longer than a person's pause between two studies (a new
    # TLS connection costs two round trips), shorter than the service front end's idle timeout (~4 min).
    upstream_idle: float = 120.0
    # Frames read ahead of a viewer (proxy/readahead.py): at most this many bytes held (0: off), fetched at
    # most read_ahead_requests at a time.
    read_ahead: int = 128 * 1024 * 1024
    read_ahead_requests: int = 16
    # Rewrite upstream URLs in Location/Content-Location and JSON/XML bodies (as they stream). rewrite_limit
    # no longer bounds anything; it is still read so that older configurations start.
    rewrite: bool = True
    rewrite_limit: int = 32 * 1024 * 1024
    # On SIGTERM/SIGINT, in-flight requests get this long to finish before they are cut.
    shutdown_grace: float = 30.0
    # Processes sharing the listening port (SO_REUSEPORT), each with its own token source and pool.
    workers: int = 1
    # Request bodies up to this size are buffered so that a 401 can be retried with a fresh token.
    replay_limit: int = 1024 * 1024
    # Refresh this long before expiry when the credential gives no refresh_on (azure-core uses 300 s).
    refresh_margin: float = 300.0
    az_timeout: int = 10
    # The DIMSE gateway (proxy/dimse/): off unless dimse_listen is given. dimse_allow holds (AE title, IP or
    # None) pairs; move_destinations maps an AE title to where C-MOVE sends (never taken from the request).
    dimse_listen: tuple[str, int] | None = None
    dimse_aet: str = DEFAULT_DIMSE_AET
    dimse_allow: tuple[tuple[str, str | None], ...] = ()
    dimse_page_size: int = DEFAULT_DIMSE_PAGE_SIZE
    move_destinations: tuple[tuple[str, str, int], ...] = ()

    @property
    def scope(self) -> str:
        return self.audience.rstrip("/") + "/.default"

    @property
    def audience_warning(self) -> str | None:
        """Why this audience is suspect, or None; `check` and `serve` both say it, in these words.

        A warning, not a refusal: sovereign clouds have DICOM audiences of their own.
        """
        if self.audience.rstrip("/") == DEFAULT_AUDIENCE:
            return None
        return (
            f"{self.audience} is not the DICOM service's audience ({DEFAULT_AUDIENCE}); the service will refuse "
            "its tokens unless it is your cloud's DICOM audience"
        )

    @property
    def local_url(self) -> str:
        host = self.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.listen_port}"

    @property
    def added_version(self) -> str:
        """The version a bare service root needs for DICOMweb clients ("/v2"); "" when the upstream has a path."""
        return "/v2" if self.upstream.raw_path in ("", "/") else ""

    @property
    def upstream_dicomweb(self) -> URL:
        """The DICOMweb base at the service, as a viewer uses it."""
        return self.upstream.with_path(self.added_version) if self.added_version else self.upstream


def default_text(option: Option) -> str:
    """The default as a person reads it, from the Settings field itself (never written twice)."""
    fields = {item.name: item.default for item in dataclasses.fields(Settings)}
    if option.name == "listen":
        return DEFAULT_LISTEN
    value = fields.get(option.name if option.bytes_of is None else option.bytes_of)
    if option.bytes_of is not None and isinstance(value, int):
        return str(value // MIB)
    if value is None or value == () or value is dataclasses.MISSING:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ", ".join(value)
    return str(value)


def default(name: str) -> Any:
    """A Settings field's default."""
    return next(item.default for item in dataclasses.fields(Settings) if item.name == name)


def build_settings(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Merge the sources (flag > env > file > default) and validate; raise ConfigurationError."""
    config_path = flags.get("config") or environ.get(CONFIG_ENV) or None
    file_values = read_config_file(Path(config_path)) if config_path else {}
    known = {option.name for option in OPTIONS}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigurationError(f"{config_path}: unknown key(s) {', '.join(unknown)}")

    raw: dict[str, Any] = {}
    for option in OPTIONS:
        value = flags.get(option.name)
        if value is not None and value != []:
            raw[option.name] = value
        elif option.env in environ:
            raw[option.name] = _from_text(option, environ[option.env])
        elif option.name in file_values:
            raw[option.name] = _from_file(option, file_values[option.name], str(config_path))
    return Settings(**settings_fields(raw, environ))


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"--config: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"--config: {path} is not valid TOML: {exc}") from exc


def _from_text(option: Option, text: str) -> Any:
    if option.kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigurationError(f"{option.env}: expected true or false, got {text!r}")
    if option.kind == "list":
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _from_file(option: Option, value: Any, where: str) -> Any:
    expected: dict[str, Callable[[Any], bool]] = {
        "bool": lambda v: isinstance(v, bool),
        "list": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
        "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
    }
    if isinstance(value, str) and option.kind == "list":
        return _from_text(option, value)
    if not expected[option.kind](value):
        kind = {"bool": "true or false", "list": "a list of strings", "float": "a number", "int": "a whole number"}
        raise ConfigurationError(
            f"{where}: key {option.name} must be {kind.get(option.kind, 'a string')}, got {value!r}"
        )
    return value

"""Settings: every knob of the proxy, merged once from flags > environment > config file > defaults.

The CLI parses flags and hands them here with the environment; nothing else in the package reads the
environment or the config file, and everything downstream receives the frozen `Settings`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Untyped in typeshed, but public and documented; it reads only the mapping it is given.
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

from yarl import URL

from .errors import ConfigurationError

DEFAULT_AUDIENCE = "https://dicom.healthcareapis.azure.com"
DEFAULT_LISTEN = "127.0.0.1:8080"
CREDENTIAL_KINDS = ("cli", "default", "environment", "managed-identity", "workload-identity")
LOG_FORMATS = ("text", "json")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
DEFAULT_DIMSE_AET = "DICOMPROXY"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_TENANT = re.compile(r"^[0-9A-Za-z.-]+$")
_NOT_A_PLAIN_URL = re.compile(r"[\s\"'<>\\]")


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
    move_destinations: tuple[tuple[str, str, int], ...] = ()

    @property
    def scope(self) -> str:
        return self.audience.rstrip("/") + "/.default"

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


OptionKind = Literal["str", "bool", "list", "float", "int"]


@dataclass(frozen=True)
class Option:
    """One setting as it is spelled on each source; the CLI's parser is built from these.

    `name` is the TOML key and the Settings field it feeds (or the field's source, e.g. `listen`).
    `flag` is None for a setting that only the environment or the file can give (a secret).
    `negates`: the flag turns a setting that is on by default off (`--no-rewrite`).
    """

    name: str
    flag: str | None
    env: str
    help: str
    kind: OptionKind = "str"
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    negates: bool = False


OPTIONS = (
    Option("upstream", "--upstream", "DICOM_PROXY_UPSTREAM", "DICOM service base URL (required)", metavar="URL"),
    Option("listen", "--listen", "DICOM_PROXY_LISTEN", "where to listen", metavar="HOST:PORT"),
    Option("credential", "--credential", "DICOM_PROXY_CREDENTIAL", "azure-identity credential",
           choices=CREDENTIAL_KINDS),
    Option("tenant", "--tenant", "DICOM_PROXY_TENANT", "tenant to request the token from", metavar="ID"),
    Option("audience", "--audience", "DICOM_PROXY_AUDIENCE", "token resource", metavar="URL"),
    Option("ca_bundle", "--ca-bundle", "DICOM_PROXY_CA_BUNDLE", "extra CA certificates (PEM) for the upstream's TLS",
           metavar="FILE"),
    Option("read_only", "--read-only", "DICOM_PROXY_READ_ONLY", "only GET, HEAD and OPTIONS reach the upstream",
           "bool"),
    Option("cors_origins", "--cors-origin", "DICOM_PROXY_CORS_ORIGINS", "allowed browser origin (repeat)", "list",
           metavar="ORIGIN"),
    Option("allowed_hosts", "--allow-host", "DICOM_PROXY_ALLOWED_HOSTS", "extra accepted Host (repeat)", "list",
           metavar="NAME"),
    Option("access_key", None, "DICOM_PROXY_ACCESS_KEY", "the key local clients must present"),
    Option("access_key_file", "--access-key-file", "DICOM_PROXY_ACCESS_KEY_FILE",
           "file holding the key local clients must present", metavar="FILE"),
    Option("allow_unauthenticated_remote", "--allow-unauthenticated-remote",
           "DICOM_PROXY_ALLOW_UNAUTHENTICATED_REMOTE",
           "listen on a non-loopback address without an access key: anyone who reaches it acts as you", "bool"),
    Option("insecure_upstream", "--insecure-upstream", "DICOM_PROXY_INSECURE_UPSTREAM",
           "allow a plain http:// upstream on another machine: the token crosses the network in clear", "bool"),
    Option("log_format", "--log-format", "DICOM_PROXY_LOG_FORMAT", "log lines for people or machines",
           choices=LOG_FORMATS),
    Option("connect_timeout", "--connect-timeout", "DICOM_PROXY_CONNECT_TIMEOUT", "upstream connect timeout",
           "float", metavar="SECONDS"),
    Option("read_timeout", "--read-timeout", "DICOM_PROXY_READ_TIMEOUT",
           "longest silence from the upstream mid-answer, or from a client mid-request", "float",
           metavar="SECONDS"),
    Option("shutdown_grace", "--shutdown-grace", "DICOM_PROXY_SHUTDOWN_GRACE", "time in-flight requests get on SIGTERM",
           "float", metavar="SECONDS"),
    Option("workers", "--workers", "DICOM_PROXY_WORKERS",
           "processes sharing the port, each with its own token (more helps small requests on many cores)", "int",
           metavar="N"),
    Option("rewrite", "--no-rewrite", "DICOM_PROXY_REWRITE",
           "pass upstream URLs in headers and bodies through unchanged", "bool", negates=True),
    Option("rewrite_limit_mib", "--rewrite-limit", "DICOM_PROXY_REWRITE_LIMIT_MIB",
           "no longer used: bodies of any size are rewritten as they stream (accepted for old configurations)",
           "float", metavar="MIB"),
    Option("dimse_listen", "--dimse-listen", "DICOM_PROXY_DIMSE_LISTEN",
           "where the DIMSE gateway listens for C-ECHO/STORE/FIND/GET/MOVE (off unless given)", metavar="HOST:PORT"),
    Option("dimse_aet", "--dimse-aet", "DICOM_PROXY_DIMSE_AET",
           "the called AE title the DIMSE gateway answers to (others are rejected)", metavar="AET"),
    Option("dimse_allow", "--dimse-allow", "DICOM_PROXY_DIMSE_ALLOW",
           "calling AE title accepted by the DIMSE gateway, optionally only from one IP address (repeat); "
           "without it any AE from loopback", "list", metavar="AET[@HOST]"),
    Option("move_destinations", "--move-destination", "DICOM_PROXY_MOVE_DESTINATIONS",
           "where C-MOVE may send, by AE title (repeat); never taken from the request", "list",
           metavar="AET=HOST:PORT"),
)  # fmt: skip


def default_text(option: Option) -> str:
    """The default as a person reads it, from the Settings field itself (never written twice)."""
    fields = {item.name: item.default for item in dataclasses.fields(Settings)}
    if option.name == "listen":
        return DEFAULT_LISTEN
    if option.name == "rewrite_limit_mib":
        return f"{fields['rewrite_limit'] // (1024 * 1024)}"  # type: ignore[operator]
    value = fields.get(option.name)
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


CONFIG_FLAG, CONFIG_ENV = "--config", "DICOM_PROXY_CONFIG"


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
    return _validate(raw, environ)


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
        raise ConfigurationError(f"{where}: key {option.name} must be a {option.kind}, got {value!r}")
    return value


def _validate(raw: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    insecure_upstream = bool(raw.get("insecure_upstream", False))
    upstream = _upstream_url(raw.get("upstream"), insecure_upstream)
    listen_host, listen_port = parse_listen(str(raw.get("listen", DEFAULT_LISTEN)))

    ca_bundle = _ca_bundle(Path(raw["ca_bundle"])) if raw.get("ca_bundle") else None

    log_format = str(raw.get("log_format", default("log_format")))
    if log_format not in LOG_FORMATS:
        raise ConfigurationError(f"--log-format: expected text or json, got {log_format!r}")

    access_key = _access_key(raw)
    allow_remote = bool(raw.get("allow_unauthenticated_remote", False))
    if not is_loopback(listen_host) and access_key is None and not allow_remote:
        raise ConfigurationError(
            f"--listen: {listen_host} is reachable from other machines; set an access key "
            "(--access-key-file or DICOM_PROXY_ACCESS_KEY) or pass --allow-unauthenticated-remote"
        )

    cors_origins = tuple(_cors_origin(origin) for origin in raw.get("cors_origins", []))
    allowed_hosts = _allowed_hosts(raw.get("allowed_hosts", []), listen_host)
    workers = _workers(raw.get("workers", default("workers")))

    return Settings(
        upstream=upstream,
        listen_host=listen_host,
        listen_port=listen_port,
        ca_bundle=ca_bundle,
        read_only=bool(raw.get("read_only", False)),
        cors_origins=cors_origins,
        allowed_hosts=allowed_hosts,
        access_key=access_key,
        allow_unauthenticated_remote=allow_remote,
        insecure_upstream=insecure_upstream,
        log_format=log_format,
        upstream_proxy=_environment_proxy(upstream, environ),
        connect_timeout=_positive(raw, "connect_timeout", default("connect_timeout")),
        read_timeout=_positive(raw, "read_timeout", default("read_timeout")),
        shutdown_grace=_positive(raw, "shutdown_grace", default("shutdown_grace")),
        workers=workers,
        rewrite=bool(raw.get("rewrite", default("rewrite"))),
        rewrite_limit=int(_positive(raw, "rewrite_limit_mib", default("rewrite_limit") / 1024 / 1024) * 1024 * 1024),
        **_credential_settings(raw),
        **_dimse_settings(raw, workers),
    )


def _credential_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Which identity, for which tenant and audience."""
    credential = str(raw.get("credential", default("credential")))
    if credential not in CREDENTIAL_KINDS:
        raise ConfigurationError(
            f"--credential: unknown credential {credential!r}; choose one of {', '.join(CREDENTIAL_KINDS)}"
        )
    tenant = raw.get("tenant") or None
    if tenant is not None and not _TENANT.match(tenant):
        raise ConfigurationError(f"--tenant: {tenant!r} is not a tenant ID or domain")
    audience = str(raw.get("audience", default("audience")))
    if URL(audience).scheme != "https" or not URL(audience).host:
        raise ConfigurationError(f"--audience: {audience!r} must be an https:// URL")
    return {"credential": credential, "tenant": tenant, "audience": audience}


def _dimse_settings(raw: Mapping[str, Any], workers: int) -> dict[str, Any]:
    """The DIMSE gateway's settings, refused where they would open it to other machines."""
    dimse_listen = parse_listen(str(raw["dimse_listen"]), "--dimse-listen") if raw.get("dimse_listen") else None
    dimse_allow = tuple(_dimse_allow(entry) for entry in raw.get("dimse_allow", []))
    if dimse_listen is not None:
        # Like the HTTP side without an access key: an open DIMSE port would store and retrieve as you.
        if not is_loopback(dimse_listen[0]) and not dimse_allow:
            raise ConfigurationError(
                f"--dimse-listen: {dimse_listen[0]} is reachable from other machines; list the calling AE titles "
                "allowed with --dimse-allow AET[@HOST] (DICOM_PROXY_DIMSE_ALLOW)"
            )
        if workers > 1:
            raise ConfigurationError("--dimse-listen: the DIMSE gateway runs in one process; use --workers 1")
    return {
        "dimse_listen": dimse_listen,
        "dimse_aet": _ae_title(str(raw.get("dimse_aet", default("dimse_aet"))), "--dimse-aet"),
        "dimse_allow": dimse_allow,
        "move_destinations": tuple(_move_destination(entry) for entry in raw.get("move_destinations", [])),
    }


def _upstream_url(value: Any, insecure: bool) -> URL:
    if not value:
        raise ConfigurationError(
            "--upstream: required (or set DICOM_PROXY_UPSTREAM), e.g. "
            "https://<workspace>-<service>.dicom.azurehealthcareapis.com"
        )
    try:
        url = URL(str(value))
    except ValueError as exc:
        raise ConfigurationError(f"--upstream: {value!r} is not a URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"--upstream: {value!r} must be an https:// URL with a host")
    if url.query_string or url.fragment or url.user or url.password:
        raise ConfigurationError(f"--upstream: {value!r} must not carry credentials, a query or a fragment")
    if _NOT_A_PLAIN_URL.search(str(url)):
        # Such a base could not be told apart from the text around it in a body, so links could not be rewritten.
        raise ConfigurationError(f"--upstream: {value!r} holds a quote, bracket, backslash or space")
    if url.scheme == "http" and not is_loopback(url.host) and not insecure:
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
    url = URL(chosen if "://" in chosen else f"http://{chosen}")
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigurationError(f"HTTPS_PROXY: {chosen!r} is not an http:// proxy URL")
    return url


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigurationError(f"{flag}: expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigurationError(f"{flag}: port {port} is outside 1-65535")
    host = host.strip("[]") or "127.0.0.1"
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _ca_bundle(path: Path) -> Path:
    """Read it now: a missing or unreadable bundle should stop start-up with its reason, not a traceback."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"--ca-bundle: cannot read {path}: {exc.strerror}") from exc
    if b"-----BEGIN CERTIFICATE-----" not in text:
        raise ConfigurationError(f"--ca-bundle: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return path


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
    url = URL(origin)
    if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
        raise ConfigurationError(f"--cors-origin: {origin!r} must look like https://viewer.example.org")
    return origin.rstrip("/")


def _allowed_hosts(extra: list[str], listen_host: str) -> tuple[str, ...]:
    names = list(LOOPBACK_NAMES)
    if listen_host not in ("0.0.0.0", "::"):
        names.append(f"[{listen_host}]" if ":" in listen_host else listen_host)
    names.extend(name.lower() for name in extra)
    return tuple(dict.fromkeys(names))


def _ae_title(value: str, flag: str) -> str:
    """An AE title as PS3.5 allows it: 1 to 16 characters of printable ASCII but the backslash, not all spaces."""
    title = value.strip()
    if not 0 < len(title) <= 16 or "\\" in title or not all(" " <= char <= "~" for char in title):
        raise ConfigurationError(
            f"{flag}: {value!r} is not an AE title (1 to 16 printable ASCII characters, no backslash)"
        )
    return title


def _dimse_allow(entry: str) -> tuple[str, str | None]:
    title, at, host = entry.partition("@")
    if not at:
        return _ae_title(title, "--dimse-allow"), None
    try:
        address = str(ipaddress.ip_address(host.strip("[]")))
    except ValueError as exc:
        raise ConfigurationError(f"--dimse-allow: {host!r} in {entry!r} is not an IP address") from exc
    return _ae_title(title, "--dimse-allow"), address


def _move_destination(entry: str) -> tuple[str, str, int]:
    title, equals, address = entry.partition("=")
    if not equals:
        raise ConfigurationError(f"--move-destination: expected AET=HOST:PORT, got {entry!r}")
    host, port = parse_listen(address.strip(), "--move-destination")
    return _ae_title(title, "--move-destination"), host, port


def _workers(value: Any) -> int:
    try:
        workers = int(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"--workers: expected a whole number, got {value!r}") from exc
    if not 1 <= workers <= 64:
        raise ConfigurationError(f"--workers: expected 1 to 64, got {value!r}")
    if workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("--workers: more than 1 needs SO_REUSEPORT, which this platform lacks")
    return workers


def _positive(raw: Mapping[str, Any], name: str, default: float) -> float:
    flag = next(option.flag for option in OPTIONS if option.name == name)
    value = raw.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{flag}: expected a number, got {value!r}") from exc
    if not math.isfinite(number) or number <= 0:
        raise ConfigurationError(f"{flag}: must be more than 0, got {value!r}")
    return number

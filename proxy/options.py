"""The one table of options: each setting declared once, with its flag, variable, TOML key, kind and help.

The CLI's parser, the merge of the sources, the README table and the example TOML follow from this table
(or are checked against it by tests/test_settings.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_AUDIENCE = "https://dicom.healthcareapis.azure.com"
DEFAULT_DIMSE_AET = "DICOMPROXY"
# Azure's largest QIDO-RS page; a service that caps lower is followed all the same (proxy/dimse/client.py).
DEFAULT_DIMSE_PAGE_SIZE = 200
CREDENTIAL_KINDS = ("cli", "default", "environment", "managed-identity", "workload-identity")
LOG_FORMATS = ("text", "json")
CONFIG_FLAG, CONFIG_ENV = "--config", "DICOM_PROXY_CONFIG"
# The longest a timeout or grace may be: a day is already more than anyone waits, and far larger values
# overflow the event loop's clock arithmetic.
_DAY = 86400.0
MIB = 1024 * 1024


OptionKind = Literal["str", "bool", "list", "float", "int"]


@dataclass(frozen=True)
class Option:
    """One setting as it is spelled on each source; the CLI's parser is built from these.

    `name` is the TOML key and the Settings field it feeds (or the field's source, e.g. `listen`).
    `flag` is None for a setting that only the environment or the file can give (a secret).
    `negates`: the flag turns a setting that is on by default off (`--no-rewrite`).
    `limits`: for a number, the open lower and closed upper bound (low < value <= high).
    `bytes_of`: the Settings field in bytes that a number given in MiB feeds (`rewrite_limit_mib` feeds
    `rewrite_limit`).
    """

    name: str
    flag: str | None
    env: str
    help: str
    kind: OptionKind = "str"
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    negates: bool = False
    limits: tuple[float, float] = (0.0, 0.0)
    bytes_of: str | None = None


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
           "float", metavar="SECONDS", limits=(0, _DAY)),
    Option("read_timeout", "--read-timeout", "DICOM_PROXY_READ_TIMEOUT",
           "longest silence from the upstream mid-answer, or from a client mid-request", "float",
           metavar="SECONDS", limits=(0, _DAY)),
    Option("upstream_idle", "--upstream-idle", "DICOM_PROXY_UPSTREAM_IDLE",
           "how long an idle upstream connection is kept for the next request (below the service's own idle "
           "timeout, about 4 minutes)", "float", metavar="SECONDS", limits=(0, _DAY)),
    Option("read_ahead_mib", "--read-ahead-mib", "DICOM_PROXY_READ_AHEAD_MIB",
           "memory for frames fetched ahead of a viewer that reads a series frame by frame (0 turns read-ahead "
           "off)", "int", metavar="MIB", limits=(-1, 64 * 1024), bytes_of="read_ahead"),
    Option("read_ahead_requests", "--read-ahead-requests", "DICOM_PROXY_READ_AHEAD_REQUESTS",
           "most requests read-ahead sends the service at once (the viewer's own come on top)", "int", metavar="N",
           limits=(0, 256)),
    Option("shutdown_grace", "--shutdown-grace", "DICOM_PROXY_SHUTDOWN_GRACE", "time in-flight requests get on SIGTERM",
           "float", metavar="SECONDS", limits=(0, _DAY)),
    Option("workers", "--workers", "DICOM_PROXY_WORKERS",
           "processes sharing the port, each with its own token (more helps small requests on many cores)", "int",
           metavar="N", limits=(0, 64)),
    Option("rewrite", "--no-rewrite", "DICOM_PROXY_REWRITE",
           "pass upstream URLs in headers and bodies through unchanged", "bool", negates=True),
    Option("rewrite_limit_mib", "--rewrite-limit", "DICOM_PROXY_REWRITE_LIMIT_MIB",
           "no longer used: bodies of any size are rewritten as they stream (accepted for old configurations)",
           "float", metavar="MIB", limits=(0, 1024 * 1024), bytes_of="rewrite_limit"),
    Option("dimse_listen", "--dimse-listen", "DICOM_PROXY_DIMSE_LISTEN",
           "where the DIMSE gateway listens for C-ECHO/STORE/FIND/GET/MOVE (off unless given)", metavar="HOST:PORT"),
    Option("dimse_aet", "--dimse-aet", "DICOM_PROXY_DIMSE_AET",
           "the called AE title the DIMSE gateway answers to (others are rejected)", metavar="AET"),
    Option("dimse_allow", "--dimse-allow", "DICOM_PROXY_DIMSE_ALLOW",
           "calling AE title accepted by the DIMSE gateway, optionally only from one IP address (repeat); "
           "without it any AE from loopback", "list", metavar="AET[@HOST]"),
    Option("dimse_page_size", "--dimse-page-size", "DICOM_PROXY_DIMSE_PAGE_SIZE",
           "results the DIMSE gateway asks for per QIDO-RS page (limit); lower it for a service that refuses more",
           "int", metavar="N", limits=(0, 10000)),
    Option("move_destinations", "--move-destination", "DICOM_PROXY_MOVE_DESTINATIONS",
           "where C-MOVE may send, by AE title (repeat); never taken from the request", "list",
           metavar="AET=HOST:PORT"),
)  # fmt: skip


def option(name: str) -> Option:
    """The option that feeds `name`."""
    return next(item for item in OPTIONS if item.name == name)

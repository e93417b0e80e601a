"""Command line: `dicom-auth-proxy serve|check [options]`.

This module only maps options onto Settings (flags > DICOM_PROXY_* environment > --config file >
defaults, merged in settings.py) and hands them to the part that does the work.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigurationError
from .settings import CREDENTIAL_KINDS, LOG_FORMATS, Settings, build_settings


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option gets the same one line as a bad value, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        sys.exit(_fail(f"{message} (see '{self.prog} --help')", 2))


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="dicom-auth-proxy",
        description="Local authenticating proxy for the Azure Health Data Services DICOM service.",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in (
        ("serve", "run the proxy"),
        ("check", "diagnose az sign-in, the token and the upstream"),
    ):
        _add_options(commands.add_parser(name, help=help_text, description=help_text))
    return top


def _add_options(command: argparse.ArgumentParser) -> None:
    add = command.add_argument
    add("--config", metavar="FILE", help="TOML file with the settings below (env DICOM_PROXY_CONFIG)")
    add("--upstream", metavar="URL", help="DICOM service base URL (env DICOM_PROXY_UPSTREAM; required)")
    add("--listen", metavar="HOST:PORT", help="where to listen (default 127.0.0.1:8080)")
    add("--credential", choices=CREDENTIAL_KINDS, help="azure-identity credential (default cli)")
    add("--tenant", metavar="ID", help="tenant to request the token from")
    add("--audience", metavar="URL", help="token resource (default https://dicom.healthcareapis.azure.com)")
    add("--ca-bundle", metavar="FILE", help="extra CA certificates for the upstream's TLS")
    add("--read-only", action="store_true", default=None, help="only GET, HEAD and OPTIONS reach the upstream")
    add("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN", help="allowed browser origin")
    add("--allow-host", dest="allowed_hosts", action="append", metavar="NAME", help="extra accepted Host")
    add("--access-key-file", metavar="FILE", help="file holding the key local clients must present")
    add(
        "--allow-unauthenticated-remote",
        action="store_true",
        default=None,
        help="listen on a non-loopback address without an access key: anyone who reaches it acts as you",
    )
    add(
        "--insecure-upstream",
        action="store_true",
        default=None,
        help="allow a plain http:// upstream on another machine: the token crosses the network in clear",
    )
    add("--log-format", choices=LOG_FORMATS, help="text (default) or json")
    add("--connect-timeout", metavar="SECONDS", type=float, help="upstream connect timeout (default 10)")
    add("--read-timeout", metavar="SECONDS", type=float, help="upstream idle read timeout (default 300)")
    add(
        "--no-rewrite",
        dest="rewrite",
        action="store_false",
        default=None,
        help="pass upstream URLs in headers and bodies through unchanged",
    )
    add(
        "--rewrite-limit",
        dest="rewrite_limit_mib",
        metavar="MIB",
        type=float,
        help="no longer used: bodies of any size are rewritten as they stream (accepted for old configurations)",
    )
    add("--shutdown-grace", metavar="SECONDS", type=float, help="time in-flight requests get on SIGTERM (default 30)")
    add(
        "--workers",
        metavar="N",
        type=int,
        help="processes sharing the port, each with its own token (default 1; more helps small requests on many cores)",
    )


def load_settings(arguments: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    flags: dict[str, Any] = {key: value for key, value in vars(arguments).items() if key != "command"}
    return build_settings(flags, environ)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    try:
        settings = load_settings(arguments, os.environ)
    except ConfigurationError as error:
        return _fail(error.detail, 2)

    if arguments.command == "check":
        from .check import run_check

        return run_check(settings, sys.stdout)

    from .observe import configure_logging

    configure_logging(settings.log_format)

    from .app import run
    from .supervisor import supervise

    def serve(worker: int) -> int:
        try:
            run(settings, announce=worker == 0)
        except ConfigurationError as error:
            return _fail(error.detail, 2)
        except OSError as error:
            return _fail(f"cannot listen on {settings.listen_host}:{settings.listen_port}: {error.strerror}", 1)
        return 0

    return supervise(settings.workers, serve) if settings.workers > 1 else serve(0)


def _fail(detail: str, exit_code: int) -> int:
    """One line on stderr in argparse's own shape, instead of a traceback."""
    print(f"dicom-auth-proxy: error: {detail}", file=sys.stderr)
    return exit_code

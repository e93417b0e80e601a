"""Command line: `dicom-auth-proxy serve|check [options]`.

This module only maps options onto Settings (flags > DICOM_PROXY_* environment > --config file >
defaults, merged in settings.py) and hands them to the part that does the work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigurationError
from .settings import CONFIG_ENV, OPTIONS, Settings, build_settings, default_text


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
    """One argument per option of settings.OPTIONS, its help ending with the Settings default."""
    command.add_argument("--config", metavar="FILE", help=f"TOML file with the settings below (env {CONFIG_ENV})")
    for option in OPTIONS:
        if option.flag is None:
            continue
        default = default_text(option)
        help_text = f"{option.help} (env {option.env}" + (f"; default {default})" if default else ")")
        if option.kind == "bool":
            action = "store_false" if option.negates else "store_true"
            command.add_argument(option.flag, dest=option.name, action=action, default=None, help=help_text)
        elif option.kind == "list":
            command.add_argument(option.flag, dest=option.name, action="append", metavar=option.metavar, help=help_text)
        else:
            command.add_argument(
                option.flag,
                dest=option.name,
                metavar=option.metavar,
                choices=option.choices or None,
                # Numbers stay text here: settings parses flags, variables and the file with one number parser.
                help=help_text,
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

    from .logs import configure_logging

    configure_logging(settings.log_format)
    if settings.audience_warning:
        # Once, before the workers start: each would otherwise repeat it.
        logging.getLogger("proxy").warning("--audience: %s", settings.audience_warning)

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

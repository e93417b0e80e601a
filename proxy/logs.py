"""Log lines: the access log, and text or JSON formatting for every logger.

No client bytes reach a log line except the path, with control characters escaped; the query string is
left out because it can hold patient names.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .errors import loggable
from .observe import REQUEST_ID

# Set on the stand-in request aiohttp makes for bytes its parser refused: it has no real method or path.
MALFORMED = web.RequestKey("malformed", bool)


class AccessLogger(AbstractAccessLogger):
    """One line per request; the query string is left out because it can hold patient names."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.get(MALFORMED):
            method, path = "-", "-"
        else:
            method, path = request.method, loggable(request.path)
        access_line(
            self.logger,
            request.remote,
            method,
            path,
            response.status,
            response.body_length,
            time,
            request.get(REQUEST_ID),
        )


def access_line(
    log: logging.Logger,
    client: str | None,
    method: str,
    path: str,
    status: int | None,
    size: int,
    seconds: float,
    request_id: str | None,
) -> None:
    """The access line; `status` None for an exchange that broke off before its answer was complete."""
    fields = {
        "client": client,
        "method": method,
        "path": path,
        "status": status,
        "bytes": size,
        "seconds": round(seconds, 4),
        "request_id": request_id or "-",
    }
    log.info(
        '%s "%s %s" %s %d %.3fs id=%s',
        client,
        method,
        path,
        "-" if status is None else status,
        size,
        seconds,
        request_id or "-",
        extra={"access": fields},
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`time level logger: message` in UTC, with the time text made once per second, not per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return f"{self._second_text},{int(record.msecs):03d}"


def configure_logging(log_format: str, *, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # Facts no line of ours shows, which every record would otherwise look up (Logging HOWTO, "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (sys._getframe) per record
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # azure-identity logs every get_token at INFO; our own token lines say what matters.
    logging.getLogger("azure").setLevel(logging.WARNING)

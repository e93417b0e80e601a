"""Log lines: the access log, and text or JSON formatting for every logger.

No client bytes reach a log line except the path, with control characters escaped; the query string is
left out because it can hold patient names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .errors import loggable
from .observe import REQUEST_ID

# Set on the stand-in request aiohttp makes for bytes its parser refused: it has no real method or path.
MALFORMED = web.RequestKey("malformed", bool)
# Set where an answer is cut off: the bytes that went out before. aiohttp counts the write that found the
# connection closed (a chunk, or the end of a chunked body) as sent.
SENT_BEFORE_CUT = web.RequestKey("sent_before_cut", int)


class AccessLogger(AbstractAccessLogger):
    """aiohttp's hook for answers it finished (or failed to finish) writing: one access line each."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        access_line(self.logger, request, response.status, time)


def sent_bytes(request: web.BaseRequest) -> int:
    """The bytes of a request's answer that went out (headers included), also when it was cut off."""
    sent: int = request.get(SENT_BEFORE_CUT, request.writer.output_size)
    return sent


def access_line(
    log: logging.Logger,
    request: web.BaseRequest | None,
    status: int | None,
    seconds: float,
    *,
    peer: str | None = None,
    sent: int = 0,
) -> None:
    """The one writer of access lines, so the rules (no query string, escaped path, bytes on the wire) hold
    for every exchange: finished, cut off, or refused before a request was read (`request` None, from `peer`
    after `sent` bytes). `status` None for an exchange that broke off before its answer was complete.
    """
    if request is None:
        client, method, path = peer, "-", "-"
    else:
        client, sent = request.remote, sent_bytes(request)
        method, path = ("-", "-") if request.get(MALFORMED) else (request.method, loggable(request.path))
    request_id = (request.get(REQUEST_ID) if request is not None else None) or "-"
    fields = {
        "client": client,
        "method": method,
        "path": path,
        "status": status,
        "bytes": sent,
        "seconds": round(seconds, 4),
        "request_id": request_id,
    }
    log.info(
        '%s "%s %s" %s %d %.3fs id=%s',
        client,
        method,
        path,
        "-" if status is None else status,
        sent,
        seconds,
        request_id,
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
    """`time level logger: message` in UTC, with the time text made once per second, not per line.

    The line is one f-string: logging's %-style template costs an access line a few microseconds more.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._second_text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return f"{self._second_text},{int(record.msecs):03d}"


class LoopTurnHandler(logging.StreamHandler[TextIO]):
    """Writes the lines of one event-loop turn in one go, where a plain StreamHandler makes a write(2) per line.

    A busy proxy answers many requests per turn: a system call per access line cost a small request 5% of
    its time. A line logged anywhere else (the DIMSE gateway's threads, start-up, after the loop closed)
    goes out at once, after those the loop holds, so nothing waits on a busy loop and the order stays.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._held: list[str] = []
        # The loop (and its thread) whose flush is on its way, if one is.
        self._turn: tuple[int, asyncio.AbstractEventLoop] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._held.append(line)
        turn = self._turn
        if turn is not None and turn[0] == threading.get_ident() and turn[1].is_running():
            return  # this turn's flush is on its way
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._turn = (threading.get_ident(), loop)
        loop.call_soon(self.flush)

    def flush(self) -> None:
        assert self.lock is not None
        with self.lock:
            self._turn = None
            held, self._held = self._held, []
            if held:
                try:
                    self.stream.write("".join(held))
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is closed or gone: the lines have nowhere to go


def configure_logging(log_format: str, *, level: int = logging.INFO) -> None:
    handler = LoopTurnHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # Facts no line of ours shows, which every record would otherwise look up (Logging HOWTO, "Optimization").
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (sys._getframe) per record
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # azure-identity logs every get_token at INFO and each failure at WARNING; our own token lines say what
    # matters, once per try (tokens.py).
    logging.getLogger("azure").setLevel(logging.ERROR)

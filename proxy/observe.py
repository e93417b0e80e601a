"""Local endpoints (/-/health, /-/ready), the access log and log formatting.

Liveness never touches the token or the upstream; readiness reports whether a valid token is held.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .tokens import TokenSource

access_logger = logging.getLogger("proxy.access")


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class Readiness:
    """200 while a valid token is held, 503 with the reason otherwise."""

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    async def __call__(self, request: web.Request) -> web.Response:
        token = self._tokens.current
        if token is not None:
            expires = datetime.fromtimestamp(token.expires_on, UTC).isoformat(timespec="seconds")
            return web.json_response({"status": "ready", "token_expires_at": expires})
        error = self._tokens.last_error
        detail = error.detail if error else "the first token has not been acquired yet"
        return web.json_response(
            {"error": "not_ready", "detail": detail, "hint": error.hint if error else "wait a moment"},
            status=503,
        )


class AccessLogger(AbstractAccessLogger):
    """One line per request; the query string is left out because it can hold patient names."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            '%s "%s %s" %d %d %.3fs',
            request.remote,
            request.method,
            request.path,
            response.status,
            response.body_length,
            time,
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str, *, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # azure-identity logs every get_token at INFO; our own token lines say what matters.
    logging.getLogger("azure").setLevel(logging.WARNING)

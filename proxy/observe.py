"""Probes (/-/health, /-/ready) and request ids.

Liveness never touches the token or the upstream; readiness reports whether a valid token is held and
the service has not refused it.
"""

from __future__ import annotations

import itertools
import os
import re

from aiohttp import web

from .errors import NotReady
from .headers import REQUEST_ID_HEADER
from .tokens import TokenSource, expiry_text

REQUEST_ID = web.RequestKey("request_id", str)
# A client's own request id is kept (and logged) only when it is a UUID or hex: a freer one could carry a
# patient's name into the log, where no client text may go, or forge log lines.
_CLIENT_REQUEST_ID = re.compile(r"^[0-9A-Fa-f-]{8,64}$")


async def health(request: web.BaseRequest) -> web.Response:
    return web.json_response({"status": "ok"})


class Readiness:
    """200 while a valid token is held and the service has not refused it; raises the reason otherwise.

    Probes need no access key, so with one configured the reason is only named (its code and hint): who
    is signed in and what `az` said are for the log and the status page, which need the key.
    """

    def __init__(self, tokens: TokenSource, *, detailed: bool = True) -> None:
        self._tokens = tokens
        self._detailed = detailed

    async def __call__(self, request: web.BaseRequest) -> web.Response:
        token = self._tokens.current
        if token is not None and self._tokens.refusal is None:
            return web.json_response({"status": "ready", "token_expires_at": expiry_text(token.expires_on)})
        reason = self._tokens.refusal or self._tokens.last_error or NotReady("the first token has not been acquired")
        if self._detailed:
            raise reason
        raise type(reason)("not ready; the proxy's log and its status page /-/ say why", hint=reason.hint)


class RequestIds:
    """Ids for requests: a random per-process prefix and a counter, far cheaper than uuid4 each time."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):010x}"

    def assign(self, request: web.BaseRequest) -> str:
        """The client's own id when it looks like one, else a new one; kept on the request for the log."""
        incoming = request.headers.get(REQUEST_ID_HEADER)
        request[REQUEST_ID] = given = incoming if incoming and _CLIENT_REQUEST_ID.match(incoming) else self.new()
        return given

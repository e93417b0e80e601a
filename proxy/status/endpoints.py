"""`/-/` and `/-/status.json`: one snapshot of the proxy's state, as a page for people or JSON for scripts."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from .. import __version__
from ..errors import ProxyError
from ..forward import local_origin
from ..guard import ACCESS_KEY_HEADER
from ..settings import Settings
from ..tokens import TokenSource, expiry_text
from .page import JSON_CSP, PAGE_CSP, render
from .snapshot import RecentRequest, Snapshot, TokenState, counters, identity, problem, recent, refusals


class StatusPage:
    """The proxy's state, read from the parts that hold it when asked.

    `base_url` turns the origin the client used (its allowed Host) into the DICOMweb base URL to paste.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        tokens: TokenSource,
        registry: CollectorRegistry,
        recent: deque[RecentRequest],
        base_url: Callable[[str], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._registry = registry
        self._recent = recent
        self._base_url = base_url
        self._clock = clock

    def snapshot(self, request: web.BaseRequest) -> Snapshot:
        settings, tokens = self._settings, self._tokens
        token = tokens.current
        failure: ProxyError | None = tokens.refusal or tokens.last_error
        refused = refusals(self._recent)
        state = self._state(refused_newest=refused is not None and refused["newest"])
        token_state: TokenState | None = None
        if token is not None:
            expires_in = max(0, int(token.expires_on - self._clock()))
            token_state = {"expires_at": expiry_text(token.expires_on), "expires_in_seconds": expires_in}
        return {
            "version": __version__,
            "state": state,
            "identity": identity(token.claims) if token is not None else None,
            "token": token_state,
            # With a token still held, a failed refresh is shown too: it will matter once the token expires.
            "problem": problem(failure) if failure is not None else None,
            "credential": settings.credential,
            "audience": settings.audience,
            "upstream": str(settings.upstream),
            "base_url": self._base_url(local_origin(request)),
            "access_key_required": settings.access_key is not None,
            "access_key_header": ACCESS_KEY_HEADER,
            "read_only": settings.read_only,
            "cors_origins": list(settings.cors_origins),
            "counters": counters(self._registry),
            "recent": recent(self._recent),
            "refusals": refused,
        }

    def _state(self, *, refused_newest: bool) -> str:
        tokens = self._tokens
        if tokens.refusal is not None:
            return "refused"
        if tokens.current is None:
            return "no_token" if tokens.last_error is not None else "starting"
        return "denied" if refused_newest else "ready"

    async def page(self, request: web.BaseRequest) -> web.Response:
        return web.Response(text=render(self.snapshot(request)), content_type="text/html", headers=_headers(PAGE_CSP))

    async def json(self, request: web.BaseRequest) -> web.Response:
        body = json.dumps(self.snapshot(request), indent=2, ensure_ascii=False)
        return web.Response(text=body, content_type="application/json", headers=_headers(JSON_CSP))


def _headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }

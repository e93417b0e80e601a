"""TokenSource: a valid access token on demand, with `az` kept off the request path.

Tokens are cached (cachetools, keyed by credential, scope and tenant) until shortly before they expire,
refreshed by a background task before that, and fetched by exactly one in-flight acquisition however many
callers arrive at once. Failures of the credential, tokens that arrive already expired (a skewed clock)
and tokens the service keeps refusing become errors that are retried with backoff, never in a loop and
never by every request. Nothing here knows about HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.core.credentials import TokenRequestOptions
from azure.core.credentials_async import AsyncSupportsTokenInfo
from azure.core.exceptions import AzureError
from cachetools import TLRUCache

from .errors import TokenRefused, TokenUnavailable, loggable

logger = logging.getLogger("proxy.tokens")

CacheKey = tuple[str, str, str | None]


# Called after each acquisition with its result ("ok" or "error") and how long it took in seconds.
AcquisitionHook = Callable[[str, float], None]


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_on: float
    refresh_at: float
    # Acquisitions are numbered, so a refusal can tell a token fetched after an earlier refusal.
    serial: int = 0

    @property
    def claims(self) -> dict[str, Any]:
        return token_claims(self.value)


def token_claims(value: str) -> dict[str, Any]:
    """The JWT's payload, read without verifying it: only for telling the user who and what it is for."""
    try:
        payload = value.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def who(claims: dict[str, Any]) -> str:
    """The user or application a token's claims speak for (never the token itself)."""
    return str(claims.get("upn") or claims.get("unique_name") or claims.get("appid") or claims.get("oid") or "unknown")


def identity_of(value: str) -> tuple[str, str]:
    """The tenant and the user or application a token speaks for: what answers kept for it are keyed by."""
    claims = token_claims(value)
    return str(claims.get("tid", "")), who(claims)


def describe_identity(claims: dict[str, Any]) -> str:
    """Who the token speaks for, in words, for logs and `check`."""
    return f"{who(claims)} in tenant {claims.get('tid', 'unknown')}"


def expiry_text(expires_on: float) -> str:
    return datetime.fromtimestamp(expires_on, UTC).isoformat(timespec="seconds")


class TokenSource:
    """Hands out the token for one credential and scope; `start()` warms it, `close()` stops refreshing."""

    def __init__(
        self,
        credential: AsyncSupportsTokenInfo,
        scope: str,
        *,
        tenant: str | None = None,
        credential_name: str = "cli",
        refresh_margin: float = 300.0,
        expiry_margin: float = 30.0,
        min_refresh_interval: float = 10.0,
        min_retry_interval: float = 5.0,
        max_backoff: float = 60.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_acquisition: AcquisitionHook | None = None,
    ) -> None:
        self._credential, self._scope, self._tenant = credential, scope, tenant
        self._credential_name = credential_name
        self._key: CacheKey = (credential_name, scope, tenant)
        self._refresh_margin, self._max_backoff = refresh_margin, max_backoff
        self._min_refresh_interval, self._min_retry_interval = min_refresh_interval, min_retry_interval
        self._clock, self._sleep, self._on_acquisition = clock, sleep, on_acquisition
        # One entry, for this source's (credential, scope, tenant). The cache is for its per-item time to
        # use: a token leaves it `expiry_margin` seconds before it expires, on the injected clock, so that a
        # token handed out is still valid by the time the upstream checks it, with no expiry check of ours.
        self._cache: TLRUCache[CacheKey, Token] = TLRUCache(
            maxsize=1, ttu=lambda _key, token, _now: token.expires_on - expiry_margin, timer=clock
        )
        self._expiry_margin = expiry_margin
        self._inflight: asyncio.Future[Token] | None = None
        self._last_error: TokenUnavailable | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._ended_at = -math.inf  # when the last acquisition ended, whatever its result
        self._refresher: asyncio.Task[None] | None = None
        self._reschedule = asyncio.Event()
        self._serial = 0
        # Refusals by the service (401) since it last accepted a token: the serial of the last token
        # refused (0: none), how many backoffs followed, and until when the refused token is kept.
        self._refused_serial = 0
        self._backoffs = 0
        self._refused_until = 0.0
        self._refusal: TokenRefused | None = None
        self._dropped_at = -math.inf  # when a refusal last dropped a token

    @property
    def current(self) -> Token | None:
        """The valid token held now, if any; never triggers an acquisition."""
        return self._cache.get(self._key)

    @property
    def last_error(self) -> TokenUnavailable | None:
        return self._last_error

    @property
    def refusal(self) -> TokenRefused | None:
        """Why the service refuses the tokens it is given, while it keeps doing so."""
        return self._refusal

    async def get(self) -> str:
        """A valid token; raises TokenUnavailable when the credential cannot give one.

        Callers wait only for a first try (at start-up, or after a refusal dropped the token). Once a try
        has failed nobody waits on `az` again: the caller gets the error at once, with `retry_after`, and
        may start the next try in the background when the last one ended `min_retry_interval` ago, so that
        an `az login` is picked up within seconds of the next request, however long the backoff has grown.
        """
        token = self._cache.get(self._key)
        if token is not None:
            return token.value
        error = self._last_error
        if error is None:
            try:
                return (await self._acquire()).value
            except TokenUnavailable as failed:
                error = failed
        elif self._inflight is None and self._clock() >= self._ended_at + self._min_retry_interval:
            self._inflight_started()
        raise TokenUnavailable(error.detail, hint=error.hint, retry_after=self._retry_after()) from None

    def _retry_after(self) -> int:
        """Whole seconds until a request may start the next try (1 while one is under way)."""
        if self._inflight is not None and not self._inflight.done():
            return 1
        return max(1, math.ceil(max(0.0, self._ended_at + self._min_retry_interval - self._clock())))

    def refused(self, value: str, reason: str = "") -> bool:
        """The service answered 401 to `value`: whether a request should be retried with a fresh token.

        The first refusal drops the token (it may have been revoked). A token fetched after that refusal
        and refused again means the service refuses every token (wrong audience, no role): it is kept and
        no new one is fetched for a backoff window (10 s doubling to `max_backoff`), so requests get the
        401 at once instead of each running `az`. Whatever the service accepts meanwhile, refusals drop at
        most one token per `min_refresh_interval`.
        """
        token = self._cache.get(self._key)
        if token is None or token.value != value:
            return True  # a newer token is already held or on its way
        now = self._clock()
        if now < self._refused_until:
            return False
        previous, self._refused_serial = self._refused_serial, token.serial
        if previous and token.serial > previous:
            self._backoffs += 1
            delay = min(self._max_backoff, self._min_refresh_interval * 2.0 ** (self._backoffs - 1))
            self._refused_until = now + delay
            self._refusal = refusal = TokenRefused(
                f"the DICOM service refuses the tokens of the {self._credential_name} credential for "
                f"{describe_identity(token.claims)} ({reason or '401 Unauthorized'})"
            )
            logger.error("%s; not fetching another for %.0fs. Hint: %s", refusal.detail, delay, refusal.hint)
            return False
        if now - self._dropped_at < self._min_refresh_interval:
            # Tokens refused on some paths and accepted on others: at most one fresh token per interval.
            return False
        self._dropped_at = now
        del self._cache[self._key]
        self._retry_at = 0.0
        self._reschedule.set()
        return True

    def accepted(self) -> None:
        """The service accepted a token: any refusal is over."""
        if self._refused_serial:
            self._refused_serial, self._backoffs, self._refused_until, self._refusal = 0, 0, 0.0, None

    def start(self) -> None:
        """Begin the first acquisition and the refresh loop; never raises, so start-up survives a dead az."""
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh_forever(), name="token-refresh")

    async def close(self) -> None:
        tasks = [task for task in (self._refresher, self._inflight) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TokenUnavailable):
                await task
        self._refresher = self._inflight = None

    async def _acquire(self) -> Token:
        # shield: a caller that goes away (client disconnect) must not cancel the shared acquisition.
        return await asyncio.shield(self._inflight or self._inflight_started())

    def _inflight_started(self) -> asyncio.Future[Token]:
        """Start the one shared acquisition; its result reaches whoever awaits it, and the cache."""
        self._inflight = inflight = asyncio.ensure_future(self._fetch())
        inflight.add_done_callback(self._forget_inflight)
        return inflight

    def _forget_inflight(self, future: asyncio.Future[Token]) -> None:
        if self._inflight is future:
            self._inflight = None
        if not future.cancelled():
            future.exception()  # mark retrieved: failures are reported through callers and the log

    async def _fetch(self) -> Token:
        try:
            return await self._try_credential()
        finally:
            self._ended_at = self._clock()

    async def _try_credential(self) -> Token:
        started = self._clock()
        options: TokenRequestOptions = {"tenant_id": self._tenant} if self._tenant else {}
        try:
            info = await self._credential.get_token_info(self._scope, options=options)
        except AzureError as exc:
            reason, fix = failure_reason(exc.message or str(exc))
            hint = f"The Azure CLI seems broken: {fix}; then run 'dicom-auth-proxy check'." if fix else None
            raise self._failed(reason, started, hint=hint) from exc
        except Exception as exc:  # noqa: BLE001 - any failure must back off, never end the refresher
            raise self._failed(f"{type(exc).__name__}: {first_line(str(exc))}", started) from exc
        now = self._clock()
        if info.expires_on - now <= self._expiry_margin:
            # Using it would fail at once and fetching again at once would loop: a failure with backoff.
            raise self._failed(
                f"the token it handed out {'expired' if info.expires_on <= now else 'expires'} at "
                f"{expiry_text(info.expires_on)} (exp {int(info.expires_on)}), but the local time is "
                f"{expiry_text(now)}: this machine's clock may be wrong",
                started,
                hint="Check this machine's clock (date, timedatectl, NTP); if it is right, run 'az login' again.",
            )
        self._report("ok", now - started)
        refresh_at = info.refresh_on or info.expires_on - self._refresh_margin
        self._serial += 1
        token = Token(info.token, info.expires_on, max(refresh_at, now + self._min_refresh_interval), self._serial)
        self._cache[self._key] = token
        self._failures, self._last_error = 0, None
        logger.info(
            "token acquired from the %s credential in %.2fs for %s; expires at %s (in %ds)",
            self._credential_name,
            now - started,
            describe_identity(token.claims),
            expiry_text(info.expires_on),
            int(info.expires_on - now),
        )
        return token

    def _report(self, result: str, seconds: float) -> None:
        if self._on_acquisition is not None:
            self._on_acquisition(result, seconds)

    def _failed(self, reason: str, started: float, hint: str | None = None) -> TokenUnavailable:
        self._report("error", self._clock() - started)
        self._failures += 1
        # 1 s doubling to `max_backoff`, but never sooner than `min_retry_interval`: az at most once per 5 s.
        delay = max(self._min_retry_interval, min(self._max_backoff, 2.0 ** (self._failures - 1)))
        self._retry_at = self._clock() + delay
        error = TokenUnavailable(f"no token from the {self._credential_name} credential: {reason}", hint=hint)
        self._last_error = error
        self._reschedule.set()  # a refresher asleep until a dropped token's renewal must wake for the backoff
        logger.error("%s; retrying in %.0fs. Hint: %s", error.detail, delay, error.hint)
        return error

    async def _refresh_forever(self) -> None:
        while True:
            await self._nap(max(0.0, self._next_try_at() - self._clock()))
            if self._inflight is None and self._clock() < self._next_try_at():
                continue  # the schedule moved meanwhile (a request's try, a refusal)
            try:
                await self._acquire()
            except TokenUnavailable:
                pass  # logged by _failed, which also set the backoff
            except Exception:  # noqa: BLE001 - a refresher that dies leaves the proxy without tokens
                logger.exception("the token refresher failed; retrying in %.0fs", self._max_backoff)
                self._retry_at = self._clock() + self._max_backoff

    async def _nap(self, seconds: float) -> None:
        """Sleep `seconds`, or less when the schedule changes (a failure or a refusal set `_reschedule`)."""
        self._reschedule.clear()
        sleeping = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._reschedule.wait())
        try:
            await asyncio.wait((sleeping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()

    def _next_try_at(self) -> float:
        """When the refresher tries next: before the token expires, and not before the backoff ends
        (which a try started by a request may have moved)."""
        wake_at = self._retry_at
        token = self._cache.get(self._key)
        if token is not None:
            wake_at = max(wake_at, token.refresh_at)
        return wake_at


def first_line(message: str) -> str:
    """azure-identity appends troubleshooting links on later lines; one line reads better in a log."""
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


# azure-identity's words when `az` printed something that is not its JSON (a broken or half-upgraded CLI).
_UNEXPECTED_OUTPUT = re.compile(r"Unexpected output from Azure CLI: '(.*)'\. ?\n", re.DOTALL)
BROKEN_CLI_FIX = "run 'az upgrade', or reinstall the Azure CLI if that fails"


def failure_reason(message: str) -> tuple[str, str | None]:
    """A credential's failure in one line, and the fix when it is not `az login` (for serve and check alike).

    A CLI that prints something other than a token is broken, not signed out: what it printed is shown
    (its first line, escaped, in balanced quotes) with `az upgrade` as the fix.
    """
    printed = _UNEXPECTED_OUTPUT.search(message)
    if printed is None:
        return first_line(message), None
    output = printed.group(1).strip().splitlines()
    if not output:
        return "az printed nothing", BROKEN_CLI_FIX
    if "accessToken" in output[0] or "eyJ" in output[0]:
        return "az printed something that is not a token, but looks like part of one (withheld)", BROKEN_CLI_FIX
    shown = output[0].replace("\\", "\\\\").replace('"', '\\"')
    return f'az printed something that is not a token: "{loggable(shown, 120)}"', BROKEN_CLI_FIX

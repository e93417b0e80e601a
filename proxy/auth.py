"""The token step of one upstream request: send with a token, look at the answer, maybe send once more.

Written as a flow (httpx's `Auth.auth_flow` is the model) so that the decision can be tested without a
socket: the caller sends each token the flow yields and tells it the status and the service's reason.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from .tokens import TokenSource

logger = logging.getLogger("proxy.auth")

_CHALLENGE_DESCRIPTION = re.compile(r'error_description="([^"]{0,200})"')


@dataclass(frozen=True)
class Answer:
    """What the flow needs to know of an upstream answer."""

    status: int
    reason: str = ""  # the service's reason for a 401, from its WWW-Authenticate challenge


async def token_flow(tokens: TokenSource, *, replayable: bool) -> AsyncGenerator[str, Answer]:
    """Yield the token to send; after a 401, yield a fresh one once if the body can be sent again.

    The TokenSource decides whether a fresh token is worth a try (it is not while the service refuses
    every token), and learns when the service accepts one.
    """
    token = await tokens.get()
    answer = yield token
    if answer.status == 401:
        if not (tokens.refused(token, answer.reason) and replayable):
            return
        logger.info("upstream refused the token (401); retrying once with a fresh token")
        token = await tokens.get()
        answer = yield token
        if answer.status == 401:
            tokens.refused(token, answer.reason)  # refused again: the source backs off
            return
    tokens.accepted()


async def send_with_token(
    tokens: TokenSource,
    send: Callable[[str], Awaitable[aiohttp.ClientResponse]],
    *,
    replayable: bool,
) -> aiohttp.ClientResponse:
    """The upstream's answer to `send(token)`, sent once more with a fresh token when `token_flow` says so."""
    flow = token_flow(tokens, replayable=replayable)
    try:
        token = await anext(flow)
        while True:
            response = await send(token)
            reason = challenge_reason(response) if response.status == 401 else ""
            try:
                token = await flow.asend(Answer(response.status, reason))
            except StopAsyncIteration:
                return response
            response.release()
    finally:
        await flow.aclose()


def challenge_reason(response: aiohttp.ClientResponse) -> str:
    """The service's reason for a 401, from its WWW-Authenticate challenge, for the log and /-/ready."""
    found = _CHALLENGE_DESCRIPTION.search(response.headers.get("WWW-Authenticate", ""))
    return f"401: {found.group(1)}" if found else "401 Unauthorized"

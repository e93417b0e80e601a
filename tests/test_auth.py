"""The token step of a request, driven without a socket: which tokens are sent, and what the source learns."""

from __future__ import annotations

import pytest

from proxy.auth import Answer, token_flow
from proxy.tokens import TokenSource

from .test_tokens import SCOPE, Clock, FakeCredential


@pytest.fixture
def source() -> tuple[TokenSource, FakeCredential]:
    clock = Clock()
    credential = FakeCredential(3600, clock=clock)
    return TokenSource(credential, SCOPE, clock=clock), credential


async def drive(source: TokenSource, statuses: list[int], *, replayable: bool = True) -> list[str]:
    """Send each yielded token, answering with the next status; return the tokens that were sent."""
    flow = token_flow(source, replayable=replayable)
    sent = [await anext(flow)]
    for status in statuses:
        try:
            sent.append(await flow.asend(Answer(status, "401: stand-in" if status == 401 else "")))
        except StopAsyncIteration:
            break
    return sent


async def test_an_accepted_token_is_sent_once(source):
    tokens, credential = source
    assert await drive(tokens, [200]) == ["token-1"]
    assert credential.calls == 1


async def test_a_401_is_retried_once_with_a_fresh_token(source):
    tokens, credential = source
    assert await drive(tokens, [401, 200]) == ["token-1", "token-2"]
    assert tokens.refusal is None


async def test_a_401_on_a_body_that_cannot_be_sent_again_is_passed_on(source):
    tokens, credential = source
    assert await drive(tokens, [401], replayable=False) == ["token-1"]
    assert await drive(tokens, [200]) == ["token-2"], "the refused token was still dropped"


async def test_a_second_401_is_not_retried_and_the_refusal_holds_until_a_token_is_accepted(source):
    tokens, credential = source
    assert await drive(tokens, [401, 401]) == ["token-1", "token-2"]
    assert tokens.refusal is not None and "stand-in" in tokens.refusal.detail
    assert await drive(tokens, [401]) == ["token-2"], "inside the backoff: no new token, no retry"
    assert credential.calls == 2
    assert await drive(tokens, [200]) == ["token-2"]
    assert tokens.refusal is None

"""Token acquisition, caching, refresh and failure, through the real AzureCliCredential and the az stand-in."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import aiohttp
import pytest
from azure.identity.aio import AzureCliCredential

from proxy.errors import TokenUnavailable
from proxy.tokens import TokenSource

from .conftest import wait_for
from .upstream import token_claims

SCOPE = "https://dicom.healthcareapis.azure.com/.default"


@pytest.fixture
def az_on_path(az, monkeypatch):  # noqa: ANN201
    monkeypatch.setenv("PATH", f"{az.directory}{os.pathsep}{os.environ['PATH']}")
    return az


async def test_concurrent_cold_callers_share_one_az_run(az_on_path):
    az_on_path.configure(delay=0.5)
    source = TokenSource(AzureCliCredential(), SCOPE)
    tokens = await asyncio.gather(*(source.get() for _ in range(100)))
    assert set(tokens) == {az_on_path.issued_tokens()[0]}
    assert az_on_path.calls == 1
    assert await source.get() == tokens[0]
    assert az_on_path.calls == 1


async def test_a_failure_is_not_retried_by_every_caller(az_on_path):
    az_on_path.configure(mode="logged_out")
    source = TokenSource(AzureCliCredential(), SCOPE)
    with pytest.raises(TokenUnavailable) as first:
        await source.get()
    with pytest.raises(TokenUnavailable):
        await source.get()
    assert az_on_path.calls == 1
    assert "az login" in first.value.hint
    assert "Please run 'az login'" in first.value.detail


async def test_a_refusal_forgets_only_the_refused_token(az_on_path):
    source = TokenSource(AzureCliCredential(), SCOPE)
    first = await source.get()
    source.refused("some-other-token")
    assert await source.get() == first
    source.refused(first)
    second = await source.get()
    assert second != first
    assert az_on_path.calls == 2


async def test_the_tenant_is_passed_to_az(az_on_path):
    source = TokenSource(AzureCliCredential(tenant_id="contoso.example"), SCOPE, tenant="contoso.example")
    token = await source.get()
    assert token_claims(token)["tid"] == "contoso.example"
    arguments = az_on_path.call_arguments()[0]
    assert arguments[arguments.index("--tenant") + 1] == "contoso.example"
    assert arguments[arguments.index("--resource") + 1] == "https://dicom.healthcareapis.azure.com"


async def test_a_hundred_simultaneous_requests_at_start_up_run_az_once(start_proxy, az, upstream):
    az.configure(delay=1.5)
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:

        async def one(number: int) -> int:
            async with client.get(f"{proxy.url}/echo/v2/studies/{number}") as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(number) for number in range(100)))
    assert statuses == [200] * 100
    assert az.calls == 1
    assert {seen.header("Authorization") for seen in upstream.seen} == {f"Bearer {az.issued_tokens()[0]}"}


async def test_no_request_runs_az_once_warm(start_proxy, az, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        for number in range(30):
            async with client.get(f"{proxy.url}/echo/{number}") as response:
                assert response.status == 200
    assert az.calls == 1


@pytest.mark.parametrize(
    ("mode", "detail"),
    [
        ("logged_out", "Please run 'az login'"),
        ("fail", "AADSTS700082"),
        ("garbage", 'az printed something that is not a token: "this is not json"'),
    ],
)
async def test_az_failing_gives_503_json_and_the_proxy_recovers(start_proxy, az, upstream, mode, detail):
    az.configure(mode=mode)
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/v2/studies") as response:
            assert response.status == 503
            answer = await response.json()
        assert answer["error"] == "token_unavailable"
        assert detail in answer["detail"]
        assert ("az upgrade" if mode == "garbage" else "az login") in answer["hint"]
        assert 1 <= int(response.headers["Retry-After"]) <= 5
        async with client.get(f"{proxy.url}/-/ready") as response:
            assert response.status == 503
        assert upstream.seen == []

        az.configure()

        async def status() -> int:
            async with client.get(f"{proxy.url}/echo/recovered") as response:
                return response.status

        deadline = asyncio.get_running_loop().time() + 20
        while await status() != 200:
            assert asyncio.get_running_loop().time() < deadline, "the proxy never recovered"
            await asyncio.sleep(0.2)
        async with client.get(f"{proxy.url}/-/ready") as response:
            assert response.status == 200
    assert proxy.process.poll() is None
    # One line per failed try, the proxy's own: azure-identity's "get_token_info failed" warning is silenced.
    output = proxy.output()
    assert "get_token_info failed" not in output
    assert output.count("proxy.tokens: no token from the cli credential") == az.calls - 1


def test_az_missing_from_path_gives_503(start_proxy, upstream, proxy_env, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proxy = start_proxy(env=dict(proxy_env, PATH=str(empty)))
    import requests

    response = requests.get(f"{proxy.url}/v2/studies", timeout=10)
    assert response.status_code == 503
    assert "Azure CLI not found" in response.json()["detail"]
    assert upstream.seen == []


async def test_a_401_invalidates_the_token_and_retries_once(start_proxy, az, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/echo/warm") as response:
            assert response.status == 200
        first = az.issued_tokens()[0]
        upstream.revoked.add(first)
        body = b"small replayable body" * 100
        async with client.post(f"{proxy.url}/echo/v2/studies", data=body) as response:
            assert response.status == 200
            echoed = await response.json()
    second = az.issued_tokens()[1]
    assert [seen.header("Authorization") for seen in upstream.seen[1:]] == [
        f"Bearer {first}",
        f"Bearer {second}",
    ]
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert az.calls == 2


async def test_a_401_on_a_streamed_body_is_passed_on(start_proxy, az, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/echo/warm") as response:
            assert response.status == 200
        upstream.revoked.add(az.issued_tokens()[0])

        async def body():  # noqa: ANN202
            for _ in range(4):
                yield b"x" * 1024 * 1024

        async with client.post(f"{proxy.url}/echo/v2/studies", data=body()) as response:
            assert response.status == 401
            assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        # The next request gets a fresh token without waiting for the old one to expire.
        async with client.get(f"{proxy.url}/echo/again") as response:
            assert response.status == 200
    assert upstream.seen[-1].header("Authorization") == f"Bearer {az.issued_tokens()[1]}"


async def test_ready_reports_the_expiry_of_a_held_token(start_proxy, az, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.url}/echo/warm") as response:
            assert response.status == 200
        async with client.get(f"{proxy.url}/-/ready") as response:
            assert response.status == 200
            answer = await response.json()
    assert answer["status"] == "ready"
    expires = json.loads(json.dumps(token_claims(az.issued_tokens()[0])))["exp"]
    from datetime import UTC, datetime

    assert answer["token_expires_at"] == datetime.fromtimestamp(expires, UTC).isoformat(timespec="seconds")


# Faults never become storms (issue 10) -----------------------------------------------------------------


@pytest.mark.parametrize("lifetime", [-100, 20], ids=["already-expired", "inside-the-expiry-margin"])
def test_a_token_that_arrives_expired_backs_off_and_blames_the_clock(start_proxy, az, upstream, lifetime):
    import requests

    az.configure(lifetime=lifetime)
    proxy = start_proxy()
    wait_for(lambda: "clock may be wrong" in proxy.output(), what="the expired token to be refused")
    # That it is retried on the backoff, never in a loop, is proven on the fake clock below.
    ready = requests.get(f"{proxy.url}/-/ready", timeout=10)
    assert ready.status_code == 503
    assert "clock may be wrong" in ready.json()["detail"]
    assert "local time is" in ready.json()["detail"]
    assert "clock" in ready.json()["hint"]
    assert requests.get(f"{proxy.url}/echo/x", timeout=10).status_code == 503
    assert upstream.seen == []
    assert "this machine's clock may be wrong" in proxy.output()
    assert "token acquired" not in proxy.output()


def test_a_short_lived_token_is_used(start_proxy, az, upstream):
    import requests

    az.configure(lifetime=45)  # past the 30 s expiry margin, well inside the 300 s refresh margin
    proxy = start_proxy()
    wait_for(lambda: az.calls == 1 and "token acquired" in proxy.output(), what="the first token")
    assert requests.get(f"{proxy.url}/echo/x", timeout=10).status_code == 200
    assert az.calls == 1


async def test_a_short_lived_token_is_refreshed_at_most_every_ten_seconds():
    clock = Clock()
    credential = FakeCredential(45, clock=clock)  # each token expires inside the 300 s refresh margin
    source, sleeps = await refresher_until_held(credential, clock, sleeps=4)
    assert sleeps == [0.0, 10.0, 10.0, 10.0, 10.0]
    assert credential.calls == 4


async def test_a_service_that_refuses_every_token_costs_two_az_runs_not_one_per_request(start_proxy, az, upstream):
    az.configure(audience="https://management.azure.com")  # what a wrong --audience gives
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        for number in range(10):
            async with client.get(f"{proxy.url}/echo/{number}") as response:
                assert response.status == 401
                assert "audience" in response.headers["WWW-Authenticate"]
        async with client.get(f"{proxy.url}/-/ready") as response:
            assert response.status == 503
            answer = await response.json()
    assert az.calls == 2  # the start-up token, and one fresh token after its first refusal
    assert answer["error"] == "token_refused"
    assert "audience" in answer["detail"]
    assert "--audience" in answer["hint"]
    assert "refuses the tokens" in proxy.output()


class FakeCredential:
    """A credential that answers from a script: a token, or an exception to raise."""

    def __init__(self, *answers: object, clock) -> None:  # noqa: ANN001
        self.answers = list(answers)
        self.calls = 0
        self.clock = clock

    async def get_token_info(self, *scopes: str, options: object = None) -> object:
        from azure.core.credentials import AccessTokenInfo

        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return AccessTokenInfo(f"token-{self.calls}", int(self.clock() + float(answer)))

    async def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_refusals_back_off_and_end_when_the_service_accepts_a_token():
    clock = Clock()
    credential = FakeCredential(3600, clock=clock)
    source = TokenSource(credential, SCOPE, clock=clock)
    first = await source.get()
    assert source.refused(first, "401: audience") is True  # maybe revoked: try a fresh one
    second = await source.get()
    assert source.refused(second, "401: audience") is False  # refused again: back off
    assert source.refusal is not None and "audience" in source.refusal.detail
    assert await source.get() == second and credential.calls == 2
    clock.now += 5
    assert source.refused(second) is False  # still inside the 10 s window
    clock.now += 6
    assert source.refused(second) is True  # the window is over: one fresh try
    third = await source.get()
    assert credential.calls == 3
    assert source.refused(third) is False
    clock.now += 15
    assert source.refused(third) is False, "the second window doubles to 20 s"
    source.accepted()
    assert source.refusal is None
    assert source.refused(third) is True


async def test_an_unexpected_credential_error_is_logged_and_the_refresher_keeps_going(caplog):
    credential = FakeCredential(RuntimeError("surprise"), 3600, clock=__import__("time").time)
    source = TokenSource(credential, SCOPE)
    source.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while source.current is None:
            assert asyncio.get_running_loop().time() < deadline, "the refresher died"
            await asyncio.sleep(0.05)
    finally:
        await source.close()
    assert credential.calls == 2
    assert "RuntimeError: surprise" in caplog.text


def test_az_is_stopped_when_the_proxy_stops(start_proxy, az, upstream):
    az.configure(mode="hang")
    proxy = start_proxy()
    wait_for(lambda: az.running(), what="the start-up az run")
    assert proxy.stop() == 0
    wait_for(lambda: az.running() == [], timeout=5, what="az to be stopped with the proxy")


# The refresher's timing and the shared acquisition, with a fake clock: milliseconds, not minutes --------


class FakeSleep:
    """Records each sleep and moves the fake clock instead of waiting; after `limit` sleeps it blocks."""

    def __init__(self, clock: Clock, limit: int) -> None:
        self.clock, self.limit, self.sleeps = clock, limit, []
        self.blocked = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) > self.limit:
            self.blocked.set()
            await asyncio.Event().wait()
        self.clock.now += seconds
        await asyncio.sleep(0)


async def refresher_until_held(credential: FakeCredential, clock: Clock, *, sleeps: int) -> tuple[TokenSource, list]:
    """Run a source's refresher on the fake clock until its sleep number `sleeps` + 1; its sleeps so far."""
    sleep = FakeSleep(clock, limit=sleeps)
    source = TokenSource(credential, SCOPE, clock=clock, sleep=sleep)
    source.start()
    await asyncio.wait_for(sleep.blocked.wait(), 5)
    await source.close()
    return source, sleep.sleeps


async def test_the_refresher_renews_the_token_before_it_expires_without_a_request():
    clock = Clock()
    credential = FakeCredential(3600, clock=clock)
    source, sleeps = await refresher_until_held(credential, clock, sleeps=2)
    # Start-up fetches at once, then each token is renewed 300 s (the refresh margin) before it expires.
    assert sleeps == [0.0, 3300.0, 3300.0]  # the third is where the test holds it
    assert credential.calls == 2


async def test_failures_back_off_one_second_doubling_to_a_minute_and_never_within_five_seconds():
    clock = Clock()
    credential = FakeCredential(OSError("az is not there"), clock=clock)
    source, sleeps = await refresher_until_held(credential, clock, sleeps=9)
    # 1 s doubling to a minute, but never within 5 s of the last try: az runs at most once per 5 s.
    assert sleeps == [0.0, 5.0, 5.0, 5.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert "az is not there" in str(source.last_error)


async def test_a_caller_that_goes_away_does_not_cancel_the_shared_acquisition():
    started, release = asyncio.Event(), asyncio.Event()

    class SlowCredential(FakeCredential):
        async def get_token_info(self, *scopes: str, options: object = None) -> object:
            started.set()
            await release.wait()
            return await super().get_token_info(*scopes, options=options)

    clock = Clock()
    credential = SlowCredential(3600, clock=clock)
    source = TokenSource(credential, SCOPE, clock=clock)
    leaving = asyncio.create_task(source.get())
    staying = asyncio.create_task(source.get())
    await asyncio.wait_for(started.wait(), 5)  # both callers now wait on the one acquisition
    leaving.cancel()  # a client that disconnects while the token is being fetched
    with pytest.raises(asyncio.CancelledError):
        await leaving
    release.set()
    assert await asyncio.wait_for(staying, 5) == "token-1"
    assert leaving.cancelled()
    assert credential.calls == 1


async def test_refusals_on_some_paths_and_acceptance_on_others_fetch_at_most_one_token_per_interval():
    clock = Clock()
    credential = FakeCredential(3600, clock=clock)
    source = TokenSource(credential, SCOPE, clock=clock)
    for _ in range(10):  # a path that answers 401, then one that answers 200, over and over
        token = await source.get()
        source.refused(token, "401: this path")
        await source.get()
        source.accepted()
    assert credential.calls == 2, "one fresh token for the first refusal, none for the next nine"
    clock.now += 10
    assert source.refused(await source.get(), "401: this path") is True


# Nobody waits on a failing az; a request starts the next try once 5 s have passed (issue 18) ------------


async def never_wake(seconds: float) -> None:
    """The refresher's sleep in these tests: it never wakes, so only callers start tries."""
    await asyncio.Event().wait()


async def until(condition, what: str) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + 15
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_after_a_failed_try_callers_get_503_at_once_and_az_login_is_picked_up_by_the_next_request(
    az_on_path,
):
    az_on_path.configure(mode="logged_out")
    clock = Clock()
    source = TokenSource(AzureCliCredential(), SCOPE, clock=clock, sleep=never_wake)
    source.start()
    try:
        with pytest.raises(TokenUnavailable):
            await source.get()  # the first try: callers wait for it
        with pytest.raises(TokenUnavailable) as failed:
            await source.get()
        assert failed.value.retry_after == 5 and az_on_path.calls == 1
        clock.now += 3
        with pytest.raises(TokenUnavailable) as failed:
            await source.get()
        assert failed.value.retry_after == 2 and az_on_path.calls == 1

        az_on_path.configure()  # the user ran `az login`
        clock.now += 2
        with pytest.raises(TokenUnavailable) as failed:
            await source.get()  # answered at once; the try it started runs in the background
        assert failed.value.retry_after == 1
        await until(lambda: source.current is not None, "the try the request started")
        assert await source.get() == az_on_path.issued_tokens()[0]
        assert az_on_path.calls == 2
    finally:
        await source.close()


async def test_no_caller_waits_on_a_hanging_az_once_a_try_has_failed(az_on_path):
    az_on_path.configure(mode="logged_out")
    clock = Clock()
    source = TokenSource(AzureCliCredential(), SCOPE, clock=clock, sleep=never_wake)
    try:
        with pytest.raises(TokenUnavailable):
            await source.get()
        az_on_path.configure(mode="hang")  # offline: the next az never answers
        clock.now += 5
        for _ in range(20):
            with pytest.raises(TokenUnavailable) as failed:
                await source.get()
            assert failed.value.retry_after == 1
        await until(lambda: az_on_path.running(), "the background try's az")
        with pytest.raises(TokenUnavailable):
            await source.get()
        assert az_on_path.running(), "the answers came while the try still hung"
        assert az_on_path.calls == 2
        # End the hung az, and with it the try, while the loop runs (its subprocess transport closes cleanly).
        hung = source.last_error
        az_on_path.stop_leftovers()
        await until(lambda: source.last_error is not hung, "the killed try to end")
    finally:
        await source.close()


async def test_az_runs_at_most_once_per_five_seconds_under_any_load():
    clock = Clock()
    tried_at: list[float] = []

    class Failing(FakeCredential):
        async def get_token_info(self, *scopes: str, options: object = None) -> object:
            tried_at.append(clock())
            return await super().get_token_info(*scopes, options=options)

    source = TokenSource(Failing(OSError("offline"), clock=clock), SCOPE, clock=clock, sleep=never_wake)
    for _ in range(200):  # 50 s of requests, 20 a second
        tries, error = len(tried_at), source.last_error
        for _ in range(5):
            with pytest.raises(TokenUnavailable):
                await source.get()
        if len(tried_at) > tries:  # a request started a try: let it end (each failure is a new error)
            await until(lambda error=error: source.last_error is not error, "the try to end")
        await asyncio.sleep(0)  # the ended try's done callback runs
        clock.now += 0.25
    assert len(tried_at) == 10
    assert all(later - earlier >= 5 for earlier, later in zip(tried_at, tried_at[1:], strict=False))


class ManualSleep:
    """The refresher's sleep, ended by the test: `wake()` moves the fake clock on by what was asked."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.asked = clock, []
        self._pending: asyncio.Future[None] | None = None

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        if seconds > 0:
            self._pending = asyncio.get_running_loop().create_future()
            await self._pending
            self.clock.now += seconds

    def wake(self) -> None:
        assert self._pending is not None and not self._pending.done(), "the refresher is not asleep"
        self._pending.set_result(None)


async def test_a_try_started_by_a_request_moves_the_refreshers_schedule():
    clock = Clock()
    credential = FakeCredential(OSError("offline"), clock=clock)
    sleep = ManualSleep(clock)
    source = TokenSource(credential, SCOPE, clock=clock, sleep=sleep)
    source.start()
    try:
        await until(lambda: sleep.asked == [0.0, 5.0], "the first failure and its 5 s backoff")
        clock.now += 5
        with pytest.raises(TokenUnavailable):
            await source.get()  # starts the next try itself
        await until(lambda: len(sleep.asked) == 3, "the refresher to take the new schedule")
        assert credential.calls == 2, "the refresher did not run az again at the old time"
        assert sleep.asked[-1] == 5.0  # 5 s after the request's try, not at once
    finally:
        await source.close()


async def test_after_a_refusal_the_refresher_retries_on_the_backoff_not_at_the_old_renewal():
    clock = Clock()
    credential = FakeCredential(3600, OSError("offline"), clock=clock)
    sleep = ManualSleep(clock)
    source = TokenSource(credential, SCOPE, clock=clock, sleep=sleep)
    source.start()
    try:
        await until(lambda: sleep.asked == [0.0, 3300.0], "the first token and its renewal time")
        assert source.refused(await source.get()) is True  # revoked: dropped
        with pytest.raises(TokenUnavailable):
            await source.get()  # the fresh try fails (offline)
        await until(lambda: sleep.asked[-1] == 5.0, "the refresher to wake for the backoff")
        sleep.wake()  # 5 s pass, no request comes: the refresher itself tries again
        await until(lambda: credential.calls == 3, "the refresher's own retry")
    finally:
        await source.close()


async def test_a_token_that_arrives_expired_is_retried_on_the_backoff_not_in_a_loop():
    clock = Clock()
    credential = FakeCredential(-100, clock=clock)  # every token already expired: a clock 100 s ahead
    source, sleeps = await refresher_until_held(credential, clock, sleeps=4)
    assert sleeps == [0.0, 5.0, 5.0, 5.0, 8.0]
    assert credential.calls == 4
    assert "clock may be wrong" in str(source.last_error)

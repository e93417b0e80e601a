"""The upstream pool: connections kept warm across a person's pause, the most recently used one first."""

from __future__ import annotations

import asyncio

import aiohttp


async def fetch(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as response:
        await response.read()
        return response.status


async def test_requests_one_after_another_reuse_the_connection_used_last(start_proxy, upstream):
    proxy = start_proxy()
    async with aiohttp.ClientSession() as client:
        # Four at once open four upstream connections; the service answers the slow one last.
        statuses = await asyncio.gather(
            fetch(client, f"{proxy.url}/slow/0.5"), *(fetch(client, f"{proxy.url}/echo/{n}") for n in range(3))
        )
        assert statuses == [200] * 4
        opened = {seen.peer for seen in upstream.seen}
        assert len(opened) == 4
        # The slow answer's connection went back to the pool last: the most recently used one.
        used_last = next(seen.peer for seen in upstream.seen if seen.raw_path.startswith("/slow"))
        before = len(upstream.seen)
        for number in range(8):  # a viewer scrolling: one frame at a time
            assert await fetch(client, f"{proxy.url}/echo/one/{number}") == 200
    # aiohttp's own pool hands them out first-in first-out, rotating through all four (each gone cold).
    assert [seen.peer for seen in upstream.seen[before:]] == [used_last] * 8


async def test_an_idle_connection_is_kept_for_upstream_idle_seconds_and_no_longer(start_proxy, upstream):
    kept = start_proxy("--upstream-idle", "30")
    dropped = start_proxy("--upstream-idle", "1")
    async with aiohttp.ClientSession() as client:
        for proxy in (kept, dropped):
            assert await fetch(client, f"{proxy.url}/echo/first") == 200
        await asyncio.sleep(3)  # longer than one proxy's idle time, shorter than the other's
        for proxy in (kept, dropped):
            assert await fetch(client, f"{proxy.url}/echo/second") == 200
    peers = [seen.peer for seen in upstream.seen]
    assert peers[2] == peers[0], "kept warm for --upstream-idle 30"
    assert peers[3] != peers[1], "a connection idle past --upstream-idle is not reused"


async def test_the_pools_private_deque_is_still_where_the_warm_connector_looks():
    from proxy.internals import WarmConnector

    connector = WarmConnector()
    try:
        idle = getattr(connector, "_conns", None)
        assert idle is not None and hasattr(idle, "get"), "aiohttp's TCPConnector no longer has _conns (WarmConnector)"
    finally:
        await connector.close()

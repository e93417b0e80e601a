"""The one silence timer: notices a wait on a client that lasts the read timeout.

Used for a connection that sends no request, a body that stops arriving and an answer the client stops
reading. One timer per connection or transfer looks at the wait in progress: an asyncio.timeout around
each chunk made and cancelled a timer per chunk, 8% of a 1 GiB download's CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _never() -> bool:
    return False


class Silence:
    """Calls `on_silence` once a wait (from `waiting()` to `heard()`) has lasted `limit` seconds.

    `excused()` true postpones the verdict: a connection whose request is being handled is waiting on the
    upstream, not on its client. `waiting()` and `heard()` cost a clock read.
    """

    def __init__(
        self,
        limit: float,
        on_silence: Callable[[], None],
        *,
        excused: Callable[[], bool] = _never,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._limit = limit
        self._on_silence = on_silence
        self._excused = excused
        self._since: float | None = None
        self.noticed = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._loop.time() + limit, self._check)

    def waiting(self) -> None:
        """A wait starts now (again, if one was in progress: something was heard)."""
        self._since = self._loop.time()

    def heard(self) -> None:
        """No wait is in progress."""
        self._since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        if self._since is not None and now - self._since >= self._limit and not self._excused():
            self._timer = None
            self.noticed = True
            self._on_silence()
            return
        since = self._since if self._since is not None and now - self._since < self._limit else now
        self._timer = self._loop.call_at(since + self._limit, self._check)

"""The log handler: lines of one event-loop turn written together, and never held back from anyone else."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator

import pytest

from proxy.logs import LoopTurnHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, CountingStream]]:
    stream = CountingStream()
    handler = LoopTurnHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger(f"test-logs-{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, stream
    log.removeHandler(handler)


def test_the_lines_of_one_turn_are_written_together_when_it_ends(logged):
    log, stream = logged

    async def turn() -> None:
        log.info("first")
        log.info("second")
        assert stream.getvalue() == ""
        await asyncio.sleep(0)
        assert (stream.getvalue(), stream.writes) == ("first\nsecond\n", 1)

    asyncio.run(turn())


def test_a_line_from_another_thread_is_written_at_once_after_those_the_loop_holds(logged):
    log, stream = logged

    async def busy_turn() -> None:
        log.info("from the loop")
        # The loop is busy (this turn has not ended): the gateway thread's line must not wait for it.
        other = threading.Thread(target=log.error, args=("from a gateway thread",))
        other.start()
        other.join()
        assert stream.getvalue() == "from the loop\nfrom a gateway thread\n"

    asyncio.run(busy_turn())


def test_lines_held_when_the_loop_stopped_go_out_with_the_next_line(logged):
    log, stream = logged
    loop = asyncio.new_event_loop()

    def last_callback() -> None:
        loop.stop()
        log.info("logged as the loop stops")  # its flush is scheduled, but the loop never runs it

    loop.call_soon(last_callback)
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""
    log.info("logged after")
    assert stream.getvalue() == "logged as the loop stops\nlogged after\n"


def test_lines_logged_outside_any_loop_are_written_at_once(logged):
    log, stream = logged
    log.info("start-up")
    assert stream.getvalue() == "start-up\n"

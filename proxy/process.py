"""What the proxy asks of the process it runs in, on each platform: signals, the open-files limit.

Unix-only facilities (`resource`, the loop's signal handlers) are used only where they exist, never at
import time, so the proxy starts on Windows too (tests/test_platforms.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("proxy")


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Callable[[], None]:
    """SIGINT (Ctrl+C) and SIGTERM set `stop`, so that shutdown is graceful everywhere; returns what undoes it.

    The loop's own signal handlers where it has them (Unix); Windows' loops raise NotImplementedError, and
    there Python's `signal.signal` takes the signal and hands it to the loop thread (until undone: after the
    loop has closed, a Ctrl+C must not call into it).
    """
    previous: dict[int, Any] = {}
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signal_number, stop.set)
        except NotImplementedError:
            handler = signal.signal(signal_number, lambda _number, _frame: loop.call_soon_threadsafe(stop.set))
            previous[signal_number] = handler

    def restore() -> None:
        for signal_number, handler in previous.items():
            signal.signal(signal_number, handler)

    return restore


class DescriptorShortage:
    """Says once, clearly, that connections wait because the process ran out of file descriptors."""

    def __init__(self) -> None:
        self._told = False

    def handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            if not self._told:
                self._told = True
                logger.error(
                    "out of file descriptors (limit %s): new connections wait until others close; "
                    "raise the limit (ulimit -n) or close idle clients",
                    _open_file_limit(),
                )
            return
        loop.default_exception_handler(context)


def _open_file_limit() -> str:
    try:
        import resource  # Unix only
    except ImportError:
        return "unknown"
    return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def raise_open_file_limit() -> None:
    """Each connection costs two descriptors (client and upstream): take all the hard limit allows.

    Unix only: Windows has no such limit to raise (and no `resource` module)."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            logger.debug("could not raise the open-files limit from %d", soft)

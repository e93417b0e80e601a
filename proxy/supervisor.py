"""Several worker processes on one port (SO_REUSEPORT), started and stopped together."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable

logger = logging.getLogger("proxy")


def supervise(workers: int, serve: Callable[[int], int]) -> int:
    """Fork `workers` processes that each `serve(number)` on the shared port; return 0 if all exit cleanly.

    Forked before any event loop, thread or credential exists. Each worker gets a session of its own, so a
    terminal's Ctrl-C reaches only this supervisor, which passes SIGINT/SIGTERM on once; when one worker
    fails, the others are stopped too rather than serving on at reduced strength.
    """
    children: set[int] = set()

    def stop(signal_number: int, frame: object = None) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)

    # Installed before the first fork, so no SIGTERM can fall between forking and forwarding; each worker
    # puts the previous handlers back until aiohttp installs its own.
    previous = {each: signal.signal(each, stop) for each in (signal.SIGTERM, signal.SIGINT)}
    for number in range(workers):
        pid = os.fork()
        if pid == 0:
            for signal_number, handler in previous.items():
                signal.signal(signal_number, handler)
            os.setsid()
            code = 1
            try:
                code = serve(number)
            finally:
                logging.shutdown()
                os._exit(code)
        children.add(pid)
    logger.info("%d worker processes share port (SO_REUSEPORT), each with its own token", workers)

    worst = 0
    while children:
        pid, status = os.wait()
        children.discard(pid)
        code = os.waitstatus_to_exitcode(status)  # negative: killed by that signal
        if code != 0 and worst == 0:
            logger.error("a worker exited with status %d; stopping the others", code)
            stop(signal.SIGTERM)
            worst = code if code > 0 else 1
    return worst

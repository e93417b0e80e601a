"""The bridge from pynetdicom's threads to the proxy's event loop, where the one DICOMweb client lives."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from .status import OUT_OF_RESOURCES, Failure

T = TypeVar("T")


class LoopBridge:
    """Runs coroutines of the proxy's event loop from pynetdicom's threads, each step bounded by `timeout`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        except RuntimeError:  # the loop has closed: the proxy is stopping
            coroutine.close()
            raise Failure(OUT_OF_RESOURCES, "the proxy is shutting down") from None
        try:
            return future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Failure(OUT_OF_RESOURCES, f"the DICOM service did not answer within {self._timeout:g}s") from None
        except concurrent.futures.CancelledError:  # cancelled by the proxy's shutdown
            raise Failure(OUT_OF_RESOURCES, "the proxy is shutting down") from None

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """An async iterator of the loop, item by item; stopping early closes it (and its upstream answer)."""
        end = object()

        async def step() -> Any:
            return await anext(items, end)

        try:
            while (item := self.run(step())) is not end:
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                self.run(aclose())

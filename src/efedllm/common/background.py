"""An asyncio event loop on a thread of its own, for synchronous code that drives hivemind's async API.

The distributed client and the verifier node are synchronous objects whose peers, streams and
deliveries live on one event loop (hivemind's ``P2P`` must be used from the loop it was replicated
on). Call order: ``start()``; then ``run(coroutine)`` (waits for its result) or ``submit(coroutine)``
(returns a ``concurrent.futures.Future``) from any thread, any number of times; ``shutdown()``
cancels whatever still runs on the loop, stops it and joins the thread. The constructor does nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine


class BackgroundLoop:
    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> "BackgroundLoop":
        if self._loop is not None:
            raise RuntimeError(f"{self.name} is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=self.name)
        self._thread.start()
        return self

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def run(self, coroutine: Coroutine, timeout: float | None = None) -> Any:
        """Runs ``coroutine`` on the loop and returns its result (or raises its exception)."""
        return self.submit(coroutine).result(timeout)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancels every task still on the loop, then stops and closes it; a no-op when not running."""
        if self._loop is None:
            return
        self.run(_cancel_other_tasks(), timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=timeout)
        self._loop.close()
        self._loop = self._thread = None


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)

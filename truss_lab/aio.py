"""One event loop per LiveModel, on a daemon thread, for `async def` model methods.

A Truss server runs all of a model's coroutines on one loop; so do we, so state an async model keeps
(an aiohttp session made in load(), say) stays on the loop it was made on. Callers in any thread,
including a notebook cell whose own thread already runs a loop, block on the result.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable


class LoopThread:
    def __init__(self, name: str = "truss-lab-loop"):
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=main, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, awaitable: Awaitable) -> Any:
        """Run `awaitable` on the loop and wait for it; an interrupt here cancels it there."""
        loop = self._loop or self._start()
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        with self._guard:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()


async def _as_coroutine(awaitable: Awaitable) -> Any:
    return await awaitable

"""One event loop per LiveModel, on a daemon thread, for `async def` model methods.

A Truss server runs all of a model's coroutines on one loop; so do we, so state an async model keeps
(an aiohttp session made in load(), say) stays on the loop it was made on. Callers in any thread,
including a notebook cell whose own thread already runs a loop, block on the result.

Never blocks the loop's own thread on itself (cleanup that lands there, such as an abandoned async
stream finalised by the garbage collector, is scheduled instead); an interrupted caller gives its
coroutine back only once it has stopped; `close()` cancels what is in flight, so callers get a clear
error at once, and every later call raises one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from typing import Any, Awaitable

from .errors import TrussLabError

STOP_WAIT_S = 30.0  # how long an interrupted or cancelled coroutine is given to stop


class LoopClosed(TrussLabError):
    """The model was closed: its event loop no longer runs anything."""


class LoopThread:
    def __init__(self, name: str = "truss-lab-loop"):
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._closed = False
        self._running: set[concurrent.futures.Future] = set()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._closed:
                raise LoopClosed(f"{self._name}: closed (close() was called); load the model again")
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

    def on_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, awaitable: Awaitable, context: contextvars.Context | None = None) -> Any:
        """Run `awaitable` on the loop and wait for it. An interrupt here cancels it there and waits
        (up to STOP_WAIT_S) until it has stopped, so a lock held around this call is not given back
        while the coroutine still runs. `context`: run it in that Context (the steps of one async
        stream share one, as they share one task on the Truss server: a ContextVar a `with` sets in
        the first step is reset in the last), else in a copy of the caller's."""
        if self.on_loop_thread():
            _discard(awaitable)
            raise RuntimeError(f"{self._name}: a blocking call from the model's own event loop thread would deadlock it")
        loop = self._loop or self._start()
        stopped = threading.Event()  # set once the coroutine has stopped, or once it is sure never to start
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:  # from here on an interrupt (Ctrl-C) anywhere cancels the coroutine and waits for it
            _submit(loop, _as_coroutine(awaitable, stopped), context, future, stopped)
            with self._guard:
                self._running.add(future)
            return future.result()
        except concurrent.futures.CancelledError:
            if self._closed:
                raise LoopClosed(f"{self._name}: closed while this call was running") from None
            raise
        except BaseException:
            future.cancel()
            try:  # runs after _submit's start() if that was queued at all: FIFO
                loop.call_soon_threadsafe(_never_started, future, stopped)
            except RuntimeError:  # the loop is closed: nothing runs there any more
                stopped.set()
            stopped.wait(STOP_WAIT_S)
            raise
        finally:
            with self._guard:
                self._running.discard(future)

    def finish(self, awaitable: Awaitable, context: contextvars.Context | None = None) -> None:
        """Run cleanup (an `aclose()`): wait for it, or schedule it when called on the loop thread itself."""
        if self.on_loop_thread():
            asyncio.get_running_loop().create_task(awaitable, context=context) if context is not None \
                else asyncio.ensure_future(awaitable)
            return
        if self._closed or self._loop is None:
            _discard(awaitable)
            return
        self.run(awaitable, context)

    def close(self) -> None:
        """Cancel every call in flight (their callers get LoopClosed), stop the loop and its thread."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
            running = list(self._running)
        if loop is None:
            return
        for future in running:
            future.cancel()
        if self.on_loop_thread():
            loop.call_soon(loop.stop)
            return

        async def drain() -> None:  # let cancelled coroutines run their finally blocks
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=STOP_WAIT_S)

        try:
            asyncio.run_coroutine_threadsafe(drain(), loop).result(STOP_WAIT_S + 1)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()

    @property
    def closed(self) -> bool:
        return self._closed


def _submit(loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None,
            future: concurrent.futures.Future, stopped: threading.Event) -> None:
    """run_coroutine_threadsafe into a future the caller already holds (so an interrupt at any point
    of the call can cancel it), with the task in `context` (or a copy of the caller's). The future
    stays pending until the task is done, so cancelling it always reaches the task."""
    if context is None:
        context = contextvars.copy_context()

    def start() -> None:
        if future.cancelled():
            coro.close()
            stopped.set()
            return
        task = loop.create_task(coro, context=context)
        future.truss_lab_task = task  # type: ignore[attr-defined]

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                future.cancel()
            elif future.set_running_or_notify_cancel():
                if t.exception() is not None:
                    future.set_exception(t.exception())
                else:
                    future.set_result(t.result())

        task.add_done_callback(done)
        future.add_done_callback(lambda f: f.cancelled() and not task.done() and _call_soon(loop, task.cancel))

    loop.call_soon_threadsafe(start)


def _never_started(future: concurrent.futures.Future, stopped: threading.Event) -> None:
    """Queued after an interrupt: when it runs, _submit's start() has run if it was ever queued."""
    if getattr(future, "truss_lab_task", None) is None:
        stopped.set()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any) -> None:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed
        pass


async def _as_coroutine(awaitable: Awaitable, stopped: threading.Event) -> Any:
    try:
        return await awaitable
    finally:
        stopped.set()


def _discard(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: say nothing about it

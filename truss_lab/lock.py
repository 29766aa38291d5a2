"""The predict lock: a semaphore of `predict_concurrency` slots that serves waiters first come, first served.

A Truss server guards predict with an asyncio.Semaphore, which hands slots out in arrival order.
`threading.Semaphore` does not: a thread that releases and at once acquires again usually wins over
threads that have waited for seconds (the timeline shows requests starving). To measure what a
server would do, a release here hands the slot straight to the oldest waiter.
"""

from __future__ import annotations

import collections
import threading


class FairLock:
    """A FIFO semaphore: `with lock:` holds one of `size` slots; waiters are served in arrival order."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._free = size
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    @property
    def available(self) -> int:
        """Free slots right now."""
        return self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self) -> None:
        with self._mutex:
            if self._free and not self._waiters:
                self._free -= 1
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._waiters.append(waiter)
        try:
            waiter.acquire()  # until a release hands us its slot
        except BaseException:  # interrupted (Ctrl-C): never keep, never lose a slot
            with self._mutex:
                try:
                    self._waiters.remove(waiter)
                except ValueError:  # the slot was handed over just before the interrupt: pass it on
                    self._release_locked()
            raise

    def release(self) -> None:
        with self._mutex:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._waiters:
            self._waiters.popleft().release()  # the slot goes to the oldest waiter, not to a newcomer
        elif self._free >= self.size:
            raise ValueError("FairLock released more times than acquired")
        else:
            self._free += 1

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<FairLock {self.size - self._free}/{self.size} held, {self.waiting} waiting>"

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
    """A FIFO semaphore: `with lock:` holds one of `size` slots; waiters are served in arrival order.

    `resize(n)` changes the size in place: waiters are admitted at once when it grows; when it shrinks
    below the slots held, those holders finish and nobody new gets in until fewer than `n` hold it.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self._held = 0
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()

    @property
    def available(self) -> int:
        """Free slots right now."""
        return max(0, self.size - self._held)

    @property
    def held(self) -> int:
        return self._held

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        with self._mutex:
            self.size = size
            self._admit_locked()

    def acquire(self) -> None:
        with self._mutex:
            if self._held < self.size and not self._waiters:
                self._held += 1
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
        if self._held <= 0:
            raise ValueError("FairLock released more times than acquired")
        self._held -= 1
        self._admit_locked()

    def _admit_locked(self) -> None:
        while self._waiters and self._held < self.size:
            self._held += 1
            self._waiters.popleft().release()  # the slot goes to the oldest waiter, not to a newcomer

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<FairLock {self._held}/{self.size} held, {self.waiting} waiting>"

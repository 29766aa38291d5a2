"""The predict lock: a semaphore of `predict_concurrency` slots that serves waiters first come, first
served; and the gate a reload passes alone, so that no request runs on two versions of the code.

A Truss server guards predict with an asyncio.Semaphore, which hands slots out in arrival order.
`threading.Semaphore` does not: a thread that releases and at once acquires again usually wins over
threads that have waited for seconds (the timeline shows requests starving). To measure what a
server would do, a release here hands the slot straight to the oldest waiter.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator


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


class GateBusy(Exception):
    """Requests were still in flight when a reload's wait for them ran out."""

    def __init__(self, inside: int, timeout: float):
        super().__init__(f"{inside} request{'s' if inside != 1 else ''} still in flight after {timeout:g} s")
        self.inside = inside


class Gate:
    """Requests pass it together (`enter` / `leave`, a counter under a mutex); a reload passes it alone
    (`with gate.alone(timeout):`): it waits for the requests in flight to end - a stream counts until
    it ends - and holds new ones back until it is done. So a request runs entirely on the code it
    started with. If the requests in flight do not end within `timeout`, GateBusy, and the held-back
    requests go on."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._waiting = 0  # reloads waiting for the gate, or holding it

    @property
    def inside(self) -> int:
        return self._inside

    def enter(self) -> None:
        with self._cond:
            while self._waiting:
                self._cond.wait()
            self._inside += 1

    def leave(self) -> None:
        with self._cond:
            self._inside -= 1
            if not self._inside and self._waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def alone(self, timeout: float) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()  # whoever waits to see a reload waiting (a test, say)
            if not self._cond.wait_for(lambda: not self._inside, timeout):
                self._waiting -= 1
                self._cond.notify_all()
                raise GateBusy(self._inside, timeout)
        try:
            yield
        finally:
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()

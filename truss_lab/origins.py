"""Work the model's code started - threads, processes, executor jobs - counted as the model's activity.

The reloader tells a file the model wrote under data/ from one the user replaced by when it changed
(trace.ActivityLog: intervals of model activity). load() and requests are intervals of their own; so
is everything they start:

* a thread started from model code, for as long as it runs (a background download in load());
* a job submitted to a thread or process pool from model code, from submit until its future is done
  (the pool's own worker threads and processes live on and are not counted);
* a process started from model code (`multiprocessing.Process`, `subprocess.Popen`), until it exits
  (a daemon thread waits on their exit, so the interval ends when the process does).

"From model code" means a frame of one of the truss's files (model/, packages/) is on the caller's
stack; the activity goes to the truss this process holds (loader.py: one a process). Installed once,
when the first truss loads; for code that is not the model's each wrapper costs one stack walk per
thread or process started (never per call of anything else).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Any

from . import loader

_installed = False
_install_lock = threading.Lock()


def _log_of_caller() -> Any:
    resident = loader.resident()
    if resident is None:
        return None
    frame = sys._getframe(2)
    for _ in range(200):
        if frame is None:
            return None
        if resident.owns(frame.f_code.co_filename):
            return getattr(resident, "activity", None)
        frame = frame.f_back
    return None


def install() -> None:
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        _wrap_threads()
        _wrap_executors()
        _wrap_processes()
        _installed = True


def _wrap_threads() -> None:
    import concurrent.futures.thread as pool_thread

    original = threading.Thread.start
    pool_worker = getattr(pool_thread, "_worker", None)

    @functools.wraps(original)
    def start(self, *args, **kwargs):
        log = _log_of_caller()
        if log is not None and getattr(self, "_target", None) is not pool_worker:
            run = self.run

            def counted_run() -> None:
                token = log.begin()
                try:
                    run()
                finally:
                    log.end(token)

            self.run = counted_run
        return original(self, *args, **kwargs)

    threading.Thread.start = start


def _wrap_executors() -> None:
    import concurrent.futures

    for cls in (concurrent.futures.ThreadPoolExecutor, concurrent.futures.ProcessPoolExecutor):
        original = cls.submit

        def make(original):
            @functools.wraps(original)
            def submit(self, fn, /, *args, **kwargs):
                log = _log_of_caller()
                future = original(self, fn, *args, **kwargs)
                if log is not None:
                    token = log.begin()
                    future.add_done_callback(lambda _f: log.end(token))
                return future

            return submit

        cls.submit = make(original)


def _wrap_processes() -> None:
    import multiprocessing.process
    import subprocess

    import concurrent.futures.process as pool_process

    pool_worker = getattr(pool_process, "_process_worker", None)
    original_start = multiprocessing.process.BaseProcess.start

    @functools.wraps(original_start)
    def start(self):
        log = _log_of_caller()
        out = original_start(self)
        if log is not None and getattr(self, "_target", None) is not pool_worker:
            _Reaper.follow(self.sentinel, log)
        return out

    multiprocessing.process.BaseProcess.start = start

    original_init = subprocess.Popen.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        log = _log_of_caller()
        original_init(self, *args, **kwargs)
        if log is not None:
            try:
                fd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # no pidfd here: counted until this Popen is collected
                return
            _Reaper.follow(fd, log, close=True)

    subprocess.Popen.__init__ = init


class _Reaper:
    """One daemon thread that ends a process's activity interval when the process exits."""

    _lock = threading.Lock()
    _waiting: dict[int, tuple[Any, int, bool]] = {}  # fd -> (log, token, close the fd after)
    _wake_r, _wake_w = -1, -1
    _thread: threading.Thread | None = None

    @classmethod
    def follow(cls, fd: int, log: Any, close: bool = False) -> None:
        token = log.begin()
        with cls._lock:
            cls._waiting[fd] = (log, token, close)
            if cls._thread is None:
                cls._wake_r, cls._wake_w = os.pipe()
                cls._thread = threading.Thread(target=cls._run, name="truss-lab-process-reaper", daemon=True)
                cls._thread.start()
        os.write(cls._wake_w, b"x")

    @classmethod
    def _run(cls) -> None:
        import select

        while True:
            with cls._lock:
                fds = list(cls._waiting)
            try:
                ready, _, _ = select.select([cls._wake_r, *fds], [], [])
            except OSError:  # an fd closed under us: drop the ones that are gone
                with cls._lock:
                    for fd in list(cls._waiting):
                        try:
                            os.fstat(fd)
                        except OSError:
                            log, token, _ = cls._waiting.pop(fd)
                            log.end(token)
                continue
            for fd in ready:
                if fd == cls._wake_r:
                    os.read(fd, 64)
                    continue
                with cls._lock:
                    entry = cls._waiting.pop(fd, None)
                if entry is not None:
                    log, token, close = entry
                    log.end(token)
                    if close:
                        os.close(fd)

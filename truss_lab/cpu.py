"""What the machine and its scheduler say about CPU time (Linux; None where it does not say): the
machine's CPU stall (PSI) and busy time, a process's CPU time, a thread's time waiting for a CPU. Read
with os.open/os.read, never open(): that is the lock-misuse guard's own stand-in (guard.py)."""

from __future__ import annotations

import os
import threading
import time


_PRESSURE = "/proc/pressure/cpu"


_pressure_ok = os.path.exists(_PRESSURE)


def cpu_stall_ms() -> float | None:
    """The machine's cumulative CPU stall (Linux PSI, `some total`: time at least one runnable task
    waited for a CPU), in ms; on a kernel without PSI, the 1-minute load average above the CPU count,
    as a stand-in that is either 0 or 'busy'. None where neither is known."""
    global _pressure_ok
    if _pressure_ok:
        try:
            fd = os.open(_PRESSURE, os.O_RDONLY)  # not open(): that is the guard's own stand-in
            try:
                line = os.read(fd, 128).split(b"\n", 1)[0]
            finally:
                os.close(fd)
            return int(line.rsplit(b"total=", 1)[1]) / 1000.0
        except (OSError, ValueError, IndexError):
            _pressure_ok = False
    return None


def machine_cpu_s() -> float | None:
    """The busy CPU seconds of the whole machine so far, all CPUs together (Linux /proc/stat), or None."""
    try:
        fd = os.open("/proc/stat", os.O_RDONLY)  # not open(): that is the guard's own stand-in
        try:
            fields = os.read(fd, 256).split(b"\n", 1)[0].split()[1:9]
        finally:
            os.close(fd)
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields)
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def process_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds a process used so far (this one by default; another from /proc/<pid>/stat), or None."""
    if pid is None or pid == os.getpid():
        return time.process_time()
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            fields = os.read(fd, 1024).rsplit(b")", 1)[1].split()
        finally:
            os.close(fd)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class _RunQueueFile(threading.local):
    fd: int | None = None
    failed = False

    def __del__(self) -> None:  # the thread ended: its file goes too
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


_RUN_QUEUE = _RunQueueFile()


def run_queue_ns() -> int | None:
    """How long this thread has been runnable but not running, in ns (Linux: the second field of
    /proc/thread-self/schedstat), or None where the kernel does not say. One pread of a file kept open
    per thread: about a microsecond."""
    rq = _RUN_QUEUE
    if rq.fd is None:
        if rq.failed:
            return None
        try:
            rq.fd = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
        except (OSError, AttributeError):
            rq.failed = True
            return None
    try:
        return int(os.pread(rq.fd, 64, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return None

"""Lock-misuse guard: what predict does while it holds the lock that is not compute.

The Truss advice is "GPU work in predict, slow non-GPU work in pre/postprocess". The guard makes a
breach visible. While predict holds the lock it notes, for that request only:

- what it calls: a connection (`socket.socket.connect`), a name lookup (`socket.getaddrinfo`), an
  HTTP request (`urllib.request`), a file opened (`open`, minus /proc, /sys, /dev and Python's own
  files), a subprocess (`subprocess.Popen`), a sleep (`time.sleep`);
- idle time: the predict thread's CPU time against wall time. A predict that held the lock 180 ms
  while this whole process used the CPU for 5 ms was waiting on something - a download, a disk, a
  sleep. Not reported once a GPU framework has a device in use (waiting for the GPU is the point),
  nor for async predicts (their work runs on the event loop's thread).

Scoping: the current request is a ContextVar, set in the thread that runs predict (and inside the
task that runs an async predict), so a download in another request's preprocess is never blamed on
this predict. Threads that predict itself starts are not followed.

How it sees them, and what that costs everything else: an audit hook (`sys.addaudithook`) would see
them too, but Python calls a hook on *every* audited event in the process, forever - `id()` and
`sys._getframe()` among them - so a pure-Python preprocess that deep-copies its config ran 28 % slower
with one installed (benchmarks/bench_guard.py). Instead `install()` wraps exactly those six
functions, once, when the first guarded model loads: other code pays nothing, and a call to one of
them outside a guarded predict pays one ContextVar read. A guarded predict that does nothing
suspicious adds two clock reads and a ContextVar set/reset (benchmarks/bench_lock.py). What the
guard records has credentials taken out: a URL's `user:password@`, token-like query parameters, and
secret-looking `--flag value` pairs in a subprocess's argv. The limit of wrapping: a module that
bound `from time import sleep` (say) before the first guarded model loaded keeps the unwrapped one.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import time
import types
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Awaitable

from .cpu import cpu_stall_ms

IDLE_MIN_MS = 20.0  # below this, an idle predict is not worth a warning
IDLE_CPU_SHARE = 0.2  # predict thread CPU / wall below this ...
IDLE_PROCESS_SHARE = 0.5  # ... and the whole process's CPU / wall below this: "idle"
MAX_EVENTS = 32  # per request; a predict that opens 10,000 files is reported as such, not stored

ADVICE = {
    "connect": "move the download to preprocess",
    "dns": "move the download to preprocess",
    "http": "move the download to preprocess",
    "file": "read it in load() or preprocess",
    "subprocess": "run it in preprocess or postprocess",
    "sleep": "wait in preprocess, not under the lock",
    "idle": "if that is not GPU time, move the waiting (I/O, sleep) out of predict",
}

WHAT = {
    "connect": "opened a connection to {detail}",
    "dns": "looked up {detail}",
    "http": "sent {detail}",
    "file": "opened {detail}",
    "subprocess": "started a subprocess {detail}",
    "sleep": "slept {detail}",
    "idle": "was idle for {detail}",
}


@dataclass(frozen=True, slots=True)
class Finding:
    """One kind of lock misuse in one request: what predict did, and for how long it held the lock."""

    kind: str  # connect | dns | http | file | subprocess | sleep | idle
    detail: str
    held_ms: float
    count: int = 1

    @property
    def message(self) -> str:
        what = WHAT[self.kind].format(detail=self.detail)
        more = f" ({self.count} times)" if self.count > 1 else ""
        return f"predict {what}{more} and held the lock {self.held_ms:.0f} ms — {ADVICE[self.kind]}"

    def __str__(self) -> str:
        return self.message


class LockMisuseWarning(UserWarning):
    """Predict did non-compute work (I/O, a sleep, a subprocess) while holding the lock."""


@dataclass(slots=True)
class Watch:
    """What one predict did while holding the lock; filled by the audit hook."""

    wall0: float
    proc0: float
    events: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, detail) -> count
    dropped: int = 0  # events past MAX_EVENTS distinct ones
    idle_check: bool = True  # off for async predicts and streams: the thread's CPU time says nothing
    stall0: float | None = None  # the machine's CPU stall counter at the start (cpu_stall_ms), if read


_CURRENT: ContextVar[Watch | None] = ContextVar("truss_lab_guard", default=None)
_installed = False
_install_lock = threading.Lock()
_IGNORED_PREFIXES = ("/proc/", "/sys/", "/dev/")
_IMPORT_SUFFIXES = (".py", ".pyc", ".so", ".pyd", ".pth")


def _library_prefixes() -> tuple[str, ...]:
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return tuple(p.rstrip(os.sep) + os.sep for p in prefixes if p)


_LIBRARY = _library_prefixes()


def _address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


def _file(args: tuple) -> str | None:
    path = args[0]
    if isinstance(path, int):  # os.fdopen / open(fd): already open
        return None
    path = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    if path.endswith(_IMPORT_SUFFIXES) or path.startswith(_IGNORED_PREFIXES) or path.startswith(_LIBRARY):
        return None
    return path


def _classify(event: str, args: tuple) -> tuple[str, str] | None:
    if event == "socket.connect":
        address = args[1]
        if not isinstance(address, tuple):  # AF_UNIX: a local socket, e.g. a GPU daemon; not a download
            return None
        return "connect", _address(address)
    if event == "socket.getaddrinfo":
        return "dns", f"{args[0]}:{args[1]}" if args[1] is not None else str(args[0])
    if event == "urllib.Request":
        return "http", redact_url(f"{args[3] or 'GET'} {args[0]}")
    if event == "open":
        path = _file(args)
        return ("file", path) if path is not None else None
    if event == "subprocess.Popen":
        argv = args[1]
        shown = " ".join(redact_argv(list(map(str, argv)))) if isinstance(argv, (list, tuple)) else redact_url(str(argv))
        return "subprocess", shown[:80]
    if event == "time.sleep":
        if not float(args[0]) > 0:  # sleep(0) yields the CPU to another thread: not a wait
            return None
        return "sleep", f"{float(args[0]) * 1000:.0f} ms"
    return None


def _hook(event: str, args: tuple) -> None:
    """Record one call of a watched function in the current predict's watch (never raises)."""
    watch = _CURRENT.get()
    if watch is None:
        return
    try:
        found = _classify(event, args)
    except Exception:  # the guard must never break the program it watches
        return
    if found is None:
        return
    if found in watch.events:
        watch.events[found] += 1
    elif len(watch.events) < MAX_EVENTS:
        watch.events[found] = 1
    else:
        watch.dropped += 1


def install() -> None:
    """Wrap the watched functions (once per process; inert outside a guarded predict)."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if not _installed:
            _wrap_all()
            _installed = True


def _wrap_all() -> None:
    import builtins
    import io
    import socket
    import subprocess
    import urllib.request

    current = _CURRENT.get

    def wrap(owner: Any, name: str, event: str, shape) -> None:
        original = getattr(owner, name)
        if isinstance(original, types.BuiltinFunctionType):  # open, time.sleep: a stand-in that never binds
            setattr(owner, name, Watched(original, event, shape))
            return

        @functools.wraps(original)
        def watched(*args, **kwargs):  # a method or Python function: it binds as the original did
            if current() is not None:
                _seen(event, shape, args, kwargs)
            return original(*args, **kwargs)

        watched.__truss_lab_wrapped__ = original
        setattr(owner, name, watched)

    open_shape = lambda file, *a, **k: (file,)  # noqa: E731
    wrap(builtins, "open", "open", open_shape)
    io.open = builtins.open
    wrap(socket.socket, "connect", "socket.connect", lambda self, address: (self, address))
    wrap(socket.socket, "connect_ex", "socket.connect", lambda self, address: (self, address))
    wrap(socket, "getaddrinfo", "socket.getaddrinfo", lambda host, port, *a, **k: (host, port))
    wrap(urllib.request.OpenerDirector, "open", "urllib.Request", _urllib_shape)
    wrap(subprocess.Popen, "_execute_child", "subprocess.Popen", lambda self, args, executable, *a, **k: (executable, args))
    wrap(time, "sleep", "time.sleep", lambda secs: (secs,))


def _seen(event: str, shape, args: tuple, kwargs: dict) -> None:
    try:
        seen = shape(*args, **kwargs)
    except Exception:  # an odd call: the original says what is wrong with it
        return
    if seen is not None:
        _hook(event, seen)


class Watched:
    """What stands in for a builtin function (`open`, `time.sleep`) once the guard is installed.

    A Python function would bind as a method (`class R: opener = open` then `self.opener(p)` would pass
    `self`); a builtin never does, and neither does this: it has no `__get__`. Its name, doc, repr,
    signature and pickling are the builtin's; outside a guarded predict a call costs one ContextVar
    read before the builtin runs."""

    def __init__(self, original: Any, event: str, shape) -> None:
        vars(self).update(
            __wrapped__=original, __truss_lab_wrapped__=original, _event=event, _shape=shape,
            __name__=original.__name__, __qualname__=original.__qualname__, __doc__=original.__doc__,
            __module__=getattr(original, "__module__", None), __self__=getattr(original, "__self__", None),
            __text_signature__=getattr(original, "__text_signature__", None),
        )
        self._original = original

    def __call__(self, *args, **kwargs):
        if _CURRENT.get() is not None:
            _seen(self._event, self._shape, args, kwargs)
        return self._original(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._original)

    def __reduce__(self) -> str:
        return self.__qualname__  # pickled by name, as the builtin is

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(self._original)


def _urllib_shape(self, fullurl, data=None, *a, **k) -> tuple:
    if isinstance(fullurl, str):
        return (fullurl, data, {}, "POST" if data is not None else "GET")
    return (fullurl.full_url, data, {}, fullurl.get_method())


# ------------------------------------------------------------------ credentials never recorded

_SECRET_WORDS = re.compile(r"(token|secret|passw(or)?d|pwd|api[_-]?key|apikey|key|auth|signature|sig|credential|session)", re.I)


def redact_url(text: str) -> str:
    """`user:password@` and token-like query parameter values replaced with ***."""
    text = re.sub(r"(?<=://)[^/@\s:]+:[^/@\s]*@", "***:***@", text)
    return re.sub(
        r"([?&;])([^=&;#\s]+)=([^&;#\s]*)",
        lambda m: f"{m.group(1)}{m.group(2)}=***" if _SECRET_WORDS.search(m.group(2)) else m.group(0),
        text,
    )


def redact_argv(argv: list[str]) -> list[str]:
    """A subprocess's argv with secret-looking values (`--token X`, `--api-key=X`, `PASSWORD=X`, URLs with
    credentials) replaced with ***."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name, eq, value = arg.partition("=")
        if eq and _SECRET_WORDS.search(name.lstrip("-")):
            out.append(f"{name}=***")
        elif arg.startswith("-") and _SECRET_WORDS.search(arg.lstrip("-")):
            out.append(arg)
            hide_next = True
        else:
            out.append(redact_url(arg))
    return out


def begin(contention: bool = True) -> Watch:
    """Start a watch for one predict (then `enter` it in every thread or task that runs predict).

    `contention`: also read the machine's CPU stall counter, so that a predict whose threads waited
    for a CPU (other processes busy) is not called idle. The runner skips it for predicts too short to
    be called idle anyway."""
    return Watch(time.perf_counter(), time.process_time(), stall0=cpu_stall_ms() if contention else None)


def enter(watch: Watch) -> Any:
    """Make `watch` current in this thread (or task); returns the token for `leave`."""
    return _CURRENT.set(watch)


def leave(token: Any) -> None:
    _CURRENT.reset(token)


def end(watch: Watch, held_ms: float, cpu_ms: float | None = None, cpu_wait_ms: float | None = None) -> list[Finding]:
    """Turn what was seen into findings (one per kind and detail); [] on the fast path.

    `cpu_ms`: predict's thread CPU time as the runner measured it for the trace's compute/idle split
    (one measurement for both); None where it says nothing (async, streamed), and then no idle finding.
    `cpu_wait_ms`: the time predict's thread waited for a CPU (a busy machine): contention, so it is not
    counted as idle, for the thread or for the process.
    """
    wall_ms = (time.perf_counter() - watch.wall0) * 1000.0
    idle_check = watch.idle_check and cpu_ms is not None
    if not watch.events and (not idle_check or wall_ms < IDLE_MIN_MS):
        return []  # nothing seen, and too short (or not ours to time) to call idle
    proc_ms = (time.process_time() - watch.proc0) * 1000.0
    events = _most_telling(watch.events)
    out = [Finding(kind, detail, held_ms, count) for (kind, detail), count in events.items()]
    if watch.dropped and out:
        last = out[-1]
        out[-1] = Finding(last.kind, f"{last.detail} and {watch.dropped} other things", held_ms, last.count)
    waited = cpu_wait_ms or 0.0
    if (
        not out  # a download or a sleep already explains the waiting
        and idle_check
        and wall_ms >= IDLE_MIN_MS
        and cpu_ms + waited < IDLE_CPU_SHARE * wall_ms
        and proc_ms + waited < IDLE_PROCESS_SHARE * wall_ms
        and not gpu_in_use()
        and not _machine_busy(watch, wall_ms)
    ):
        idle = f"{max(0.0, held_ms - cpu_ms - waited):.0f} of its {held_ms:.0f} ms (thread CPU {cpu_ms:.0f} ms)"  # = the trace's idle split
        out.append(Finding("idle", idle, held_ms))
    return out


def _machine_busy(watch: Watch, wall_ms: float) -> bool:
    """Whether runnable tasks waited for a CPU for most of the predict: its threads (a framework's
    thread pool among them) may have been ready to compute, so idle time cannot be told from contention."""
    if watch.stall0 is None:
        return False
    stall1 = cpu_stall_ms()
    return stall1 is not None and stall1 - watch.stall0 > IDLE_PROCESS_SHARE * wall_ms


def _most_telling(events: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """One download is a lookup, a connection and a request: report the request (or the connection)."""
    kinds = {kind for kind, _ in events}
    hidden = {"dns", "connect"} if "http" in kinds else {"dns"} if "connect" in kinds else set()
    return {key: n for key, n in events.items() if key[0] not in hidden}


def iterate(watch: Watch, iterator: Any) -> Any:
    """Yield from `iterator` with `watch` current only while a chunk is being produced.

    For `LiveModel.stream`: between chunks the caller's own code runs, and is not predict's.
    """
    iterator = iter(iterator)
    while True:
        token = _CURRENT.set(watch)
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            _CURRENT.reset(token)
        yield item


async def within(watch: Watch, awaitable: Awaitable) -> Any:
    """Await `awaitable` with `watch` current: the event loop task of an async predict is watched too."""
    watch.idle_check = False
    token = _CURRENT.set(watch)
    try:
        return await awaitable
    finally:
        try:
            _CURRENT.reset(token)
        except ValueError:  # closed by the garbage collector in another context: nothing to undo there
            pass


_gpu_seen = False
_tf_has_gpu: bool | None = None  # asked once: the GPUs TensorFlow can see do not change in a process


def gpu_in_use() -> bool:
    """True once torch has initialised CUDA, or TensorFlow (imported) sees a GPU: waiting is not idling."""
    global _gpu_seen, _tf_has_gpu
    if _gpu_seen:
        return True
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            _gpu_seen = True
    except Exception:
        pass
    tf = sys.modules.get("tensorflow")
    if tf is not None and _tf_has_gpu is None:
        try:  # physical, not logical, devices: asking must not create TensorFlow's runtime context
            _tf_has_gpu = bool(tf.config.list_physical_devices("GPU"))
        except Exception:
            _tf_has_gpu = False
    _gpu_seen = _gpu_seen or bool(_tf_has_gpu)
    return _gpu_seen


class Warner:
    """Warn once per kind of finding (per code version: a fix that regresses warns again)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()

    def once(self, key: str) -> bool:
        """True the first time `key` (an output warning's text, say) is seen, then False."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True

    def first(self, findings: list[Finding]) -> list[Finding]:
        """The findings whose kind has not been warned about yet (and mark them warned)."""
        new = []
        with self._lock:
            for f in findings:
                if f.kind not in self._seen:
                    self._seen.add(f.kind)
                    new.append(f)
        return new

"""What crosses between the kernel and a worker process (worker.py), and in what form.

A worker answers with what the Truss server would send: an output as msgpack with numpy (the Truss
server's binary body, which keeps arrays as arrays; a pydantic output as its JSON), never as a pickle
of the model's own objects - the kernel does not have the worker's modules (or has another truss's
under the same names). Traces, reports, reload events and profiles are plain values and cross as
they are. An error crosses as its stage, message, file:line, the original exception's type and
message, and the worker's traceback of the model's own frames.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import STAGE_ERRORS, LoadError, ModelError, TrussLabError, describe
from .serialization import is_pydantic, truss_json, truss_json_check


class RemoteError(Exception):
    """The exception a model raised in a worker process, in the kernel: its type's name and message."""

    remote_type = "Exception"

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


_REMOTE_TYPES: dict[str, type] = {}


def _plain_args(exc: BaseException) -> tuple | None:
    """The exception's args when they are plain values (an OSError's errno, strerror and filename)."""
    plain = (str, int, float, bool, bytes, type(None))
    args = exc.args
    if isinstance(exc, OSError) and len(args) == 2 and exc.filename is not None:  # not in args: OSError's own
        args += (exc.filename,) + ((None, exc.filename2) if exc.filename2 is not None else ())
    return args if all(isinstance(a, plain) for a in args) else None


def remote_exception(module: str, name: str, message: str, args: tuple | None = None) -> BaseException:
    """An exception like the worker's: a builtin one as itself, with its args (`except KeyError:`,
    `err.errno`, `err.filename` work), any other as a RemoteError subclass of that name."""
    builtin = getattr(builtins, name, None) if module == "builtins" else None
    if isinstance(builtin, type) and issubclass(builtin, BaseException):
        for attempt in ((args,) if args is not None else ()) + ((message,),):
            try:
                return builtin(*attempt)
            except Exception:
                pass
    cls = _REMOTE_TYPES.get(name)
    if cls is None:
        cls = _REMOTE_TYPES[name] = type(name, (RemoteError,), {"remote_type": f"{module}.{name}", "__module__": "truss_lab.remote"})
    return cls(message)


# ------------------------------------------------------------------------------ outputs


class NotSendable(TrussLabError):
    """An output (or chunk) the Truss server could not send either."""


def encode(value: Any) -> bytes:
    """`value` as the Truss server's binary body: msgpack with numpy (a pydantic model as its JSON)."""
    from .serialization import truss_msgpack_serialize

    if is_pydantic(value):
        value = json.loads(truss_json(value))
    try:
        return truss_msgpack_serialize(value)
    except (TypeError, ValueError, OverflowError) as exc:
        bad = truss_json_check(value)
        where = f" at {bad[0]}: {bad[1]}" if bad else f": {describe(exc)}"
        raise NotSendable(f"the output cannot leave the worker process as the Truss server would send it{where}") from None


def decode(data: bytes) -> Any:
    from .serialization import truss_msgpack_deserialize

    return truss_msgpack_deserialize(data)


# ------------------------------------------------------------------------------ errors


def error_state(err: BaseException) -> dict:
    """A model error (or any exception) as plain data."""
    cause = err.__cause__ if isinstance(err, ModelError) else err
    state = {
        "class": type(err).__name__,
        "stage": getattr(err, "stage", None),
        "message": str(err),
        "location": getattr(err, "location", None),
        "traceback": err.model_traceback() if isinstance(err, ModelError) else None,
        "cause": (type(cause).__module__, type(cause).__name__, str(cause), _plain_args(cause)) if cause is not None else None,
    }
    return state


def error_from_state(state: dict, trace: Any = None) -> BaseException:
    """The kernel's ModelError (or TrussLabError) for an error_state from a worker."""
    cls = STAGE_ERRORS.get(state.get("stage") or "") if state["class"] in {c.__name__ for c in STAGE_ERRORS.values()} else None
    if cls is None and state["class"] == "LoadError":
        cls = LoadError
    if cls is None:
        return TrussLabError(state["message"])
    err = cls(state["message"], location=state.get("location"), trace=trace)
    err.remote_traceback = state.get("traceback")
    if state.get("cause") is not None:
        err.__cause__ = remote_exception(*state["cause"])
    return err


def bare_trace(trace: Any) -> Any:
    """A Trace without what only its process can use (the profiler of a profiled request)."""
    return dataclasses.replace(trace, profiler=None) if getattr(trace, "profiler", None) is not None else trace


# ------------------------------------------------------------------------------ the connection

BUFFER = 1 << 20  # a socket buffer of 1 MB each way: a 4 MB array crosses in a few system calls, not dozens


def dial(path: str, key: bytes) -> Any:
    """A connection to the worker listening at `path`, authenticated with `key` (as
    multiprocessing.connection.Client makes one, with wider socket buffers)."""
    from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _widen(s)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    conn = Connection(s.detach())
    answer_challenge(conn, key)
    deliver_challenge(conn, key)
    return conn


def widen(conn: Any) -> Any:
    """The same socket buffers for a connection the worker accepted."""
    s = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        _widen(s)
    finally:
        s.close()
    return conn


def _widen(s: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        s.setsockopt(socket.SOL_SOCKET, option, BUFFER)


# ------------------------------------------------------------------------------ the kernel's side


def scratch_dir(kind: str) -> str:
    """A new folder of this process's (`truss-lab-<kind>-<pid>-*` in the temporary folder, 0700), after
    removing those of processes that are gone (a kernel killed with SIGKILL removes nothing)."""
    prefix = f"truss-lab-{kind}-"
    for folder in Path(tempfile.gettempdir()).glob(prefix + "*-*"):
        pid = folder.name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def rewarn(caught: list[tuple]) -> None:
    """The warnings the worker's load gave, given here (a builtin or truss_lab category as itself)."""
    import builtins
    import importlib

    for module, name, message, filename, lineno in caught:
        category = getattr(builtins, name, None) if module == "builtins" else None
        if category is None and module.startswith("truss_lab"):
            category = getattr(importlib.import_module(module), name, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = UserWarning
        warnings.warn_explicit(message, category, filename, lineno)


class RemoteServer:
    """A server a worker started (`tr.serve()`): its URL, and stop()."""

    def __init__(self, url: str, stop: Callable[[], Any]):
        self.url, self._stop = url, stop

    def stop(self) -> None:
        self._stop()

    def __enter__(self) -> "RemoteServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<truss_lab server at {self.url} (in a worker process)>"

"""A worker process: one truss, loaded exactly as in the kernel (one truss a process), answering the
kernel's WorkerModel (worker.py) over a unix socket in a folder only this user can enter.

    python -m truss_lab.worker_process      # its options arrive pickled on stdin, which it then watches

It never outlives the kernel: on Linux the kernel's death kills it (PR_SET_PDEATHSIG), and anywhere
stdin reaching end-of-file (the kernel gone, even killed with SIGKILL) makes it exit. Each kernel
thread that calls gets a connection of its own, served by a thread of its own here, so requests run
concurrently and meet at the model's own lock, as HTTP requests meet on a Truss server.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sys
import threading
import weakref
from multiprocessing.connection import Listener
from typing import Any

from .errors import PostprocessError, TrussLabError
from .wire import NotSendable, bare_trace, encode, error_state, widen

# what the kernel may call on the model by name (the rest of the API is built from these in worker.py)
CALLS = frozenset({
    "reload", "watch", "unwatch", "watch_examples", "wait_for_examples", "wait_for_reload", "report", "clear_traces",
    "profile", "check", "schema", "is_healthy", "methods", "example", "bench",
})
GETS = frozenset({
    "name", "bundle", "version", "load_ms", "concurrency", "guard", "lock_available", "traces", "watching",
    "reload_history", "reload_count", "examples", "examples_diff", "pid", "path", "reload_drain_timeout",
})
SETS = frozenset({"concurrency", "guard", "reload_drain_timeout"})


def portable(value: Any) -> Any:
    """A value as it crosses to the kernel: traces without their profilers, reports and profiles with such traces."""
    import dataclasses

    from .profile import Profile
    from .trace import Report, Trace

    if isinstance(value, Trace):
        return bare_trace(value)
    if isinstance(value, list) and value and isinstance(value[0], Trace):
        return [bare_trace(t) for t in value]
    if isinstance(value, Profile):
        return dataclasses.replace(value, traces=[bare_trace(t) for t in value.traces])
    if isinstance(value, Report):
        report = dataclasses.replace(value, traces=[bare_trace(t) for t in value.traces])
        if getattr(value, "profile", None) is not None:
            report.profile = portable(value.profile)
        return report
    if hasattr(value, "exception") and hasattr(value, "summary"):  # a ReloadEvent: its error as text only
        return dataclasses.replace(value, exception=None) if getattr(value, "exception", None) is not None else value
    return value


def result_state(result: Any) -> dict:
    out: dict[str, Any] = {"trace": bare_trace(result.trace), "error": None, "output": None}
    if result.error is not None:
        out["error"] = error_state(result.error)
        return out
    try:
        out["output"] = encode(result.output)
    except NotSendable as exc:
        err = PostprocessError(f"{result.model_name}: {exc}", trace=result.trace)
        out["error"] = error_state(err)
    return out


class Worker:
    """The model of this process, and what the kernel's connections ask of it."""

    def __init__(self, live: Any, control: Any):
        self.live = live
        self.control = control
        self._send_lock = threading.Lock()
        self._servers: dict[int, Any] = {}
        self.subscribed: set[str] = set()
        self._asks: dict[int, list] = {}  # questions to the kernel (a chain's /hot-reload): id -> [Event, answer]

    def ask_kernel(self, kind: str, timeout: float = 3600.0) -> Any:
        """Ask the kernel (its WorkerModel's on_ask) and wait for its answer."""
        ident, done = id(threading.current_thread()), threading.Event()
        self._asks[ident] = [done, None]
        self.push("ask", (ident, kind))
        try:
            if not done.wait(timeout):
                raise TrussLabError(f"the kernel did not answer {kind!r} within {timeout:.0f} s")
            return self._asks[ident][1]
        finally:
            self._asks.pop(ident, None)

    def push(self, kind: str, payload: Any) -> None:
        with self._send_lock:
            try:
                self.control.send(("event", kind, portable(payload)))
            except (OSError, EOFError):
                pass

    def serve(self, conn: Any) -> None:
        """One kernel thread's connection: calls, answered in order, until the kernel closes it."""
        try:
            while True:
                try:
                    op, args, kwargs = conn.recv()
                except (EOFError, OSError):
                    return
                if op == "stream":
                    self._stream(conn, *args)
                    continue
                try:
                    reply = ("ok", self._answer(op, args, kwargs))
                except BaseException as exc:  # the kernel gets it as one line with its stage
                    reply = ("err", error_state(exc if isinstance(exc, TrussLabError) else _wrapped(exc)))
                payload = None
                if op == "run" and reply[0] == "ok" and reply[1]["output"] is not None:
                    payload, reply[1]["output"] = reply[1]["output"], len(reply[1]["output"])
                try:
                    conn.send(reply)
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    conn.send(("err", error_state(TrussLabError(f"{op}: its answer cannot cross to the kernel ({exc})"))))
                    continue
                if payload is not None:
                    conn.send_bytes(payload)
        finally:
            conn.close()

    def _answer(self, op: str, args: tuple, kwargs: dict) -> Any:
        live = self.live
        if op == "run":  # the output follows in a frame of its own (serve() sends it)
            return result_state(live.run(args[0], method=kwargs.get("method", "predict")))
        if op == "call" and args[0] in CALLS:
            value = getattr(live, args[0])(*args[1:], **kwargs)
            return None if args[0] == "watch" else portable(value)  # watch() answers with a handle of this process
        if op == "get" and args[0] in GETS:
            return portable(getattr(live, args[0]))
        if op == "set" and args[0] in SETS:
            setattr(live, args[0], args[1])
            return None
        if op == "answer":  # the kernel's answer to ask_kernel
            ask = self._asks.get(args[0])
            if ask is not None:
                ask[1] = args[1]
                ask[0].set()
            return None
        if op == "serve":
            if kwargs.pop("reload_in_kernel", False):  # a chain's entrypoint: /hot-reload reloads the chain
                from .reload import ReloadEvent

                def reload() -> Any:
                    ok, error = self.ask_kernel("reload")
                    return ReloadEvent(live.version, "methods" if ok else "failed", error=error)

                kwargs["reload"] = reload
            server = live.serve(*args, **kwargs)
            self._servers[id(server)] = server
            return server.url, id(server)
        if op == "stop_server":
            server = self._servers.pop(args[0], None)
            if server is not None:
                server.stop()
            return None
        if op == "subscribe":
            if args[0] not in self.subscribed:
                self.subscribed.add(args[0])
                if args[0] == "reload":
                    live.on_reload(lambda event: self.push("reload", event))
                elif args[0] == "examples":
                    live.on_examples(lambda diff: self.push("examples", diff))
            return None
        raise TrussLabError(f"a worker does not answer {op} {args[:1]}")

    def _stream(self, conn: Any, model_input: Any, method: str) -> None:
        """A stream, pulled chunk by chunk ("next"); "close" (or the kernel going away) closes it here."""
        chunks = self.live.open_stream(model_input, method=method)
        try:
            try:
                lead = next(chunks)
            except BaseException as exc:
                conn.send(("err", error_state(exc if isinstance(exc, TrussLabError) else _wrapped(exc))))
                return
            conn.send(("ok", lead))
            while True:
                try:
                    op, _, _ = conn.recv()
                except (EOFError, OSError):
                    return
                if op != "next":
                    conn.send(("ok", None))
                    return
                try:
                    chunk = next(chunks)
                except StopIteration:
                    conn.send(("end", None))
                    return
                except BaseException as exc:
                    conn.send(("err", error_state(exc if isinstance(exc, TrussLabError) else _wrapped(exc))))
                    return
                try:
                    conn.send(("chunk", encode(chunk)))
                except NotSendable as exc:
                    conn.send(("err", error_state(PostprocessError(f"{self.live.name}: a chunk: {exc}"))))
                    return
        finally:
            chunks.close()


def _warnings(caught: list) -> list[tuple]:
    return [(w.category.__module__, w.category.__qualname__, str(w.message), w.filename, w.lineno) for w in caught]


def _wrapped(exc: BaseException) -> TrussLabError:
    from .errors import describe

    err = TrussLabError(describe(exc))
    err.__cause__ = exc
    return err


class _Connections:
    """The kernel's connections to this process, so that a child it forks (a fork process pool in
    load()) closes them: the kernel sees this process's death as end-of-file, whatever it forked."""

    def __init__(self) -> None:
        self.open: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def add(self, conn: Any) -> None:
        self.open.add(conn)


_CONNECTIONS = _Connections()


def _close_in_child(listener: Any) -> None:
    """In a forked child: this process's sockets closed through their objects (so that nothing closes
    their file descriptors again once the child reuses the numbers), the socket file left in place."""
    for conn in list(_CONNECTIONS.open):
        try:
            conn.close()
        except OSError:
            pass
    try:
        listener._listener._socket.close()
    except (OSError, AttributeError):
        pass


def _hold_sigterm() -> None:
    """Around a fork: SIGTERM blocked in the forking thread (the child inherits the mask), so that one
    sent to a child before it let go of this process's handler waits for the default instead of being
    caught by the handler - whose pending flag the child's Python clears, losing it (a pool's
    terminate() right after its start would then never end that child)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def _release_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _default_sigterm() -> None:
    """In a forked child: SIGTERM is SIGTERM again (a pool's terminate() ends that child alone)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _release_sigterm()


_WORKER_PID = [os.getpid()]
_FOLDER: list[str] = []  # the socket's folder, which the kernel would remove: here when the kernel died


def _end_all(*_: Any) -> None:
    """This process and every process it started (its process group: the kernel starts it in a session
    of its own), at once: a pool the model left running never outlives it. Its socket's folder goes
    too (a kernel killed with SIGKILL cannot remove it). In a forked child (which inherits this
    handler) SIGTERM is SIGTERM: a pool's terminate() ends that child, not the worker's process group."""
    if os.getpid() != _WORKER_PID[0]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    for folder in _FOLDER:
        shutil.rmtree(folder, ignore_errors=True)
    os.killpg(0, signal.SIGKILL)


def _die_with_parent() -> None:
    """Linux: the kernel's death ends this process and its children, whatever killed the kernel (the
    parent-death signal is SIGTERM, whose handler ends the process group)."""
    signal.signal(signal.SIGTERM, _end_all)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_when_parent_goes(fd: int) -> None:
    """Read stdin's pipe to its end - the kernel gone - and end. With os.read on a file descriptor of
    its own: a thread blocked in sys.stdin's reader holds its lock, and a child forked meanwhile (a fork
    pool) would deadlock when multiprocessing closes its stdin."""
    try:
        while os.read(fd, 64):
            pass
    except OSError:
        pass
    _end_all()


def main() -> None:
    for name in filter(None, os.environ.pop("TRUSS_LAB_PRELOAD", "").split(",")):  # while the kernel starts others
        try:
            __import__(name)
        except Exception:
            pass  # the model's own import says what is wrong, at its line
    try:
        opts = pickle.load(sys.stdin.buffer)
    except EOFError:  # spawned for a truss the kernel no longer starts
        return
    _FOLDER.append(os.path.dirname(opts["socket"]))
    _die_with_parent()
    if os.getppid() != opts["parent"]:  # the kernel died before the line above took effect
        _end_all()
    threading.Thread(target=_exit_when_parent_goes, args=(os.dup(0),), name="truss-lab-parent", daemon=True).start()
    os.environ.update(opts.get("env") or {})
    import warnings

    from .guard import LockMisuseWarning
    from .trace import OutputWarning

    for quiet in (OutputWarning, LockMisuseWarning):  # the kernel gives them, from each request's trace
        warnings.filterwarnings("ignore", category=quiet)
    listener = Listener(opts["socket"], family="AF_UNIX", authkey=opts["authkey"])
    os.register_at_fork(before=_hold_sigterm, after_in_parent=_release_sigterm,
                        after_in_child=lambda: (_close_in_child(listener), _default_sigterm()))
    control = listener.accept()
    _CONNECTIONS.add(control)
    from .errors import describe
    from .live import LiveModel
    from .bundle import read_bundle

    if opts.get("chainlet"):
        from .chainlet import mount

        mount(os.path.join(opts["path"], "packages"))
    with warnings.catch_warnings(record=True) as caught:  # what load() warns: the kernel gives it
        warnings.simplefilter("default")
        try:
            live = LiveModel(read_bundle(opts["path"]), **opts["load"])
        except TrussLabError as exc:
            control.send(("failed", error_state(exc), _warnings(caught)))
            return
        except BaseException as exc:  # what the model's code raised outside a stage
            control.send(("failed", error_state(TrussLabError(f"loading {opts['path']} failed: {describe(exc)}")), _warnings(caught)))
            return
    if opts.get("chainlet"):
        from .chainlet import adopt

        adopt(live)
    worker = Worker(live, control)
    control.send(("ready", {"pid": os.getpid()}, _warnings(caught)))

    def accept() -> None:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):
                continue
            _CONNECTIONS.add(conn)
            threading.Thread(target=worker.serve, args=(widen(conn),), name="truss-lab-conn", daemon=True).start()

    threading.Thread(target=accept, name="truss-lab-accept", daemon=True).start()
    try:
        while True:
            try:
                message = control.recv()
            except (EOFError, OSError):
                break
            if message[0] == "close":
                break
    finally:
        live.close()
        try:
            with worker._send_lock:
                control.send(("closed", None))
        except (OSError, EOFError):
            pass
        os._exit(0)


if __name__ == "__main__":
    main()

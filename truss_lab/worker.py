"""A truss in a worker process, behind the LiveModel API: every truss but the one the kernel holds.

    tr = truss_lab.load("other-truss")            # the kernel already holds one: this runs in a worker
    tr = truss_lab.load("t", process="worker")    # or ask for it
    tr.pid, tr.process                            # where it runs
    tr.restart()                                  # after the worker died (or to start it fresh)

Truss runs one truss per process; so does truss_lab (loader.py). The worker (worker_process.py) is a
Python child holding just that truss, loaded as the kernel would load it. What comes back is what the
Truss server would send - an output as msgpack with numpy (arrays stay arrays), never the model's own
objects - and plain values: traces, reports, reload events, profiles. A model error comes back as
its stage, file:line and the worker's traceback of the model's frames. A worker that dies is one
line with its exit code or signal; the kernel never waits on a dead one; it never outlives the kernel.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .batch import Watching, bench, predict_batch
from .bundle import read_bundle
from .errors import TrussLabError
from .runner import DEFAULT_TRACE_CAPACITY
from .trace import Result
from .wire import RemoteServer, decode, dial, error_from_state, rewarn, scratch_dir


class WorkerDied(TrussLabError):
    """The worker process of a truss is gone (it crashed, ran out of memory, or was killed)."""


def _setting(name: str, convert: Callable[[Any], Any] = lambda value: value) -> property:
    """A setting of the worker's LiveModel, read and set there (worker_process.SETS)."""
    return property(lambda self: self._get(name), lambda self, value: self._rpc("set", name, convert(value)))


class WorkerModel:
    """A truss loaded in a worker process, with LiveModel's API (see the module docstring)."""

    process = "worker"
    examples_source: Path | None = None  # where its examples come from, when not its folder's examples.yaml (a chain's entrypoint)

    def __init__(self, path: str | os.PathLike, *, concurrency: int | None = None, secrets: Mapping[str, str] | None = None,
                 environment: Any = None, trace_capacity: int = DEFAULT_TRACE_CAPACITY, guard: bool = True,
                 chainlet: bool = False, env: Mapping[str, str] | None = None, spawned: subprocess.Popen | None = None):
        self.path = Path(path).resolve()
        self._load = {"concurrency": concurrency, "secrets": dict(secrets or {}), "environment": environment,
                      "trace_capacity": trace_capacity, "guard": guard}
        self._chainlet, self._env = chainlet, dict(env or {})
        self._on_reload: list[Callable] = []
        self._on_examples: list[Callable] = []
        self._on_close: list[Callable] = []
        self._on_ask: dict[str, Callable[[], Any]] = {}  # the worker's questions to the kernel (serve(on_hot_reload=))
        self._closed = False
        from .guard import Warner

        self._warner = Warner()
        self._bundle = read_bundle(self.path)
        self._start(spawned)

    # ------------------------------------------------------------------ the process

    def _start(self, spawned: subprocess.Popen | None = None) -> None:
        self._dir = scratch_dir("worker")  # 0700: only this user reaches the socket
        self._socket = os.path.join(self._dir, "s")
        self._key = os.urandom(32)
        self._local = threading.local()
        self._proc = spawned or spawn()
        opts = {"socket": self._socket, "authkey": self._key, "path": str(self.path), "load": self._load,
                "parent": os.getpid(), "chainlet": self._chainlet, "env": self._env}
        try:
            self._proc.stdin.write(pickle.dumps(opts))
            self._proc.stdin.flush()  # stdin stays open: its end-of-file tells the worker the kernel is gone
            self._control = self._connect()
            message = self._recv(self._control)  # load() runs now: it may take minutes
        except BaseException:
            self._kill()
            raise
        rewarn(message[2])
        if message[0] != "ready":
            self._kill()
            raise error_from_state(message[1])
        self.pid = message[1]["pid"]
        self._bundle = self._get("bundle")
        # the process ends with this object: a notebook that drops it (re-runs the cell) leaves no worker
        self._reaper = weakref.finalize(self, _reap, self._proc, self._dir)
        self._events = threading.Thread(target=_listen, args=(weakref.ref(self), self._control),
                                        name=f"truss-lab-worker[{self._bundle.model_name}]", daemon=True)
        self._events.start()
        self._rpc("subscribe", "reload")  # keeps the bundle here fresh, and feeds on_reload callbacks
        if self._on_examples:
            self._rpc("subscribe", "examples")

    def _connect(self) -> Any:
        deadline = time.monotonic() + 60
        while True:
            if self._proc.poll() is not None:
                raise self._death()
            try:
                return dial(self._socket, self._key)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TrussLabError(f"{self.path}: its worker process did not start within 60 s") from None
                time.sleep(0.01)

    def _recv(self, conn: Any) -> Any:
        """A message from the worker: its death is end-of-file here (the worker's forked children close
        its connections), so an error, never a hang."""
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._death() from None

    def _death(self) -> TrussLabError:
        if self._closed:  # a call that was in flight when close() stopped the process
            return self._closed_error()
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # what it started (a pool) goes with it
        if code is None:
            how = "stopped answering"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        name = self._bundle.model_name
        return WorkerDied(f"{name}: its worker process (pid {self._proc.pid}) {how}; tr.restart() starts it again")

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _closed_error(self) -> TrussLabError:
        return TrussLabError(f"{self._bundle.model_name}: closed (tr.close() was called); load it again")

    def _rpc(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise self._closed_error()
        if self._proc.poll() is not None:
            raise self._death()
        conn = self._conn()
        try:
            conn.send((op, args, kwargs))
            reply = self._recv(conn)
            if reply[0] == "ok" and op == "run" and reply[1]["output"] is not None:
                reply[1]["output"] = conn.recv_bytes()  # the output's own frame: no pickle around it
        except BaseException:  # an interrupted call leaves its reply unread: this connection is done
            self._local.conn = None
            conn.close()
            if isinstance(sys.exc_info()[1], (EOFError, OSError)):
                raise self._death() from None
            raise
        if reply[0] == "err":
            raise error_from_state(reply[1])
        return reply[1]

    def _get(self, name: str) -> Any:
        return self._rpc("get", name)

    def _kill(self) -> None:
        """The worker and whatever it started (a pool its model left running): its process group."""
        reaper = getattr(self, "_reaper", None)
        if reaper is not None:
            reaper.detach()
        _reap(self._proc, self._dir)

    def restart(self) -> "WorkerModel":
        """Start the worker again (after it died, or to begin fresh): a new process, load() again."""
        if self._closed:
            raise TrussLabError(f"{self.name}: closed (tr.close() was called); load it again with truss_lab.load")
        self._stop_process()
        self._start()
        return self

    def _stop_process(self) -> None:
        try:
            if self._proc.poll() is None:
                self._control.send(("close",))
                self._proc.wait(30)
        except (OSError, EOFError, subprocess.TimeoutExpired, AttributeError):
            pass
        self._kill()

    def close(self) -> None:
        """Stop the worker process (its servers, its watcher, its model); every later call raises."""
        if self._closed:
            return
        self._closed = True
        self._stop_process()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:
                warnings.warn(f"{self.name}: an on_close callback failed: {exc}", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> "WorkerModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid {self._proc.pid}"
        return f"<LiveModel {self.name!r} in a worker process ({state}) from {self.path}>"

    # ------------------------------------------------------------------ requests

    def run(self, model_input: Any, *, request: Any = None, method: str = "predict", profiler: Any = None) -> Result:
        """As LiveModel.run, in the worker; the output is what the Truss server would send."""
        if request is not None or profiler is not None:
            raise TrussLabError(f"{self.name} runs in a worker process: request= and profiler= stay in the kernel "
                                f"(tr.serve() serves real requests; tr.profile() profiles in the worker)")
        state = self._rpc("run", model_input, method=method)
        trace = state["trace"]
        error = error_from_state(state["error"], trace) if state["error"] else None
        output = decode(state["output"]) if state["output"] is not None else None
        if trace.warnings or trace.findings:
            self._warn(trace)
        return Result(model_input, output, trace, error, self.name, (self._bundle.data_dir, self._bundle.path))

    def _warn(self, trace: Any) -> None:
        """The warnings the request gave in the worker (which keeps them quiet there), given here, each
        once per code version, at the model's own method: an OutputWarning once per message, a
        LockMisuseWarning once per kind."""
        from .guard import LockMisuseWarning
        from .trace import OutputWarning

        for message in trace.warnings:
            if self._warner.once(message):
                # at the stage that made it: a stream's own, else the last stage (postprocess, if it has one)
                self._warn_at(message, OutputWarning, "predict" if ": predict yielded " in message else "postprocess")
        for f in self._warner.first(trace.findings):
            self._warn_at(f"{self.name}: {f.message}", LockMisuseWarning, "predict")

    def _warn_at(self, message: str, category: type[Warning], method: str) -> None:
        path = self._bundle.model_file
        lines = path.read_text().splitlines()
        line = next((i for i, text in enumerate(lines, 1) if f"def {method}" in text), None)
        line = line or next((i for i, text in enumerate(lines, 1) if "def predict" in text), 1)
        warnings.warn_explicit(message, category, str(path), line)

    def predict(self, model_input: Any, *, request: Any = None) -> Result:
        return self.run(model_input, request=request).raise_for_error()

    def call(self, method: str, body: Any, *, request: Any = None) -> Result:
        return self.run(body, request=request, method=method).raise_for_error()

    def stream(self, model_input: Any, *, request: Any = None, method: str = "predict") -> Iterator[Any]:
        chunks = self.open_stream(model_input, request=request, method=method)
        next(chunks)
        yield from chunks

    def open_stream(self, model_input: Any, *, request: Any = None, method: str = "predict") -> Iterator[Any]:
        """As LiveModel.open_stream: chunk by chunk from the worker, on a connection of its own;
        closing it (or dropping it) closes the generator in the worker."""
        if request is not None:
            raise TrussLabError(f"{self.name} runs in a worker process: request= stays in the kernel (tr.serve() serves real requests)")
        conn = self._connect()

        def chunks() -> Iterator[Any]:
            done = False
            try:
                conn.send(("stream", (model_input, method), {}))
                tag, lead = self._recv(conn)
                if tag == "err":
                    done = True
                    raise error_from_state(lead)
                yield lead
                while True:
                    conn.send(("next", (), {}))
                    tag, value = self._recv(conn)
                    if tag == "end":
                        done = True
                        return
                    if tag == "err":
                        done = True
                        raise error_from_state(value)
                    yield decode(value)
            finally:
                try:
                    if not done:
                        conn.send(("close", (), {}))
                        conn.recv()
                except (OSError, EOFError):
                    pass
                conn.close()

        return chunks()

    # ------------------------------------------------------------------ what the worker's model says

    name = property(lambda self: self._bundle.model_name)
    bundle = property(lambda self: self._bundle)
    version = property(lambda self: self._get("version"))
    load_ms = property(lambda self: self._get("load_ms"))
    lock_available = property(lambda self: self._get("lock_available"))
    traces = property(lambda self: self._get("traces"))
    watching = property(lambda self: self._get("watching"))
    reload_history = property(lambda self: self._get("reload_history"))
    reload_count = property(lambda self: self._get("reload_count"))
    examples_diff = property(lambda self: self._get("examples_diff"))
    roots = property(lambda self: [self._bundle.path])

    @property
    def examples(self) -> dict[str, Any]:
        return {e.name: e.input for e in self._bundle.examples}

    def example(self, name: str) -> Any:
        return self._bundle.example(name)

    concurrency = _setting("concurrency")
    guard = _setting("guard")
    reload_drain_timeout = _setting("reload_drain_timeout", float)

    def _in_kernel_only(self, what: str) -> TrussLabError:
        return TrussLabError(f"{self.name} runs in a worker process (pid {self.pid}): {what} lives there. "
                             f"Load it with process='kernel' (close the truss the kernel holds first) to reach it")

    @property
    def model(self) -> Any:
        raise self._in_kernel_only("its model object")

    @property
    def serving(self) -> Any:
        raise self._in_kernel_only("its serving version (model instance, modules)")

    def on_retire(self, callback: Callable[[Any], None]) -> None:
        raise self._in_kernel_only("the model instance a full reload replaces")

    def run_stage(self, stage: str, x: Any) -> Any:
        raise self._in_kernel_only("running one stage alone (a split deployment's)")

    def methods(self) -> list[str]:
        return self._rpc("call", "methods")

    def schema(self) -> dict | None:
        return self._rpc("call", "schema")

    def is_healthy(self) -> bool | None:
        return self._rpc("call", "is_healthy")

    def report(self, last: int | None = None):
        return self._rpc("call", "report", last)

    def clear_traces(self) -> None:
        self._rpc("call", "clear_traces")

    def reload(self, full: bool = False):
        return self._rpc("call", "reload", full)

    def watch(self, examples: bool | list[str] = False) -> Watching:
        self._rpc("call", "watch", examples)
        return Watching(self)

    def watch_examples(self, examples: bool | list[str] = True) -> None:
        self._rpc("call", "watch_examples", examples)

    def unwatch(self) -> None:
        self._rpc("call", "unwatch")

    def wait_for_reload(self, since: int, timeout: float = 10.0):
        return self._rpc("call", "wait_for_reload", since, timeout)

    def wait_for_examples(self, timeout: float = 60.0) -> bool:
        return self._rpc("call", "wait_for_examples", timeout)

    def on_reload(self, callback: Callable) -> Callable[[], None]:
        self._on_reload.append(callback)
        return lambda: self._on_reload.remove(callback) if callback in self._on_reload else None

    def on_examples(self, callback: Callable) -> Callable[[], None]:
        if not self._on_examples:
            self._rpc("subscribe", "examples")
        self._on_examples.append(callback)
        return lambda: self._on_examples.remove(callback) if callback in self._on_examples else None

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def profile(self, model_input: Any = None, n: int = 1, **kwargs: Any):
        """As LiveModel.profile, run in the worker (where the model's frames are)."""
        return self._rpc("call", "profile", model_input, n, **kwargs)

    def check(self, inputs=None, **kwargs):
        kwargs.pop("note", None)
        return self._rpc("call", "check", inputs, **kwargs)

    def serve(self, host: str = "127.0.0.1", port: int = 0, max_body: int | None = None,
              on_hot_reload: Callable[[], Any] | None = None):
        """HTTP with the Truss server's routes, served by the worker itself: `.url`, `.stop()`.
        `on_hot_reload`: what POST /hot-reload runs here in the kernel (a chain's reload) - it returns a
        ReloadEvent - instead of the worker's own reload."""
        if on_hot_reload is not None:
            self._on_ask["reload"] = on_hot_reload
        url, ident = self._rpc("serve", host, port, max_body, reload_in_kernel=on_hot_reload is not None)
        return RemoteServer(url, lambda: self._rpc("stop_server", ident) if self._proc.poll() is None else None)

    def predict_batch(self, inputs: Any, workers: int = 8) -> list[Result]:
        return predict_batch(self, inputs, workers)  # kernel threads, each its own connection

    def bench(self, inputs: Any = None, n: int = 100, concurrency: int = 8, **kwargs: Any):
        """As LiveModel.bench: `concurrency` kernel threads send `n` requests to the worker, whose lock
        they meet there (`profile=True`: the bench runs inside the worker, where it can be profiled)."""
        if kwargs.get("profile"):
            return self._rpc("call", "bench", inputs, n, concurrency, progress=False, label=kwargs.get("label", ""), profile=True)
        return bench(self, inputs, n, concurrency, **kwargs)

    def _cpu_s(self) -> float | None:
        """CPU seconds the model used so far: the worker's, and this process's share of sending to it."""
        from .cpu import process_cpu_s

        worker, here = process_cpu_s(self._proc.pid), process_cpu_s()
        return None if worker is None else worker + here


def spawn(preload: tuple[str, ...] = ()) -> subprocess.Popen:
    """A worker process, waiting for the truss it will hold (its options, on stdin); it imports
    `preload` (a chainlet's truss_chains and web server) meanwhile, so that a chain's chainlets import
    side by side, as a deployed chain's start at once. A session of its own: the worker and what it
    starts are one process group, ended together."""
    env = {**os.environ, "TRUSS_LAB_PRELOAD": ",".join(preload)} if preload else None
    return subprocess.Popen([sys.executable, "-m", "truss_lab.worker_process"], stdin=subprocess.PIPE,
                            start_new_session=True, env=env)


def _reap(proc: subprocess.Popen, folder: str) -> None:
    """End a worker and whatever it started (a pool its model left running: its process group), and
    remove its socket's folder."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


def _answer(tr: WorkerModel, ident: int, kind: str) -> None:
    """The kernel's answer to a worker's question: (ok, error) of what `on_ask[kind]` returned."""
    try:
        event = tr._on_ask[kind]()
        answer = (bool(event.ok), event.error)
    except Exception as exc:
        answer = (False, f"{type(exc).__name__}: {exc}")
    with contextlib.suppress(TrussLabError):
        tr._rpc("answer", ident, answer)


def _listen(ref: "weakref.ref[WorkerModel]", control: Any) -> None:
    """The worker's pushes (reload events, examples diffs) for the callbacks registered in the kernel;
    holding the WorkerModel only while it handles one, so a dropped one is collected and its worker ends."""
    while True:
        try:
            message = control.recv()
        except (EOFError, OSError):
            return
        tr = ref()
        if tr is None or message[0] != "event":
            return
        _, kind, payload = message
        if kind == "ask":  # answered on a thread of its own: the question (a chain's reload) may take a while
            threading.Thread(target=_answer, args=(tr, *payload), name="truss-lab-ask", daemon=True).start()
            del tr  # not held while waiting for the next message
            continue
        if kind == "reload":
            try:
                tr._bundle = tr._get("bundle")
            except TrussLabError:
                pass
        for callback in list(tr._on_reload if kind == "reload" else tr._on_examples):
            try:
                callback(payload)
            except Exception as exc:  # a display callback must never stop the listener
                warnings.warn(f"truss_lab {kind} callback {callback!r} raised {type(exc).__name__}: {exc}", RuntimeWarning)
        del tr

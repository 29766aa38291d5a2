"""LiveModel: a loaded Truss answering requests as a Truss server would, with a Trace per request.

    preprocess  ->  [lock]  predict  [/lock]  ->  postprocess

Only predict holds the lock, a semaphore of `runtime.predict_concurrency` slots. Everything else runs
concurrently in the caller's thread. A request reads the serving code once, when it starts, so a
reload (reload.py) never changes the code under a request that is already running.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import threading
import types
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from . import guard as lockguard
from . import loader
from .aio import LoopThread
from .bundle import Bundle, read_bundle, resolve_secrets, validate_concurrency
from .errors import STAGE_ERRORS, LoadError, ModelError, TrussLabError, describe
from .jsoncheck import first_non_json
from .lock import FairLock
from .trace import BenchReport, Report, Trace

if TYPE_CHECKING:
    from .reload import ReloadEvent

DEFAULT_TRACE_CAPACITY = 1000


class OutputWarning(UserWarning):
    """The output could not be sent by a Truss server as JSON (the call still succeeds)."""


@dataclass(frozen=True)
class Serving:
    """One version of the model code, bound to a live instance. Replaced whole, never mutated."""

    version: int
    instance: Any
    module: types.ModuleType
    model_cls: type
    preprocess: Callable | None
    predict: Callable
    postprocess: Callable | None
    streaming: bool

    @classmethod
    def bind(cls, version: int, instance: Any, module, model_cls: type, methods: loader.ModelMethods) -> "Serving":
        return cls(
            version=version,
            instance=instance,
            module=module,
            model_cls=model_cls,
            preprocess=_bound(model_cls, instance, "preprocess") if methods.has_preprocess else None,
            predict=_bound(model_cls, instance, "predict"),
            postprocess=_bound(model_cls, instance, "postprocess") if methods.has_postprocess else None,
            streaming=methods.predict_is_generator,
        )


def _bound(model_cls: type, instance: Any, name: str) -> Callable:
    """`model_cls.name` bound to `instance` (the class of this version, whatever instance.__class__ is)."""
    attr = inspect.getattr_static(model_cls, name)
    if isinstance(attr, (staticmethod, classmethod)):
        return getattr(model_cls, name)
    return types.MethodType(getattr(model_cls, name), instance)


@dataclass
class Result:
    """One request: what went in, what came out, and where the time went."""

    input: Any
    output: Any
    trace: Trace
    error: ModelError | None = None
    model_name: str = ""
    search_dirs: tuple[Path, ...] = ()  # where relative image paths in input/output are shown from

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def version(self) -> int:
        return self.trace.version

    def raise_for_error(self) -> "Result":
        if self.error is not None:
            raise self.error
        return self

    def __repr__(self) -> str:
        from . import render

        return render.result_text(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        from . import render

        return render.bundle(self)


class LiveModel:
    """A Truss loaded in this process. Thread-safe: call it from as many threads as you like."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        concurrency: int | None = None,
        secrets: Mapping[str, str] | None = None,
        environment: Any = None,
        trace_capacity: int = DEFAULT_TRACE_CAPACITY,
        guard: bool = True,
    ):
        self.bundle = bundle
        self._warner = lockguard.Warner()
        self.guard = guard
        self._secret_overrides = dict(secrets or {})
        self.environment = environment
        self._loop = LoopThread(name=f"truss-lab-loop[{bundle.model_name}]")
        self._ids = itertools.count(1)
        self._traces: collections.deque[Trace] = collections.deque(maxlen=trace_capacity)
        self._concurrency_override = concurrency
        self.concurrency = bundle.predict_concurrency if concurrency is None else concurrency
        self._serving: Serving | None = None
        self._servers: list[Any] = []  # HTTP servers started by serve(); close() stops them
        self.load_ms: float = 0.0
        self.roots = loader.user_roots(bundle)
        self._start()

    # ------------------------------------------------------------------ loading

    def _build(self, bundle: Bundle, version: int) -> tuple[Serving, float]:
        """Import, construct and load() one version of the model; raise LoadError on any failure."""
        loader.apply_environment_variables(bundle)
        with loader.imported(bundle, version) as module:
            model_cls = loader.model_class(bundle, module)
            methods = loader.ModelMethods.check(bundle, model_cls)  # before load(): it may take minutes
            kwargs = loader.model_kwargs(bundle, resolve_secrets(bundle, self._secret_overrides), self.environment)
            instance = loader.build_instance(bundle, model_cls, kwargs)
            load_ms = loader.run_load(bundle, instance, self._loop.run)
            return Serving.bind(version, instance, module, model_cls, methods), load_ms

    def _rebind(self, bundle: Bundle, version: int) -> Serving:
        """Import a new version of the code and bind it to the live instance's state (no load())."""
        with loader.imported(bundle, version) as module:
            model_cls = loader.model_class(bundle, module)
            methods = loader.ModelMethods.check(bundle, model_cls)
            instance = share_state(self._serving.instance, model_cls, bundle)
            return Serving.bind(version, instance, module, model_cls, methods)

    def _switch(self, serving: Serving, bundle: Bundle) -> None:
        """Make `serving` the code for every request that starts from now on (one reference swap)."""
        self.bundle = bundle
        if self._concurrency_override is None and bundle.predict_concurrency != self._lock_size:
            self.concurrency = bundle.predict_concurrency
        self._serving = serving
        self._warner.reset()  # a new version warns again about a misuse it still has

    def _start(self) -> None:
        from .reload import Reloader

        try:
            self._serving, self.load_ms = self._build(self.bundle, 1)
            self.reloader = Reloader(self)
        except BaseException:
            self._loop.close()
            raise

    # ------------------------------------------------------------------ hot reload

    def reload(self, full: bool = False) -> "ReloadEvent":
        """Reload edited code now: swap changed methods, or rebuild and load() when needed (full=True forces it)."""
        return self.reloader.reload(full=full)

    def watch(self) -> "_Watching":
        """Reload on every save, from a background thread. Also a context manager: `with tr.watch(): ...`."""
        self.reloader.watch()
        return _Watching(self)

    def unwatch(self) -> None:
        self.reloader.unwatch()

    @property
    def watching(self) -> bool:
        return self.reloader.watching

    def on_reload(self, callback: Callable[["ReloadEvent"], None]) -> Callable[[], None]:
        """Call `callback(event)` after each reload; returns a function that unsubscribes it."""
        return self.reloader.on_reload(callback)

    @property
    def reload_history(self) -> list["ReloadEvent"]:
        return list(self.reloader.history)

    @property
    def reload_count(self) -> int:
        """How many reloads (of any kind, failed ones too) have happened; see `wait_for_reload`."""
        return self.reloader.count

    def wait_for_reload(self, since: int, timeout: float = 10.0) -> "ReloadEvent":
        """Block until the watcher has reloaded after `since` (a `reload_count` read before your edit).

            n = tr.reload_count
            path.write_text(new_code)
            event = tr.wait_for_reload(since=n)
        """
        event = self.reloader.wait(since, timeout)
        if event is None:
            hint = "" if self.watching else " (the watcher is off: tr.watch() or %truss watch on)"
            raise TrussLabError(f"{self.name}: no reload within {timeout:g} s{hint}")
        return event

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self.bundle.model_name

    @property
    def path(self) -> Path:
        return self.bundle.path

    @property
    def model(self) -> Any:
        """The live Model instance (its loaded weights, its state)."""
        return self._serving.instance

    @property
    def version(self) -> int:
        return self._serving.version

    @property
    def serving(self) -> Serving:
        return self._serving

    @property
    def concurrency(self) -> int:
        """Lock size: how many predict() calls may run at once (runtime.predict_concurrency)."""
        return self._lock_size

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        try:
            value = validate_concurrency(value)
        except ValueError as exc:
            raise TrussLabError(f"concurrency {exc}") from None
        self._lock_size = value
        # Requests already waiting keep the semaphore they hold a reference to; new ones get this.
        self._lock = FairLock(value)

    @property
    def guard(self) -> bool:
        """Whether the lock-misuse guard watches predict (see guard.py). Turn off with `tr.guard = False`."""
        return self._guard

    @guard.setter
    def guard(self, on: bool) -> None:
        if on:
            lockguard.install()
        self._guard = bool(on)

    @property
    def examples(self) -> dict[str, Any]:
        return {e.name: e.input for e in self.bundle.examples}

    def example(self, name: str) -> Any:
        return self.bundle.example(name)

    @property
    def traces(self) -> list[Trace]:
        return list(self._traces)

    def clear_traces(self) -> None:
        self._traces.clear()

    def report(self, last: int | None = None) -> Report:
        traces = self.traces
        if last is not None:
            traces = traces[-last:]
        return Report.from_traces(traces, self._lock_size)

    def methods(self) -> list[str]:
        s = self._serving
        found = ["load"] if callable(getattr(s.model_cls, "load", None)) else []
        found += [m for m in ("preprocess", "predict", "postprocess") if getattr(s, m) is not None]
        return found

    def __repr__(self) -> str:
        return (
            f"<LiveModel {self.name!r} v{self.version} from {self.path} | "
            f"{self._serving.model_cls.__name__}, lock {self._lock_size}, load {self.load_ms:.0f} ms>"
        )

    # ------------------------------------------------------------------ requests

    def predict(self, model_input: Any) -> Result:
        """Run the three stages; raise PreprocessError / PredictError / PostprocessError on failure."""
        return self.run(model_input).raise_for_error()

    def run(self, model_input: Any) -> Result:
        """Run the three stages; a model error is returned in `Result.error`, not raised."""
        s = self._serving
        t = Trace(next(self._ids), s.version, threading.current_thread().name, perf_counter())
        stage = "preprocess"
        output = None
        error = None
        try:
            x = self._preprocess(s, model_input, t)
            stage = "predict"
            x = self._locked_predict(s, x, t)
            stage = "postprocess"
            output = self._postprocess(s, x, t)
            self._check_output(output, t)
        except Exception as exc:
            error = self._fail(t, stage, exc)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: record, then let it through
            t.error, t.error_stage = describe(exc), stage
            raise
        finally:
            t.end = perf_counter()
            self._traces.append(t)
        return Result(model_input, output, t, error, self.bundle.model_name, (self.bundle.data_dir, self.bundle.path))

    def _preprocess(self, s: Serving, x: Any, t: Trace) -> Any:
        if s.preprocess is None:
            return x
        t.pre_start = perf_counter()
        try:
            return self._call(s.preprocess, x)
        finally:
            t.pre_end = perf_counter()

    def _postprocess(self, s: Serving, x: Any, t: Trace) -> Any:
        if s.postprocess is None:
            return x
        t.post_start = perf_counter()
        try:
            return self._call(s.postprocess, x)
        finally:
            t.post_end = perf_counter()

    def run_stage(self, stage: str, x: Any) -> tuple[Any, ModelError | None]:
        """Run one stage alone, as a split deployment does (ray_serve.py): (value, None) or (None, error).

        predict runs under the lock; a missing preprocess/postprocess passes its input through. Each
        call is traced (only that stage's timestamps are set).
        """
        steps = {"preprocess": self._preprocess, "predict": self._locked_predict, "postprocess": self._postprocess}
        if stage not in steps:
            raise TrussLabError(f"stage must be one of {', '.join(steps)}, got {stage!r}")
        s = self._serving
        t = Trace(next(self._ids), s.version, threading.current_thread().name, perf_counter())
        try:
            return steps[stage](s, x, t), None
        except Exception as exc:
            return None, self._fail(t, stage, exc)
        finally:
            t.end = perf_counter()
            self._traces.append(t)

    def _locked_predict(self, s: Serving, x: Any, t: Trace) -> Any:
        lock = self._lock  # a concurrency change swaps the semaphore; release the one we took
        t.lock_requested = perf_counter()
        try:
            with lock:  # `with`: no instruction between acquiring and the guaranteed release
                t.lock_acquired = t.predict_start = perf_counter()
                watch = lockguard.begin() if self._guard else None
                token = lockguard.enter(watch) if watch is not None else None
                try:
                    y = self._call(s.predict, x, watch)
                    if _is_stream(y):
                        y = self._drain(y, t, watch)
                    return y
                finally:
                    t.predict_end = perf_counter()
                    if watch is not None:
                        lockguard.leave(token)
                        self._found(s, t, lockguard.end(watch, t.predict_ms))
        finally:
            if t.lock_acquired is not None:
                t.lock_released = perf_counter()

    def _call(self, fn: Callable, x: Any, watch: lockguard.Watch | None = None) -> Any:
        y = fn(x)
        if inspect.isawaitable(y):
            y = self._loop.run(y if watch is None else lockguard.within(watch, y))
        return y

    def _found(self, s: Serving, t: Trace, findings: list[lockguard.Finding]) -> None:
        """Attach lock-misuse findings to the trace; warn once per kind, pointing at the user's predict."""
        if not findings:
            return
        t.findings = findings
        code = getattr(getattr(s.model_cls, "predict", None), "__code__", None)
        where = (code.co_filename, code.co_firstlineno) if code else (str(self.bundle.model_file), 1)
        for f in self._warner.first(findings):
            warnings.warn_explicit(
                f"{self.bundle.model_name}: {f.message}", lockguard.LockMisuseWarning, *where
            )

    def _drain(self, stream: Any, t: Trace, watch: lockguard.Watch | None = None) -> Any:
        """Consume a streaming predict inside the lock (as a Truss server does) and join the chunks."""
        chunks: list[Any] = []
        for chunk in self._iterate(stream, watch):
            if t.first_chunk is None:
                t.first_chunk = perf_counter()
            chunks.append(chunk)
        t.chunks = len(chunks)
        return join_chunks(chunks)

    def _iterate(self, stream: Any, watch: lockguard.Watch | None = None) -> Iterator[Any]:
        if inspect.isasyncgen(stream):
            try:
                while True:
                    try:
                        step = stream.__anext__()
                        yield self._loop.run(step if watch is None else lockguard.within(watch, step))
                    except StopAsyncIteration:
                        return
            finally:
                self._loop.run(stream.aclose())
        else:
            yield from stream

    def stream(self, model_input: Any) -> Iterator[Any]:
        """Yield a streaming predict's chunks as they come; the lock is held until the stream ends.

        Close it early (break, `close()`, leaving a `with closing(...)`) and the lock is released.
        A predict that does not stream yields its one (postprocessed) output.
        """
        s = self._serving
        if not s.streaming:
            yield self.predict(model_input).output
            return
        t = Trace(next(self._ids), s.version, threading.current_thread().name, perf_counter())
        stage = "preprocess"
        count = 0
        try:
            x = self._preprocess(s, model_input, t)
            stage = "predict"
            lock = self._lock
            t.lock_requested = perf_counter()
            with lock:
                t.lock_acquired = t.predict_start = perf_counter()
                watch = lockguard.begin() if self._guard else None
                if watch is not None:
                    watch.idle_check = False  # the caller's own code runs between chunks
                try:
                    if watch is None:
                        chunks = self._iterate(self._call(s.predict, x))
                    else:
                        token = lockguard.enter(watch)
                        try:
                            stream = self._call(s.predict, x, watch)
                        finally:
                            lockguard.leave(token)
                        chunks = lockguard.iterate(watch, self._iterate(stream, watch))
                    for chunk in chunks:
                        if t.first_chunk is None:
                            t.first_chunk = perf_counter()
                        count += 1
                        yield chunk
                finally:
                    t.predict_end = perf_counter()
                    if watch is not None:
                        self._found(s, t, lockguard.end(watch, t.predict_ms))
        except Exception as exc:
            raise self._fail(t, stage, exc) from exc
        except BaseException as exc:  # GeneratorExit (closed early), KeyboardInterrupt
            if not isinstance(exc, GeneratorExit):
                t.error, t.error_stage = describe(exc), stage
            raise
        finally:
            if t.lock_acquired is not None:
                t.lock_released = perf_counter()
            t.chunks = count
            t.end = perf_counter()
            self._traces.append(t)

    def _fail(self, t: Trace, stage: str, exc: BaseException) -> ModelError:
        err = STAGE_ERRORS[stage].from_exception(exc, self.roots, trace=t)
        t.error, t.error_stage, t.location = describe(exc), stage, err.location
        return err

    def _check_output(self, output: Any, t: Trace) -> None:
        bad = first_non_json(output)
        if bad is not None:
            path, tname = bad
            message = (
                f"{self.bundle.model_name}: output is not JSON-serialisable at {path}: {tname} "
                f"(a Truss server could not send it; convert it, e.g. with .tolist() or float())"
            )
            t.warnings.append(message)
            warnings.warn(message, OutputWarning, stacklevel=4)

    def predict_batch(self, inputs: Iterable[Any], workers: int = 8) -> list[Result]:
        """Run every input with `workers` concurrent threads; results come back in input order.

        A model error in one input is kept in that Result; it does not stop the others.
        """
        inputs = list(inputs)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise TrussLabError(f"workers must be a positive integer, got {workers!r}")
        if not inputs:
            return []
        with ThreadPoolExecutor(max_workers=min(workers, len(inputs)), thread_name_prefix="truss-lab-worker") as pool:
            futures = [pool.submit(self.run, x) for x in inputs]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def bench(
        self,
        inputs: Iterable[Any] | None = None,
        n: int = 100,
        concurrency: int = 8,
        *,
        progress: bool = True,
        label: str = "",
        on_result: Callable[[Result], None] | None = None,
    ) -> BenchReport:
        """Send `n` requests (cycling over `inputs`, or the truss's examples) from `concurrency` workers.

        Shows a tqdm progress bar (a widget in Jupyter, text in a terminal) unless `progress=False`.
        A model error in one request is counted in the report's failures; it does not stop the bench.
        `on_result(result)` is called (in this thread) as each request ends, e.g. to drive a progress widget.
        """
        inputs = list(self.examples.values()) if inputs is None else list(inputs)
        if not inputs:
            raise TrussLabError(f"{self.bundle.examples_path}: no inputs given and no examples to cycle over")
        for name, value in (("n", n), ("concurrency", concurrency)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrussLabError(f"{name} must be a positive integer, got {value!r}")
        traces: list[Trace] = []
        failed = 0
        bar = _progress_bar(n, f"{self.name} ×{concurrency}", progress)
        try:
            with ThreadPoolExecutor(max_workers=min(concurrency, n), thread_name_prefix="truss-lab-bench") as pool:
                futures = [pool.submit(self.run, inputs[i % len(inputs)]) for i in range(n)]
                try:
                    for future in as_completed(futures):
                        result = future.result()
                        traces.append(result.trace)
                        if on_result is not None:
                            on_result(result)
                        if not result.ok:
                            failed += 1
                            bar.set_postfix(failed=failed, refresh=False)
                        bar.update(1)
                except BaseException:  # Ctrl-C in the notebook: drop what has not started
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            bar.close()
        return BenchReport.from_traces(traces, self._lock_size, concurrency=concurrency, label=label or self.name)

    def serve(self, host: str = "127.0.0.1", port: int = 0, max_body: int | None = None):
        """Serve this model over HTTP with the Truss server's routes, from a background thread.

        Returns the running server (`.url`, `.stop()`); port 0 picks a free port. Same lock, traces and
        hot reload as in the notebook. Needs the `serve` extra (FastAPI, uvicorn).
        """
        try:
            from .serve import DEFAULT_MAX_BODY, serve
        except ImportError as exc:
            raise TrussLabError(f"serve() needs FastAPI and uvicorn: pip install 'truss_lab[serve]' ({exc})") from None
        server = serve(self, host, port, DEFAULT_MAX_BODY if max_body is None else max_body)
        self._servers.append(server)
        return server

    @property
    def lock_available(self) -> int:
        """Free lock slots right now (== concurrency when no predict is running)."""
        return self._lock.available

    def close(self) -> None:
        """Stop the HTTP servers started by serve(), the watcher and the event loop thread."""
        for server in self._servers:
            server.stop()
        self._servers.clear()
        self.reloader.unwatch()
        self._loop.close()

    def __enter__(self) -> "LiveModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Watching:
    """What `LiveModel.watch()` returns: leaving a `with` block stops watching."""

    def __init__(self, live: LiveModel):
        self.live = live

    def __enter__(self) -> LiveModel:
        return self.live

    def __exit__(self, *exc) -> None:
        self.live.unwatch()

    def __repr__(self) -> str:
        return f"<watching {self.live.path} for changes>" if self.live.watching else "<not watching>"


def share_state(instance: Any, new_cls: type, bundle: Bundle) -> Any:
    """An instance of `new_cls` whose attributes *are* `instance`'s (one shared __dict__, no copy).

    Requests still running on the old instance keep their class; the new one sees the same weights.
    A class with __slots__ has no __dict__ to share: then the class is swapped in place, as Truss does.
    """
    try:
        view = new_cls.__new__(new_cls)
        view.__dict__ = instance.__dict__
        return view
    except (TypeError, AttributeError):
        try:
            instance.__class__ = new_cls
            return instance
        except TypeError as exc:
            raise LoadError(
                f"{bundle.model_file}: cannot move the live model to the new class ({exc}); "
                f"use a full reload: tr.reload(full=True)"
            ) from None


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm.auto's bar (notebook widget or terminal text), imported only when a bench runs."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=True)


def _is_stream(y: Any) -> bool:
    return inspect.isgenerator(y) or inspect.isasyncgen(y)


def join_chunks(chunks: list[Any]) -> Any:
    """A streamed output as one value: text joined, bytes joined, anything else as a list."""
    if chunks and all(isinstance(c, str) for c in chunks):
        return "".join(chunks)
    if chunks and all(isinstance(c, (bytes, bytearray)) for c in chunks):
        return b"".join(chunks)
    return chunks


def load(
    path: str,
    *,
    concurrency: int | None = None,
    secrets: Mapping[str, str] | None = None,
    environment: Any = None,
    trace_capacity: int = DEFAULT_TRACE_CAPACITY,
    guard: bool = True,
) -> LiveModel:
    """Load the Truss at `path`: read config.yaml, import model.py, build Model, run load() once.

    `guard=False` turns off the lock-misuse guard (guard.py) for this model.
    """
    bundle = read_bundle(path)
    return LiveModel(
        bundle,
        concurrency=concurrency,
        secrets=secrets,
        environment=environment,
        trace_capacity=trace_capacity,
        guard=guard,
    )

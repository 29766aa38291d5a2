"""The request runner: one request as a Truss server runs it, with a Trace.

    preprocess  ->  [lock]  predict  [/lock]  ->  postprocess

Only predict holds the lock, a first-come-first-served semaphore of `runtime.predict_concurrency`
slots. Everything else runs concurrently in the caller's thread; async methods run on the model's
own event loop. A request reads the serving code (`wrapper.Serving`) once, when it starts, so a
reload never changes the code under a request that is already running.

`Runner` is only this: stages, lock, traces, the guard. `LiveModel` (live.py) adds loading, hot
reload and the conveniences (batch, bench, serve).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import inspect
import itertools
import logging
import threading
import warnings
from pathlib import Path
from time import perf_counter, thread_time
from typing import Any, Callable, Iterator

from . import guard as lockguard
from .aio import LoopThread
from .bundle import Bundle, validate_concurrency
from .errors import STAGE_ERRORS, ModelError, SecretNotFound, TrussLabError, describe
from .cpu import run_queue_ns
from .lock import FairLock, Gate
from .request import RequestOnce
from .trace import SPAN, ActivityLog, OutputWarning, Report, Result, Trace, span_from
from .serialization import is_response, parse_input, truss_json_check
from .wrapper import (
    ENDPOINTS,
    RESPONSE_WITH_POSTPROCESS,
    ModelDefinitionError,
    Serving,
    is_stream,
    join_chunks,
    refuse_postprocess,
    warn_at,
)

DEFAULT_TRACE_CAPACITY = 1000
STAGES = ("preprocess", "predict", "postprocess")
POSTPROCESS_STREAM = "postprocess"  # what open_stream leads with for a postprocess that yields (True: predict's stream)
logger = logging.getLogger("truss_lab")


STREAMABLE = (bytes, memoryview, str)  # what the Truss server's StreamingResponse sends; anything else cuts the stream
_UNSENDABLE = "unsendable chunk: "


class Runner:
    """Runs requests against `self._serving` (set by a subclass): thread-safe, one Trace each."""

    bundle: Bundle
    roots: list[Path]
    _serving: Serving
    chainlet = False  # a Truss Chain's chainlet (chains.py): every request gets a span, its calls are its children

    def __init__(self, *, concurrency: int, trace_capacity: int, guard: bool, loop_name: str):
        self._warner = lockguard.Warner()
        self.guard = guard
        self._loop = LoopThread(name=loop_name)
        self._ids = itertools.count(1)
        self._traces: collections.deque[Trace] = collections.deque(maxlen=trace_capacity)
        self.activity = ActivityLog()  # when model code ran: files it writes under data/ never trigger a reload
        self._gate = Gate()  # requests pass together, a reload alone: no request runs on two versions
        self._lock = FairLock(self._valid_size(concurrency))
        self._lock_size = self._lock.size
        self._concurrency_override: int | None = None
        self._long_predicts = True  # the last predict took >= 1 ms: measure contention for the next one

    @property
    def concurrency(self) -> int:
        """Lock size: how many predict() calls may run at once (runtime.predict_concurrency)."""
        return self._lock_size

    @concurrency.setter
    def concurrency(self, value: int) -> None:
        """Resize the one lock in place (never more holders than the new size); the override lasts
        across reloads until you change it or config.yaml changes `predict_concurrency`."""
        self._set_lock_size(value)
        self._concurrency_override = self._lock_size

    def _set_lock_size(self, value: int) -> None:
        self._lock.resize(self._valid_size(value))
        self._lock_size = self._lock.size

    @staticmethod
    def _valid_size(value: Any) -> int:
        try:
            return validate_concurrency(value)
        except ValueError as exc:
            raise TrussLabError(f"concurrency {exc}") from None

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
    def lock_available(self) -> int:
        """Free lock slots right now (== concurrency when no predict is running)."""
        return self._lock.available

    @property
    def traces(self) -> list[Trace]:
        """The kept traces, oldest first (the last `trace_capacity` requests)."""
        return list(self._traces)

    def clear_traces(self) -> None:
        """Forget the kept traces (reports and timelines start afresh)."""
        self._traces.clear()

    def report(self, last: int | None = None) -> Report:
        """A Report of the traces kept, or of the last `last` of them (0: none)."""
        traces = self.traces
        if last is not None:
            if isinstance(last, bool) or not isinstance(last, int) or last < 0:
                raise TrussLabError(f"last must be a number of traces (0 or more), got {last!r}")
            traces = traces[-last:] if last else []
        return Report.from_traces(traces, self._lock_size)

    # ------------------------------------------------------------------ requests

    def predict(self, model_input: Any, *, request: Any = None) -> Result:
        """Run one request: preprocess -> predict (under the lock) -> postprocess.

        Args:
            model_input: the request body, as the Truss server would parse it (JSON values, or bytes).
            request: what a method with a `request` parameter receives (a starlette Request); by default
                one is made from `model_input`, as if it had been POSTed as JSON.

        Returns:
            A Result: `.output` (what the Truss server would send), `.trace` (each stage's time).

        Raises:
            PreprocessError: preprocess raised (the original is `__cause__`; `.location` is file:line).
            PredictError: predict raised.
            PostprocessError: postprocess raised.
            InputError: the input does not fit the pydantic model the first stage names.

        Example:
            ```python
            result = tr.predict(tr.example("three"))
            result.output, result.trace.predict_ms
            ```
        """
        return self.run(model_input, request=request).raise_for_error()

    def call(self, method: str, body: Any, *, request: Any = None) -> Result:
        """Call one of the model's OpenAI-compatible methods as the Truss server's route for it does: no pre-
        or postprocess and no predict lock; a returned stream is joined.

        Args:
            method: `chat_completions`, `completions`, `embeddings`, `messages` or `responses`.
            body: the request body.
            request: as for `predict`.

        Returns:
            A Result.

        Raises:
            ModelError: the method raised, or the model has no such method.

        Example:
            ```python
            tr.call("chat_completions", {"messages": [{"role": "user", "content": "hi"}]}).output
            ```
        """
        return self.run(body, request=request, method=method).raise_for_error()

    def run(self, model_input: Any, *, request: Any = None, method: str = "predict", profiler: Any = None) -> Result:
        """Run one request like `predict`, keeping a model error in `Result.error` instead of raising it.

        Args:
            model_input: the request body.
            request: as for `predict`.
            method: `"predict"`, or an OpenAI-compatible method's name (`"chat_completions"`, ...), run
                as its route runs it.
            profiler: a profile.Profiler that samples each stage of this request (`tr.profile` makes one).

        Returns:
            A Result; `.error` is a ModelError (stage, file:line) when the request failed.

        Example:
            ```python
            result = tr.run({"image": "no-such-file.png"})
            result.ok, result.error
            ```
        """
        t = self._new_trace(method)
        if profiler is not None:
            t.profiler = profiler
        output = error = None
        try:
            output = self._consume(self._open(t, model_input, request, method, drain=True))
        except ModelError as exc:
            error = exc
        return Result(model_input, output, t, error, self.bundle.model_name, (self.bundle.data_dir, self.bundle.path))

    def stream(self, model_input: Any, *, request: Any = None, method: str = "predict") -> Iterator[Any]:
        """Yield a streaming predict's chunks as they come; the lock is held until the stream ends.

        Streaming is decided by the value predict returns, as in a Truss server: a generator (or
        async generator), whether predict is a generator function or returns one. Any other value
        is postprocessed and yielded as the one output. Close the stream early (break, `close()`)
        and the lock is released.

        Args:
            model_input: the request body.
            request: as for `predict`.
            method: as for `run`.

        Yields:
            Each chunk predict produced (or the one output).

        Raises:
            ModelError: a stage raised (after the chunks already given, for a stream that fails midway).

        Example:
            ```python
            for chunk in tr.stream({"prompt": "hi"}):
                print(chunk, end="")
            ```
        """
        chunks = self.open_stream(model_input, request=request, method=method)
        next(chunks)  # whether it streams: this caller takes the values the same way
        yield from chunks

    def open_stream(self, model_input: Any, *, request: Any = None, method: str = "predict") -> Iterator[Any]:
        """`stream()`, led by one value: True if the method returned a stream (chunks follow),
        POSTPROCESS_STREAM if postprocess did (chunks follow; Truss never gathers those into one JSON
        answer), False if neither (one output follows). An HTTP front end needs to know before the
        first chunk."""
        return self._open(self._new_trace(method), model_input, request, method, drain=False)

    def _new_trace(self, method: str) -> Trace:
        t = Trace(next(self._ids), 0, threading.current_thread().name, perf_counter())  # its version: once it passed the gate
        if method != "predict":
            t.method = method
        span = SPAN.get()  # a request that came with a trace context (a chainlet's call): its place in the tree
        if span is None and self.chainlet:  # a chain's request made here (chain.run, %truss predict): a new tree
            span = span_from(None, root=True)
        if span is not None:
            t.span = span
        return t

    @staticmethod
    def _consume(answer: Iterator[Any]) -> Any:
        """The value an `_open` answer leads to (a stream joined as Truss gathers it); the request (its
        trace) ends here, not when the generator is collected."""
        try:
            return join_chunks(list(answer)) if next(answer) else next(answer)
        finally:
            answer.close()

    def _open(self, t: Trace, model_input: Any, request: Any, method: str, drain: bool,
              stages: tuple[str, ...] = STAGES) -> Iterator[Any]:
        """The one request path, as Truss's model wrapper runs it: parse the input as the method's
        signature asks, preprocess, predict under the lock (for `predict`; the OpenAI-compatible
        methods take no lock and skip pre/postprocess), then stream or postprocess.

        `stages`: a split deployment (run_stage) runs one of them alone; the output is checked only
        at the end of the whole path."""
        if self._loop.closed:
            raise TrussLabError(f"{self.bundle.model_name}: closed (tr.close() was called); load it again")
        req = RequestOnce(model_input, request, t if self.chainlet else None)
        stage = "input"
        count = 0
        streamed = False
        self._gate.enter()  # inside the generator: one never started never holds the gate
        s = self._serving  # the code this request runs on, to its end (a reload waits for it)
        t.version = s.version
        active = self.activity.begin()
        try:
            if method not in s.methods.specs:
                raise TrussLabError(self._missing(s, method))
            whole = stages == STAGES
            x = model_input
            if "preprocess" in stages:
                x = self._input(s, x)
                if method == "predict":
                    stage = "preprocess"
                    x = self._preprocess(s, x, t, req)
            if "predict" not in stages:  # postprocess alone
                stage = "postprocess"
                yield False
                yield self._postprocess(s, x, t, req) if "postprocess" in stages else x
                return
            spec = s.methods.specs[method]
            t.cpu_measurable = not (spec.is_async or spec.is_generator)  # else predict's CPU is not this thread's
            stage = "predict"
            with self._slot(s, t, method) as watch:
                token = lockguard.enter(watch) if watch is not None else None
                try:
                    y = self._call(s, method, x, req, watch, t)
                finally:
                    if token is not None:
                        lockguard.leave(token)
                streamed = is_stream(y)
                if streamed:
                    t.cpu_measurable = False
                    if method == "predict":
                        refuse_postprocess(s, y)
                    if watch is not None and not drain:
                        watch.idle_check = False  # the caller's own code runs between chunks
                    chunks = self._iterate(y, watch)
                    yield True
                    for chunk in chunks if watch is None else lockguard.iterate(watch, chunks):
                        if t.first_chunk is None:
                            t.first_chunk = perf_counter()
                        if not isinstance(chunk, STREAMABLE):
                            self._check_chunk(chunk, t, method, count, s)
                        count += 1
                        yield chunk
            if not streamed:
                if "postprocess" in stages:
                    if method == "predict" and not is_response(y):
                        stage = "postprocess"
                        y = self._postprocess(s, y, t, req)
                        if is_stream(y):  # a postprocess that yields streams, as on Truss (outside the lock)
                            streamed = True
                            yield POSTPROCESS_STREAM
                            for chunk in self._iterate(y):
                                if t.first_chunk is None:
                                    t.first_chunk = perf_counter()
                                if not isinstance(chunk, STREAMABLE):
                                    self._check_chunk(chunk, t, "postprocess", count, s)
                                count += 1
                                yield chunk
                            t.post_end = perf_counter()  # its work happened while it was iterated
                            return
                    elif method == "predict" and s.postprocess is not None:
                        raise ModelDefinitionError(RESPONSE_WITH_POSTPROCESS)
                if whole:
                    self._check_output(y, t, s, stage)
                yield False
                yield y
        except TrussLabError as exc:
            if not isinstance(exc, (ModelError, SecretNotFound)):  # ours (a closed model, a bad method name)
                t.error, t.error_stage = str(exc), stage
                raise
            raise self._fail(t, stage, exc, method) from exc  # the model's: a secret it lacks is its stage's error
        except Exception as exc:
            raise self._fail(t, stage, exc, method) from exc
        except BaseException as exc:  # GeneratorExit (closed early), KeyboardInterrupt
            if not isinstance(exc, GeneratorExit):
                t.error, t.error_stage = describe(exc), stage
            raise
        finally:
            if streamed:
                t.chunks = count
            t.end = perf_counter()
            self._traces.append(t)
            self.activity.end(active)
            self._gate.leave()

    def _missing(self, s: Serving, method: str) -> str:
        have = ", ".join(s.methods.endpoints) or "none"
        if method == "predict":
            return f"{self.bundle.model_name}: the model has no predict(): it serves /v1/websocket only (tr.serve())"
        if method in ENDPOINTS:
            return f"{self.bundle.model_name}: the model has no {method}() method (its OpenAI-compatible methods: {have})"
        return f"method must be 'predict' or one of {', '.join(ENDPOINTS)}, got {method!r}"

    def _input(self, s: Serving, x: Any) -> Any:
        """The inputs the first stage gets: None when it takes only the request (Truss skips parsing),
        the pydantic model its signature names (parsed from a dict), or `x` as it is."""
        if s.methods.skip_input_parsing:
            return None
        if s.methods.input_type is None:
            return x
        return parse_input(s.methods.input_type, x)

    def _preprocess(self, s: Serving, x: Any, t: Trace, req: Callable[[], Any]) -> Any:
        if s.preprocess is None:
            return x
        t.pre_start = perf_counter()
        try:
            return self._call(s, "preprocess", x, req, None, t)
        finally:
            t.pre_end = perf_counter()

    def _postprocess(self, s: Serving, x: Any, t: Trace, req: Callable[[], Any]) -> Any:
        if s.postprocess is None:
            return x
        t.post_start = perf_counter()
        try:
            return self._call(s, "postprocess", x, req, None, t)
        finally:
            t.post_end = perf_counter()

    def run_stage(self, stage: str, x: Any) -> tuple[Any, ModelError | None]:
        """Run one stage alone, as a split deployment does (serving/ray_serve.py): (value, None) or (None, error).

        predict runs under the lock (a stream is joined); a missing preprocess/postprocess passes its
        input through. Each call is traced (only that stage's timestamps are set).
        """
        if stage not in STAGES:
            raise TrussLabError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        try:
            return self._consume(self._open(self._new_trace("predict"), x, None, "predict", drain=True, stages=(stage,))), None
        except ModelError as exc:
            return None, exc

    def _slot(self, s: Serving, t: Trace, method: str):
        return self._predict_slot(s, t) if method == "predict" else self._unlocked_slot(t)

    @contextlib.contextmanager
    def _unlocked_slot(self, t: Trace) -> Iterator[None]:
        """An OpenAI-compatible method: timed like predict, but Truss takes no lock for it."""
        t.predict_start = perf_counter()
        try:
            yield None
        finally:
            t.predict_end = perf_counter()

    @contextlib.contextmanager
    def _predict_slot(self, s: Serving, t: Trace) -> Iterator[lockguard.Watch | None]:
        """Hold one lock slot for predict: the trace's lock and predict times, and the guard's watch
        (None when the guard is off), whose findings are attached when the slot is given back."""
        lock = self._lock
        t.lock_requested = perf_counter()
        try:
            with lock:  # `with`: no instruction between acquiring and the guaranteed release
                t.lock_acquired = t.predict_start = perf_counter()
                cpu0 = thread_time()
                long = self._long_predicts  # a predict of a microsecond is never idle: skip the contention reads
                rq0 = run_queue_ns() if long and t.cpu_measurable else None
                watch = lockguard.begin(long) if self._guard else None
                try:
                    yield watch
                finally:
                    t.predict_end = perf_counter()
                    cpu_ms = None
                    if t.cpu_measurable and (watch is None or watch.idle_check):
                        cpu_ms = t.predict_cpu_ms = (thread_time() - cpu0) * 1000.0
                        if rq0 is not None and cpu_ms < 0.9 * t.predict_ms:  # time not computing: was it waiting for a CPU?
                            rq1 = run_queue_ns()
                            t.predict_cpu_wait_ms = (rq1 - rq0) / 1e6 if rq1 is not None else None
                        if cpu_ms + (t.predict_cpu_wait_ms or 0.0) < 0.5 * t.predict_ms:  # mostly not computing: a GPU busy?
                            t.gpu_in_use = lockguard.gpu_in_use()
                    self._long_predicts = t.predict_ms >= 1.0
                    if watch is not None:
                        self._found(s, t, lockguard.end(watch, t.predict_ms, cpu_ms, t.predict_cpu_wait_ms))
        finally:
            if t.lock_acquired is not None:
                t.lock_released = perf_counter()

    def _call(self, s: Serving, name: str, x: Any, req: Callable[[], Any], watch: lockguard.Watch | None = None,
              t: Trace | None = None) -> Any:
        prof = t.profiler if t is not None else None
        if prof is None:
            y = s.call(name, x, req)
        else:  # a profiled request (profile.py): this stage's samples, where it runs
            stage = name if name in STAGES else "predict"
            y = prof.call(lambda: s.call(name, x, req), stage, t.request_id)
            if inspect.isawaitable(y):
                y = prof.wrap(y, stage, t.request_id)
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

    def _iterate(self, stream: Any, watch: lockguard.Watch | None = None) -> Iterator[Any]:
        if inspect.isasyncgen(stream):
            context = contextvars.copy_context()  # one for all its steps, as one task iterates it on Truss
            try:
                while True:
                    try:
                        step = stream.__anext__()
                        yield self._loop.run(step if watch is None else lockguard.within(watch, step), context)
                    except StopAsyncIteration:
                        return
            finally:
                self._loop.finish(stream.aclose(), context)  # scheduled, not awaited, if the GC finalises it on the loop thread
        else:
            yield from stream

    def schema(self) -> dict | None:
        """The input and output JSON schemas of a model with pydantic-typed I/O, as the Truss server's
        `GET /v1/models/{name}/schema` answers them.

        Returns:
            `{"input_schema": ..., "output_schema": ..., "supports_streaming": ...}`, or None for a model
            without typed I/O.

        Example:
            ```python
            tr.schema()["input_schema"]["properties"]
            ```
        """
        from .serialization import truss_schema

        s = self._serving
        return truss_schema(s.model_cls, s.methods.input_type)

    def is_healthy(self) -> bool | None:
        """The model's is_healthy(), as the Truss server's readiness check asks it: None when the model
        has none, False when it raises (the error is logged), else what it returns."""
        s = self._serving
        if "is_healthy" not in s.methods.specs:
            return None
        try:
            y = s.bound["is_healthy"]()
            return self._loop.run(y) if inspect.isawaitable(y) else y
        except Exception as exc:
            logger.warning("%s: is_healthy() raised %s", self.bundle.model_name, describe(exc))
            return False

    def _fail(self, t: Trace, stage: str, exc: BaseException, method: str = "predict") -> ModelError:
        what = method if (stage == "predict" and method != "predict") else None
        err = STAGE_ERRORS[stage].from_exception(exc, self.roots, trace=t, what=what)
        t.error, t.error_stage, t.location = describe(exc), stage, err.location
        return err

    def _warn_output(self, message: str, s: Any, stage: str) -> None:
        """An OutputWarning at the model's own stage method, once per message and code version (a bench
        of a thousand requests warns once; a reload that keeps the problem warns again)."""
        if self._warner.once(message):
            warn_at(message, OutputWarning, self.bundle, s.model_cls, stage)

    def _check_chunk(self, chunk: Any, t: Trace, stage: str, index: int, s: Any) -> None:
        """A chunk the Truss server cannot stream: warn, once per request, naming it."""
        if any(w.startswith(_UNSENDABLE) for w in t.warnings):
            return
        message = (
            f"{_UNSENDABLE}{self.bundle.model_name}: {stage} yielded chunk {index + 1} of type {type(chunk).__name__}: "
            f"streamed over HTTP, the Truss server sends only bytes, memoryview and str chunks and cuts the stream "
            f"there (joined for Accept: application/json it sends str(chunk)); encode it, e.g. json.dumps(chunk) + '\\n'"
        )
        t.warnings.append(message)
        self._warn_output(message, s, stage)

    def _check_output(self, output: Any, t: Trace, s: Any, stage: str) -> None:
        bad = truss_json_check(output)
        if bad is not None:
            path, tname = bad
            message = (
                f"{self.bundle.model_name}: output is not JSON a Truss server can send, at {path}: {tname} "
                f"(it would answer 500; convert it, e.g. with .tolist() or float())"
            )
            t.warnings.append(message)
            self._warn_output(message, s, stage)

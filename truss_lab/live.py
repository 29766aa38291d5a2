"""LiveModel: a Truss loaded in this process, answering requests as a Truss server would.

A `Runner` (runner.py: stages, lock, traces) plus what a developer needs around it: loading the code
(loader.py, wrapper.py), hot reload (reload.py), and the conveniences - many inputs at once
(`predict_batch`), a load test (`bench`), HTTP (`serve`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from . import carry, collectors, loader, names, origins, wrapper
from . import guard as lockguard
from .bundle import Bundle, read_bundle, resolve_secrets
from .errors import TrussLabError, describe
from .reload import Reloader, Snapshot
from .runner import DEFAULT_TRACE_CAPACITY, Result, Runner
from .trace import BenchReport, Trace

if TYPE_CHECKING:
    from .profile import Profile
    from .reload import ReloadEvent


class LiveModel(Runner):
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
        super().__init__(
            concurrency=bundle.predict_concurrency if concurrency is None else concurrency,
            trace_capacity=trace_capacity,
            guard=guard,
            loop_name=f"truss-lab-loop[{bundle.model_name}]",
        )
        self._secret_overrides = dict(secrets or {})
        self.environment = environment
        self._concurrency_override = None if concurrency is None else self._lock_size
        self._serving: wrapper.Serving | None = None
        self._servers: list[Any] = []  # HTTP servers started by serve(); close() stops them
        self._on_close: list[Callable[[], None]] = []
        self._on_retire: list[Callable[[Any], None]] = []
        self._examples_watch = None
        self.load_ms: float = 0.0
        self.roots = loader.user_roots(bundle)
        self.space = loader.Space(bundle)  # this model's code versions and their Truss names (loader.py)
        self.space.activity = self.activity  # threads, jobs and processes its code starts count as its activity
        origins.install()
        collectors.install()
        self._start()

    # ------------------------------------------------------------------ loading

    def _build(self, bundle: Bundle, version: int, sources: dict[str, bytes]) -> tuple[wrapper.Serving, float]:
        """Import, construct and load() one version of the model; raise LoadError on any failure."""
        code = self.space.new_version(bundle, version, sources)
        undo_env = self.space.env.apply(bundle.environment_variables)  # before the import, as in the container
        try:
            with names.active(code):  # Truss names the wrapper itself looks up (annotations) are this version's
                module = loader.import_model(code)
                model_cls = wrapper.model_class(bundle, module)
                methods = wrapper.ModelMethods.check(bundle, model_cls)  # before load(): it may take minutes
                kwargs = wrapper.model_kwargs(bundle, resolve_secrets(bundle, self._secret_overrides), self.environment)
                active = self.activity.begin()  # files __init__/load() write under data/ are the model's own
                try:
                    instance = wrapper.build_instance(bundle, model_cls, kwargs)
                    load_ms = wrapper.run_load(bundle, instance, self._loop.run, methods, self.environment)
                finally:
                    self.activity.end(active)
        except BaseException:
            collectors.give_back(code)
            code.release()
            undo_env()
            raise
        return wrapper.Serving.bind(version, instance, module, model_cls, methods, code), load_ms

    def _rebind(self, bundle: Bundle, version: int, sources: dict[str, bytes]) -> wrapper.Serving:
        """Import a new version of the code and bind it to the live instance's state (no load()).

        Every module the serving version has imported is imported in the new one too, and the
        run-time state of each is carried by carry.py's rules; carry.NeedsFullReload when state was
        built by code that changed."""
        old = self._serving.code
        code = self.space.new_version(bundle, version, sources)
        try:
            with names.active(code):
                module = loader.import_model(code, also=list(old.modules))
                model_cls = wrapper.model_class(bundle, module)
                methods = wrapper.ModelMethods.check(bundle, model_cls)
                _, full = carry.carry_version(old, code)
                if full:
                    raise carry.NeedsFullReload(full)
                move_held = carry.reclass_held(self._serving.instance, old, code)
                instance = wrapper.share_state(self._serving.instance, model_cls, bundle)
                move_held()  # objects load() built from truss classes answer with the new class (undone if one refuses)
                collectors.settle(old, code)  # a carried metric keeps counting where it was registered
        except BaseException:
            collectors.give_back(code)
            code.release()
            raise
        return wrapper.Serving.bind(version, instance, module, model_cls, methods, code)

    def _switch(self, serving: wrapper.Serving, bundle: Bundle) -> None:
        """Make `serving` the code for every request that starts from now on (one reference swap)."""
        config_changed = bundle.predict_concurrency != self.bundle.predict_concurrency
        self.bundle = bundle
        if config_changed:  # config.yaml says a new size: it wins over an earlier runtime override
            self._concurrency_override = None
        if self._concurrency_override is None and bundle.predict_concurrency != self._lock_size:
            self._set_lock_size(bundle.predict_concurrency)
        self._serving = serving
        self.space.serve(serving.code)
        self._warner.reset()  # a new version warns again about a misuse it still has

    def _set_examples(self, bundle: Bundle) -> None:
        self.bundle.examples = bundle.examples

    def _forget(self, s: wrapper.Serving) -> None:
        if s.code is not None:
            s.code.release()
        for callback in list(self._on_retire):
            try:
                callback(s.instance)
            except Exception as exc:  # a cleanup hook must never break serving
                warnings.warn(f"truss_lab on_retire callback {callback!r} raised {describe(exc)}", RuntimeWarning)

    def _start(self) -> None:
        try:
            try:
                snapshot = Snapshot.take(self.bundle)  # before the import: a save during load() is a reload after it
            except SyntaxError:  # the import says where, as a LoadError
                snapshot = None
            self._serving, self.load_ms = self._build(self.bundle, 1, snapshot.sources if snapshot else {})
            self.space.serve(self._serving.code)
            self.reloader = Reloader(self, snapshot)
        except BaseException:
            self._loop.close()
            self.space.close()
            raise

    def active(self):
        """`with tr.active():` Truss names used outside model code in the block (`joblib.load` of a
        file naming `model.transformers.Scale`, `importlib.import_module("model.helper")`) resolve to
        this model's serving code. Outside such a block they resolve to the truss loaded last."""
        return names.active(self._serving.code)

    # ------------------------------------------------------------------ hot reload

    def reload(self, full: bool = False) -> "ReloadEvent":
        """Reload edited code now: swap changed methods, or rebuild and load() when needed (full=True forces it)."""
        return self.reloader.reload(full=full)

    def watch(self, examples: bool | list[str] = False) -> "_Watching":
        """Reload on every save, from a background thread. Also a context manager: `with tr.watch(): ...`.

        `examples=True` (or a list of example names): after every successful reload, run the examples
        in the background and diff them with the run before (`tr.examples_diff`, `tr.on_examples`).
        """
        self.reloader.watch()
        if examples:
            self.watch_examples(examples)
        return _Watching(self)

    def watch_examples(self, examples: bool | list[str] = True) -> None:
        """Start (or, with False, stop) re-running the examples after every reload; see watch()."""
        if not examples:
            if self._examples_watch is not None:
                self._examples_watch.stop()
                self._examples_watch = None
            return
        if self._examples_watch is None:
            from .examples import ExamplesWatch

            self._examples_watch = ExamplesWatch(self, None if examples is True else list(examples))

    def unwatch(self) -> None:
        self.reloader.unwatch()
        self.watch_examples(False)

    @property
    def examples_diff(self):
        """The latest ExamplesDiff (what the last save changed in the examples' outputs), or None."""
        return self._examples_watch.latest if self._examples_watch is not None else None

    def on_examples(self, callback) -> Callable[[], None]:
        """Call `callback(diff)` after each examples run that follows a reload (needs watch(examples=True))."""
        if self._examples_watch is None:
            raise TrussLabError(f"{self.name}: examples are not watched: tr.watch(examples=True)")
        return self._examples_watch.on_diff(callback)

    def wait_for_examples(self, timeout: float = 60.0) -> bool:
        """Block until no examples run is going (True), or `timeout` passes (False)."""
        return self._examples_watch.wait(timeout) if self._examples_watch is not None else True

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
    def serving(self) -> wrapper.Serving:
        return self._serving

    @property
    def examples(self) -> dict[str, Any]:
        return {e.name: e.input for e in self.bundle.examples}

    def example(self, name: str) -> Any:
        return self.bundle.example(name)

    def methods(self) -> list[str]:
        s = self._serving
        found = ["load"] if callable(getattr(s.model_cls, "load", None)) else []
        return found + [m for m in wrapper.METHOD_NAMES if m in s.methods.specs]

    def __repr__(self) -> str:
        return (
            f"<LiveModel {self.name!r} v{self.version} from {self.path} | "
            f"{self._serving.model_cls.__name__}, lock {self._lock_size}, load {self.load_ms:.0f} ms>"
        )

    # ------------------------------------------------------------------ conveniences

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
        profile: bool = False,
    ) -> BenchReport:
        """Send `n` requests (cycling over `inputs`, or the truss's examples) from `concurrency` workers.

        Shows a tqdm progress bar (a widget in Jupyter, text in a terminal) unless `progress=False`.
        A model error in one request is counted in the report's failures; it does not stop the bench.
        `on_result(result)` is called (in this thread) as each request ends, e.g. to drive a progress widget.
        `profile=True`: every request is profiled (see profile()); the report's `.profile` has them all.
        """
        inputs = list(self.examples.values()) if inputs is None else list(inputs)
        if not inputs:
            raise TrussLabError(f"{self.bundle.examples_path}: no inputs given and no examples to cycle over")
        for name, value in (("n", n), ("concurrency", concurrency)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrussLabError(f"{name} must be a positive integer, got {value!r}")
        traces: list[Trace] = []
        failed = 0
        profiler = None
        if profile:
            from .profile import Profiler

            profiler = Profiler()
        bar = _progress_bar(n, f"{self.name} ×{concurrency}", progress)
        stall0, wall0 = lockguard.cpu_stall_ms(), time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=min(concurrency, n), thread_name_prefix="truss-lab-bench") as pool:
                futures = [pool.submit(self.run, inputs[i % len(inputs)], profiler=profiler) for i in range(n)]
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
        stall1, wall_ms = lockguard.cpu_stall_ms(), (time.perf_counter() - wall0) * 1000.0
        stall = (stall1 - stall0) / wall_ms if stall0 is not None and stall1 is not None and wall_ms > 0 else math.nan
        report = BenchReport.from_traces(traces, self._lock_size, concurrency=concurrency, label=label or self.name,
                                         cpu_stall_share=stall)
        if profiler is not None:
            from .profile import Profile

            report.profile = Profile(self.name, self.roots, profiler.sessions, traces, profiler.interval)
        return report

    def report(self, last: int | None = None):
        """A Report over the kept traces (or the last `last`), with the reloads in their time."""
        report = super().report(last)
        if report.traces:
            t0 = time.time() - (time.perf_counter() - report.traces[0].start)
            report.reloads = [e for e in self.reload_history if e.when >= t0]
        return report

    def profile(self, model_input: Any = None, n: int = 1, *, interval: float = 0.001, ops: bool = False,
                logdir: str | None = None) -> "Profile":
        """Run `n` requests of `model_input` (default: each example in turn) through the normal runner
        - the same lock, traces and guard - with a sampling profiler (pyinstrument) on every stage:
        a Profile of where inside preprocess, predict and postprocess the time went, and the lock wait.

        `ops=True`: also run them under the framework's own profiler (PyTorch's, or TensorFlow's) and
        list the heaviest ops predict ran (`profile.ops`; kernels on a GPU), its trace in `logdir`.
        """
        from .profile import Profile, Profiler

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TrussLabError(f"n must be a positive integer, got {n!r}")
        inputs = [model_input] if model_input is not None else list(self.examples.values())
        if not inputs:
            raise TrussLabError(f"{self.bundle.examples_path}: no input given and no examples to profile")
        try:
            import pyinstrument  # noqa: F401  (a one-line error here, not deep in a stage)
        except ImportError:
            raise TrussLabError("profile() needs pyinstrument: pip install pyinstrument") from None
        framework = None
        if ops:
            from .profile import framework_ops

            framework = framework_ops(logdir)
            if framework is None:
                raise TrussLabError(f"{self.name}: profile(ops=True) profiles PyTorch or TensorFlow ops, and neither is imported")
        profiler = Profiler(interval, marker=framework.marker if framework is not None else None)
        with framework if framework is not None else contextlib.nullcontext():
            traces = [self.run(inputs[i % len(inputs)], profiler=profiler).trace for i in range(n)]
        profile = Profile(self.name, self.roots, profiler.sessions, traces, interval)
        if framework is not None:
            profile.ops = framework.ops()
        return profile

    def serve(self, host: str = "127.0.0.1", port: int = 0, max_body: int | None = None):
        """Serve this model over HTTP with the Truss server's routes, from a background thread.

        Returns the running server (`.url`, `.stop()`); port 0 picks a free port. Same lock, traces and
        hot reload as in the notebook. Needs the `serve` extra (FastAPI, uvicorn).
        """
        try:
            from .serving.server import DEFAULT_MAX_BODY, serve
        except ImportError as exc:
            raise TrussLabError(f"serve() needs FastAPI and uvicorn: pip install 'truss_lab[serve]' ({exc})") from None
        server = serve(self, host, port, DEFAULT_MAX_BODY if max_body is None else max_body)
        self._servers.append(server)
        return server

    def check(self, inputs=None, **kwargs):
        """`truss-lab check` for this model: its examples (or `inputs`) on the real Truss server and
        here, compared, plus the deploy lints; a CheckReport (serving/check.py)."""
        from .serving.check import check

        return check(self, inputs, **kwargs)  # check() takes this LiveModel duck-typed: no import of live

    def on_retire(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(instance)` with a replaced version's model instance once its last request has
        ended (after a reload; a method swap's old instance shares its state with the new one)."""
        self._on_retire.append(callback)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when the model closes (a panel or a notice lets go of it then)."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Stop the HTTP servers started by serve(), the watcher and the event loop thread; end async
        requests in flight; from then on every call raises. Whatever held on to the model through
        `on_close`/`on_reload` lets go of it, so it (and its weights) can be garbage-collected."""
        for server in self._servers:
            server.stop()
        self._servers.clear()
        self.unwatch()
        self._loop.close()
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # a front end's cleanup must never stop a close
                warnings.warn(f"{self.name}: an on_close callback failed: {exc}", RuntimeWarning, stacklevel=2)
        self.reloader.clear_callbacks()
        self.space.close()  # its Truss names resolve to other loaded trusses; its variables are put back
        if self._serving is not None:
            s = self._serving
            self.retire(s)  # its modules go once no request runs on them
            closed = type(s.model_cls.__name__, (), {"__module__": s.model_cls.__module__})
            # nothing of the model's code stays reachable from a closed model: its globals can be collected
            self._serving = wrapper.Serving(s.version, None, None, closed, wrapper.ModelMethods({}), {}, None)

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


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm.auto's bar (notebook widget or terminal text), imported only when a bench runs."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=True)


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

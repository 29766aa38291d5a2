"""LiveModel: a Truss loaded in this process, answering requests as a Truss server would.

A `Runner` (runner.py: stages, lock, traces) plus what a developer needs around it: loading the code
(loader.py, wrapper.py), hot reload (reload.py), and the conveniences - many inputs at once
(`predict_batch`), a load test (`bench`), HTTP (`serve`).
"""

from __future__ import annotations

import abc
import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from . import batch, cpu, loader, origins, owned, wrapper
from .bundle import Bundle, read_bundle, resolve_secrets
from .errors import TrussLabError, describe
from .reload import Reloader
from .snapshot import Snapshot
from .runner import DEFAULT_TRACE_CAPACITY, Runner
from .trace import BenchReport, Result

if TYPE_CHECKING:
    from .profile import Profile
    from .reload import ReloadEvent


@dataclass
class Held:
    """What one version of the code put into process-wide registries (owned.py): its import's
    collectors and handlers, and its load()'s (which a method swap keeps with the model)."""

    imported: owned.Owned = field(default_factory=owned.Owned)
    loaded: owned.Owned = field(default_factory=owned.Owned)


class LiveModel(Runner, metaclass=abc.ABCMeta):
    """A Truss loaded in this process (one a process, as in Truss's image). Thread-safe: call it from
    as many threads as you like. A truss in a worker process (worker.WorkerModel) has the same API and
    counts as a LiveModel too (`isinstance`)."""

    reload_drain_timeout = 60.0  # seconds a reload waits for the requests in flight (a stream: to its end)

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
        self.resident = loader.Resident(bundle)  # this process now holds the truss's code (loader.py)
        self.resident.owner = self
        self.resident.activity = self.activity  # threads, jobs and processes its code starts count as its activity
        origins.install()
        self._start()

    @property
    def pid(self) -> int:
        """The process the model runs in: this one."""
        return os.getpid()

    def _cpu_s(self) -> float | None:
        """CPU seconds the model's process used so far."""
        return cpu.process_cpu_s()

    @property
    def process(self) -> str:
        return "kernel"

    # ------------------------------------------------------------------ loading

    def _build(self, bundle: Bundle, version: int) -> tuple[wrapper.Serving, float]:
        """Import the model's code (none of it in sys.modules yet), construct it and load() it; raise
        LoadError on any failure, leaving nothing of it registered."""
        undo_env = self.resident.env.apply(bundle.environment_variables)  # before the import, as in the container
        held = Held()
        try:
            with held.imported.recording():
                module = self.resident.import_model()
            model_cls = wrapper.model_class(bundle, module)
            methods = wrapper.ModelMethods.check(bundle, model_cls)  # before load(): it may take minutes
            kwargs = wrapper.model_kwargs(bundle, resolve_secrets(bundle, self._secret_overrides), self.environment)
            active = self.activity.begin()  # files __init__/load() write under data/ are the model's own
            try:
                with held.loaded.recording():
                    instance = wrapper.build_instance(bundle, model_cls, kwargs)
                    load_ms = wrapper.run_load(bundle, instance, self._loop.run, methods, self.environment)
            finally:
                self.activity.end(active)
        except BaseException:
            held.imported.drop()
            held.loaded.drop()
            undo_env()
            raise
        return wrapper.Serving.bind(version, instance, module, model_cls, methods, held), load_ms

    def _apply(self, bundle: Bundle, full: bool, sources: dict[str, bytes], bump: bool = True) -> tuple[str, list[str]]:
        """A reload to `sources` (the .py files as saved), alone at the gate (swap.py); (kind, why it
        was full). `bump=False`: the same version (only line numbers moved)."""
        from .swap import apply

        with self._gate.alone(self.reload_drain_timeout):
            return apply(self, bundle, full, sources, bump)

    def _switch(self, serving: wrapper.Serving, bundle: Bundle) -> None:
        """Make `serving` the code for every request that starts from now on (one reference swap)."""
        config_changed = bundle.predict_concurrency != self.bundle.predict_concurrency
        self.bundle = bundle
        if config_changed:  # config.yaml says a new size: it wins over an earlier runtime override
            self._concurrency_override = None
        if self._concurrency_override is None and bundle.predict_concurrency != self._lock_size:
            self._set_lock_size(bundle.predict_concurrency)
        self._serving = serving
        self._warner.reset()  # a new version warns again about a misuse it still has

    def _set_examples(self, bundle: Bundle) -> None:
        self.bundle.examples = bundle.examples

    def _retired(self, instance: Any) -> None:
        """A full reload replaced `instance`: tell the on_retire callbacks (no request runs on it)."""
        for callback in list(self._on_retire):
            try:
                callback(instance)
            except Exception as exc:  # a cleanup hook must never break serving
                warnings.warn(f"truss_lab on_retire callback {callback!r} raised {describe(exc)}", RuntimeWarning)

    def _start(self) -> None:
        try:
            try:
                snapshot = Snapshot.take(self.bundle)  # before the import: a save during load() is a reload after it
            except SyntaxError:  # the import says where, as a LoadError
                snapshot = None
            self.resident.sources = snapshot.sources if snapshot is not None else {}
            self._serving, self.load_ms = self._build(self.bundle, 1)
            self.reloader = Reloader(self, snapshot)
        except BaseException:
            self._loop.close()
            self.resident.release()
            raise

    # ------------------------------------------------------------------ hot reload

    def reload(self, full: bool = False) -> "ReloadEvent":
        """Reload edited code now: swap changed methods, or rebuild and load() when needed (full=True forces it)."""
        if self._loop.closed:
            raise TrussLabError(f"{self.name}: closed (tr.close() was called, or the truss was loaded again); load it again")
        return self.reloader.reload(full=full)

    def watch(self, examples: bool | list[str] = False) -> "batch.Watching":
        """Reload on every save, from a background thread. Also a context manager: `with tr.watch(): ...`.

        `examples=True` (or a list of example names): after every successful reload, run the examples
        in the background and diff them with the run before (`tr.examples_diff`, `tr.on_examples`).
        """
        self.reloader.watch()
        if examples:
            self.watch_examples(examples)
        return batch.Watching(self)

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
        return batch.predict_batch(self, inputs, workers)

    def bench(self, inputs: Iterable[Any] | None = None, n: int = 100, concurrency: int = 8, *, progress: bool = True,
              label: str = "", on_result: Callable[[Result], None] | None = None, profile: bool = False) -> BenchReport:
        """Send `n` requests (cycling over `inputs`, or the truss's examples) from `concurrency` workers.

        Shows a tqdm progress bar (a widget in Jupyter, text in a terminal) unless `progress=False`.
        A model error in one request is counted in the report's failures; it does not stop the bench.
        `on_result(result)` is called (in this thread) as each request ends, e.g. to drive a progress widget.
        `profile=True`: every request is profiled (see profile()); the report's `.profile` has them all.
        """
        return batch.bench(self, inputs, n, concurrency, progress=progress, label=label, on_result=on_result, profile=profile)

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
            from .profile_ops import framework_ops

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

    def serve(self, host: str = "127.0.0.1", port: int = 0, max_body: int | None = None,
              reload: Callable[[], Any] | None = None):
        """Serve this model over HTTP with the Truss server's routes, from a background thread.

        Returns the running server (`.url`, `.stop()`); port 0 picks a free port. Same lock, traces and
        hot reload as in the notebook (`reload`: what POST /hot-reload runs instead - a chain's reload,
        for its entrypoint). Needs the `serve` extra (FastAPI, uvicorn).
        """
        try:
            from .serving.server import DEFAULT_MAX_BODY, serve
        except ImportError as exc:
            raise TrussLabError(f"serve() needs FastAPI and uvicorn: pip install 'truss_lab[serve]' ({exc})") from None
        server = serve(self, host, port, DEFAULT_MAX_BODY if max_body is None else max_body, reload=reload)
        self._servers.append(server)
        return server

    def check(self, inputs=None, **kwargs):
        """`truss-lab check` for this model: its examples (or `inputs`) on the real Truss server and
        here, compared, plus the deploy lints; a CheckReport (serving/check.py)."""
        from .serving.check import check

        return check(self, inputs, **kwargs)  # check() takes this LiveModel duck-typed: no import of live

    def restart(self) -> "LiveModel":
        """Start the model afresh in this process: import its code again and run load() on a new
        instance (`reload(full=True)`, raising if that fails; the old one keeps serving then). A worker's
        restart() starts a new process."""
        event = self.reload(full=True)
        if event.kind == "failed":
            raise event.exception or TrussLabError(f"{self.name}: restart failed: {event.error}")
        return self

    def on_retire(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(instance)` with the model instance a full reload replaced (no request runs on
        it any more). A method swap keeps the instance: its class changes in place."""
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
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:  # while the model's event loop still runs (a chainlet closes its clients on it)
            try:
                callback()
            except Exception as exc:  # a front end's cleanup must never stop a close
                warnings.warn(f"{self.name}: an on_close callback failed: {exc}", RuntimeWarning, stacklevel=2)
        self._loop.close()
        self.reloader.clear_callbacks()
        if self._serving is not None and self._serving.code is not None:
            s = self._serving
            s.code.imported.drop()
            s.code.loaded.drop()
            closed = type(s.model_cls.__name__, (), {"__module__": s.model_cls.__module__})
            # nothing of the model's code stays reachable from a closed model: its globals can be collected
            self._serving = wrapper.Serving(s.version, None, None, closed, wrapper.ModelMethods({}), {}, None)
        self.resident.release()  # its modules leave sys.modules, its variables are put back

    def __enter__(self) -> "LiveModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(
    path: str,
    *,
    process: str = "auto",
    concurrency: int | None = None,
    secrets: Mapping[str, str] | None = None,
    environment: Any = None,
    trace_capacity: int = DEFAULT_TRACE_CAPACITY,
    guard: bool = True,
) -> "LiveModel":
    """Load the Truss at `path`: read config.yaml, import model.py, build Model, run load() once.

    `process`: where it runs - "kernel" (this process, which holds one truss, as Truss's image does:
    `tr.model` is the live object, breakpoints work), "worker" (a child process of its own, behind the
    same API: worker.py), or "auto": this process if it holds no truss yet, else a worker. Loading the
    truss this process already holds replaces it (re-running the cell that loads it).
    `guard=False` turns off the lock-misuse guard (guard.py) for this model.
    """
    if process not in ("auto", "kernel", "worker"):
        raise TrussLabError(f"process must be 'auto', 'kernel' or 'worker', got {process!r}")
    if str(path).endswith(".py") and os.path.isfile(path):
        return _load_model_file(path, process, concurrency, secrets, guard)
    bundle = read_bundle(path)
    held = loader.resident()
    if process != "worker" and held is not None:
        if held.bundle.path.resolve() == bundle.path.resolve() and getattr(held, "owner", None) is not None:
            held.owner.close()  # the cell that loaded it ran again: the new one replaces it
        elif process == "kernel":
            raise TrussLabError(f"{bundle.model_name}: this process already holds the truss {held.bundle.model_name!r} "
                                f"({held.bundle.path}): one truss per process, as in Truss's image. Close it first, "
                                f"or load this one with process='worker'")
        else:
            process = "worker"
    options = {"concurrency": concurrency, "secrets": secrets, "environment": environment,
               "trace_capacity": trace_capacity, "guard": guard}
    if process != "worker":
        try:
            return LiveModel(bundle, **options)
        except loader.ProcessTaken:
            if process == "kernel":
                raise
            # auto, and another thread's load took this process meanwhile: a worker, as if it had been first
    from .worker import WorkerModel

    return WorkerModel(bundle.path, **options)


def _load_model_file(path: str, process: str, concurrency: int | None, secrets: Any, guard: bool) -> Any:
    """`truss_lab.load("my_model.py")`: a single-file ModelBase model, as `truss push my_model.py` deploys it."""
    from .chain_gen import is_model_file
    from .chains import ModelFile, load_chain

    if not is_model_file(Path(path)):
        raise TrussLabError(f"{path}: no `class ...(truss_chains.ModelBase)` in it - a Truss Chain's source is loaded "
                            f"with truss_lab.load_chain, a truss is a folder")
    if process == "kernel":
        raise TrussLabError(f"{path}: a single-file model runs its generated truss in a worker process "
                            f"(process='auto' or 'worker')")
    LiveModel.register(ModelFile)  # it has the LiveModel API (its truss's, in a worker)
    tr = ModelFile(load_chain(path, guard=guard, secrets=secrets))
    if concurrency is not None:
        tr.concurrency = concurrency
    return tr

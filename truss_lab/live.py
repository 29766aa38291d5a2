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
        """"kernel" when the truss runs in this process, "worker" in a worker process of its own."""
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
        """Reload edited code now: swap the changed methods on the live instance (its loaded state kept), or
        build a new instance and run `load()` again when the change needs it.

        Args:
            full: always build anew and run `load()`.

        Returns:
            A ReloadEvent: `.kind` is `methods`, `full`, `examples`, `unchanged` or `failed` (the old code
            keeps serving; `.error` and `.location` say what and where).

        Example:
            ```python
            event = tr.reload()
            event.ok, event.kind
            ```
        """
        if self._loop.closed:
            raise TrussLabError(f"{self.name}: closed (tr.close() was called, or the truss was loaded again); load it again")
        return self.reloader.reload(full=full)

    def watch(self, examples: bool | list[str] = False) -> "batch.Watching":
        """Reload on every save, from a background thread. Also a context manager: `with tr.watch(): ...`.

        Args:
            examples: `True` (or a list of example names): after every successful reload, run the examples
                in the background and diff them with the run before (`tr.examples_diff`, `tr.on_examples`).

        Returns:
            A handle that stops watching when used as a context manager.

        Example:
            ```python
            tr.watch(examples=True)
            ```
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
        """Stop reloading on save (and re-running the examples after reloads)."""
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
        """Whether a save reloads the model now (see watch())."""
        return self.reloader.watching

    def on_reload(self, callback: Callable[["ReloadEvent"], None]) -> Callable[[], None]:
        """Call `callback(event)` after each reload; returns a function that unsubscribes it."""
        return self.reloader.on_reload(callback)

    @property
    def reload_history(self) -> list["ReloadEvent"]:
        """The last 200 ReloadEvents, oldest first."""
        return list(self.reloader.history)

    @property
    def reload_count(self) -> int:
        """How many reloads (of any kind, failed ones too) have happened; see `wait_for_reload`."""
        return self.reloader.count

    def wait_for_reload(self, since: int, timeout: float = 10.0) -> "ReloadEvent":
        """Block until the watcher has reloaded after `since` (a `reload_count` read before your edit).

        Args:
            since: `tr.reload_count` as it was before the edit.
            timeout: seconds to wait.

        Returns:
            The newest ReloadEvent.

        Raises:
            TrussLabError: no reload within `timeout`.

        Example:
            ```python
            n = tr.reload_count
            path.write_text(new_code)
            event = tr.wait_for_reload(since=n)
            ```
        """
        event = self.reloader.wait(since, timeout)
        if event is None:
            hint = "" if self.watching else " (the watcher is off: tr.watch() or %truss watch on)"
            raise TrussLabError(f"{self.name}: no reload within {timeout:g} s{hint}")
        return event

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        """The model's name: config.yaml's `model_name`, else the folder's name."""
        return self.bundle.model_name

    @property
    def path(self) -> Path:
        """The truss folder."""
        return self.bundle.path

    @property
    def model(self) -> Any:
        """The live Model instance (its loaded weights, its state)."""
        return self._serving.instance

    @property
    def version(self) -> int:
        """The code version serving now: 1 at load, one more for every reload that changed what runs."""
        return self._serving.version

    @property
    def serving(self) -> wrapper.Serving:
        """What serves requests now: the model instance, its class, its methods' calling conventions (in this process only)."""
        return self._serving

    @property
    def examples(self) -> dict[str, Any]:
        """The examples of examples.yaml: `{name: input}`, in file order."""
        return {e.name: e.input for e in self.bundle.examples}

    def example(self, name: str) -> Any:
        """The input of the example called `name` in examples.yaml.

        Args:
            name: the example's name.

        Returns:
            Its input, as `predict` takes it.

        Raises:
            BundleError: there is no example of that name (the error lists those there are).

        Example:
            ```python
            tr.predict(tr.example("three"))
            ```
        """
        return self.bundle.example(name)

    def methods(self) -> list[str]:
        """The model's methods Truss calls, in the order it calls them (`load`, `preprocess`, `predict`, ...)."""
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
        """Run every input with `workers` concurrent threads, through the same lock.

        Args:
            inputs: the request bodies.
            workers: how many requests at once.

        Returns:
            A Result per input, in input order; a model error in one is kept in its Result and does not
            stop the others.

        Example:
            ```python
            results = tr.predict_batch([tr.example("three"), tr.example("seven")], workers=2)
            ```
        """
        return batch.predict_batch(self, inputs, workers)

    def bench(self, inputs: Iterable[Any] | None = None, n: int = 100, concurrency: int = 8, *, progress: bool = True,
              label: str = "", on_result: Callable[[Result], None] | None = None, profile: bool = False) -> BenchReport:
        """Send `n` requests from `concurrency` workers and report on them, the lock above all.

        Args:
            inputs: the request bodies to cycle over (default: the truss's examples).
            n: how many requests.
            concurrency: how many at once.
            progress: a tqdm bar (a widget in Jupyter, text in a terminal) while it runs.
            label: a name for the report (compare() shows it).
            on_result: called in this thread with each Result as it ends (to drive a progress widget).
            profile: profile every request (see profile()); the report's `.profile` has them all.

        Returns:
            A BenchReport: throughput, latency percentiles per stage, lock wait and utilization, the bound
            `lock size / mean predict`, failures by stage (a failing request is counted, the bench goes on)
            and the lock-misuse findings.

        Raises:
            TrussLabError: no inputs and no examples, or `n` / `concurrency` not positive integers.

        Example:
            ```python
            report = tr.bench(n=40, concurrency=4, progress=False)
            report.throughput, report.lock_utilization
            ```
        """
        return batch.bench(self, inputs, n, concurrency, progress=progress, label=label, on_result=on_result, profile=profile)

    def report(self, last: int | None = None):
        """A Report over the kept traces, with the reloads in their time.

        Args:
            last: only the last `last` requests.

        Returns:
            A Report (throughput, latency per stage, lock wait and utilization, failures).

        Example:
            ```python
            tr.report(last=10).to_chrome_trace("trace.json")
            ```
        """
        report = super().report(last)
        if report.traces:
            t0 = time.time() - (time.perf_counter() - report.traces[0].start)
            report.reloads = [e for e in self.reload_history if e.when >= t0]
        return report

    def profile(self, model_input: Any = None, n: int = 1, *, interval: float = 0.001, ops: bool = False,
                logdir: str | None = None) -> "Profile":
        """Profile requests stage by stage: where inside preprocess, predict and postprocess the time went.

        The requests go through the normal runner - the same lock, traces and guard - with a sampling
        profiler (pyinstrument) on every stage.

        Args:
            model_input: the request body (default: each example in turn).
            n: how many requests.
            interval: the sampling interval in seconds.
            ops: also run them under the framework's own profiler (PyTorch's or TensorFlow's) and list the
                heaviest ops predict ran (`profile.ops`; kernels on a GPU).
            logdir: where the framework's own trace goes (with `ops=True`).

        Returns:
            A Profile: per stage its call tree (your functions, library calls folded at the call) and hot
            spots with self and total time.

        Example:
            ```python
            p = tr.profile(tr.example("three"), n=5)
            print(p.tree("predict"))
            ```
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
        """Serve this model over HTTP with the Truss server's routes, from a background thread: the same lock,
        traces and hot reload as in the notebook (needs the `serve` extra).

        Args:
            host: the address to bind (127.0.0.1 unless you say otherwise).
            port: the port; 0 picks a free one.
            max_body: bigger request bodies get 413 (default 16 MB).
            reload: what `POST /hot-reload` runs instead of this model's reload (a chain's, for its
                entrypoint).

        Returns:
            The running server: `.url`, `.stop()`.

        Example:
            ```python
            server = tr.serve()
            server.url           # http://127.0.0.1:PORT; POST /v1/models/model:predict
            server.stop()
            ```
        """
        try:
            from .serving.server import DEFAULT_MAX_BODY, serve
        except ImportError as exc:
            raise TrussLabError(f"serve() needs FastAPI and uvicorn: pip install 'truss_lab[serve]' ({exc})") from None
        server = serve(self, host, port, DEFAULT_MAX_BODY if max_body is None else max_body, reload=reload)
        self._servers.append(server)
        return server

    def check(self, inputs=None, **kwargs):
        """`truss-lab check` for this model: its examples (or `inputs`) on the real Truss server and here,
        compared, plus the deploy lints.

        Args:
            inputs: the inputs to send instead of the examples.
            **kwargs: as for `truss_lab.check`.

        Returns:
            A CheckReport (`.ok`).

        Example:
            ```python
            tr.check().ok
            ```
        """
        from .serving.check import check

        return check(self, inputs, **kwargs)  # check() takes this LiveModel duck-typed: no import of live

    def restart(self) -> "LiveModel":
        """Start the model afresh: import its code again and run `load()` on a new instance
        (`reload(full=True)`; a worker's restart starts a new process).

        Returns:
            The model itself.

        Raises:
            LoadError: the new load failed (the old instance keeps serving).

        Example:
            ```python
            tr.restart()
            ```
        """
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
        `on_close`/`on_reload` lets go of it, so it (and its weights) can be garbage-collected.

        Also a context manager: `with truss_lab.load(path) as tr: ...` closes it at the end.

        Example:
            ```python
            tr.close()
            ```
        """
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
    """Load the Truss at `path`: read config.yaml, import model.py, build `Model`, run `load()` once.

    A `path` ending in `.py` is a single-file `ModelBase` model (`truss init --python-config`), loaded
    as `truss push my_model.py` deploys it, always in a worker process.

    Args:
        path: a Truss folder (`config.yaml`, `model/model.py`), or a single-file model `my_model.py`.
        process: where it runs: `"kernel"` (this process, which holds one truss, as Truss's image does:
            `tr.model` is the live object, breakpoints work), `"worker"` (a child process of its own,
            behind the same API), or `"auto"`: this process if it holds no truss yet, else a worker.
            Loading the truss this process already holds replaces it (re-running the cell that loads it).
        concurrency: the lock size, instead of `runtime.predict_concurrency`.
        secrets: secret values by name; they win over config defaults and `TRUSS_SECRET_<name>`
            variables, as in Truss.
        environment: passed to `Model.__init__` as `environment` (and to `setup_environment`).
        trace_capacity: how many request traces to keep for reports and timelines.
        guard: `False` turns off the lock-misuse guard for this model.

    Returns:
        A LiveModel (a WorkerModel when it runs in a worker process: the same API).

    Raises:
        BundleError: the folder, a file or a config key is wrong (one line naming it).
        LoadError: importing the model, building it or its `load()` failed (with file:line).
        TrussLabError: a bad argument (`process=` unknown, a `.py` file that is no model).

    Example:
        ```python
        tr = truss_lab.load("examples/digits")
        tr.predict(tr.example("three")).output    # {'predictions': {'three': 100.0, ...}}
        ```
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

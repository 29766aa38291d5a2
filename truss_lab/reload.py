"""Hot reload: re-import edited model code, swap what changed, keep the loaded model.

The rules (what a user sees):
  * only methods other than __init__/load changed (or module-level helpers): the new methods serve
    the *same* instance state, load() is not re-run, module/class values follow carry.py's rule;
  * __init__ or load changed, config.yaml or data/ changed: a new instance is built and load()ed, and
    only switched to once that succeeded;
  * nothing changed in behaviour (whitespace, comments): nothing is swapped;
  * anything fails (syntax, import, class missing, load() raising): the old code keeps serving and
    the event names file:line. The next good save recovers.

What changed is decided from file contents (a fingerprint of each .py file's syntax tree: no line
numbers, no comments), not from the watcher's events.

Atomic switch: a method swap makes a new instance of the new class that shares the live instance's
`__dict__` (the weights, any state), so a request that started on version k runs version k's class
to the end, `self.helper()` calls included, and the next request gets version k+1.
"""

from __future__ import annotations

import ast
import atexit
import collections
import dataclasses
import hashlib
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import loader
from .carry import NeedsFullReload
from .bundle import Bundle, read_bundle
from .errors import BundleError, TrussLabError, describe
from .wrapper import Serving

FULL_RELOAD_METHODS = ("__init__", "load", "__post_init__")  # what builds the state a swap keeps
HISTORY = 200


@dataclass
class ReloadEvent:
    """One reload: what happened, to which version, what changed, and how long it took."""

    version: int  # the version serving after this event
    kind: str  # "methods" | "full" | "examples" (examples.yaml only: the model untouched) | "unchanged" | "failed"
    changed: list[str] = field(default_factory=list)
    error: str | None = None
    location: str | None = None
    duration_ms: float = 0.0
    trigger: str = "manual"  # "manual" | "watch"
    when: float = field(default_factory=time.time)
    exception: BaseException | None = field(default=None, repr=False, compare=False)  # a failed one's error (its traceback)

    @property
    def ok(self) -> bool:
        return self.kind != "failed"

    def summary(self) -> str:
        what = ", ".join(self.changed) if self.changed else ""
        if self.kind == "methods":
            return f"v{self.version}: swapped {what} in {self.duration_ms:.0f} ms (model kept, load() not re-run)"
        if self.kind == "full":
            return f"v{self.version}: full reload ({what}) in {self.duration_ms:.0f} ms (load() re-run)"
        if self.kind == "examples":
            return f"v{self.version}: {what} changed; the model was not reloaded"
        if self.kind == "unchanged":
            return f"v{self.version}: no change in behaviour{f' ({what})' if what else ''}; nothing swapped"
        return f"reload failed: {self.error} (still serving v{self.version})"

    def __str__(self) -> str:
        return self.summary()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)


# ------------------------------------------------------------------------------ fingerprints


def _digest(node: ast.AST | list) -> str:
    """A node's (or nodes') fingerprint: its AST dump, which has no line numbers and no comments."""
    nodes = node if isinstance(node, list) else [node]
    return hashlib.sha1("\n".join(ast.dump(n) for n in nodes).encode()).hexdigest()


@dataclass
class PyFile:
    """A parsed .py file: its fingerprint and, for model.py, the model class's, method by method."""

    module: str  # the whole file
    methods: dict[str, str]  # model class only: method name -> fingerprint; "<class body>" for the rest
    outside_class: str  # the file with the model class left out
    classes: dict[str, dict[str, str]] = field(default_factory=dict)  # every class: method -> fingerprint
    model_bases: tuple[str, ...] = ()  # model class only: the names of its bases
    model_is_dataclass: bool = False  # its __init__ is generated from the class body


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def fingerprint_file(path: Path, class_name: str | None) -> PyFile:
    """Parse `path` (a SyntaxError propagates, with its line) and fingerprint it."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    methods: dict[str, str] = {}
    outside: list[ast.AST] = []
    classes: dict[str, dict[str, str]] = {}
    bases: tuple[str, ...] = ()
    is_dataclass = False
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            classes[stmt.name] = {m.name: _digest(m) for m in stmt.body if isinstance(m, _DEFS)}
        if class_name and isinstance(stmt, ast.ClassDef) and stmt.name == class_name:
            methods = dict(classes[stmt.name])
            rest = [n for n in stmt.body if not isinstance(n, _DEFS)]
            methods["<class body>"] = _digest([*stmt.bases, *stmt.keywords, *stmt.decorator_list, *rest])
            bases = tuple(_last_name(b) for b in stmt.bases if _last_name(b))
            is_dataclass = any("dataclass" in (_last_name(d.func if isinstance(d, ast.Call) else d) or "") for d in stmt.decorator_list)
        else:
            outside.append(stmt)
    return PyFile(module=_digest(tree), methods=methods, outside_class=_digest(outside), classes=classes,
                  model_bases=bases, model_is_dataclass=is_dataclass)


def _last_name(node: ast.AST) -> str | None:
    """`Base` for `Base`, `mod.Base` or `Base[T]`."""
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


@dataclass
class Snapshot:
    """Everything a reload compares: config, data files (size, mtime), and .py fingerprints."""

    config: str
    data: dict[str, tuple[int, int]]
    examples: str  # sha1 of examples.yaml ("" when there is none): an edit reloads the examples, not the model
    py_bytes: dict[str, str]  # rel path -> sha1 of the bytes (cheap check before compiling)
    py: dict[str, PyFile]
    sources: dict[str, bytes] = field(default_factory=dict, repr=False)  # absolute path -> bytes: what a version compiles

    @classmethod
    def take(cls, bundle: Bundle, previous: "Snapshot | None" = None) -> "Snapshot":
        """Read the folder; compile only .py files whose bytes changed since `previous`."""
        root = bundle.path
        config = hashlib.sha1(bundle.config_path.read_bytes()).hexdigest() if bundle.config_path.exists() else ""
        examples = hashlib.sha1(bundle.examples_path.read_bytes()).hexdigest() if bundle.examples_path.is_file() else ""
        data: dict[str, tuple[int, int]] = {}
        if bundle.data_dir.is_dir():
            for p in sorted(bundle.data_dir.rglob("*")):
                if p.is_file() and not _ignored(p):
                    st = p.stat()
                    data[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
        py_bytes: dict[str, str] = {}
        py: dict[str, PyFile] = {}
        sources: dict[str, bytes] = {}
        for folder in (bundle.model_dir, bundle.packages_dir):
            if not folder.is_dir():
                continue
            for p in sorted(folder.rglob("*.py")):
                if _ignored(p):
                    continue
                rel = str(p.relative_to(root))
                raw = p.read_bytes()
                sources[str(p)] = raw
                py_bytes[rel] = hashlib.sha1(raw).hexdigest()
                if previous is not None and previous.py_bytes.get(rel) == py_bytes[rel]:
                    py[rel] = previous.py[rel]
                elif p == bundle.model_file:
                    py[rel] = fingerprint_file(p, bundle.model_class_name)
                else:
                    try:
                        py[rel] = fingerprint_file(p, None)
                    except SyntaxError:  # a scratch file the model may never import: its import says so if it does
                        py[rel] = PyFile(module="unparseable:" + py_bytes[rel], methods={}, outside_class="")
        return cls(config=config, data=data, examples=examples, py_bytes=py_bytes, py=py, sources=sources)


def _ignored(path: Path) -> bool:
    return any(part in ("__pycache__", ".ipynb_checkpoints") or part.startswith(".") for part in path.parts[-3:])


@dataclass
class Diff:
    config: bool
    data: list[str]
    files: list[str]  # .py files whose behaviour changed
    methods: list[str]  # model class methods changed/added/removed
    module_level: bool  # model.py changed outside the model class
    state_builders: list[str] = field(default_factory=list)  # e.g. "Base.load", "dataclass fields": need a full reload

    @property
    def needs_full(self) -> bool:
        return (self.config or bool(self.data) or any(m in FULL_RELOAD_METHODS for m in self.methods)
                or bool(self.state_builders))

    @property
    def any(self) -> bool:
        return self.config or bool(self.data) or bool(self.files)

    def names(self, model_rel: str) -> list[str]:
        out = ["config.yaml"] if self.config else []
        out += self.data
        out += self.methods
        out += [b for b in self.state_builders if b != "dataclass fields" or "dataclass fields" not in out]
        if self.module_level:
            out.append("module-level code")
        out += [f for f in self.files if f != model_rel]
        return out


def diff(old: Snapshot, new: Snapshot, model_rel: str) -> Diff:
    data = sorted(k for k in set(old.data) | set(new.data) if old.data.get(k) != new.data.get(k))
    def module_fp(snapshot: Snapshot, rel: str) -> str | None:
        return snapshot.py[rel].module if rel in snapshot.py else None

    files = sorted(k for k in set(old.py) | set(new.py) if module_fp(old, k) != module_fp(new, k))
    methods: list[str] = []
    module_level = False
    if model_rel in files and model_rel in old.py and model_rel in new.py:
        a, b = old.py[model_rel].methods, new.py[model_rel].methods
        methods = sorted(m for m in set(a) | set(b) if a.get(m) != b.get(m))
        if "<class body>" in methods:
            methods.remove("<class body>")
            module_level = True  # class attributes (constants) count as code around the methods
        module_level = module_level or old.py[model_rel].outside_class != new.py[model_rel].outside_class
    return Diff(config=old.config != new.config, data=data, files=files, methods=methods, module_level=module_level,
                state_builders=_state_builders(old, new, model_rel))


def _state_builders(old: Snapshot, new: Snapshot, model_rel: str) -> list[str]:
    """What changed in how the model's state is built, beyond its own __init__/load: a base class's
    __init__, load or __post_init__ (in any file of the truss), or a dataclass model's fields."""
    if model_rel not in old.py or model_rel not in new.py:
        return []
    model_old, model_new = old.py[model_rel], new.py[model_rel]
    found = []
    if model_new.model_is_dataclass and model_old.methods.get("<class body>") != model_new.methods.get("<class body>"):
        found.append("dataclass fields")
    for base in sorted(set(model_old.model_bases) | set(model_new.model_bases)):
        def methods_of(snapshot: Snapshot) -> dict[str, str]:
            for f in snapshot.py.values():
                if base in f.classes:
                    return f.classes[base]
            return {}

        a, b = methods_of(old), methods_of(new)
        found += [f"{base}.{m}" for m in FULL_RELOAD_METHODS if a.get(m) != b.get(m)]
    return found


# ------------------------------------------------------------------------------ the reloader


class Reloadable(Protocol):
    """What the Reloader needs from the model it reloads (a LiveModel, live.py)."""

    bundle: Bundle
    name: str
    activity: Any  # trace.ActivityLog: when the model's code ran

    @property
    def serving(self) -> Serving: ...

    @property
    def version(self) -> int: ...

    def _build(self, bundle: Bundle, version: int, sources: dict[str, bytes]) -> tuple[Serving, float]:
        """Import, construct and load() a new version (a full reload); raise LoadError on failure."""

    def _rebind(self, bundle: Bundle, version: int, sources: dict[str, bytes]) -> Serving:
        """Import a new version and bind it to the live instance's state (a method swap); raise
        carry.NeedsFullReload when run-time state was built by code that changed."""

    def _switch(self, serving: Serving, bundle: Bundle) -> None:
        """Make `serving` the code every request from now on runs."""

    def _set_examples(self, bundle: Bundle) -> None:
        """Take `bundle`'s examples (examples.yaml was edited; nothing else changed)."""

    def retire(self, serving: Serving) -> None:
        """The replaced version: drop its modules once no request runs on it."""


class Reloader:
    """Owns a LiveModel's reloads: one at a time, a history, callbacks, and the file watcher."""

    def __init__(self, live: Reloadable, snapshot: "Snapshot | None" = None):
        self._setup(live)
        self.snapshot = snapshot if snapshot is not None else Snapshot.take(live.bundle)

    def _setup(self, live: Any) -> None:
        """Everything but what is reloaded: history, callbacks, the watcher (a chain's reloader shares it)."""
        self.live = live
        self._lock = threading.Lock()
        self.history: collections.deque[ReloadEvent] = collections.deque(maxlen=HISTORY)
        self._callbacks: list[Callable[[ReloadEvent], None]] = []
        self._recorded = threading.Condition()
        self.count = 0  # events ever recorded (the history keeps only the last HISTORY)
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    # -------------------------------------------------------------- reload

    def reload(self, full: bool = False, trigger: str = "manual") -> ReloadEvent:
        with self._lock:
            t0 = time.perf_counter()
            event = self._reload(full)
            if event is None:  # only files the model itself wrote changed: nothing to reload or report
                return ReloadEvent(self.live.version, "unchanged", [], trigger=trigger)
            event.duration_ms = (time.perf_counter() - t0) * 1000.0
            event.trigger = trigger
            self._record(event)
        self._notify(event)
        return event

    def _record(self, event: ReloadEvent) -> None:
        with self._recorded:
            self.history.append(event)
            self.count += 1
            self._recorded.notify_all()

    def wait(self, since: int, timeout: float | None) -> ReloadEvent | None:
        """The latest event once more than `since` have been recorded; None if `timeout` passes first."""
        with self._recorded:
            if not self._recorded.wait_for(lambda: self.count > since, timeout):
                return None
            return self.history[-1]

    def _notify(self, event: ReloadEvent) -> None:
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception as exc:  # a display callback must never break reloading
                warnings.warn(f"truss_lab reload callback {callback!r} raised {describe(exc)}", RuntimeWarning)

    def _reload(self, full: bool) -> ReloadEvent | None:
        live = self.live
        current = live.serving
        try:
            bundle = read_bundle(live.bundle.path)
        except BundleError as exc:
            return ReloadEvent(current.version, "failed", ["config.yaml"], error=str(exc), location=exc.location, exception=exc)
        model_rel = str(bundle.model_file.relative_to(bundle.path))
        try:
            new_snapshot = Snapshot.take(bundle, self.snapshot)
        except SyntaxError as exc:
            err = loader.load_error(exc, bundle, f"importing {Path(exc.filename or '?').name}")
            return ReloadEvent(current.version, "failed", error=str(err), location=err.location, exception=err)
        except OSError as exc:
            return ReloadEvent(current.version, "failed", error=f"cannot read the truss folder: {exc}")
        d = diff(self.snapshot, new_snapshot, model_rel)
        model_wrote = False
        if d.data and not full:
            user = self._without_model_writes(d, new_snapshot)
            model_wrote, d = user is not d, user
        names = d.names(model_rel)
        examples_changed = new_snapshot.examples != self.snapshot.examples
        if examples_changed:
            names.append(bundle.examples_filename)
        if not full and not d.any:
            self.snapshot = new_snapshot
            if examples_changed:  # examples.yaml alone: the new examples, the same loaded model
                live._set_examples(bundle)
                return ReloadEvent(current.version, "examples", names)
            return None if model_wrote else ReloadEvent(current.version, "unchanged", [])
        version = current.version + 1  # reloads are serialised, and a failed one leaves no trace
        sources = new_snapshot.sources
        try:
            if full or d.needs_full:
                serving, _ = live._build(bundle, version, sources)
                kind = "full"
            else:
                try:
                    serving = live._rebind(bundle, version, sources)
                    kind = "methods"
                except NeedsFullReload as why:  # state built by code that changed: build it again
                    names += why.reasons
                    serving, _ = live._build(bundle, version, sources)
                    kind = "full"
        except TrussLabError as exc:  # LoadError, and ModelMethods' definition errors
            return ReloadEvent(current.version, "failed", names, error=str(exc), location=getattr(exc, "location", None), exception=exc)
        except (Exception, SystemExit) as exc:  # anything else user code raised (sys.exit() in model.py, ...)
            err = loader.load_error(exc, bundle, "reload")
            return ReloadEvent(current.version, "failed", names, error=str(err), location=err.location, exception=err)
        live._switch(serving, bundle)
        self.snapshot = new_snapshot
        live.retire(current)  # its modules go once no request runs on them
        return ReloadEvent(serving.version, kind, names or ["forced"])

    def _without_model_writes(self, d: Diff, new: Snapshot) -> Diff:
        """`d` without the data/ files the model itself wrote (their mtime falls while its code ran:
        load() writing a cache, a request appending to a log). A file the user replaces still counts."""
        user = []
        for rel in d.data:
            stamp = new.data.get(rel)
            if stamp is not None and self.live.activity.covers(stamp[1] / 1e9):
                continue
            user.append(rel)
        return d if len(user) == len(d.data) else dataclasses.replace(d, data=user)

    # -------------------------------------------------------------- callbacks

    def on_reload(self, callback: Callable[[ReloadEvent], None]) -> Callable[[], None]:
        """Call `callback(event)` after every reload (from the watcher's thread); returns an unsubscribe
        (which holds the callback list, not the model: keeping it never keeps the model alive)."""
        callbacks = self._callbacks
        callbacks.append(callback)

        def remove() -> None:
            if callback in callbacks:
                callbacks.remove(callback)

        return remove

    def clear_callbacks(self) -> None:
        self._callbacks.clear()

    # -------------------------------------------------------------- watching

    @property
    def watching(self) -> bool:
        return self._watcher is not None and self._watcher.is_alive()

    @property
    def watch_path(self) -> Path:
        """The folder whose saves reload: the truss folder."""
        return self.live.bundle.path

    def watch_filter(self, watchfiles: Any) -> Any:
        """Which changes under watch_path count (editor droppings and notebook checkpoints do not)."""
        return watchfiles.DefaultFilter(ignore_dirs=(*watchfiles.DefaultFilter.ignore_dirs, ".ipynb_checkpoints"))

    def watch(self, step_ms: int = 12, debounce_ms: int = 400) -> None:
        """Reload on save, from a daemon thread. Saves within `step_ms` of each other count as one."""
        if self.watching:
            return
        import watchfiles  # lazy: only a watching LiveModel needs it

        self._stop = threading.Event()
        ready = threading.Event()
        stop = self._stop
        path = self.watch_path

        watch_filter = self.watch_filter(watchfiles)

        def run() -> None:
            try:
                # yield_on_timeout: an empty set every `rust_timeout` ms of quiet; the first one
                # tells us the OS watch is in place, so watch() can return knowing no save is missed.
                for changes in watchfiles.watch(
                    path,
                    watch_filter=watch_filter,
                    step=step_ms,
                    debounce=debounce_ms,
                    stop_event=stop,
                    rust_timeout=100,
                    yield_on_timeout=True,
                    raise_interrupt=False,
                ):
                    ready.set()
                    if stop.is_set():
                        break
                    if changes:
                        try:
                            self.reload(trigger="watch")
                        except Exception as exc:  # never let one save stop the watcher: report it instead
                            event = ReloadEvent(self.live.version, "failed", error=f"reload failed: {describe(exc)}",
                                                trigger="watch", exception=exc)
                            self._record(event)
                            self._notify(event)
            except Exception as exc:  # the folder vanished, say: report it like a failed reload
                event = ReloadEvent(self.live.version, "failed", error=f"watcher stopped: {describe(exc)}", trigger="watch")
                self._record(event)
                self._notify(event)
            finally:
                ready.set()

        self._watcher = threading.Thread(target=run, name=f"truss-lab-watch[{self.live.name}]", daemon=True)
        self._watcher.start()
        _WATCHING.add(self)
        if not ready.wait(10):
            warnings.warn(f"truss_lab: the file watcher on {path} took over 10 s to start", RuntimeWarning)

    def unwatch(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
            self._watcher = None
        _WATCHING.discard(self)


_WATCHING: "weakref.WeakSet[Reloader]" = weakref.WeakSet()


@atexit.register  # before the interpreter kills daemon threads: one in watchfiles 0.19's Rust code aborts the process
def _stop_watchers() -> None:
    for reloader in list(_WATCHING):
        reloader.unwatch(timeout=2.0)


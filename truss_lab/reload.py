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

Atomic switch: a reload waits at the gate (lock.Gate) until no request runs, then swaps the live
instance's `__class__` in place (swap.py; the weights and any state stay) or builds a new instance
(a full reload), so a request that started on version k runs version k's code to the end,
`self.helper()` calls included, and the next request gets version k+1.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import loader
from .bundle import Bundle, read_bundle
from .errors import BundleError, ModelError, TrussLabError, describe
from .lock import GateBusy
from .snapshot import Diff, Snapshot, diff
from .wrapper import Serving

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
        if self.kind == "unchanged" and self.changed == ["line numbers"]:
            return f"v{self.version}: no change in behaviour (only lines moved: imported again, so errors name the lines as saved)"
        if self.kind == "unchanged":
            return f"v{self.version}: no change in behaviour{f' ({what})' if what else ''}; nothing swapped"
        return f"reload failed: {self.error} (still serving v{self.version})"

    def __str__(self) -> str:
        return self.summary()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)


# ------------------------------------------------------------------------------ fingerprints


def _without_frames(exc: BaseException) -> BaseException:
    """`exc` and its causes without their tracebacks: a failed reload's event must not keep the frames
    (and through them the instance and weights it was building) alive."""
    if isinstance(exc, ModelError) and exc.remote_traceback is None:
        exc.remote_traceback = exc.model_traceback()  # the model's frames as text (`%truss traceback`), no frames
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return exc


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

    def _apply(self, bundle: Bundle, full: bool, sources: dict[str, bytes]) -> tuple[str, list[str]]:
        """Reload to `sources` (the truss's .py files as saved), alone at the gate: ("methods" | "full",
        why it was full). Raises with the old code serving (GateBusy: requests in flight did not end)."""

    def _set_examples(self, bundle: Bundle) -> None:
        """Take `bundle`'s examples (examples.yaml was edited; nothing else changed)."""


def _truncated(changes: set) -> bool:
    """Whether a file of the batch is empty now: a save that truncates the file and then writes it,
    seen between the two on a busy machine (importing it would fail with a misleading error)."""
    for _, path in changes:
        try:
            if os.path.getsize(path) == 0:
                return True
        except OSError:
            pass
    return False


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
            bundle = self._bundle(live.bundle)
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
            relined = new_snapshot.py_bytes != self.snapshot.py_bytes  # comments, blank lines: the code moved
            self.snapshot = new_snapshot
            if relined:  # imported again, so a traceback names the lines the file has now
                with contextlib.suppress(Exception):
                    live._apply(bundle, False, new_snapshot.sources, bump=False)
            if examples_changed:  # examples.yaml alone: the new examples, the same loaded model
                live._set_examples(bundle)
                return ReloadEvent(live.version, "examples", names)
            return None if model_wrote else ReloadEvent(live.version, "unchanged", ["line numbers"] if relined else [])
        try:
            kind, reasons = live._apply(bundle, full or d.needs_full, new_snapshot.sources)  # alone at the gate
        except GateBusy as exc:
            return ReloadEvent(current.version, "failed", names, error=f"not applied: {exc} (a reload waits for the requests "
                                                                          f"in flight, streams to their end); save again, or tr.reload()")
        except TrussLabError as exc:  # LoadError, and ModelMethods' definition errors
            return ReloadEvent(current.version, "failed", names, error=str(exc), location=getattr(exc, "location", None),
                               exception=_without_frames(exc))
        except (Exception, SystemExit) as exc:  # anything else user code raised (sys.exit() in model.py, ...)
            err = loader.load_error(exc, bundle, "reload")
            return ReloadEvent(current.version, "failed", names, error=str(err), location=err.location, exception=_without_frames(err))
        self.snapshot = new_snapshot
        return ReloadEvent(live.version, kind, names + reasons or ["forced"])

    def _bundle(self, serving: Bundle) -> Bundle:
        """The folder read again - unless config.yaml and the examples are as they were when it was
        last read (parsing YAML is a millisecond of every save). That read's bundle, not the serving
        one: a reload that failed read a config the model does not serve yet."""
        files = (serving.config_path, serving.examples_path)
        now = tuple(p.read_bytes() if p.is_file() else None for p in files)
        read = getattr(self, "_read", None)
        if read is not None and read[0] == now:
            return read[1]
        bundle = read_bundle(serving.path)
        self._read = (now, bundle)
        return bundle

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
        paths = getattr(self, "watch_paths", None) or (self.watch_path,)

        watch_filter = self.watch_filter(watchfiles)

        def run() -> None:
            held_back = 0
            try:
                # yield_on_timeout: an empty set every `rust_timeout` ms of quiet; the first one
                # tells us the OS watch is in place, so watch() can return knowing no save is missed.
                for changes in watchfiles.watch(
                    *paths,
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
                    if changes and not held_back and _truncated(changes):
                        held_back = 1  # an editor's save caught between truncating and writing: its write follows
                        continue
                    if held_back and not changes and held_back < 3:
                        held_back += 1  # quiet ticks of 100 ms; after 0.3 s the file is empty on purpose
                        continue
                    if changes or held_back:
                        held_back = 0
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
            warnings.warn(f"truss_lab: the file watcher on {', '.join(map(str, paths))} took over 10 s to start", RuntimeWarning)

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


"""What did my save change? Every example re-run after a reload, diffed against the run before it.

    tr.watch(examples=True)          # after every successful reload, run examples.yaml in the background
    tr.examples_diff                 # the latest ExamplesDiff (also passed to tr.on_examples(callback))
    run_examples(tr)                 # one run now: {name: ExampleOutcome}

Examples go through the normal runner (same lock, same traces). A save that lands while a run is
still going cancels it: requests already inside the model finish, the rest are skipped, and only the
newest code's run is diffed. Snapshots for CI (`truss-lab snapshot` / `truss-lab test`) store the same
outcomes next to the truss, one readable JSON entry per example.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .jsondiff import diff_paths, rank_changes, short_json
from .serialization import truss_json

SNAPSHOT_FILE = "examples.snapshot.json"
RTOL, ATOL = 1e-4, 1e-6  # an example's numbers within this count as unchanged (float noise across runs)
STAGES = ("pre", "predict", "post")


@dataclass
class ExampleOutcome:
    """One example's run: its output as JSON (or the error: stage, file:line, message) and its stage times."""

    name: str
    ok: bool
    output: Any = None  # as the server would send it (JSON values)
    error: str | None = None
    stage: str | None = None
    location: str | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    version: int | None = None  # the code version that answered it

    def to_json(self) -> dict:
        out = {"ok": self.ok, "output": self.output} if self.ok else {"ok": False, "error": self.error, "stage": self.stage}
        return out

    @classmethod
    def of(cls, name: str, result) -> "ExampleOutcome":
        t = result.trace
        ran = {"pre": t.pre_start, "predict": t.predict_start, "post": t.post_start}  # which stages ran: never how fast
        stages = {s: ms for s, ms in (("pre", t.pre_ms), ("predict", t.predict_ms), ("post", t.post_ms)) if ran[s] is not None}
        if result.error is not None:
            err = result.error
            return cls(name, False, error=str(err), stage=err.stage, location=err.location, stage_ms=stages, version=getattr(t, "version", None))
        try:
            output = json.loads(truss_json(result.output))
        except (TypeError, ValueError):
            output = repr(result.output)
        return cls(name, True, output, stage_ms=stages, version=getattr(t, "version", None))


@dataclass
class ExampleChange:
    name: str
    status: str  # unchanged | changed | now failing | fixed | still failing | new | removed | first run
    paths: list[tuple[str, Any, Any]] = field(default_factory=list)  # changed JSON paths: (path, old, new)
    ranks: list[str] = field(default_factory=list)  # 'seven: #1 -> #2'
    stage_ms: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (old, new)
    error: str | None = None  # for now failing / still failing: "stage at file:line: message"
    old: Any = field(default=None, repr=False)  # the outputs, for pictures of image outputs
    new: Any = field(default=None, repr=False)

    def line(self) -> str:
        parts = [f"{self.name}: {self.status}"]
        if self.ranks:
            parts.append("; ".join(self.ranks))
        elif self.paths:
            parts.append("; ".join(f"{p or '<output>'}: {short_json(a)} -> {short_json(b)}" for p, a, b in self.paths[:5])
                         + (f" (+{len(self.paths) - 5} more)" if len(self.paths) > 5 else ""))
        if self.error:
            parts.append(self.error)
        # every stage that ran in both versions, however fast: what is shown never depends on the machine's speed
        times = [f"{s} {a:.1f} -> {b:.1f} ms (x{b / max(a, 1e-9):.2f})" for s, (a, b) in self.stage_ms.items()]
        if times:
            parts.append(", ".join(times))
        return " — ".join(parts)


@dataclass
class ExamplesDiff:
    """What one save changed, example by example."""

    old_version: int | None
    new_version: int
    changes: list[ExampleChange]
    cancelled: bool = False  # a newer save cancelled this run (not shown as a diff)

    def count(self, status: str) -> int:
        return sum(1 for c in self.changes if c.status == status)

    @property
    def any_change(self) -> bool:
        return any(c.status != "unchanged" for c in self.changes)

    def summary(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in ("changed", "now failing", "fixed", "still failing", "new", "removed",
                                                            "first run") if self.count(s))
        return (f"examples v{self.old_version} -> v{self.new_version}: "
                f"{counts or 'all unchanged'} ({len(self.changes)} examples)")

    def __str__(self) -> str:
        return "\n".join([self.summary()] + ["  " + c.line() for c in self.changes if c.status != "unchanged"])

    __repr__ = __str__

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)


def example_inputs(live, names: list[str] | None = None) -> list[tuple[str, Any]]:
    examples = list(live.bundle.examples)
    if names is not None:
        examples = [e for e in examples if e.name in names]
    return [(e.name, e.input) for e in examples]


def run_examples(live, inputs: list[tuple[str, Any]] | None = None, cancel: threading.Event | None = None) -> dict[str, ExampleOutcome] | None:
    """Run the examples through `live`'s runner; None if `cancel` was set before they all ran."""
    out: dict[str, ExampleOutcome] = {}
    for name, x in inputs if inputs is not None else example_inputs(live):
        if cancel is not None and cancel.is_set():
            return None
        out[name] = ExampleOutcome.of(name, live.run(x))
    return out


def diff(old: dict[str, ExampleOutcome], new: dict[str, ExampleOutcome], old_version: int | None, new_version: int,
         rtol: float = RTOL, atol: float = ATOL, unseen: frozenset[str] = frozenset()) -> ExamplesDiff:
    """Each example's outcome in `new` against `old`. `unseen`: examples the old code never ran (a save
    came before they had run on it): their status is "first run", with the error if they fail."""
    changes = []
    for name in list(old) + [n for n in new if n not in old]:
        a, b = old.get(name), new.get(name)
        if a is None and b is not None and name in unseen:
            changes.append(ExampleChange(name, "first run", error=b.error))
            continue
        if a is None or b is None:
            changes.append(ExampleChange(name, "new" if a is None else "removed"))
            continue
        times = {s: (a.stage_ms[s], b.stage_ms[s]) for s in STAGES if s in a.stage_ms and s in b.stage_ms}
        where = b.error  # "predict failed at model/model.py:31: ValueError: ..." - stage and line included
        if a.ok and b.ok:
            paths = diff_paths(a.output, b.output, rtol, atol)
            status = "changed" if paths else "unchanged"
            changes.append(ExampleChange(name, status, paths, rank_changes(a.output, b.output) if paths else [], times,
                                         old=a.output if paths else None, new=b.output if paths else None))
        elif a.ok:
            changes.append(ExampleChange(name, "now failing", stage_ms=times, error=where))
        elif b.ok:
            changes.append(ExampleChange(name, "fixed", stage_ms=times))
        elif a.error == b.error:
            changes.append(ExampleChange(name, "unchanged", stage_ms=times, error=where))
        else:
            changes.append(ExampleChange(name, "still failing", stage_ms=times, error=where))
    return ExamplesDiff(old_version, new_version, changes)


class ExamplesWatch:
    """Runs the examples after every successful reload of one LiveModel, in the background, and diffs."""

    def __init__(self, live, names: list[str] | None = None):
        self.live = live
        self.names = names
        self.latest: ExamplesDiff | None = None
        self.baseline: dict[str, ExampleOutcome] | None = None
        self.baseline_version: int | None = None
        self._callbacks: list[Callable[[ExamplesDiff], None]] = []
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._runs = 0
        self._started_version = 0  # the newest code version a run was started for
        self._unseen: set[str] = set()  # examples the baseline's code never ran (the first run was cut short)
        self._done = threading.Condition()
        self._unsubscribe = live.on_reload(self._on_reload)
        self._start(live.version)

    def on_diff(self, callback: Callable[[ExamplesDiff], None]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def _on_reload(self, event) -> None:
        if event.ok and event.kind in ("methods", "full", "examples"):
            self._start(event.version)

    def _start(self, version: int) -> None:
        with self._lock:
            self._cancel.set()  # a run still going is stale now: its remaining examples are skipped
            cancel = self._cancel = threading.Event()
            with self._done:
                self._runs += 1
                self._started_version = max(self._started_version, version)
                self._done.notify_all()
        inputs = example_inputs(self.live, self.names)
        threading.Thread(target=self._run, args=(version, inputs, cancel), name="truss-lab-examples", daemon=True).start()

    def _run(self, version: int, inputs, cancel: threading.Event) -> None:
        outcomes: dict[str, ExampleOutcome] | None = {}
        try:
            for name, x in inputs:
                if cancel.is_set():  # a newer save: the rest would run the newer code
                    break
                outcomes[name] = ExampleOutcome.of(name, self.live.run(x))
        except Exception:  # the model closed under us, say
            outcomes = None
        emit = None
        with self._done:
            if outcomes is not None:
                ran = {n: o for n, o in outcomes.items() if o.version == version}  # a save mid-run: the rest ran newer code
                if not cancel.is_set() and len(ran) == len({n for n, _ in inputs}):  # (a name given twice runs twice)
                    if self.baseline is not None:
                        unseen = frozenset(n for n in ran if n not in self.baseline and n in self._unseen)
                        self.latest = emit = diff(self.baseline, ran, self.baseline_version, version, unseen=unseen)
                    self.baseline, self.baseline_version, self._unseen = ran, version, set()
                elif self.baseline is None:
                    # the first run, cut short by a save: what it ran on its own code is the baseline (the
                    # old code cannot run again), and the examples it did not reach are said to be unseen
                    self.baseline, self.baseline_version = ran, version
                    self._unseen = {n for n, _ in inputs if n not in ran}
            self._runs -= 1
            self._done.notify_all()
        if emit is not None:
            for callback in list(self._callbacks):
                try:
                    callback(emit)
                except Exception:
                    pass

    def wait(self, timeout: float | None = None) -> bool:
        """Until the examples have run on the code serving now and no run is going (True), or `timeout`
        passes (False). Right after `wait_for_reload` too: a reload whose run has not started yet is
        waited for."""
        with self._done:
            return self._done.wait_for(lambda: self._runs == 0 and self._started_version >= self.live.version, timeout)

    def stop(self) -> None:
        self._cancel.set()
        self._unsubscribe()


# ------------------------------------------------------------------------------ snapshots


def snapshot_path(bundle) -> Path:
    return bundle.path / SNAPSHOT_FILE


def write_snapshot(live) -> Path:
    """Store every example's outcome next to the truss (readable, one entry per example, sorted keys)."""
    outcomes = run_examples(live)
    path = snapshot_path(live.bundle)
    data = {name: o.to_json() for name, o in outcomes.items()}
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def test_snapshot(live, rtol: float = RTOL, atol: float = ATOL) -> ExamplesDiff:
    """Re-run the examples and diff them with the stored snapshot (old) - the run now (new)."""
    from .errors import BundleError

    path = snapshot_path(live.bundle)
    if not path.is_file():
        raise BundleError(f"{path}: no snapshot yet (truss-lab snapshot {live.bundle.path})")
    try:
        stored = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path}: not JSON: {exc}") from None
    old = {name: ExampleOutcome(name, e.get("ok", False), e.get("output"), e.get("error"), e.get("stage")) for name, e in stored.items()}
    new = run_examples(live)
    return diff(old, new, None, live.version, rtol, atol)

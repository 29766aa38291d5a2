"""Where inside each stage the time goes: pyinstrument, per serving stage, next to the lock.

`tr.profile(x, n=1)` sends `n` requests through the normal runner (the same lock, traces and guard)
with a sampling profiler around each stage call, in the thread that runs it (an async stage is
profiled inside the model's event loop, awaits included). The lock wait is its own entry, measured
by the trace rather than sampled. A `Profile` holds, per stage, the pyinstrument sessions of every
request, and answers:

    profile.hotspots("preprocess", n=5)  # [Hotspot(function, location, seconds, share), ...]
    profile.tree("predict")              # the folded call tree, as text

The truss's own code is expanded; library code is folded at the call from the truss's code (a
`tf.image.resize` is one entry with all of its time); `expand=True` expands everything. pyinstrument
is imported only when a profile is taken.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("preprocess", "predict", "postprocess")
INTERVAL_S = 0.001  # pyinstrument's sampling interval
MARKER = "truss_lab_predict"  # what predict's window is called in a framework's own trace
WRAPPERS = frozenset({  # decorator frames a library call is named through (to the function they wrap)
    "error_handler", "op_dispatch_handler", "dispatch_target", "wrapper", "wrapped", "inner", "_wrapper",
    "decorated", "new_func", "_f", "func_wrapper", "wrapper_function", "_call_wrapped", "decorator",
})


@dataclass(frozen=True)
class Hotspot:
    """One function's time within a stage (its own time; a folded library call's whole time)."""

    function: str
    location: str  # file:line, relative to the truss's parent folder for the truss's own code
    seconds: float
    share: float  # of that stage's time
    library: bool = False  # a folded library call (its callees included)

    def line(self, requests: int = 1) -> str:
        folded = " (library, folded)" if self.library else ""
        return f"{self.share:6.1%}  {self.seconds * 1000 / max(1, requests):8.2f} ms/request  {self.function}  {self.location}{folded}"

    def __str__(self) -> str:
        return self.line()


class Profiler:
    """What the runner calls when a request is profiled: a pyinstrument profiler around each stage."""

    def __init__(self, interval: float = INTERVAL_S, marker: Any = None):
        self.interval = interval
        self.marker = marker  # marker(name) -> a context manager a framework profiler records (TensorFlow's TraceMe)
        self.sessions: dict[str, list[tuple[int, Any]]] = {s: [] for s in STAGES}  # stage -> [(request id, session)]
        self._lock = threading.Lock()

    def _add(self, stage: str, request_id: int, session: Any) -> None:
        if session is not None:
            with self._lock:
                self.sessions[stage].append((request_id, session))

    def call(self, run, stage: str, request_id: int) -> Any:
        """`run()` (a stage call) profiled in this thread; an awaitable it returns is profiled where it
        is awaited (`wrap`)."""
        from pyinstrument import Profiler as Pyinstrument

        p = Pyinstrument(interval=self.interval, async_mode="disabled")
        p.start()
        try:
            with self._marked(stage):
                return run()
        finally:
            p.stop()
            self._add(stage, request_id, p.last_session)

    def _marked(self, stage: str):
        import contextlib

        return self.marker(MARKER) if self.marker is not None and stage == "predict" else contextlib.nullcontext()

    def wrap(self, awaitable: Any, stage: str, request_id: int) -> Any:
        """A coroutine that profiles `awaitable` inside the event loop that runs it."""

        async def profiled():
            from pyinstrument import Profiler as Pyinstrument

            p = Pyinstrument(interval=self.interval, async_mode="enabled")
            p.start()
            try:
                with self._marked(stage):
                    return await awaitable
            finally:
                p.stop()
                self._add(stage, request_id, p.last_session)

        return profiled()


@dataclass
class Profile:
    """Per stage, where the time of `n` requests went (see the module docstring)."""

    model_name: str
    roots: list[Path]  # the truss's own code lives here (expanded; everything else folds)
    sessions: dict[str, list[tuple[int, Any]]]
    traces: list[Any] = field(default_factory=list)
    interval: float = INTERVAL_S
    ops: "Ops | None" = None  # with profile(ops=True): the framework's heaviest ops in predict

    @property
    def count(self) -> int:
        return len(self.traces)

    def stage_seconds(self, stage: str) -> float:
        """The stage's time over all profiled requests (the lock wait: measured, not sampled)."""
        if stage == "lock_wait":
            return sum(t.lock_wait_ms for t in self.traces) / 1000.0
        return sum(s.duration for _, s in self.sessions.get(stage, []))

    def _combined(self, stage: str):
        from pyinstrument.session import Session

        found = [s for _, s in self.sessions.get(stage, [])]
        if not found:
            return None
        out = found[0]
        for s in found[1:]:
            out = Session.combine(out, s)
        return out

    def _root(self, session):
        """The session's call tree with repeated calls of one function from one place merged (a
        generator resumed 300 times is one entry), as pyinstrument's own renderers show it."""
        from pyinstrument import processors

        frame = session.root_frame(trim_stem=False)
        for process in (processors.remove_importlib, processors.aggregate_repeated_calls, processors.merge_consecutive_self_time):
            frame = process(frame, options={})
        return frame

    def hotspots(self, stage: str, n: int = 5, expand: bool = False) -> list[Hotspot]:
        """The heaviest functions of `stage`, heaviest first: the truss's own functions by their own
        time, a library call made from the truss's code by its whole time (`expand=True`: every
        function by its own time)."""
        if stage == "lock_wait":
            seconds = self.stage_seconds("lock_wait")  # listed however short: what shows never depends on speed
            return [Hotspot("waiting for the predict lock", "(measured by the trace, not sampled)", seconds, 1.0)] if self.count else []
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)} or lock_wait, got {stage!r}")
        session = self._combined(stage)
        if session is None:
            return []
        total = session.duration or 1e-12
        found: dict[tuple[str, str, bool], float] = {}
        for start in self._starts(self._root(session)):
            self._visit(start, found, expand)
        spots = [Hotspot(fn, loc, secs, secs / total, lib) for (fn, loc, lib), secs in found.items() if secs > 0]
        spots.sort(key=lambda h: -h.seconds)
        return spots[:n]

    def _mine(self, frame) -> bool:
        path = frame.file_path or ""
        return bool(path) and any(path.startswith(str(r) + "/") for r in self.roots)

    def _starts(self, root) -> list:
        """The outermost frames of the truss's own code (the stage method), under truss_lab's frames."""
        out, stack = [], [root]
        while stack:
            f = stack.pop()
            if f is None:
                continue
            if self._mine(f):
                out.append(f)
            else:
                stack.extend(f.children)
        return out

    def _where(self, frame) -> str:
        path = Path(frame.file_path or "?")
        for r in self.roots:
            if str(path).startswith(str(r) + "/"):
                return f"{path.relative_to(r.parent)}:{frame.line_no}"
        return f"{frame.file_path_short}:{frame.line_no}"

    def _visit(self, frame, found: dict, expand: bool) -> None:
        mine = self._mine(frame)
        if frame.is_synthetic:
            return
        if not mine and not expand:  # folded at the call from the truss's code, with all of its time
            children = [c for c in frame.children if not c.is_synthetic]
            if frame.function in WRAPPERS and children:  # a decorator (TF's error_handler, op dispatch):
                for child in children:  # each function it wrapped is its own entry (tf.image.resize -> resize_images_v2)
                    self._visit(child, found, expand)
                own = frame.time - sum(c.time for c in children)
                if own > 0:
                    key = (frame.function, self._where(frame), True)
                    found[key] = found.get(key, 0.0) + own
                return
            key = (frame.function, self._where(frame), True)
            found[key] = found.get(key, 0.0) + frame.time
            return
        key = (frame.function, self._where(frame), not mine)
        own = sum(c.time for c in frame.children if c.is_synthetic)
        found[key] = found.get(key, 0.0) + own
        for child in frame.children:
            if not child.is_synthetic:
                self._visit(child, found, expand)

    def tree(self, stage: str, depth: int = 8, expand: bool = False) -> str:
        """The stage's call tree from the truss's own code down, library calls folded, as text."""
        session = self._combined(stage)
        if session is None:
            return f"{stage}: not profiled"
        total = session.duration or 1e-12
        lines = [f"{stage}: {total * 1000 / max(1, len(self.sessions[stage])):.1f} ms/request"]

        def walk(f, level: int) -> None:
            if f.is_synthetic or level > depth:
                return
            lines.append(f"{'  ' * level}{f.time / total:5.1%}  {f.function}  {self._where(f)}")
            if self._mine(f) or expand:
                for c in sorted(f.children, key=lambda c: -c.time):
                    walk(c, level + 1)

        for start in self._starts(self._root(session)):
            walk(start, 1)
        return "\n".join(lines)

    def text(self, n: int = 5) -> str:
        lines = [f"profile of {self.model_name}: {self.count} request{'s' if self.count != 1 else ''}, "
                 f"sampled every {self.interval * 1000:g} ms"]
        for stage in ("preprocess", "lock_wait", "predict", "postprocess"):
            seconds = self.stage_seconds(stage)
            if stage != "lock_wait" and not self.sessions.get(stage):
                continue
            per = seconds * 1000 / max(1, self.count)
            lines.append(f"{stage.replace('_', ' ')}  {per:.2f} ms/request")
            lines.extend(f"  {h.line(self.count)}" for h in self.hotspots(stage, n))
        if self.ops is not None:
            lines.append(self.ops.text(n))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)

    def merged(self, other: "Profile") -> "Profile":
        sessions = {s: self.sessions.get(s, []) + other.sessions.get(s, []) for s in STAGES}
        return Profile(self.model_name, self.roots, sessions, self.traces + other.traces, self.interval)


# ------------------------------------------------------------------------------ the framework's own profiler


@dataclass(frozen=True)
class OpStat:
    """One framework op (a kernel, on a GPU) over the profiled predicts."""

    op: str
    seconds: float
    count: int

    def __str__(self) -> str:
        return f"{self.seconds * 1000:9.3f} ms  x{self.count:<5} {self.op}"


@dataclass
class Ops:
    """The heaviest ops predict ran, from the framework's own profiler, and where its trace is."""

    framework: str
    logdir: str  # `tensorboard --logdir LOGDIR` (the Profile tab) opens the framework's own trace
    ops: list[OpStat]

    def text(self, n: int = 10) -> str:
        viewer = "TensorBoard" if self.framework == "TensorFlow" else "chrome://tracing or Perfetto"
        lines = [f"{self.framework} ops in predict (its own trace, for {viewer}: {self.logdir})"]
        lines += [f"  {o}" for o in self.ops[:n]]
        return "\n".join(lines)


class _FrameworkOps:
    """A framework's own profiler around the profiled requests (a context manager), its trace in `logdir`."""

    prefix = "truss-lab-profile-"

    def __init__(self, logdir: str | None = None):
        import tempfile

        self.logdir = logdir or tempfile.mkdtemp(prefix=self.prefix)


class TensorFlowOps(_FrameworkOps):
    """TensorFlow's profiler around the profiled requests; the ops that ran inside predict, whose
    windows are marked in TensorFlow's own trace (a TraceMe per predict call), so its clock is used."""

    prefix = "truss-lab-tf-profile-"

    @staticmethod
    def marker(name: str):
        import tensorflow as tf

        return tf.profiler.experimental.Trace(name)

    def __enter__(self):
        import tensorflow as tf

        tf.profiler.experimental.start(self.logdir)
        return self

    def __exit__(self, *exc):
        import tensorflow as tf

        tf.profiler.experimental.stop()

    def ops(self) -> Ops:
        import collections
        import glob

        from tensorflow.tsl.profiler.protobuf import xplane_pb2

        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for path in glob.glob(f"{self.logdir}/**/*.xplane.pb", recursive=True):
            space = xplane_pb2.XSpace()
            with open(path, "rb") as f:
                space.ParseFromString(f.read())
            events = []  # (start ps, end ps, name, on a device)
            for plane in space.planes:
                device = plane.name.startswith("/device:")
                for line in plane.lines:
                    base = line.timestamp_ns * 1000
                    for event in line.events:
                        name = plane.event_metadata[event.metadata_id].name
                        events.append((base + event.offset_ps, base + event.offset_ps + event.duration_ps, name, device))
            windows = [(a, b) for a, b, name, _ in events if name == MARKER]
            for a, b, name, device in events:
                op = _op_name(name, device)
                if op is None or not any(wa <= a <= wb for wa, wb in windows):
                    continue
                totals[op] += (b - a) / 1e12
                counts[op] += 1
        ops = [OpStat(op, seconds, counts[op]) for op, seconds in totals.most_common()]
        return Ops("TensorFlow", self.logdir, ops)


class TorchOps(_FrameworkOps):
    """PyTorch's profiler (CPU, and CUDA kernels when a GPU is there) around the profiled requests; the
    ops inside predict's windows (a `record_function` per predict call), self time, heaviest first."""

    prefix = "truss-lab-torch-profile-"
    _prof = None

    @staticmethod
    def marker(name: str):
        import torch

        return torch.profiler.record_function(name)

    def __enter__(self):
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        from pathlib import Path

        Path(self.logdir).mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(Path(self.logdir) / "torch-trace.json"))  # chrome://tracing, Perfetto

    def ops(self) -> Ops:
        import collections

        events = list(self._prof.events())
        windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == MARKER]
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        for e in events:
            if e.name == MARKER or not any(a <= e.time_range.start <= b for a, b in windows):
                continue
            device_us = e.self_device_time_total if hasattr(e, "self_device_time_total") else getattr(e, "self_cuda_time_total", 0)
            totals[e.name] += (e.self_cpu_time_total + device_us) / 1e6
            counts[e.name] += 1
        ops = [OpStat(op, seconds, counts[op]) for op, seconds in totals.most_common() if seconds > 0]
        return Ops("PyTorch", self.logdir, ops)


def framework_ops(logdir: str | None = None):
    """The op profiler for the framework the model imported: PyTorch's, else TensorFlow's; None if neither."""
    import sys

    if "torch" in sys.modules:
        return TorchOps(logdir)
    if "tensorflow" in sys.modules:
        return TensorFlowOps(logdir)
    return None


def _op_name(event_name: str, device: bool) -> str | None:
    """The op an XPlane event is: a kernel on a device plane; `EagerLocalExecute: Conv2D` or a
    `name:Type` op on the host (the rest is the runtime's own bookkeeping)."""
    if device:
        return event_name
    if event_name.startswith("EagerLocalExecute: "):
        return event_name.split(": ", 1)[1]
    if ":" in event_name and "::" not in event_name and " " not in event_name:
        return event_name.rsplit(":", 1)[1]
    return None

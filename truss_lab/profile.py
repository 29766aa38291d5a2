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

import os
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
    """One function's time within a stage, over the profiled requests: its total time (callees
    included), its own time, and the stage's time they are a share of."""

    function: str
    location: str  # file:line, relative to the truss's parent folder for the truss's own code
    seconds: float  # total: the function and everything it called (a folded library call: all of it)
    self_seconds: float  # in the function's own code (a folded library call: all of it but the truss code it called back)
    share: float  # seconds / the stage's time
    library: bool = False  # a library call, folded at the truss's line that made it
    requests: int = 1  # the times are over this many requests

    @property
    def self_share(self) -> float:
        return self.share * self.self_seconds / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        per = 1000.0 / max(1, self.requests)
        folded = "  (library, folded)" if self.library else ""
        return (f"{self.seconds * per:9.2f} {self.self_seconds * per:9.2f} {self.share:7.1%}  "
                f"{self.function}  {self.location}{folded}")

    def __str__(self) -> str:
        return self.line()


@dataclass
class Node:
    """A function in a stage's call tree, as drawn: the truss's own code expanded; a library call folded
    at the truss's line that made it (the truss code it called back, a callback or a layer, beneath it)."""

    function: str
    location: str
    seconds: float  # total, over the profiled requests
    self_seconds: float
    library: bool
    children: list["Node"] = field(default_factory=list)

    def walk(self, level: int = 0):
        """(level, node) in drawing order: heaviest child first."""
        yield level, self
        for child in sorted(self.children, key=lambda c: -c.seconds):
            yield from child.walk(level + 1)


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
    """Per stage, where the time of `n` requests went: each stage's call tree from your own code down
    (library calls folded at your line that made them), hot spots with self and total time, and the
    lock wait. Made by `tr.profile(...)` (or `tr.bench(..., profile=True)`).

    Example:
        ```python
        p = tr.profile(tr.example("three"), n=5)
        print(p)                          # per stage: ms/request, its call tree and hot spots
        print(p.tree("preprocess"))
        p.hotspots("predict", n=3)
        ```
    """

    model_name: str
    roots: list[Path]  # the truss's own code lives here (expanded; everything else folds)
    sessions: dict[str, list[tuple[int, Any]]]
    traces: list[Any] = field(default_factory=list)
    interval: float = INTERVAL_S
    ops: Any = None  # with profile(ops=True): the framework's heaviest ops in predict

    @property
    def count(self) -> int:
        """How many requests were profiled."""
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
        """The session's call tree, truss_lab's own frames taken out (their time is the caller's and the
        callee's: a guarded `time.sleep` is `sleep`, called from the user's line), and repeated calls of
        one function from one place merged (a generator resumed 300 times is one entry), as
        pyinstrument's own renderers show it."""
        from pyinstrument import processors

        frame = session.root_frame(trim_stem=False)
        for process in (processors.remove_importlib, _remove_truss_lab_frames, processors.aggregate_repeated_calls,
                        processors.merge_consecutive_self_time):
            frame = process(frame, options={})
        return frame

    def call_tree(self, stage: str, expand: bool = False) -> list[Node]:
        """The stage's call tree from the truss's own code down (the stage method at the top), library calls
        folded at the truss's line that made them.

        Args:
            stage: `"preprocess"`, `"predict"` or `"postprocess"`.
            expand: fold nothing.

        Returns:
            Nodes: `function`, `location`, `seconds`, `self_seconds`, `library`, `children`.

        Example:
            ```python
            root = p.call_tree("preprocess")[0]
            [child.function for child in root.children]
            ```
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return self.session_tree(self._combined(stage), expand)

    def session_tree(self, session, expand: bool = False) -> list[Node]:
        """One pyinstrument session's call tree, drawn as `call_tree` draws a stage's."""
        root = self._root(session) if session is not None else None
        return [node for start in self._starts(root) for node in self._nodes(start, expand)] if root is not None else []

    def _nodes(self, frame, expand: bool) -> list[Node]:
        """`frame` as drawn: a Node, or - for a decorator frame a library call is made through - the
        functions it wrapped (tf.image.resize is resize_images_v2, not TF's error_handler)."""
        if frame.is_synthetic:
            return []
        mine = self._mine(frame)
        real = [c for c in frame.children if not c.is_synthetic]
        if not mine and not expand and frame.function in WRAPPERS and real:
            wrapped = [n for c in real for n in self._nodes(c, expand)]
            own = frame.time - sum(c.time for c in real)
            if own > 0:
                wrapped.append(Node(frame.function, self._where(frame), own, own, True))
            return wrapped
        if mine or expand:
            children = [n for c in real for n in self._nodes(c, expand)]
        else:  # folded: only the truss's own code it called back stays visible beneath it
            children = [n for c in real for start in self._starts(c) for n in self._nodes(start, expand)]
        own = frame.time - sum(c.seconds for c in children)
        return [Node(frame.function, self._where(frame), frame.time, max(0.0, own), not mine, children)]

    def hotspots(self, stage: str, n: int = 5, expand: bool = False) -> list[Hotspot]:
        """The functions `stage` spends its time in, the one that owns most of it first: every function the
        stage method calls (the truss's own and the library calls it makes, folded), ranked by total time
        (callees included; a caller before its callee when they tie), each with its own time too. The lock
        wait is one measured entry.

        Args:
            stage: `"preprocess"`, `"predict"` or `"postprocess"`.
            n: how many.
            expand: unfold library code.

        Returns:
            Hotspots: `function`, `location`, `seconds`, `self_seconds`, `share`, `library`, `requests`.

        Example:
            ```python
            for h in p.hotspots("predict", n=3):
                print(h.function, h.location, h.share)
            ```
        """
        if stage == "lock_wait":
            seconds = self.stage_seconds("lock_wait")  # listed however short: what shows never depends on speed
            return [Hotspot("waiting for the predict lock", "(measured by the trace, not sampled)", seconds, seconds, 1.0,
                            requests=self.count)] if self.count else []
        total = self.stage_seconds(stage) or 1e-12
        found: dict[tuple[str, str, bool], list[float]] = {}  # key -> [total, self, depth of its first sight]

        def visit(node: Node, depth: int, inside: frozenset) -> None:
            key = (node.function, node.location, node.library)
            entry = found.setdefault(key, [0.0, 0.0, depth])
            if key not in inside:  # a recursive call is already in its caller's total
                entry[0] += node.seconds
            entry[1] += node.self_seconds
            entry[2] = min(entry[2], depth)
            for child in node.children:
                visit(child, depth + 1, inside | {key})

        for top in self.call_tree(stage, expand):  # the stage method itself is the stage: its callees are the spots
            for child in top.children:
                visit(child, 1, frozenset())
        spots = sorted(found.items(), key=lambda kv: (-kv[1][0], kv[1][2]))
        return [Hotspot(fn, loc, secs, own, secs / total, lib, self.count)
                for (fn, loc, lib), (secs, own, _) in spots if secs > 0][:n]

    def _mine(self, frame) -> bool:
        path = frame.file_path or ""
        return bool(path) and any(path.startswith(str(r) + "/") for r in self.roots)

    def _starts(self, root) -> list:
        """The outermost frames of the truss's own code under `root` (the stage method, under truss_lab's frames)."""
        out, stack = [], [root]
        while stack:
            f = stack.pop()
            if f is None:
                continue
            if self._mine(f):
                out.append(f)
            else:
                stack.extend(reversed(f.children))
        return out

    def _where(self, frame) -> str:
        path = Path(frame.file_path or "?")
        for r in self.roots:
            if str(path).startswith(str(r) + "/"):
                return f"{path.relative_to(r.parent)}:{frame.line_no}"
        if frame.file_path in (None, "", "<built-in>"):
            return "<built-in>"
        return f"{frame.file_path_short}:{frame.line_no}"

    def tree(self, stage: str, depth: int = 8, expand: bool = False, threshold: float = 0.01) -> str:
        """The stage's call tree as text: per function its total and own ms per request and its share of
        the stage.

        Args:
            stage: `"preprocess"`, `"predict"` or `"postprocess"`.
            depth: how many calls deep.
            expand: unfold library code too.
            threshold: leave out calls under this share of the stage.

        Returns:
            The tree, one function per line (`total  self  share  function  file:line`).

        Example:
            ```python
            print(p.tree("preprocess"))
            ```
        """
        if not self.sessions.get(stage):
            return f"{stage}: not profiled"
        if not self.call_tree(stage, expand):
            return f"{stage}  {self.stage_seconds(stage) * 1000 / max(1, self.count):.2f} ms/request  {self.unsampled(stage)}"
        total = self.stage_seconds(stage) or 1e-12
        per = 1000.0 / max(1, self.count)
        lines = [f"{stage}  {total * per:.2f} ms/request", f"  {'total':>9} {'self':>9} {'share':>7}  call tree (ms/request)"]
        lines += [f"  {n.seconds * per:9.2f} {n.self_seconds * per:9.2f} {n.seconds / total:7.1%}  {'  ' * level}{n.function}  "
                  f"{n.location}{'  (library)' if n.library else ''}"
                  for level, n in self.tree_rows(stage, depth, expand, threshold)]
        return "\n".join(lines)

    def nested(self, stage: str) -> bool:
        """Whether the stage's call tree goes deeper than the calls the stage method makes: only then do
        the hot spots (functions ranked by total time, wherever they are called) say more than the tree."""
        return any(level > 1 for level, _ in self.tree_rows(stage))

    def unsampled(self, stage: str) -> str:
        """What a stage without samples shows: it ran for less than the sampling interval."""
        return f"(no samples: it ran for less than the {self.interval * 1000:g} ms sampling interval)"

    def tree_rows(self, stage: str, depth: int = 8, expand: bool = False, threshold: float = 0.01) -> list[tuple[int, Node]]:
        """(level, node) of the call tree in drawing order, pruned as `tree` prunes it (text and HTML share it)."""
        total = self.stage_seconds(stage) or 1e-12
        rows: list[tuple[int, Node]] = []
        for top in self.call_tree(stage, expand):
            skip_below: int | None = None
            for level, node in top.walk():
                if skip_below is not None and level > skip_below:
                    continue
                skip_below = None
                if level > depth or node.seconds < threshold * total:
                    skip_below = level
                    continue
                rows.append((level, node))
        return rows

    def text(self, n: int = 5) -> str:
        """The profile as text (what `print(profile)` shows): per stage its call tree and `n` hot spots."""
        lines = [f"profile of {self.model_name}: {self.count} request{'s' if self.count != 1 else ''}, "
                 f"sampled every {self.interval * 1000:g} ms"]
        for stage in ("preprocess", "lock_wait", "predict", "postprocess"):
            if stage == "lock_wait":
                lines.append(f"lock wait  {self.stage_seconds(stage) * 1000 / max(1, self.count):.2f} ms/request  (measured, not sampled)")
                continue
            if not self.sessions.get(stage):
                continue
            lines.append(self.tree(stage))
            if self.nested(stage):  # else the tree's one level already lists them, heaviest first
                lines.append(f"  {'total':>9} {'self':>9} {'share':>7}  hot spots")
                lines.extend(f"  {h.line()}" for h in self.hotspots(stage, n))
        if self.ops is not None:
            lines.append(self.ops.text(n))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)

    def merged(self, other: "Profile") -> "Profile":
        """One Profile over this one's requests and `other`'s (of the same model)."""
        sessions = {s: self.sessions.get(s, []) + other.sessions.get(s, []) for s in STAGES}
        return Profile(self.model_name, self.roots, sessions, self.traces + other.traces, self.interval)


_OWN = str(Path(__file__).resolve().parent) + os.sep  # truss_lab's own code: never in a profile


def _remove_truss_lab_frames(frame, options):
    """A pyinstrument processor: every frame of truss_lab's own code (the runner, the guard's stand-ins
    for `time.sleep` and `open`) replaced by what it called, its own time given to its caller."""
    from pyinstrument.frame_ops import delete_frame_from_tree

    if frame is None:
        return None
    for child in frame.children:
        _remove_truss_lab_frames(child, options)
        if (child.file_path or "").startswith(_OWN):
            delete_frame_from_tree(child, replace_with="children")
    return frame


# ------------------------------------------------------------------------------ the framework's own profiler



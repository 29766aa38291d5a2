"""Trace (where one request's time went) and Report (what many traces add up to).

Plain data: timestamps are `time.perf_counter()` seconds; every derived figure is milliseconds.
Drawing lives in display/ (render.py, plots.py); these classes only delegate `_repr_mimebundle_` to it.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import ModelError

STAGES = ("preprocess", "lock_wait", "predict", "postprocess", "total")


SPAN: ContextVar["tuple[str, str | None, str] | None"] = ContextVar("truss_lab_span", default=None)  # (trace, parent, own)


def span_from(traceparent: str | None, root: bool = False) -> "tuple[str, str | None, str] | None":
    """(trace id, the caller's span id, a new span id for this request) from a W3C `traceparent`
    header (`00-<32 hex>-<16 hex>-<2 hex>`); a new trace when there is none and `root`, else None."""
    if traceparent:  # ids from os.urandom, as secrets.token_hex makes them (no import on a request's path)
        parts = traceparent.strip().split("-")
        if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
            return parts[1], parts[2], os.urandom(8).hex()
    return (os.urandom(16).hex(), None, os.urandom(8).hex()) if root else None


def traceparent(span: "tuple[str, str | None, str]") -> str:
    """The `traceparent` that makes `span` (this request) the parent of the calls it makes."""
    return f"00-{span[0]}-{span[2]}-01"


def _ms(start: float | None, end: float | None) -> float:
    if start is None or end is None:
        return 0.0
    return (end - start) * 1000.0


@dataclass(slots=True)
class Trace:
    """One request's timeline: monotonic timestamps of each stage and of the lock, the code version that
    served it, how it ended, and what the lock-misuse guard saw.

    Durations are properties in milliseconds: `pre_ms`, `lock_wait_ms`, `predict_ms`, `lock_held_ms`,
    `post_ms`, `total_ms` (0 for a stage the model does not have). A chainlet's request also has its W3C
    trace context (`trace_id`, `span_id`, `parent_span_id`).

    Attributes:
        request_id: the request's number in this model.
        version: the code version that served it (a reload bumps it).
        error: the failure's one-line message, `error_stage` its stage, `location` its file:line.
        findings: the lock-misuse findings (I/O, sleeps, idle time while holding the lock).

    Example:
        ```python
        t = tr.predict(tr.example("three")).trace
        print(t)                    # v1 ok: pre … ms | lock wait … ms | predict … ms | post … ms | total … ms
        t.predict_ms, t.lock_wait_ms
        ```
    """

    request_id: int
    version: int
    thread: str
    start: float
    pre_start: float | None = None
    pre_end: float | None = None
    lock_requested: float | None = None
    lock_acquired: float | None = None
    predict_start: float | None = None
    first_chunk: float | None = None
    predict_end: float | None = None
    lock_released: float | None = None
    post_start: float | None = None
    post_end: float | None = None
    end: float | None = None
    chunks: int | None = None  # number of chunks, for a streaming predict
    error: str | None = None  # one line, 'TypeName: message'
    error_stage: str | None = None
    location: str | None = None  # file:line in the user's code
    warnings: list[str] = field(default_factory=list)
    findings: list[Any] = field(default_factory=list)  # lock-misuse findings (guard.py)
    method: str = "predict"  # or the OpenAI-compatible method called (no lock, no pre/postprocess)
    predict_cpu_ms: float | None = None  # predict's thread CPU time; None where it says nothing (async, streamed)
    predict_cpu_wait_ms: float | None = None  # predict's thread runnable but not running (other work had the CPUs)
    gpu_in_use: bool = False  # torch/TensorFlow had a GPU: a CPU-idle predict may be waiting for it
    cpu_measurable: bool = field(default=True, repr=False, compare=False)  # predict ran in this thread, not streamed
    profiler: Any = field(default=None, repr=False, compare=False)  # profile.Profiler when this request is profiled
    # W3C trace context, when the request came with a `traceparent` (or a chain started it): (the
    # request's trace id, the caller's span id or None, this request's own span id). One field: every
    # request pays for each field a Trace has.
    span: "tuple[str, str | None, str] | None" = field(default=None, repr=False)

    @property
    def trace_id(self) -> str | None:
        """The W3C trace id a chainlet's request was part of (None outside a chain)."""
        return self.span[0] if self.span is not None else None

    @property
    def parent_span_id(self) -> str | None:
        """The caller's span id: which chainlet's request made this one (None for the entrypoint's)."""
        return self.span[1] if self.span is not None else None

    @property
    def span_id(self) -> str | None:
        """This request's own span id in its chain's trace (None outside a chain)."""
        return self.span[2] if self.span is not None else None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None

    @property
    def pre_ms(self) -> float:
        """Milliseconds in preprocess (0 without one)."""
        return _ms(self.pre_start, self.pre_end)

    @property
    def lock_wait_ms(self) -> float:
        """Milliseconds waiting for the lock."""
        return _ms(self.lock_requested, self.lock_acquired)

    @property
    def predict_ms(self) -> float:
        """Milliseconds in predict, holding the lock (to the end of the stream, for a stream)."""
        return _ms(self.predict_start, self.predict_end)

    @property
    def lock_held_ms(self) -> float:
        """Milliseconds the request held the lock."""
        return _ms(self.lock_acquired, self.lock_released)

    @property
    def predict_compute_ms(self) -> float | None:
        """Of predict's time, how much its thread computed (CPU time); None when not measured."""
        if self.predict_cpu_ms is None or self.predict_end is None:
            return None
        return min(self.predict_cpu_ms, self.predict_ms)

    @property
    def predict_idle_ms(self) -> float | None:
        """Of predict's time (the lock held), how much it was not computing: waiting on I/O, a sleep,
        a download - or, with a GPU in use, possibly the GPU. None when not measured.

        Time its thread was ready to run but waited for a CPU (a busy machine: `predict_cpu_wait_ms`,
        from the kernel's per-thread run-queue time) is contention, not idleness: it is left out."""
        compute = self.predict_compute_ms
        if compute is None:
            return None
        return max(0.0, self.predict_ms - compute - (self.predict_cpu_wait_ms or 0.0))

    @property
    def post_ms(self) -> float:
        """Milliseconds in postprocess (0 without one)."""
        return _ms(self.post_start, self.post_end)

    @property
    def total_ms(self) -> float:
        """Milliseconds from the request's start to its end."""
        return _ms(self.start, self.end)

    @property
    def first_chunk_ms(self) -> float | None:
        """Time from predict start to the first streamed chunk (streaming predicts only)."""
        return None if self.first_chunk is None else _ms(self.predict_start, self.first_chunk)

    def stage_ms(self, stage: str) -> float:
        """Milliseconds of `stage`: `pre`, `lock_wait`, `predict`, `post` or `total`."""
        return {
            "preprocess": self.pre_ms,
            "lock_wait": self.lock_wait_ms,
            "predict": self.predict_ms,
            "postprocess": self.post_ms,
            "total": self.total_ms,
        }[stage]

    def summary(self) -> str:
        """One line: version, ok or the error, each stage's milliseconds (what `print(trace)` shows)."""
        status = "ok" if self.ok else f"{self.error_stage} error"
        return (
            f"v{self.version} {status}: pre {self.pre_ms:.1f} ms | lock wait {self.lock_wait_ms:.1f} ms"
            f" | predict {self.predict_ms:.1f} ms | post {self.post_ms:.1f} ms | total {self.total_ms:.1f} ms"
        )

    def __str__(self) -> str:
        return self.summary()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), on an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass(frozen=True)
class StageStats:
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "StageStats":
        s = sorted(values)
        if not s:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan)
        return cls(sum(s) / len(s), percentile(s, 50), percentile(s, 95), percentile(s, 99), s[-1])


SHORT_PREDICT_MS = 1.0  # a mean predict below this is not split into compute and idle (the clocks' own cost decides it)
BUSY_SHARE = 0.5  # other processes using this share of the CPUs during a bench: idle is not told from waiting for one


@dataclass
class Report:
    """Aggregate of traces: latency per stage, lock use, throughput and its bound.

    The bound is `lock_size / mean predict time`: with the lock always busy, no more requests per
    second can get through predict. `efficiency` is the throughput reached against it.

    Attributes:
        count: how many requests.
        failures: failed requests by stage.
        stages: per stage (`pre`, `lock_wait`, `predict`, `post`, `total`) its latency statistics.
        throughput: requests per second over the wall time.
        bound: `lock_size / mean predict seconds`.
        lock_utilization: the lock's slot-time held over wall time times lock size.
        lock_idle_share: the share of the held time predict was not computing (measured requests).
        findings: the lock-misuse findings, by kind, with how many requests had each.

    Example:
        ```python
        report = tr.report()
        print(report)                               # the table, the lock line, the findings
        report.to_chrome_trace("trace.json")        # Perfetto, chrome://tracing, speedscope
        ```
    """

    count: int
    failures: dict[str, int]
    stages: dict[str, StageStats]
    wall_s: float
    lock_size: int
    lock_utilization: float  # lock slot-time held / (wall time * lock size)
    throughput: float  # requests per second
    bound: float  # lock_size / mean predict seconds
    max_lock_holders: int
    versions: list[int]
    findings: dict[str, int] = field(default_factory=dict)  # lock-misuse kind -> requests with it
    finding_messages: dict[str, str] = field(default_factory=dict)  # kind -> the first message
    traces: list[Trace] = field(default_factory=list, repr=False)
    lock_idle_share: float = math.nan  # share of the lock's held time with predict not computing (measured requests)
    compute_bound: float = math.nan  # lock_size / mean predict *compute* seconds: the bound if predict only computed
    idle_measured: int = 0  # requests whose predict compute/idle split was measured
    gpu_in_use: bool = False  # a GPU was in use: idle may be waiting for the GPU
    others_cpu_share: float = math.nan  # bench: the machine's CPUs other processes used, as a share of all of them
    model_cpu_share: float = math.nan  # bench: what the model's process(es) used, the same way
    reloads: list[Any] = field(default_factory=list, repr=False)  # ReloadEvents in its time (instant events in exports)

    def to_chrome_trace(self, path: Any = None, profile: Any = None) -> dict:
        """Chrome trace-event JSON (Perfetto, chrome://tracing): a track per worker, a span per stage,
        the lock wait and hold, reloads, and a Profile's samples nested in their stage (export.py)."""
        from .export import chrome_trace

        return chrome_trace(self, path, profile or getattr(self, "profile", None))

    def to_otel(self, path: Any = None, exporter: Any = None) -> int:
        """The requests as OpenTelemetry spans named as the Truss server names them, written as its
        NDJSON (`OTEL_TRACING_NDJSON_FILE`) or to any SDK exporter (export.py)."""
        from .export import otel

        return otel(self, path, exporter)

    @property
    def idle_label(self) -> str:
        """What the idle part of predict is called: "waiting (GPU in use?)" with a GPU, else "idle"."""
        return "waiting (GPU in use?)" if self.gpu_in_use else "idle"

    def idle_sentence(self) -> str:
        """"lock held 100% · 82% of it idle — predict waits while holding the lock" (the timeline's caption
        lead), or why the idle share says nothing this time."""
        if self.idle_measured == 0 or math.isnan(self.lock_idle_share):
            return f"lock held {self.lock_utilization:.0%} · idle share not measured (async or streaming predict)"
        unclear = self.idle_unclear()
        if unclear:
            return f"lock held {self.lock_utilization:.0%} · idle share not told: {unclear}"
        text = f"lock held {self.lock_utilization:.0%} · {self.lock_idle_share:.0%} of it {self.idle_label}"
        if self.lock_idle_share >= 0.5 and not self.gpu_in_use:
            text += " — predict waits while holding the lock"
        return text

    def idle_unclear(self) -> str | None:
        """Why the compute/idle split cannot be trusted here, or None: predicts too short for the thread
        CPU clock and the per-request bookkeeping (their "idle" is noise), or a machine busier than the
        model (its threads, a framework's pool among them, may have waited for a CPU: that is not idling)."""
        measured = [t for t in self.traces if t.method == "predict" and t.predict_compute_ms is not None and t.lock_acquired]
        if measured:
            mean = sum(t.predict_ms for t in measured) / len(measured)
            if mean < SHORT_PREDICT_MS:
                return f"predict is too short to split into compute and idle ({mean:.2f} ms per request)"
        if self.others_cpu_share >= BUSY_SHARE and self.others_cpu_share > self.model_cpu_share:
            return f"the machine was busier than the model (other processes used {self.others_cpu_share:.0%} of its CPUs)"
        return None

    @property
    def ok(self) -> int:
        """How many requests succeeded."""
        return self.count - sum(self.failures.values())

    @property
    def efficiency(self) -> float:
        """Throughput against the bound (1.0: the lock was never idle); NaN without a bound."""
        return self.throughput / self.bound if self.bound and not math.isnan(self.bound) else math.nan

    def lock_wait_distribution(self, edges_ms: tuple[float, ...] = (0.0, 1, 10, 100, 1000)) -> list[tuple[str, int]]:
        """How many requests waited for the lock within each range: [("< 1 ms", 12), ("1-10 ms", 3), ...]."""
        waits = [t.lock_wait_ms for t in self.traces if t.lock_requested is not None]
        bins: list[tuple[str, int]] = []
        bounds = list(edges_ms[1:])
        lo = 0.0
        for hi in bounds:
            label = f"< {hi:g} ms" if lo == 0 else f"{lo:g}-{hi:g} ms"
            bins.append((label, sum(1 for w in waits if lo <= w < hi)))
            lo = hi
        bins.append((f">= {lo:g} ms", sum(1 for w in waits if w >= lo)))
        return bins

    @classmethod
    def from_traces(cls, traces: list[Trace], lock_size: int, **extra: Any) -> "Report":
        traces = sorted((t for t in traces if t.end is not None), key=lambda t: t.start)
        failures: dict[str, int] = {}
        for t in traces:
            if not t.ok:
                failures[t.error_stage or "unknown"] = failures.get(t.error_stage or "unknown", 0) + 1
        stages = {s: StageStats.of([t.stage_ms(s) for t in traces]) for s in STAGES}
        findings: dict[str, int] = {}
        messages: dict[str, str] = {}
        for t in traces:
            for kind in {f.kind for f in t.findings}:
                findings[kind] = findings.get(kind, 0) + 1
            for f in t.findings:
                messages.setdefault(f.kind, f.message)
        if traces:
            wall = max(t.end for t in traces) - min(t.start for t in traces)
        else:
            wall = 0.0
        held = [(t.lock_acquired, t.lock_released) for t in traces if t.lock_acquired and t.lock_released]
        held_s = sum(b - a for a, b in held)
        utilization = held_s / (wall * lock_size) if wall > 0 else math.nan
        throughput = len(traces) / wall if wall > 0 else math.nan
        predicted = [t.predict_ms for t in traces if t.predict_end is not None and t.method == "predict"]
        mean_predict_s = (sum(predicted) / len(predicted) / 1000.0) if predicted else 0.0
        bound = lock_size / mean_predict_s if mean_predict_s > 0 else math.nan
        measured = [t for t in traces if t.method == "predict" and t.predict_compute_ms is not None and t.lock_acquired]
        held_ms = sum(t.predict_ms for t in measured)
        idle_share = sum(t.predict_idle_ms for t in measured) / held_ms if held_ms > 0 else math.nan
        compute_s = sum(t.predict_compute_ms for t in measured) / len(measured) / 1000.0 if measured else 0.0
        compute_bound = lock_size / compute_s if compute_s > 0 else math.nan
        return cls(
            count=len(traces),
            failures=failures,
            stages=stages,
            wall_s=wall,
            lock_size=lock_size,
            lock_utilization=utilization,
            throughput=throughput,
            bound=bound,
            max_lock_holders=max_concurrent(held),
            versions=sorted({t.version for t in traces}),
            findings=findings,
            finding_messages=messages,
            traces=list(traces),
            lock_idle_share=idle_share,
            compute_bound=compute_bound,
            idle_measured=len(measured),
            gpu_in_use=any(t.gpu_in_use for t in measured),
            **extra,
        )

    def table(self) -> str:
        """The report as text: the latency table, the lock line, throughput and bound, the findings."""
        if not self.count:
            return "0 requests: nothing to report yet (run predict, predict_batch or bench first)"
        lines = [
            f"{self.count} requests, {self.ok} ok, "
            + (
                "failures: " + ", ".join(f"{k} {v}" for k, v in sorted(self.failures.items()))
                if self.failures
                else "no failures"
            ),
            f"{'stage':<12}{'mean':>9}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  (ms)",
        ]
        for name in STAGES:
            s = self.stages[name]
            lines.append(
                f"{name:<12}{s.mean:>9.2f}{s.p50:>9.2f}{s.p95:>9.2f}{s.p99:>9.2f}{s.max:>9.2f}"
            )
        lines.append(
            f"throughput {self.throughput:.2f} req/s | bound {self.bound:.2f} req/s "
            f"(lock {self.lock_size} / mean predict) | efficiency {self.efficiency:.2f}"
        )
        lines.append(
            f"lock utilization {self.lock_utilization:.0%} | max holders {self.max_lock_holders}"
            f"/{self.lock_size} | wall {self.wall_s * 1000:.0f} ms"
        )
        lines.append(self.idle_sentence() + (
            f" | compute bound {self.compute_bound:.2f} req/s (if predict only computed)" if not math.isnan(self.compute_bound) else ""))
        if self.count:
            dist = ", ".join(f"{label} {n}" for label, n in self.lock_wait_distribution() if n)
            lines.append(f"lock wait: {dist}")
        for kind, n in sorted(self.findings.items()):
            lines.append(f"lock misuse in {n} requests: {self.finding_messages[kind]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)


@dataclass
class BenchReport(Report):
    """A Report from `LiveModel.bench`: also says how it was driven (workers, label for compare())."""

    concurrency: int = 1
    label: str = ""
    profile: Any = None  # a profile.Profile over all its requests: bench(..., profile=True)

    def table(self) -> str:
        head = f"bench {self.label + ' ' if self.label else ''}with {self.concurrency} workers"
        text = head + "\n" + super().table()
        return text + "\n" + self.profile.text() if self.profile is not None else text


def max_concurrent(intervals: list[tuple[float, float]]) -> int:
    """Largest number of intervals open at one instant (ends sort before starts at equal times)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    level = best = 0
    for _, step in events:
        level += step
        best = max(best, level)
    return best


class ActivityLog:
    """When the model's own code ran (load() and requests), in wall-clock time, so the reloader can tell
    a file the model wrote under data/ (its mtime falls inside one of these) from one the user replaced.

    Two clock reads and a dict/deque update per request; the last `capacity` intervals are kept.
    """

    SLACK_S = 0.02  # file mtimes come from a coarse kernel clock: a write can be stamped a tick early, never late

    def __init__(self, capacity: int = 4096):
        self._running: dict[int, float] = {}
        self._done: collections.deque[tuple[float, float]] = collections.deque(maxlen=capacity)
        self._ids = itertools.count()

    def begin(self) -> int:
        token = next(self._ids)
        self._running[token] = time.time()
        return token

    def end(self, token: int) -> None:
        start = self._running.pop(token, None)
        if start is not None:
            self._done.append((start, time.time()))

    def covers(self, when: float) -> bool:
        """Whether model code was running at wall-clock time `when`."""
        slack = self.SLACK_S
        if any(start - slack <= when for start in list(self._running.values())):
            return True
        return any(start - slack <= when <= end for start, end in list(self._done))


class OutputWarning(UserWarning):
    """The output could not be sent by a Truss server as JSON (the call still succeeds)."""


@dataclass
class Result:
    """One request: what went in, what came out, and where the time went.

    Attributes:
        input: the request body as given.
        output: what the Truss server would send back (None when the request failed).
        trace: the request's Trace: each stage's time, the lock wait, the code version, findings.
        error: the ModelError when a stage failed (`.stage`, `.location` as file:line), else None.
        model_name: the model's name.

    Example:
        ```python
        result = tr.run(tr.example("three"))
        if result.ok:
            print(result.output, result.trace.total_ms)
        else:
            print(result.error)
        result.raise_for_error()   # the error, raised; the Result itself when ok
        ```
    """

    input: Any
    output: Any
    trace: Trace
    error: ModelError | None = None
    model_name: str = ""
    search_dirs: tuple[Path, ...] = ()  # where relative image paths in input/output are shown from

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None

    @property
    def version(self) -> int:
        """The code version that served the request."""
        return self.trace.version

    def raise_for_error(self) -> "Result":
        """Raise the request's error (a ModelError naming the stage and file:line; its cause is the
        model's own exception, with the model's frames); else return this Result."""
        __tracebackhide__ = True  # pytest: the failure is the model's, not this line's
        if self.error is not None:
            raise self.error.with_traceback(None)  # from here: the runner's frames are not the user's story
        return self

    def __repr__(self) -> str:
        from .display.text import result_text

        return result_text(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display import render

        return render.bundle(self)

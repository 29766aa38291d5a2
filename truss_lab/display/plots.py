"""The lock timeline: who preprocessed, who waited for the lock, who held it, on one time axis.

    tl = truss_lab.timeline(report)      # or a list of Traces, or a LiveModel (its kept traces)
    tl.figure()                          # a matplotlib Figure (matplotlib imported only here)
    tl.svg()                             # the same picture as SVG, no matplotlib (Report's rich display)

One row per request (or per worker thread, `by="worker"`), segments coloured by stage; a lane on top
shows how many lock slots are held over time against the lock size; the caption gives throughput,
lock utilization and efficiency. Both drawings come from one `Timeline` (the geometry), so they agree.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .style import STAGE_COLOURS, STAGE_LABELS, esc
from ..trace import Report, Trace, max_concurrent

SEGMENT_STAGES = ("preprocess", "lock_wait", "predict", "predict_idle", "postprocess")
ERROR_COLOUR = "#c62828"


@dataclass(frozen=True, slots=True)
class Segment:
    row: int
    stage: str  # one of SEGMENT_STAGES
    start_ms: float
    end_ms: float
    request_id: int

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass
class Timeline:
    """Geometry of a lock timeline, in ms since the first request started."""

    rows: list[str]
    segments: list[Segment]
    errors: list[tuple[int, float, str]]  # (row, ms, "stage error") for failed requests
    occupancy: list[tuple[float, int]]  # (ms, slots held from then on), a step function
    lock_size: int
    span_ms: float
    caption: str
    by: str
    idle_label: str = "idle"  # "waiting (GPU in use?)" when a GPU was in use
    lane_label: str = "lock\nheld"  # the occupancy lane's (a chain's: the chainlet whose lock it shows)

    def bars(self, stage: str) -> list[Segment]:
        return [s for s in self.segments if s.stage == stage]

    def label(self, stage: str) -> str:
        if stage == "predict_idle":
            return f"predict, {self.idle_label}"
        if stage == "predict" and self.bars("predict_idle"):
            return "predict (computing)"
        return STAGE_LABELS[stage]

    # -------------------------------------------------------------------- matplotlib

    def figure(self, width: float = 10.0):
        """Draw with matplotlib (a `matplotlib.figure.Figure`, no pyplot state is touched)."""
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        n = max(len(self.rows), 1)
        height = min(1.6 + 0.22 * n, 11.0) + 1.0
        fig = Figure(figsize=(width, height), layout="constrained")
        grid = fig.add_gridspec(2, 1, height_ratios=[1.0, max(2.0, height - 1.6)])
        lane = fig.add_subplot(grid[0])
        ax = fig.add_subplot(grid[1], sharex=lane)
        bar_h = 0.8 if n <= 60 else 1.0  # many rows: bars touch, no gaps to alias
        for stage in SEGMENT_STAGES:
            segs = self.bars(stage)
            if segs:
                ax.barh(
                    [s.row for s in segs],
                    [s.ms for s in segs],
                    left=[s.start_ms for s in segs],
                    height=bar_h,
                    color=STAGE_COLOURS[stage],
                    label=self.label(stage),
                    linewidth=0,
                    gid=stage,
                    hatch="////" if stage == "predict_idle" else None,
                    edgecolor=STAGE_COLOURS["predict"] if stage == "predict_idle" else None,
                )
        if self.errors:
            ax.scatter(
                [ms for _, ms, _ in self.errors], [row for row, _, _ in self.errors],
                marker="x", color=ERROR_COLOUR, s=24, zorder=3, label="error",
            )
        ax.set_ylim(n - 0.5, -0.5)
        if n <= 30:
            ax.set_yticks(range(n), self.rows, fontsize=8)
        else:
            ax.yaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.set_ylabel({"worker": "worker", "chainlet": "chainlet (a track per call at once)"}.get(self.by, "request (by start)"))
        ax.set_xlabel("ms since the first request started")
        ax.set_xlim(0, self.span_ms * 1.01 or 1.0)
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=5, frameon=False, fontsize=8)
        xs = [ms for ms, _ in self.occupancy] + [self.span_ms]
        levels = [lv for _, lv in self.occupancy] + [self.occupancy[-1][1] if self.occupancy else 0]
        lane.fill_between(xs, levels, step="post", color=STAGE_COLOURS["predict"], alpha=0.35, linewidth=0)
        lane.step(xs, levels, where="post", color=STAGE_COLOURS["predict"], linewidth=0.6)
        lane.axhline(self.lock_size, color="#333", linestyle="--", linewidth=0.8)
        lane.set_ylim(0, self.lock_size + 0.5)
        lane.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
        lane.set_ylabel(self.lane_label, fontsize=8)
        lane.tick_params(labelbottom=False)
        lane.set_title(self.caption, fontsize=9, loc="left")
        return fig

    def png(self, width: float = 10.0, dpi: int = 100) -> bytes:
        buf = io.BytesIO()
        self.figure(width).savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    # -------------------------------------------------------------------- SVG

    def svg(self, width: int = 760) -> str:
        """The same picture as inline SVG: no matplotlib needed."""
        n = max(len(self.rows), 1)
        row_h = max(2.0, min(14.0, 420.0 / n))
        left, right = 64, 12
        # the caption on one line if it fits (about 6 px a character at 11 px), else two
        head, sep, tail = self.caption.partition(CAPTION_BREAK)  # after the idle sentence
        lines = [self.caption] if len(self.caption) * 6 <= width - left or not sep else [head, tail]
        shift = 13 * (len(lines) - 1)
        top = 40 + shift
        lane_h, gap = 36, 10
        plot_w = width - left - right
        body_top = top + lane_h + gap
        height = body_top + n * row_h + 34
        span = self.span_ms or 1.0

        def x(ms: float) -> float:
            return left + plot_w * ms / span

        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="truss-lab-timeline" width="{width}" '
            f'height="{height:.0f}" viewBox="0 0 {width} {height:.0f}" font-family="sans-serif" font-size="10">',
            *(f'<text x="{left}" y="{12 + 13 * i}" font-size="11">{esc(line)}</text>' for i, line in enumerate(lines)),
        ]
        lx = left
        out.append(
            '<defs><pattern id="tl-idle" width="4" height="4" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
            f'<rect width="4" height="4" fill="{STAGE_COLOURS["predict_idle"]}"/>'
            f'<line x1="0" y1="0" x2="0" y2="4" stroke="{STAGE_COLOURS["predict"]}" stroke-width="1.2"/></pattern></defs>'
        )
        for stage in SEGMENT_STAGES:
            fill = "url(#tl-idle)" if stage == "predict_idle" else STAGE_COLOURS[stage]
            out.append(f'<rect x="{lx}" y="{20 + shift}" width="10" height="10" fill="{fill}"/>')
            out.append(f'<text x="{lx + 14}" y="{29 + shift}">{esc(self.label(stage))}</text>')
            lx += 24 + 6 * len(self.label(stage))
        if self.errors:
            out.append(f'<text x="{lx}" y="{29 + shift}" fill="{ERROR_COLOUR}">× error</text>')
        # lock lane: slots held over time, dashed line at the lock size
        scale = lane_h / (self.lock_size + 0.5)
        base = top + lane_h
        points = []
        for i, (ms, level) in enumerate(self.occupancy):
            end = self.occupancy[i + 1][0] if i + 1 < len(self.occupancy) else self.span_ms
            points.append(f"{x(ms):.1f},{base - level * scale:.1f} {x(end):.1f},{base - level * scale:.1f}")
        if points:
            out.append(
                f'<polygon points="{x(0):.1f},{base} {" ".join(points)} {x(self.span_ms):.1f},{base}" '
                f'fill="{STAGE_COLOURS["predict"]}" fill-opacity="0.35" stroke="{STAGE_COLOURS["predict"]}"/>'
            )
        cap_y = base - self.lock_size * scale
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{cap_y:.1f}" y2="{cap_y:.1f}" stroke="#333" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{left - 4}" y="{cap_y + 3:.1f}" text-anchor="end">lock {self.lock_size}</text>')
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="#999"/>')
        # one row per request (or worker)
        for seg in self.segments:
            y = body_top + seg.row * row_h
            out.append(
                f'<rect x="{x(seg.start_ms):.2f}" y="{y:.2f}" width="{max(plot_w * seg.ms / span, 0.5):.2f}" '
                f'height="{max(row_h - (1 if row_h > 4 else 0), 1):.2f}" '
                f'fill="{"url(#tl-idle)" if seg.stage == "predict_idle" else STAGE_COLOURS[seg.stage]}">'
                f"<title>{esc(self.rows[seg.row])} {esc(self.label(seg.stage))} {seg.ms:.1f} ms</title></rect>"
            )
        for row, ms, what in self.errors:
            out.append(
                f'<text x="{x(ms) + 2:.1f}" y="{body_top + row * row_h + row_h:.1f}" fill="{ERROR_COLOUR}">×'
                f"<title>{esc(self.rows[row])} {esc(what)}</title></text>"
            )
        if n <= 30 and row_h >= 10:
            for i, label in enumerate(self.rows):
                out.append(
                    f'<text x="{left - 4}" y="{body_top + i * row_h + row_h - 3:.1f}" text-anchor="end">{esc(label)}</text>'
                )
        else:
            out.append(f'<text x="{left - 4}" y="{body_top + 9}" text-anchor="end">{esc(self.rows[0]) if self.rows else ""}</text>')
            out.append(f'<text x="{left - 4}" y="{body_top + n * row_h:.1f}" text-anchor="end">{esc(self.rows[-1]) if self.rows else ""}</text>')
        axis_y = body_top + n * row_h + 4
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{axis_y:.1f}" y2="{axis_y:.1f}" stroke="#999"/>')
        for tick in nice_ticks(self.span_ms):
            out.append(f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{axis_y:.1f}" y2="{axis_y + 4:.1f}" stroke="#999"/>')
            out.append(f'<text x="{x(tick):.1f}" y="{axis_y + 14:.1f}" text-anchor="middle">{tick:g}</text>')
        out.append(f'<text x="{left + plot_w}" y="{axis_y + 27:.1f}" text-anchor="end">ms since the first request started</text>')
        out.append("</svg>")
        return "".join(out)

    # -------------------------------------------------------------------- display

    def __str__(self) -> str:
        what = {"worker": "workers", "chainlet": "chainlet tracks"}.get(self.by, "requests")
        return f"lock timeline of {len(self.rows)} {what}: {self.caption}"

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": str(self)}
        try:
            import base64

            png = base64.b64encode(self.png()).decode("ascii")
            bundle["text/html"] = f'<img src="data:image/png;base64,{png}" alt="{esc(self.caption)}"/>'
        except ImportError:  # no matplotlib: the SVG says the same
            bundle["text/html"] = self.svg()
        return bundle


def nice_ticks(span: float, target: int = 6) -> list[float]:
    """Round tick positions (1, 2 or 5 times a power of ten) from 0 to `span`."""
    if span <= 0 or not math.isfinite(span):
        return [0.0]
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(span / step) + 1)]


def timeline(source: Any, by: str = "request", last: int | None = None, lock_size: int | None = None) -> Timeline:
    """The lock timeline: one row per request (or per worker), segments coloured by stage, the idle share
    of each predict hatched, and a lane on top with the lock slots held over time against the lock size.

    Args:
        source: a Report (a BenchReport), a LiveModel (its kept traces), a Chain (a lane per chainlet),
            or a list of Traces.
        by: `"request"` (a row each) or `"worker"` (every request a worker thread ran on its row).
        last: only the last `last` requests.
        lock_size: the lock size to draw (default: the source's).

    Returns:
        A Timeline: SVG in a notebook (no matplotlib needed); `.svg()`, `.figure()` (matplotlib),
        `.png()`.

    Example:
        ```python
        truss_lab.timeline(tr.bench(n=40, concurrency=4, progress=False)).svg()
        ```
    """
    if hasattr(source, "chainlets") and hasattr(source, "trees"):  # a Chain: a lane per chainlet
        return chain_timeline(source, last)
    if by not in ("request", "worker"):
        raise ValueError(f"by must be 'request' or 'worker', got {by!r}")
    report = _report(source, last, lock_size)
    traces = report.traces
    t0 = min((t.start for t in traces), default=0.0)

    def ms(ts: float) -> float:
        return (ts - t0) * 1000.0

    if by == "request":
        rows = [f"#{t.request_id}" for t in traces]
        row_of = {id(t): i for i, t in enumerate(traces)}
    else:
        rows = list(dict.fromkeys(t.thread for t in traces))
        index = {name: i for i, name in enumerate(rows)}
        row_of = {id(t): index[t.thread] for t in traces}
        rows = [_short_thread(r) for r in rows]
    segments: list[Segment] = []
    errors: list[tuple[int, float, str]] = []
    for t in traces:
        _draw(t, row_of[id(t)], ms, segments, errors)
    steps = _occupancy(traces, ms)
    span = max((ms(t.end) for t in traces), default=0.0)
    return Timeline(rows, segments, errors, steps, report.lock_size, span, caption(report), by, report.idle_label)


def _occupancy(traces: list[Trace], ms: Callable[[float], float]) -> list[tuple[float, int]]:
    """Lock slots held over time, a step function: (ms, slots held from then on)."""
    events = sorted(
        [(t.lock_acquired, 1) for t in traces if t.lock_acquired and t.lock_released]
        + [(t.lock_released, -1) for t in traces if t.lock_acquired and t.lock_released],
        key=lambda e: (e[0], e[1]),
    )
    steps, level = [(0.0, 0)], 0
    for ts, step in events:
        level += step
        steps.append((ms(ts), level))
    return steps


def _draw(t: Trace, row: int, ms: Callable[[float], float], segments: list[Segment], errors: list) -> None:
    """One request's stages (and its error mark) on `row`."""
    for stage, a, b in (
        ("preprocess", t.pre_start, t.pre_end),
        ("lock_wait", t.lock_requested, t.lock_acquired),
        ("predict", t.predict_start, t.predict_end),
        ("postprocess", t.post_start, t.post_end),
    ):
        if a is not None and b is not None and b > a:
            idle = t.predict_idle_ms if stage == "predict" else None
            if idle:  # the idle share of predict, drawn after the computing part (a share, not when)
                split = ms(b) - idle
                segments.append(Segment(row, "predict", ms(a), split, t.request_id))
                segments.append(Segment(row, "predict_idle", split, ms(b), t.request_id))
            else:
                segments.append(Segment(row, stage, ms(a), ms(b), t.request_id))
    if not t.ok:
        errors.append((row, ms(t.end), f"{t.error_stage} error: {t.error}"))


def chain_timeline(chain: Any, last: int | None = None) -> Timeline:
    """A chain's requests with a lane per chainlet (dependencies first, the entrypoint last): each lane
    has a track per call running at once (up to its lock's worth inside predict), so its lock shows."""
    report = chain.report(last)
    every = [t for r in report.reports.values() for t in r.traces]
    t0 = min((t.start for t in every), default=0.0)

    def ms(ts: float) -> float:
        return (ts - t0) * 1000.0

    rows: list[str] = []
    segments: list[Segment] = []
    errors: list[tuple[int, float, str]] = []
    busy = [n for n, r in report.reports.items() if r.count] or list(report.reports)
    tight = min(busy, key=lambda n: report.locks[n]) if busy else None  # the smallest lock: where calls queue
    occupancy = _occupancy(report.reports[tight].traces, ms) if tight is not None else [(0.0, 0)]
    for name, r in report.reports.items():
        ends: list[float] = []  # per track of this lane: when its last call ended
        base = len(rows)
        for t in sorted(r.traces, key=lambda t: t.start):
            track = next((i for i, end in enumerate(ends) if end <= t.start), len(ends))
            if track == len(ends):
                ends.append(0.0)
            ends[track] = t.end or t.start
            _draw(t, base + track, ms, segments, errors)
        rows += [f"{name} (lock {report.locks[name]})"] + [f"{name} ·{k + 1}" for k in range(1, max(len(ends), 1))]
    span = max((ms(t.end) for t in every if t.end is not None), default=0.0)
    most = ", ".join(f"{n} {r.max_lock_holders}/{report.locks[n]}" for n, r in report.reports.items())
    caption_text = f"chain {report.chain}: {len(report.trees)} requests{CAPTION_BREAK}most locks held at once: {most}"
    return Timeline(rows, segments, errors, occupancy, report.locks.get(tight, 1) if tight else 1, span, caption_text,
                    "chainlet", "idle", lane_label=f"{tight}\nlock held" if tight else "lock\nheld")


def caption(report: Report) -> str:
    """Leads with how much of the lock's held time predict spent not computing - the lesson - then the rest."""
    if not report.count:
        return "no requests"
    fail = sum(report.failures.values())
    compute = f", compute bound {report.compute_bound:.1f}" if not math.isnan(report.compute_bound) else ""
    return (
        f"{report.idle_sentence()}{CAPTION_BREAK}"
        f"{report.count} request{'s' if report.count != 1 else ''}{f' ({fail} failed)' if fail else ''} · {report.throughput:.1f} req/s · "
        f"bound {report.bound:.1f}{compute} req/s (lock {report.lock_size})"
    )


CAPTION_BREAK = " | "  # between the idle sentence and the rest: where the SVG breaks a long caption


def _report(source: Any, last: int | None, lock_size: int | None) -> Report:
    if isinstance(source, Report):
        if last is None:
            return source
        return Report.from_traces(source.traces[-last:], source.lock_size)
    if hasattr(source, "report") and hasattr(source, "traces"):  # a LiveModel
        return source.report(last=last)
    traces = list(source) if isinstance(source, Iterable) else None
    if traces is None or not all(isinstance(t, Trace) for t in traces):
        raise TypeError(f"timeline() takes a Report, a LiveModel or a list of Traces, not {type(source).__name__}")
    if last is not None:
        traces = traces[-last:]
    if lock_size is None:  # not known from bare traces: at least as many as were ever held at once
        lock_size = max(1, max_concurrent([(t.lock_acquired, t.lock_released) for t in traces if t.lock_released]))
    return Report.from_traces(traces, lock_size)


def _short_thread(name: str) -> str:
    # "truss-lab-bench_3" -> "worker 3"; "MainThread" stays
    head, _, tail = name.rpartition("_")
    return f"worker {tail}" if head and tail.isdigit() else name

"""Traces out to the field's viewers: Chrome trace-event JSON (Perfetto, chrome://tracing, speedscope)
and OpenTelemetry spans named as the Truss server names them (`predict-endpoint`, `call-pre`,
`call-predict`, `call-post`), in the NDJSON its `OTEL_TRACING_NDJSON_FILE` exporter writes.

    report = tr.report()
    report.to_chrome_trace("trace.json")            # open in https://ui.perfetto.dev
    report.to_chrome_trace("trace.json", profile=p) # with a Profile's call trees nested in their stages
    report.to_otel("spans.ndjson")                  # or to_otel(exporter=...) for any SDK exporter
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

_STAGES = (  # (trace start attribute, end attribute, Chrome event name, Truss span name, Truss section)
    ("pre_start", "pre_end", "preprocess", "call-pre", "preprocess"),
    ("lock_requested", "lock_acquired", "lock wait", None, None),
    ("lock_acquired", "lock_released", "lock held", None, None),
    ("predict_start", "predict_end", "predict", "call-predict", "predict"),
    ("post_start", "post_end", "postprocess", "call-post", "postprocess"),
)


def _epoch_offset() -> float:
    """Wall-clock seconds minus perf_counter seconds: traces keep perf_counter times."""
    return time.time() - time.perf_counter()


def chrome_trace(report: Any, path: str | os.PathLike | None = None, profile: Any = None) -> dict:
    """The report's requests as Chrome trace events: a track per worker thread, a span per stage (the
    lock wait and the lock hold as their own), reloads as instant events, and - with a Profile - each
    profiled stage's call tree nested in that request's stage. Written to `path` if given."""
    events, _ = _report_events(report, 1, f"truss_lab: {report_name(report)}", profile)
    return _write_trace(events, path)


def chain_chrome_trace(report: Any, path: str | os.PathLike | None = None) -> dict:
    """A ChainReport as Chrome trace events: a process per chainlet (its worker threads as tracks) and
    a flow arrow from each call's caller to the call (Perfetto draws them), so a request reads across
    the chainlets as it ran."""
    events: list[dict] = []
    where: dict[int, tuple[int, int]] = {}  # id(trace) -> (pid, tid) of its request span
    for pid, (name, chainlet_report) in enumerate(report.reports.items(), start=1):
        more, placed = _report_events(chainlet_report, pid, name)
        events += more
        where.update(placed)
    flow = 0
    for tree in report.trees:
        for call, inner in tree.edges():
            if id(call.trace) in where and id(inner.trace) in where:
                flow += 1
                (pa, ta), (pb, tb) = where[id(call.trace)], where[id(inner.trace)]
                events.append({"ph": "s", "id": flow, "pid": pa, "tid": ta, "ts": inner.trace.start * 1e6,
                               "name": f"calls {inner.chainlet}", "cat": "chain"})
                events.append({"ph": "f", "bp": "e", "id": flow, "pid": pb, "tid": tb, "ts": inner.trace.start * 1e6,
                               "name": f"calls {inner.chainlet}", "cat": "chain"})
    return _write_trace(events, path)


def _write_trace(events: list[dict], path: str | os.PathLike | None) -> dict:
    out = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path is not None:
        Path(path).write_text(json.dumps(out))
    return out


def _report_events(report: Any, pid: int, process: str, profile: Any = None) -> tuple[list[dict], dict[int, tuple[int, int]]]:
    events: list[dict] = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
    placed: dict[int, tuple[int, int]] = {}
    sessions = _sessions_by_request(profile)
    tracks, names = _tracks(report.traces)
    for t in report.traces:
        tid = tracks[id(t)]
        placed[id(t)] = (pid, tid)
        args = {"request": t.request_id, "version": t.version, **({"error": t.error} if t.error else {}),
                **({"trace_id": t.trace_id, "span_id": t.span_id} if t.span_id else {})}
        events.append(_span("request", t.start, t.end, tid, {**args, "method": t.method}, "request", pid))
        for start, end, name, _, section in _STAGES:
            a, b = getattr(t, start), getattr(t, end)
            if a is None or b is None:
                continue
            events.append(_span(name, a, b, tid, args, "stage", pid))
            for session in sessions.get((t.request_id, section), []):
                events.extend(_samples(session, a, b, tid, profile))
    for tid, name in names.items():
        events.append({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}})
    offset = _epoch_offset()
    for event in getattr(report, "reloads", None) or []:
        events.append({"ph": "i", "s": "g", "pid": pid, "tid": 0, "name": f"reload: {event.kind}",
                       "ts": (event.when - offset) * 1e6, "args": {"version": event.version, "summary": event.summary()}})
    return events, placed


def _tracks(traces: list) -> tuple[dict[int, int], dict[int, str]]:
    """A track for each request such that requests overlapping in time never share one (a viewer
    nests slices on a track by time, so overlapping ones would be drawn inside each other), keeping a
    thread's requests on its own track where it is free: (id(trace) -> track, track -> name). Thread
    names are not enough: every request served over HTTP runs on a thread named "AnyIO worker thread"."""
    ends: list[float] = []  # per track (index + 1), when its last request ended
    threads: list[set[str]] = []
    out: dict[int, int] = {}
    for t in sorted(traces, key=lambda t: t.start):
        end = t.end if t.end is not None else t.start
        free = [i for i, e in enumerate(ends) if e <= t.start]
        own = [i for i in free if t.thread in threads[i]]
        if own or free:
            i = (own or free)[0]
        else:
            i = len(ends)
            ends.append(end)
            threads.append(set())
        ends[i] = max(ends[i], end)
        threads[i].add(t.thread)
        out[id(t)] = i + 1
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for i, used in enumerate(threads):
        name = next(iter(used)) if len(used) == 1 else "requests"
        seen[name] = seen.get(name, 0) + 1
        names[i + 1] = name if seen[name] == 1 else f"{name} ({seen[name]})"
    return out, names


def report_name(report: Any) -> str:
    return getattr(report, "label", "") or "model"


def _span(name: str, start: float, end: float, tid: int, args: dict, cat: str, pid: int = 1) -> dict:
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "cat": cat, "ts": start * 1e6, "dur": max(0.0, end - start) * 1e6, "args": args}


def _sessions_by_request(profile: Any) -> dict[tuple[int, str], list]:
    out: dict[tuple[int, str], list] = {}
    if profile is None:
        return out
    for stage, items in profile.sessions.items():
        for request_id, session in items:
            out.setdefault((request_id, stage), []).append(session)
    return out


def _samples(session: Any, start: float, end: float, tid: int, profile: Any) -> list[dict]:
    """A session's call tree from the truss's code down as nested spans, laid out from the stage's
    start in call order, each as long as its sampled time (a flame chart inside the stage). Scaled to
    fit the stage: an async stage's samples can add up to more than its session's own duration when
    several requests share the model's event loop, and every slice must lie inside its stage."""
    events: list[dict] = []
    nodes = profile.session_tree(session)
    sampled = max(session.duration, sum(n.seconds for n in nodes))
    scale = (end - start) / sampled if sampled > 0 else 1.0

    def lay(node, at: float) -> None:
        events.append({"ph": "X", "pid": 1, "tid": tid, "name": node.function, "cat": "sample",
                       "ts": at * 1e6, "dur": node.seconds * scale * 1e6, "args": {"location": node.location}})
        for child in node.children:
            lay(child, at)
            at += child.seconds * scale

    at = start
    for node in nodes:
        lay(node, at)
        at += node.seconds * scale
    return events


# ---------------------------------------------------------------------------------------- OpenTelemetry


class NdjsonExporter:
    """The Truss server's JSONFileExporter: one span per line, as `span.to_json()` gives it."""

    def __init__(self, path: str | os.PathLike):
        self._file = Path(path).open("a")

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        for span in spans:
            self._file.write(json.dumps(json.loads(span.to_json())) + "\n")
        self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._file.flush()
        return True


def _export_trace(tracer: Any, t: Any, ns: Any, context: Any = None) -> tuple[Any, int]:
    """One request as the Truss server's spans; returns (its `predict-endpoint` span, spans made)."""
    from opentelemetry import trace as otel_trace

    count = 0
    root = tracer.start_span("predict-endpoint", context=context, start_time=ns(t.start))
    ctx = otel_trace.set_span_in_context(root)
    root.add_event("start: model-call", timestamp=ns(t.start))
    for start, end, _, span_name, section in _STAGES:
        if span_name is None:
            continue
        begin = t.lock_requested if span_name == "call-predict" and t.lock_requested is not None else getattr(t, start)
        a, b = getattr(t, start), getattr(t, end)
        if a is None or b is None or begin is None:
            continue
        span = tracer.start_span(span_name, context=ctx, start_time=ns(begin))
        span.add_event(f"start: {section}", timestamp=ns(a))
        span.add_event(f"done: {section}", attributes={"duration_sec": b - a}, timestamp=ns(b))
        span.end(end_time=ns(b))
        count += 1
    root.add_event("done: model-call", attributes={"duration_sec": t.end - t.start}, timestamp=ns(t.end))
    root.end(end_time=ns(t.end))
    return root, count + 1


def chain_otel(report: Any, path: str | os.PathLike | None = None, exporter: Any = None) -> int:
    """A ChainReport's requests as OpenTelemetry spans: per request one trace (the id it was recorded
    with), each chainlet a service whose `predict-endpoint` span is a child of its caller's. Written
    to `path` as NDJSON, or handed to `exporter`. Returns the span count."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RecordedIds(RandomIdGenerator):  # a request's root span gets the trace id the request had
        pending: int | None = None

        def generate_trace_id(self) -> int:
            return self.pending if self.pending is not None else super().generate_trace_id()

    if exporter is None:
        if path is None:
            raise ValueError("to_otel() needs a path or an exporter")
        exporter = NdjsonExporter(path)
    shared = _KeepOpen(exporter)
    ids = RecordedIds()
    providers = {}
    for name in report.reports:
        providers[name] = TracerProvider(resource=Resource.create({SERVICE_NAME: name}), id_generator=ids)
        providers[name].add_span_processor(SimpleSpanProcessor(shared))
    offset = _epoch_offset()

    def ns(t: float) -> int:
        return int((t + offset) * 1e9)

    count = 0
    for tree in report.trees:
        made: dict[int, Any] = {}
        for caller, call in [(None, tree), *tree.edges()]:  # callers before their calls
            parent = made.get(id(caller.trace)) if caller is not None else None
            ids.pending = int(call.trace.trace_id, 16) if parent is None and call.trace.trace_id else None
            context = otel_trace.set_span_in_context(parent) if parent is not None else None
            if call.trace.end is None:
                continue
            made[id(call.trace)], n = _export_trace(providers[call.chainlet].get_tracer("truss_lab"), call.trace, ns, context)
            count += n
        ids.pending = None
    for provider in providers.values():
        provider.shutdown()
    exporter.shutdown()
    return count


class _KeepOpen:
    """One exporter shared by several providers: only the caller shuts it down."""

    def __init__(self, exporter: Any):
        self._exporter = exporter

    def export(self, spans):
        return self._exporter.export(spans)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def otel(report: Any, path: str | os.PathLike | None = None, exporter: Any = None, service_name: str = "truss-lab") -> int:
    """The report's requests as OpenTelemetry spans through the SDK, shaped as the Truss server's: a
    `predict-endpoint` span per request with `call-pre`, `call-predict` and `call-post` children, each
    with its `start: <stage>` / `done: <stage>` events and `duration_sec` (call-predict starts when the
    lock is requested, its `start: predict` event when the lock is held, as on Truss). Written to
    `path` as the server's NDJSON, or handed to `exporter` (any SpanExporter). Returns the span count."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    if exporter is None:
        if path is None:
            raise ValueError("to_otel() needs a path or an exporter")
        exporter = NdjsonExporter(path)
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("truss_lab")
    offset = _epoch_offset()

    def ns(t: float) -> int:
        return int((t + offset) * 1e9)

    count = 0
    for t in report.traces:
        if t.end is not None:
            count += _export_trace(tracer, t, ns)[1]
    provider.shutdown()
    return count

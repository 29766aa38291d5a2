"""The Truss server's routes, in one table: `truss-lab serve` (http.py) and the Ray Serve ingress
(ray_serve.py) both add exactly these, so the two cannot drift apart.

    GET  /                                       liveness: `true`
    GET  /v1/models/{name}, .../loaded           readiness (200 `{}`, 503 before / after a failed load)
    POST /v1/models/{name}:predict, :predict_binary, /invocations      the three stages
    POST /v1/chat/completions, ... (OpenAI-compatible)                  the model's method of that name
    GET  /v1/models/{name}/schema                the pydantic input and output JSON schemas
    GET  /ping                                   SageMaker's readiness
    POST /hot-reload                             reload the edited code now
    GET  /metrics/                               Prometheus text: truss_lab's request counts and stage
                                                 latencies, and whatever the model registered itself
    WS   /v1/websocket                           the model's websocket()
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import describe
from ..wrapper import ENDPOINT_ROUTES

PREDICT_ROUTES = ("/v1/models/{model_name}:predict", "/v1/models/{model_name}:predict_binary")
READY_ROUTES = ("/v1/models/{model_name}", "/v1/models/{model_name}/loaded")
SCHEMA_ROUTE = "/v1/models/{model_name}/schema"
WEBSOCKET_ROUTE = "/v1/websocket"


def create_app(backend, max_body: int, on_startup=None):
    """The FastAPI app for `backend`, with every route of the Truss server (routes.py: one table)."""
    @asynccontextmanager
    async def lifespan(app):
        if on_startup is not None:
            on_startup()
        yield

    app = FastAPI(title=f"truss_lab: {backend.name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    add_routes(app, backend, max_body)
    return app


def add_routes(app, backend, max_body: int) -> None:
    """Every route of the Truss server, answering from `backend` (http.Backend)."""
    from . import http

    async def liveness():
        return True

    async def ready(model_name: str):
        return await http.readiness(backend)

    async def is_loaded(model_name: str):
        return http.loaded(backend)

    def limit() -> int:  # a Ray ingress replica learns its limit when it starts
        return getattr(backend, "max_body", None) or max_body

    async def predict(request: Request):
        return await http.predict_response(request, backend, limit())

    async def schema(model_name: str):
        if not backend.ready():  # Truss: 503 "Schema not available, please try again later."
            return http.error_body(503, "load", "Schema not available, please try again later.", backend.name)
        found = await run_in_threadpool(backend.schema)
        if found is None:
            return JSONResponse({"error": "No schema found"}, status_code=404,
                                headers={"X-BASETEN-ERROR-SOURCE": http.ERROR_SOURCE, "X-BASETEN-ERROR-CODE": http.CODE_DOWNSTREAM})
        return JSONResponse(found)

    async def ping():
        return await http.readiness(backend)

    def hot_reload():
        if not backend.ready():
            return http.not_ready(backend)
        event = backend.reload()
        if not event.ok:
            return JSONResponse({"error": event.error}, status_code=422)
        return {"msg": "Hot reload complete"}

    async def websocket(ws: WebSocket):
        await serve_websocket(ws, backend)

    app.add_api_route("/", liveness, methods=["GET"])
    for route in READY_ROUTES:
        app.add_api_route(route, ready if route == READY_ROUTES[0] else is_loaded, methods=["GET"])
    app.add_api_route(SCHEMA_ROUTE, schema, methods=["GET"])
    for route in (*PREDICT_ROUTES, "/invocations"):
        app.add_api_route(route, predict, methods=["POST"])
    for method, route in ENDPOINT_ROUTES.items():
        app.add_api_route(route, _endpoint(backend, limit, method), methods=["POST"], name=method)
    app.add_api_route("/ping", ping, methods=["GET"])
    app.add_api_route("/hot-reload", hot_reload, methods=["POST"])
    app.add_api_websocket_route(WEBSOCKET_ROUTE, websocket)
    app.mount("/metrics", MetricsApp(backend))


def _endpoint(backend, limit, method: str):
    from . import http

    async def route(request: Request):
        return await http.predict_response(request, backend, limit(), method)

    return route


# ---------------------------------------------------------------------------------------- /v1/websocket


async def serve_websocket(ws, backend) -> None:
    """/v1/websocket as the Truss server runs it: the model's async websocket(ws), closed 1000 when it
    returns, 1011 if it raises; 1003 when the model has no websocket method."""
    from starlette.websockets import WebSocketDisconnect

    if not backend.ready() or "websocket" not in backend.methods().specs:
        await ws.accept()
        await ws.close(code=1003, reason="WebSocket is not implemented on this deployment.")
        return
    live = backend.live
    try:
        await ws.accept()
        await live.serving.bound["websocket"](ws)
        await _close(ws, 1000)
    except WebSocketDisconnect:
        pass
    except Exception as exc:
        await _close(ws, 1011, "Internal Server Error (in model/chainlet).")  # the Truss server's reason
        from .http import logger

        logger.error("%s: websocket failed: %s", backend.name, describe(exc))


async def _close(ws, code: int, reason: str | None = None) -> None:
    try:
        await ws.close(code=code, reason=reason)
    except RuntimeError:  # already closed
        pass


# ---------------------------------------------------------------------------------------- /metrics


class MetricsApp:
    """/metrics as the Truss server serves it: what is registered with prometheus_client's default
    registry (the model's own metrics), without the process, platform and gc collectors the Truss
    server unregisters and without the `_created` samples it disables - plus truss_lab's request
    counts and stage latencies (a deliberate addition, docs/parity.md). Made on the first scrape, in the
    process that serves (a Ray replica pickles the app before)."""

    def __init__(self, backend):
        self.backend = backend
        self._app = None

    def __getstate__(self):
        return {"backend": self.backend, "_app": None}

    async def __call__(self, scope, receive, send):
        if self._app is None:
            from prometheus_client import CollectorRegistry, make_asgi_app

            global _COLLECTOR, _EXPORTED
            with _COLLECTOR_LOCK:
                if _COLLECTOR is None:
                    _COLLECTOR = TraceMetrics()
                    _EXPORTED = CollectorRegistry(auto_describe=False)
                    _EXPORTED.register(_AsTrussExports())
                    _EXPORTED.register(_COLLECTOR)
            _COLLECTOR.add(self.backend)
            self._app = make_asgi_app(_EXPORTED)
        await self._app(scope, receive, send)


class _AsTrussExports:
    """The default registry as the Truss server exports it (its create_application unregisters
    PROCESS_COLLECTOR, PLATFORM_COLLECTOR and GC_COLLECTOR and calls disable_created_metrics()):
    filtered here, so this process's own registry is left as the user's code set it up."""

    _CREATED = ("counter", "histogram", "summary", "gaugehistogram")

    def collect(self):
        from prometheus_client import REGISTRY, gc_collector, platform_collector, process_collector

        defaults = {id(process_collector.PROCESS_COLLECTOR), id(platform_collector.PLATFORM_COLLECTOR), id(gc_collector.GC_COLLECTOR)}
        for collector in list(REGISTRY._collector_to_names):
            if id(collector) in defaults:
                continue
            for metric in collector.collect():
                if metric.type in self._CREATED:
                    metric.samples = [s for s in metric.samples if s.name != f"{metric.name}_created"]
                yield metric


_COLLECTOR: "TraceMetrics | None" = None
_EXPORTED: Any = None
_COLLECTOR_LOCK = threading.Lock()


class _Figures:
    """One model's cumulative counts and histograms."""

    def __init__(self, stages: tuple[str, ...], buckets: int):
        self.seen = 0  # the highest request id counted
        self.requests: dict[tuple[str, str], int] = {}
        self.hist = {s: ([0] * buckets, [0], [0.0]) for s in stages}  # per bucket, count, sum


class TraceMetrics:
    """truss_lab's request counts and stage latencies as Prometheus metrics, read from each served
    model's traces when /metrics is scraped: nothing is added to a request's own path. Counters and
    histograms only grow; traces that left a model's ring buffer between two scrapes are not counted
    (raise `trace_capacity` for a server scraped rarely)."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    STAGES = ("preprocess", "lock_wait", "predict", "postprocess", "total")

    def __init__(self):
        self._lock = threading.Lock()
        self._backends: "weakref.WeakKeyDictionary[Any, _Figures]" = weakref.WeakKeyDictionary()

    def add(self, backend) -> None:
        with self._lock:
            self._backends.setdefault(backend, _Figures(self.STAGES, len(self.BUCKETS)))

    def _take(self, backend, f: _Figures) -> None:
        live = getattr(backend, "live", None)
        if live is None:
            return
        for t in live.traces:  # (a closed model keeps its figures until it is collected)
            if t.request_id <= f.seen or t.end is None:
                continue
            f.seen = max(f.seen, t.request_id)
            status = "ok" if t.ok else f"{t.error_stage or 'unknown'}_error"
            key = (t.method, status)
            f.requests[key] = f.requests.get(key, 0) + 1
            for stage in self.STAGES:
                ms = t.stage_ms(stage)
                if stage != "total" and not ms:
                    continue
                buckets, count, total = f.hist[stage]
                seconds = ms / 1000.0
                for i, bound in enumerate(self.BUCKETS):
                    if seconds <= bound:
                        buckets[i] += 1
                count[0] += 1
                total[0] += seconds

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        requests = CounterMetricFamily("truss_lab_requests", "Requests the model answered, by method and outcome",
                                       labels=["model", "method", "status"])
        stages = HistogramMetricFamily("truss_lab_stage_seconds", "Time per request in each stage (lock_wait: waiting for the predict lock)",
                                       labels=["model", "stage"])
        with self._lock:
            for backend, f in list(self._backends.items()):
                self._take(backend, f)
                name = backend.name
                for (method, status), n in sorted(f.requests.items()):
                    requests.add_metric([name, method, status], n)
                for stage, (buckets, count, total) in f.hist.items():
                    cumulative = [(str(b), buckets[i]) for i, b in enumerate(self.BUCKETS)] + [("+Inf", count[0])]
                    stages.add_metric([name, stage], cumulative, total[0])
        yield requests
        yield stages

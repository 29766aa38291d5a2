"""Serve a LiveModel over HTTP with the Truss server's routes (FastAPI on uvicorn).

    GET  /                            liveness: 200 as soon as the server runs
    GET  /v1/models/model             readiness: 200 once load() has finished, 503 before
    POST /v1/models/model:predict     JSON in, JSON out (a streaming predict streams)

Requests go through the same runner as the notebook - the same lock, traces and hot reload - so
`tr.report()` and the timeline include HTTP traffic. Errors are JSON naming the stage, never a
traceback: 400 for a body that is not JSON or an input preprocess rejects, 500 for predict or
postprocess errors (and outputs that are not JSON), 413 for a body over the limit, 503 before ready.

    server = tr.serve(port=8080)        # a background thread, from a notebook
    server.url, server.stop()
    truss-lab serve my-truss --port 8080

This module imports FastAPI: the core imports it only when you serve. `Backend` is what the routes call; the Ray Serve deployment (ray_serve.py) provides its own, so both
servers answer the same requests the same way.
"""

from __future__ import annotations

import json
import socket
import threading
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ..errors import ModelError, TrussLabError
from ..jsoncheck import first_non_json

if TYPE_CHECKING:
    from ..bundle import Bundle

DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes; a bigger request body is refused with 413
PREDICT_ROUTE = "/v1/models/model:predict"
READY_ROUTE = "/v1/models/model"


class Backend(Protocol):
    """What the HTTP routes need from whatever runs the model."""

    name: str

    def ready(self) -> bool: ...

    def streaming(self) -> bool: ...

    async def run(self, model_input: Any) -> tuple[Any, ModelError | None]: ...

    def stream(self, model_input: Any) -> Iterator[Any]: ...


class LiveBackend:
    """A LiveModel (or one still loading) behind the routes; model calls run on worker threads."""

    def __init__(self, live=None, name: str = "model"):
        self.live = live
        self.name = live.name if live is not None else name
        self.load_error: str | None = None

    def ready(self) -> bool:
        return self.live is not None

    def streaming(self) -> bool:
        return self.live.serving.streaming

    async def run(self, model_input: Any) -> tuple[Any, ModelError | None]:
        result = await run_in_threadpool(self.live.run, model_input)
        return result.output, result.error

    def stream(self, model_input: Any) -> Iterator[Any]:
        return self.live.stream(model_input)


# ---------------------------------------------------------------------------------------- routes


def error_body(status: int, stage: str, message: str, model: str, location: str | None = None):
    body = {"error": message, "stage": stage, "model": model}
    if location:
        body["location"] = location
    return JSONResponse(body, status_code=status)


async def read_json(request, backend: Backend, max_body: int) -> tuple[Any, Any]:
    """(model_input, None), or (None, an error response): 413 over the limit, 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        return None, error_body(413, "request", f"body of {int(declared)} bytes is over the {max_body}-byte limit", backend.name)
    body = bytearray()
    async for chunk in request.stream():  # a body without Content-Length is counted as it arrives
        body += chunk
        if len(body) > max_body:
            return None, error_body(413, "request", f"body is over the {max_body}-byte limit", backend.name)
    try:
        return json.loads(body), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, error_body(400, "request", f"body is not JSON: {exc}", backend.name)


async def predict_response(request, backend: Backend, max_body: int):
    """POST /v1/models/model:predict, for any Backend."""
    if not backend.ready():
        return error_body(503, "load", "the model is still loading", backend.name)
    model_input, problem = await read_json(request, backend, max_body)
    if problem is not None:
        return problem
    if backend.streaming():
        return StreamingResponse(_encode_stream(backend.stream(model_input)), media_type="application/octet-stream")
    output, error = await backend.run(model_input)
    if error is not None:
        status = 400 if error.stage == "preprocess" else 500
        return error_body(status, error.stage, str(error), backend.name, error.location)
    bad = first_non_json(output)
    if bad is not None:
        path, tname = bad
        return error_body(500, "postprocess", f"output is not JSON-serialisable at {path}: {tname}", backend.name)
    return JSONResponse(output)


async def _encode_stream(chunks: Iterator[Any]) -> AsyncIterator[bytes]:
    """Chunks as the Truss server sends them: str as UTF-8, bytes as is, anything else as a JSON line."""
    async for chunk in iterate_in_threadpool(chunks):
        if isinstance(chunk, bytes):
            yield chunk
        elif isinstance(chunk, str):
            yield chunk.encode()
        else:
            yield (json.dumps(chunk) + "\n").encode()


def readiness(backend: Backend):
    if getattr(backend, "load_error", None):
        return JSONResponse({"name": backend.name, "ready": False, "error": backend.load_error}, status_code=503)
    if not backend.ready():
        return JSONResponse({"name": backend.name, "ready": False}, status_code=503)
    return JSONResponse({"name": backend.name, "ready": True})


def create_app(backend: Backend, max_body: int = DEFAULT_MAX_BODY, on_startup=None):
    """The FastAPI app for `backend`, with the Truss server's three routes."""
    @asynccontextmanager
    async def lifespan(app):
        if on_startup is not None:
            on_startup()
        yield

    app = FastAPI(title=f"truss_lab: {backend.name}", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/")
    async def liveness():
        return {"alive": True}

    @app.get(READY_ROUTE)
    async def ready():
        return readiness(backend)

    @app.post(PREDICT_ROUTE)
    async def predict(request: Request):
        return await predict_response(request, backend, max_body)

    return app


# ---------------------------------------------------------------------------------------- servers


class Server:
    """A uvicorn server on a background thread; `stop()` (or leaving a `with`) shuts it down."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0, max_body: int = DEFAULT_MAX_BODY):
        import uvicorn

        self.backend = backend
        self._started = threading.Event()
        app = create_app(backend, max_body, on_startup=self._started.set)
        self._socket = listen(backend.name, host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        # log_config=None: uvicorn's own dictConfig would close every logging handler already in this
        # process (a notebook's, absl's under TensorFlow); its loggers propagate to yours instead.
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5, log_config=None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"truss-lab-serve[{backend.name}]", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._started.set()

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            self.stop()
            raise TrussLabError(f"{self.backend.name}: the HTTP server did not start: {self._error or 'timed out'}")
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<truss_lab Server {self.backend.name} at {self.url}>"


def listen(name: str, host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line TrussLabError (port in use, address not on this machine)."""
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise TrussLabError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(live, host: str = "127.0.0.1", port: int = 0, max_body: int = DEFAULT_MAX_BODY) -> Server:
    """Serve `live` over HTTP from a background thread (port 0: a free one); returns the running Server."""
    return Server(LiveBackend(live), host, port, max_body).start()


def serve_path(
    path: str,
    make_model: Callable[[Bundle], Any],
    host: str = "127.0.0.1",
    port: int = 8080,
    max_body: int = DEFAULT_MAX_BODY,
    watch: bool = True,
) -> None:
    """`truss-lab serve PATH`: answer liveness at once, load in the background, serve until Ctrl-C.

    `make_model(bundle)` builds the model (a LiveModel) on a background thread while liveness answers.
    """
    import uvicorn

    from ..bundle import read_bundle

    bundle = read_bundle(path)  # a bad folder is a usage error before any port is taken
    backend = LiveBackend(name=bundle.model_name)
    sock = listen(bundle.model_name, host, port)  # a busy port too, before load() starts

    def load() -> None:
        try:
            live = make_model(bundle)
            if watch:
                live.watch()
            backend.live = live
            print(f"{bundle.model_name}: loaded in {live.load_ms:.0f} ms; ready at http://{host}:{port}{PREDICT_ROUTE}", flush=True)
        except TrussLabError as exc:
            backend.load_error = str(exc)
            print(f"{bundle.model_name}: load failed: {exc}", flush=True)

    threading.Thread(target=load, name="truss-lab-load", daemon=True).start()
    app = create_app(backend, max_body)
    print(f"serving {bundle.model_name} on http://{host}:{port} (liveness now, readiness after load())", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    if backend.live is not None:
        backend.live.close()

"""Serve a LiveModel over HTTP with the Truss server's routes (FastAPI on uvicorn).

    GET  /                                 liveness: `true` as soon as the server runs
    GET  /v1/models/{name}[/loaded]        readiness: 200 `{}` once load() has finished, 503 before
    POST /v1/models/{name}:predict         JSON in, JSON out; a returned stream streams

Requests go through the same runner as the notebook - the same lock, traces and hot reload - so
`tr.report()` and the timeline include HTTP traffic. Statuses and `x-baseten-error-*` headers are the
Truss server's (tests/conformance compares them with the real server): 400 for a body that is not
JSON, 500 for an exception in any stage or an output its encoder cannot send, 503 before ready; plus
413 for a body over the limit. Error bodies name the stage and file:line, never a traceback.

    server = tr.serve(port=8080)        # a background thread, from a notebook
    server.url, server.stop()
    truss-lab serve my-truss --port 8080

This module imports FastAPI: the core imports it only when you serve. `Backend` is what the routes
call; the Ray Serve deployment (ray_serve.py) provides its own, so both servers answer the same
requests the same way.
"""

from __future__ import annotations

import json
import socket
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from ..errors import ModelError, TrussLabError
from ..wrapper import is_response, join_chunks, truss_json, truss_json_check

if TYPE_CHECKING:
    from ..bundle import Bundle

DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes; a bigger request body is refused with 413
PREDICT_ROUTE = "/v1/models/model:predict"  # what clients use; any model name is accepted, as on Truss
READY_ROUTE = "/v1/models/model"
PREDICT_ROUTES = ("/v1/models/{model_name}:predict",)
READY_ROUTES = ("/v1/models/{model_name}", "/v1/models/{model_name}/loaded")


# The Truss server's error headers (its errors.py): which service answered, and whose fault it was.
ERROR_SOURCE = "04"  # the Truss server
CODE_UNEXPECTED, CODE_DOWNSTREAM, CODE_CLIENT = "500", "600", "700"


@dataclass
class Answer:
    """What the model gave for one request: an output, an error, or a stream of chunks."""

    output: Any = None
    error: ModelError | None = None
    chunks: Iterator[Any] | None = None  # set when predict returned a stream


class Backend(Protocol):
    """What the HTTP routes need from whatever runs the model."""

    name: str

    def ready(self) -> bool: ...

    async def answer(self, model_input: Any) -> Answer: ...


class LiveBackend:
    """A LiveModel (or one still loading) behind the routes; model calls run on worker threads."""

    def __init__(self, live=None, name: str = "model"):
        self.live = live
        self.name = live.name if live is not None else name
        self.load_error: str | None = None

    def ready(self) -> bool:
        return self.live is not None

    async def answer(self, model_input: Any) -> Answer:
        return await run_in_threadpool(self._answer, model_input)

    def _answer(self, model_input: Any) -> Answer:
        chunks = self.live.open_stream(model_input)
        try:
            if next(chunks):  # predict returned a stream: the lock stays held while it is read
                return Answer(chunks=chunks)
            return Answer(output=next(chunks))
        except ModelError as error:
            return Answer(error=error)


# ---------------------------------------------------------------------------------------- routes


def error_body(status: int, stage: str, message: str, model: str, location: str | None = None, code: str = CODE_DOWNSTREAM):
    """An error answer: the Truss server's status and headers; the body adds the stage and file:line."""
    body = {"error": message, "stage": stage, "model": model}
    if location:
        body["location"] = location
    headers = {"X-BASETEN-ERROR-SOURCE": ERROR_SOURCE, "X-BASETEN-ERROR-CODE": code}
    return JSONResponse(body, status_code=status, headers=headers)


async def read_json(request, backend: Backend, max_body: int) -> tuple[Any, Any]:
    """(model_input, None), or (None, an error response): 413 over the limit, 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        return None, error_body(413, "request", f"body of {int(declared)} bytes is over the {max_body}-byte limit", backend.name, code=CODE_CLIENT)
    body = bytearray()
    async for chunk in request.stream():  # a body without Content-Length is counted as it arrives
        body += chunk
        if len(body) > max_body:
            return None, error_body(413, "request", f"body is over the {max_body}-byte limit", backend.name, code=CODE_CLIENT)
    try:
        return json.loads(body), None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, error_body(400, "request", f"Invalid JSON payload: {exc}", backend.name, code=CODE_CLIENT)
    except RecursionError:
        return None, error_body(400, "request", "Invalid JSON payload: nested too deeply", backend.name, code=CODE_CLIENT)


def gathers(request) -> bool:
    """Whether a stream is answered as one JSON string, as the Truss server decides (Accept, not OpenAI's SDK)."""
    if "openai" in request.headers.get("user-agent", "").lower():
        return False
    return request.headers.get("accept") == "application/json"


async def predict_response(request, backend: Backend, max_body: int):
    """POST /v1/models/{name}:predict, for any Backend."""
    if not backend.ready():
        return error_body(503, "load", f"Model with name {backend.name} is not ready.", backend.name)
    model_input, problem = await read_json(request, backend, max_body)
    if problem is not None:
        return problem
    answer = await backend.answer(model_input)
    if answer.error is not None:
        error = answer.error
        return error_body(500, error.stage, str(error), backend.name, error.location)
    if answer.chunks is not None:
        if gathers(request):
            try:
                chunks = await run_in_threadpool(list, answer.chunks)
            except ModelError as error:  # failed while gathering: Truss's unhandled-exception answer (code 500)
                return error_body(500, error.stage, str(error), backend.name, error.location, code=CODE_UNEXPECTED)
            return Response(json.dumps(join_chunks(chunks)), media_type="application/json")
        return StreamingResponse(_encode_stream(answer.chunks), media_type="application/octet-stream")
    output = answer.output
    if is_response(output):
        if output.status_code >= 300:
            output.headers.update({"X-BASETEN-ERROR-SOURCE": ERROR_SOURCE, "X-BASETEN-ERROR-CODE": CODE_CLIENT})
        return output
    try:
        body = truss_json(output)  # the runner already checked it: walk it again only to say where it fails
    except (TypeError, ValueError, RecursionError):
        path, tname = truss_json_check(output) or ("<output>", type(output).__name__)
        return error_body(500, "postprocess", f"output is not JSON-serialisable at {path}: {tname}", backend.name, code=CODE_UNEXPECTED)
    return Response(body, media_type="application/json")


async def _encode_stream(chunks: Iterator[Any]) -> AsyncIterator[bytes]:
    """Chunks as the Truss server sends them: str as UTF-8, bytes as is, anything else as a JSON line.

    An error mid-stream ends the stream (the Truss server logs it and closes the body normally). A
    client that hangs up stops the stream and frees the lock at once: the generator is closed here.
    """
    try:
        async for chunk in iterate_in_threadpool(chunks):
            if isinstance(chunk, bytes):
                yield chunk
            elif isinstance(chunk, str):
                yield chunk.encode()
            else:
                yield (json.dumps(chunk) + "\n").encode()
    except ModelError:
        return
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            try:
                await run_in_threadpool(close)
            except ValueError:  # still running in a worker thread: it ends when that pull returns
                pass


def readiness(backend: Backend):
    """Truss's readiness answer: 200 `{}` once loaded, 503 before (and after a failed load, with why)."""
    if not backend.ready():
        why = getattr(backend, "load_error", None)
        message = f"Model with name {backend.name} is not ready." + (f" load() failed: {why}" if why else "")
        return error_body(503, "load", message, backend.name)
    return JSONResponse({})


def create_app(backend: Backend, max_body: int = DEFAULT_MAX_BODY, on_startup=None):
    """The FastAPI app for `backend`, with the Truss server's routes."""
    @asynccontextmanager
    async def lifespan(app):
        if on_startup is not None:
            on_startup()
        yield

    app = FastAPI(title=f"truss_lab: {backend.name}", lifespan=lifespan, docs_url=None, redoc_url=None)

    async def liveness():
        return True

    async def ready(model_name: str):
        return readiness(backend)

    async def predict(model_name: str, request: Request):
        return await predict_response(request, backend, max_body)

    app.add_api_route("/", liveness, methods=["GET"])
    for route in READY_ROUTES:
        app.add_api_route(route, ready, methods=["GET"])
    for route in PREDICT_ROUTES:
        app.add_api_route(route, predict, methods=["POST"])
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

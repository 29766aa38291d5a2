"""Serve a LiveModel over HTTP with the Truss server's routes (FastAPI on uvicorn).

    GET  /                                 liveness: `true` as soon as the server runs
    GET  /v1/models/{name}[/loaded]        readiness: 200 `{}` once load() has finished, 503 before
    POST /v1/models/{name}:predict         JSON in, JSON out; a returned stream streams
    ...and every other route of the Truss server (routes.py has the table)

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

import asyncio
import contextlib
import functools
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Protocol

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import ModelError, describe
from ..trace import SPAN, span_from, traceparent
from ..serialization import (
    InputParsingError,
    is_pydantic,
    is_response,
    parse_input,
    parse_input_json,
    truss_json,
    truss_json_check,
    truss_msgpack_deserialize,
    truss_msgpack_serialize,
)
from ..wrapper import ModelMethods, is_http_exception, join_chunks


DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes; a bigger request body is refused with 413
PREDICT_ROUTE = "/v1/models/model:predict"  # what clients use; any model name is accepted, as on Truss
READY_ROUTE = "/v1/models/model"
logger = logging.getLogger("truss_lab.serving")


# The Truss server's error headers (its errors.py): which service answered, and whose fault it was.
ERROR_SOURCE = "04"  # the Truss server
CODE_UNEXPECTED, CODE_DOWNSTREAM, CODE_CLIENT = "500", "600", "700"


@dataclass
class Answer:
    """What the model gave for one request: an output, an error, or a stream of chunks."""

    output: Any = None
    error: ModelError | None = None
    chunks: Iterator[Any] | None = None  # set when predict (or postprocess) returned a stream
    gatherable: bool = True  # predict's stream: `Accept: application/json` gathers it (a postprocess stream: never)
    read_timeout: float | None = None  # the longest wait for the next chunk (runtime.streaming_read_timeout)


class Backend(Protocol):
    """What the HTTP routes need from whatever runs the model."""

    name: str

    def ready(self) -> bool: ...

    def methods(self) -> ModelMethods: ...

    async def answer(self, inputs: Any, request: Any = None, method: str = "predict") -> Answer: ...


class LiveBackend:
    """A LiveModel (or one still loading) behind the routes; model calls run on worker threads."""

    def __init__(self, live=None, name: str = "model", reload: Any = None):
        self.live = live
        self.name = live.name if live is not None else name
        self.load_error: str | None = None
        self._reload = reload  # what /hot-reload reloads, when it is more than this model (a chain's entrypoint)

    def ready(self) -> bool:
        return self.live is not None

    def methods(self) -> ModelMethods:
        return self.live.serving.methods

    async def answer(self, inputs: Any, request: Any = None, method: str = "predict") -> Answer:
        return await run_in_threadpool(self._answer, inputs, request, method)

    def _answer(self, inputs: Any, request: Any, method: str) -> Answer:
        chunks = self.live.open_stream(inputs, request=request, method=method)
        try:
            lead = next(chunks)
            if lead:  # the method returned a stream: the lock stays held while it is read (predict's)
                return Answer(chunks=chunks, read_timeout=self.live.bundle.streaming_read_timeout, gatherable=lead is True)
            output = next(chunks)
            chunks.close()  # the request ends here (its trace), not when the generator is collected
            return Answer(output=output)
        except ModelError as error:
            return Answer(error=error)

    def schema(self) -> dict | None:
        return self.live.schema()

    def reload(self):
        """POST /hot-reload: reload the edited code now (a ReloadEvent)."""
        return self._reload() if self._reload is not None else self.live.reload()

    async def healthy(self) -> bool | None:
        """The model's is_healthy() as the Truss server asks it: None without one; an exception is False."""
        if not self.ready() or "is_healthy" not in self.methods().specs:
            return None
        return await run_in_threadpool(self.live.is_healthy)


# ---------------------------------------------------------------------------------------- routes


def error_body(status: int, stage: str, message: Any, model: str, location: str | None = None, code: str = CODE_DOWNSTREAM):
    """An error answer: the Truss server's status and headers; the body adds the stage and file:line.
    `message` is the Truss server's `error` value: a string, or an HTTPException's detail as it is."""
    body = {"error": message, "stage": stage, "model": model}
    if location:
        body["location"] = location
    headers = {"X-BASETEN-ERROR-SOURCE": ERROR_SOURCE, "X-BASETEN-ERROR-CODE": code}
    return JSONResponse(body, status_code=status, headers=headers)


async def read_body(request, backend: Backend, max_body: int) -> tuple[bytes, Any]:
    """(body, None), or (b"", a 413 response) for a body over the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        return b"", error_body(413, "request", f"body of {int(declared)} bytes is over the {max_body}-byte limit", backend.name, code=CODE_CLIENT)
    body = bytearray()
    async for chunk in request.stream():  # a body without Content-Length is counted as it arrives
        body += chunk
        if len(body) > max_body:
            return b"", error_body(413, "request", f"body is over the {max_body}-byte limit", backend.name, code=CODE_CLIENT)
    return bytes(body), None


def is_binary(request) -> bool:
    """msgpack in and out, as the Truss server decides: the request's Content-Type."""
    return request.headers.get("content-type", "").partition(";")[0].strip().lower() == "application/octet-stream"


def parse_body(body: bytes, binary: bool, input_type: type | None) -> Any:
    """The inputs from the body, as the Truss server's _parse_body: msgpack or JSON, then the pydantic
    input type if the model names one. Raises InputParsingError (a 400)."""
    if binary:
        try:
            inputs = truss_msgpack_deserialize(body)
        except ValueError as exc:
            raise InputParsingError(str(exc)) from exc
        return parse_input(input_type, inputs)
    if input_type is not None:
        return parse_input_json(input_type, body)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputParsingError(f"Invalid JSON payload: {exc}") from exc
    except RecursionError:
        raise InputParsingError("Invalid JSON payload: nested too deeply") from None


_WATCHERS: set = set()


def portable(request, body: bytes, span: Any = None):
    """The request as model code gets it: the body already read, and the client's hang-up visible
    from the model's own event loop (async model code runs there, not on this server's loop):
    `await request.is_disconnected()` turns true once the client has gone, as on the Truss server,
    and `request.state.watch_disconnect()` is installed as the Truss server installs it."""
    from starlette.requests import Request

    loop = asyncio.get_running_loop()
    receive = request.receive
    gone = threading.Event()

    async def watch() -> None:  # on this server's loop: the body is read, so the next message is the hang-up
        try:
            while (await receive()).get("type") != "http.disconnect":
                pass
        finally:
            gone.set()

    task = loop.create_task(watch())  # ends when the client goes or the response is complete (uvicorn says so then)
    _WATCHERS.add(task)  # the loop keeps only a weak reference to a task
    task.add_done_callback(_WATCHERS.discard)

    async def receive_here() -> dict:
        if gone.is_set():  # no await: starlette's zero-timeout is_disconnected() sees it
            return {"type": "http.disconnect"}
        if asyncio.get_running_loop() is loop:
            return await receive()
        while not gone.is_set():  # a model waiting on receive() itself: wake when the client goes
            await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    scope = request.scope
    if span is not None:
        headers = [(k, v) for k, v in scope["headers"] if k != b"traceparent"]
        scope = dict(scope, headers=headers + [(b"traceparent", traceparent(span).encode())])
    out = Request(scope, receive_here)
    out._body = body

    out.state.watch_disconnect = lambda: contextlib.nullcontext(gone)  # Truss's: an Event set on hang-up
    return out


def gathers(request) -> bool:
    """Whether a stream is answered as one JSON string, as the Truss server decides (Accept, not OpenAI's SDK)."""
    if "openai" in request.headers.get("user-agent", "").lower():
        return False
    return request.headers.get("accept") == "application/json"


async def predict_response(request, backend: Backend, max_body: int, method: str = "predict"):
    """POST /v1/models/{name}:predict (and :predict_binary, and the OpenAI-compatible routes), for any Backend."""
    if not backend.ready():
        return not_ready(backend)
    body, problem = await read_body(request, backend, max_body)
    if problem is not None:
        return problem
    methods = backend.methods()
    binary = is_binary(request)
    try:
        inputs = None if methods.skip_input_parsing else parse_body(body, binary, methods.input_type)
    except InputParsingError as exc:
        return error_body(400, "request", str(exc), backend.name, code=CODE_CLIENT)
    if method == "predict" and "predict" not in methods.specs:  # a websocket model: Truss's unhandled error
        return error_body(500, "predict", f"{backend.name} has no predict(): it serves /v1/websocket only", backend.name, code=CODE_UNEXPECTED)
    if method != "predict" and method not in methods.specs:  # Truss's ModelMethodNotImplemented
        return error_body(404, method, f"`{method}` must only be called if model has it.", backend.name, code=CODE_CLIENT)
    chainlet = getattr(getattr(backend, "live", None), "chainlet", False)
    span = span_from(request.headers.get("traceparent"), root=chainlet)
    token = SPAN.set(span) if span is not None else None  # the request's trace records it (runner reads it once)
    try:
        # a chainlet passes its own span on to the chainlets it calls (the stubs forward `traceparent`)
        answer = await backend.answer(inputs, portable(request, body, span if chainlet else None), method)
    finally:
        if token is not None:
            SPAN.reset(token)
    if answer.error is not None:
        return _error_answer(answer.error, backend)
    if answer.chunks is not None:
        if answer.gatherable and gathers(request):
            try:
                chunks = await run_in_threadpool(list, answer.chunks)
            except ModelError as error:  # failed while gathering: Truss's unhandled-exception answer (code 500)
                return error_body(500, error.stage, str(error), backend.name, error.location, code=CODE_UNEXPECTED)
            return _serialize(join_chunks(chunks), binary, backend)
        # the model's stream starts producing before the response starts, as the Truss server's background
        # task does: what the model sees of its client (is_disconnected()) happens at the same points
        first = asyncio.get_running_loop().run_in_executor(None, next, answer.chunks, _END)
        return StreamingResponse(_encode_stream(answer.chunks, answer.read_timeout, first), media_type="application/octet-stream")
    output = answer.output
    if is_response(output):
        if output.status_code >= 300:
            output.headers.update({"X-BASETEN-ERROR-SOURCE": ERROR_SOURCE, "X-BASETEN-ERROR-CODE": CODE_CLIENT})
        return output
    return _serialize(output, binary, backend)


def _error_answer(error: ModelError, backend: Backend):
    cause = error.__cause__
    if error.stage == "input":
        return error_body(400, "input", str(cause or error), backend.name, code=CODE_CLIENT)
    if is_http_exception(cause):  # passed through with its status and detail (a dict stays JSON), as the Truss server does
        try:
            "user_stack_trace" in cause.detail  # the Truss server asks this of every detail (a chain's error)...
        except TypeError as exc:  # ...and answers an unhandled-exception 500 where a number cannot say
            return error_body(500, error.stage, f"Unhandled exception: TypeError: {exc}", backend.name, error.location, code=CODE_UNEXPECTED)
        return error_body(cause.status_code, error.stage, cause.detail, backend.name, error.location)
    return error_body(500, error.stage, str(error), backend.name, error.location)


def _serialize(output: Any, binary: bool, backend: Backend):
    """The answer body as the Truss server's _serialize_result: msgpack for a binary request, else JSON."""
    try:
        if binary:
            if is_pydantic(output):
                output = output.model_dump(mode="python") if hasattr(output, "model_dump") else output.dict()
            body = output if isinstance(output, bytes) else truss_msgpack_serialize(output)
            return Response(body, media_type="application/octet-stream")
        body = truss_json(output)  # the runner already checked it: walk it again only to say where it fails
    except (TypeError, ValueError, RecursionError) as exc:
        if binary:
            message = f"output is not msgpack-serialisable: {describe(exc)}"
        else:
            path, tname = truss_json_check(output) or ("<output>", type(output).__name__)
            message = f"output is not JSON-serialisable at {path}: {tname}"
        return error_body(500, "postprocess", message, backend.name, code=CODE_UNEXPECTED)
    return Response(body, media_type="application/json")


_END = object()


async def _encode_stream(chunks: Iterator[Any], read_timeout: float | None = None, first: Any = None) -> AsyncIterator[bytes]:
    """Chunks as the Truss server sends them: str as UTF-8, bytes and memoryview as they are; any other
    chunk cuts the stream there (logged in one line), as on the Truss server.

    An error mid-stream ends the stream (the Truss server logs it and closes the body normally). A
    gap between chunks longer than `read_timeout` cuts the connection, as the Truss server's
    streaming_read_timeout does (the client sees an incomplete body). A client that hangs up stops
    the stream and frees the lock at once: the generator is closed here (after the pull in flight).
    """
    loop = asyncio.get_running_loop()
    pending = None
    left = False  # the client went away mid-stream
    try:
        while True:
            pending, first = first if first is not None else loop.run_in_executor(None, next, chunks, _END), None
            chunk = await asyncio.wait_for(asyncio.shield(pending), read_timeout)
            pending = None
            if chunk is _END:
                return
            if isinstance(chunk, (bytes, memoryview)):
                yield chunk
            elif isinstance(chunk, str):
                yield chunk.encode()
            else:  # the Truss server's StreamingResponse fails on it: the client gets a cut body (the trace has
                raise _StreamCut  # the runner's warning naming the chunk)
    except ModelError:
        return
    except asyncio.TimeoutError:
        logger.warning("stream cut: no chunk for %g s (runtime.streaming_read_timeout)", read_timeout)
        raise _StreamCut from None
    except (asyncio.CancelledError, GeneratorExit):
        left = True
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            stop = functools.partial(_stop_stream, chunks, close, left)
            if pending is not None and not pending.done():  # a pull still running: stop when it returns
                pending.add_done_callback(lambda _: threading.Thread(target=stop, daemon=True).start())
            else:
                await loop.run_in_executor(None, stop)


class _StreamCut(Exception):
    """Ends a streamed body without its last chunk (the client sees an incomplete body), as the Truss
    server's does on a chunk it cannot send or a read timeout. Said in one line, never as uvicorn's
    "Exception in ASGI application" traceback."""


class _QuietCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _StreamCut))


logging.getLogger("uvicorn.error").addFilter(_QuietCuts())


def _stop_stream(chunks: Iterator[Any], close: Callable[[], Any], left: bool) -> None:
    """Close a stream this server no longer reads. If its client left, it is resumed once first: the
    code after its `yield` runs and sees `await request.is_disconnected()` turn true, as it would on
    the Truss server (whose producer runs on without its client); then it is closed, freeing the lock
    (a deliberate difference, docs/parity.md: the Truss server pulls it to the end)."""
    try:
        if left:
            next(chunks, _END)
        close()
    except (ValueError, ModelError):  # still running elsewhere, or failed while closing: its trace says so
        pass


async def readiness(backend: Backend):
    """Truss's readiness answer: 200 `{}` once loaded and (if the model has is_healthy) healthy; 503 before
    (and after a failed load, with why)."""
    if not backend.ready():
        return not_ready(backend, why=getattr(backend, "load_error", None))
    healthy = getattr(backend, "healthy", None)
    state = None if healthy is None else await healthy()
    if state is not None and not state:
        return not_ready(backend, stage="is_healthy")
    return JSONResponse({})


def loaded(backend: Backend):
    return not_ready(backend) if not backend.ready() else JSONResponse({})


def not_ready(backend: Backend, stage: str = "load", why: str | None = None):
    """Truss's 503 for a model that is not ready (its ModelNotReady text), with why load() failed if known."""
    message = f"Model with name {backend.name} is not ready." + (f" load() failed: {why}" if why else "")
    return error_body(503, stage, message, backend.name)

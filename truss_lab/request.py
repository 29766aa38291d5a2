"""The request object a method with a `request` parameter gets when it is called here rather than over
HTTP (`tr.predict(x)`): a real starlette Request made from the input, as if it had been POSTed as JSON,
with `request.state.watch_disconnect()` as the Truss server installs it - made only when a method
asks for it (most models never do)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

from .serialization import truss_json
from .trace import Trace, traceparent


class RequestOnce:
    """The request object for one request's methods: the caller's, or one made from the input the
    first time a method asks for it (most models never do)."""

    __slots__ = ("_input", "_request", "_trace")

    def __init__(self, model_input: Any, request: Any, trace: Trace | None = None):
        self._input, self._request, self._trace = model_input, request, trace

    def __call__(self) -> Any:
        if self._request is None:
            t = self._trace  # a chainlet's: the request carries its span, which its calls pass on
            headers = {"traceparent": traceparent(t.span)} if t is not None and t.span is not None else None
            self._request = local_request(self._input, headers=headers)
        return self._request


def local_request(inputs: Any, headers: dict[str, str] | None = None, path: str = "/v1/models/model:predict") -> Any:
    """A real starlette Request, as if `inputs` had been POSTed as JSON to `path`: what a method with a
    `request` parameter gets in the notebook (`await request.json()`, headers, `request.state`)."""
    from starlette.requests import Request

    try:
        body = truss_json(inputs).encode()
    except (TypeError, ValueError):
        body = b""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.get_running_loop().create_future()  # a local caller never disconnects
        return {"type": "http.disconnect"}

    all_headers = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in all_headers.items()],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 0),
        "client": ("127.0.0.1", 0),
    }
    request = Request(scope, receive)
    request.state.watch_disconnect = never_disconnected
    return request


@contextlib.contextmanager
def never_disconnected():
    """Truss's `request.state.watch_disconnect()` for a caller that cannot hang up: an Event never set."""
    yield threading.Event()

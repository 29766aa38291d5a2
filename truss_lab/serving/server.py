"""uvicorn servers for the Truss server's routes: `tr.serve()` on a background thread, and
`truss-lab serve` (which answers liveness at once and readiness once load() has finished)."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..errors import TrussLabError
from .http import DEFAULT_MAX_BODY, PREDICT_ROUTE, Backend, LiveBackend
from .routes import create_app

if TYPE_CHECKING:
    from ..bundle import Bundle


def transport_options(config: dict) -> dict:
    """uvicorn's websocket ping settings from `runtime.transport`, passed as the Truss server passes
    them (only when set: uvicorn's defaults otherwise)."""
    transport = ((config or {}).get("runtime") or {}).get("transport") or {}
    out = {}
    if transport.get("ping_interval_seconds"):
        out["ws_ping_interval"] = float(transport["ping_interval_seconds"])
    if transport.get("ping_timeout_seconds"):
        out["ws_ping_timeout"] = float(transport["ping_timeout_seconds"])
    return out


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
        live = getattr(backend, "live", None)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5, log_config=None,
                                **transport_options(live.bundle.config if live is not None else {}))
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


def serve(live, host: str = "127.0.0.1", port: int = 0, max_body: int = DEFAULT_MAX_BODY, reload: Any = None) -> Server:
    """Serve `live` over HTTP from a background thread (port 0: a free one); returns the running Server.
    `reload`: what POST /hot-reload calls instead of `live.reload` (a chain's reload, for its entrypoint)."""
    return Server(LiveBackend(live, reload=reload), host, port, max_body).start()


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
                live.on_reload(lambda event: print(f"{bundle.model_name}: {event.summary()}", flush=True))  # each save, as it lands
            backend.live = live
            print(f"{bundle.model_name}: loaded in {live.load_ms:.0f} ms; ready at http://{host}:{port}{PREDICT_ROUTE}", flush=True)
        except TrussLabError as exc:
            backend.load_error = str(exc)
            print(f"{bundle.model_name}: load failed: {exc}", flush=True)

    threading.Thread(target=load, name="truss-lab-load", daemon=True).start()
    app = create_app(backend, max_body)
    print(f"serving {bundle.model_name} on http://{host}:{port} (liveness now, readiness after load())", flush=True)
    try:  # uvicorn re-raises the Ctrl-C it shut down on: the model (its watcher thread) closes first either way
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, **transport_options(bundle.config))).run(sockets=[sock])
    finally:
        if backend.live is not None:
            backend.live.close()

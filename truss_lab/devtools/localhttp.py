"""A small HTTP file server on 127.0.0.1, for trying URL inputs and downloads with no internet.

    with LocalServer("examples/digits/samples", delay_ms=40) as server:
        tr.predict(server.url("3.png"))

Files come from a folder and/or a {name: bytes} mapping; `delay_ms` adds latency to every response,
so a download takes as long as a real one would. Runs in a daemon thread; `stop()` (or leaving the
`with`) shuts it down and closes the socket. Used by the lock demo notebook and the tests.
"""

from __future__ import annotations

import mimetypes
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LocalServer:
    def __init__(
        self,
        root: str | Path | None = None,
        files: dict[str, bytes] | None = None,
        delay_ms: float = 0.0,
        port: int = 0,
    ):
        self.root = Path(root).resolve() if root is not None else None
        self.files = {name.lstrip("/"): data for name, data in (files or {}).items()}
        self.delay_ms = delay_ms
        self.requests = 0
        self._count_lock = threading.Lock()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LocalServer":
        if self._server is not None:
            return self
        server = ThreadingHTTPServer(("127.0.0.1", self._port), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="truss-lab-localhttp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalServer is not running; call start() or use it in a `with`")
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name.lstrip('/')}"

    def __repr__(self) -> str:
        where = self.base_url if self._server is not None else "stopped"
        return f"<LocalServer {where} root={self.root} files={len(self.files)} delay={self.delay_ms:g} ms>"

    # ------------------------------------------------------------------ content

    def content(self, name: str) -> bytes | None:
        if name in self.files:
            return self.files[name]
        if self.root is not None:
            path = (self.root / name).resolve()
            if path.is_file() and path.is_relative_to(self.root):  # no ../ out of the folder
                return path.read_bytes()
        return None


def _handler(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            with server._count_lock:
                server.requests += 1
            if server.delay_ms:
                time.sleep(server.delay_ms / 1000.0)
            name = unquote(urlsplit(self.path).path).lstrip("/")
            body = server.content(name)
            if body is None:
                self.send_error(404, f"no file {name!r}")
                return
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(name)[0] or "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # quiet: no line per request on stderr
            pass

    return Handler

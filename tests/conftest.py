"""Fixtures: small throwaway trusses written to tmp_path."""

from __future__ import annotations

import signal
import socket
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def write_truss(
    root: Path,
    model: str,
    config: dict | None = None,
    examples: list | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write a Truss folder: config.yaml, model/model.py (dedented), optional examples and extra files."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"model_name": root.name}
    cfg.update(config or {})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "model.py").write_text(textwrap.dedent(model))
    (root / "data").mkdir(exist_ok=True)
    if examples is not None:
        (root / "examples.yaml").write_text(yaml.safe_dump(examples))
    for rel, text in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def sigint_default_in_child() -> None:
    """`preexec_fn` for a child the test will send SIGINT: its default handling (Python then raises
    KeyboardInterrupt). Started from a script in the background (`make test &`, nohup, cron) the test
    run has SIGINT ignored, and a child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process for the test, as in an interactive shell (in a
    background job Python starts with SIGINT ignored and never installs its handler)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An async stream that sets a ContextVar before its first chunk and resets it after the last (what
# truss_chains' streaming chainlets do): tests/test_runner.py runs it here, the conformance suite on
# the real Truss server too (the case async-stream-one-context).
CONTEXTVAR_STREAM_MODEL = """
import contextlib
import contextvars

REQUEST = contextvars.ContextVar("request", default=None)

@contextlib.contextmanager
def tagged(tag):
    token = REQUEST.set(tag)
    try:
        yield
    finally:
        REQUEST.reset(token)

class Model:
    async def predict(self, x):
        with tagged(f"r{x}"):
            for i in range(3):
                yield f"{REQUEST.get()}-{i} "
"""


ECHO_MODEL = """
class Model:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loads = 0

    def load(self):
        self.loads += 1

    def preprocess(self, x):
        return {"pre": x}

    def predict(self, x):
        return {"pred": x}

    def postprocess(self, x):
        return {"post": x}
"""


@pytest.fixture
def make_truss(tmp_path):
    """make_truss(model_code, name='t', config=..., examples=..., files=...) -> Path"""

    def make(model: str = ECHO_MODEL, name: str = "t", **kw) -> Path:
        return write_truss(tmp_path / name, model, **kw)

    return make


@pytest.fixture
def live(make_truss):
    """load() a truss and close it after the test."""
    import truss_lab

    opened = []

    def load(model: str = ECHO_MODEL, name: str = "t", concurrency=None, guard=True, **kw):
        tr = truss_lab.load(make_truss(model, name, **kw), concurrency=concurrency, guard=guard)
        opened.append(tr)
        return tr

    yield load
    for tr in opened:
        tr.close()


@pytest.fixture(scope="session")
def truss_env():
    """The real Truss server (pinned), the oracle of tests/conformance: venvs made once and cached.

    `make test` makes them before pytest starts (`make truss-server`); a bare pytest makes them here.
    """
    from truss_lab.serving.truss_server import ServerEnv

    return ServerEnv.ensure()


@pytest.fixture(autouse=True)
def _one_truss_per_test():
    """A test that left the truss it loaded in this process (a failure before its close()) would send
    every later test's truss to a worker: the kernel is let go of after each test that took it."""
    from truss_lab import loader

    before = loader.resident()
    yield
    after = loader.resident()
    if after is not None and after is not before and getattr(after, "owner", None) is not None:
        after.owner.close()

"""truss_lab's pytest plugin (installed with the package: the `pytest11` entry point `truss_lab`).

A truss's own tests, on the same loaded model for the whole session:

    def test_top5(truss):
        tr = truss("examples/digits")            # loaded once per session (the first in this process,
        result = tr.predict(tr.example("seven"))  # further ones in worker processes), closed at its end
        assert next(iter(result.output)) == "seven"

Every example in a truss's examples.yaml as a test of its own:

    pytest --truss examples/digits            # only those (with test paths too: pytest tests --truss ...)
    [tool.pytest.ini_options]
    truss_examples = ["examples/digits"]      # always, next to the project's own tests

An example passes when it runs and - when the truss has an `examples.snapshot.json` (`truss-lab
snapshot`) - matches it within `--truss-rtol` / `--truss-atol` (the rules of `truss-lab test`). A
failure is reported as the stage and file:line of the model's error, or as the JSON paths that
changed, never as a truss_lab traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from .examples import ATOL, RTOL, ExampleOutcome, diff, snapshot_path


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("truss_lab")
    group.addoption("--truss", action="append", default=[], metavar="PATH",
                    help="a truss folder whose examples.yaml examples run as tests (repeatable)")
    group.addoption("--truss-rtol", type=float, default=None, metavar="R",
                    help=f"relative tolerance against the examples' snapshot (default {RTOL:g})")
    group.addoption("--truss-atol", type=float, default=None, metavar="A",
                    help=f"absolute tolerance against the examples' snapshot (default {ATOL:g})")
    parser.addini("truss_examples", type="paths", default=[],
                  help="truss folders whose examples.yaml examples run as tests, next to the project's own")
    parser.addini("truss_rtol", default=str(RTOL), help="relative tolerance against the examples' snapshot")
    parser.addini("truss_atol", default=str(ATOL), help="absolute tolerance against the examples' snapshot")


def _examples_file(folder: Path) -> Path:
    from .bundle import read_bundle

    try:
        return read_bundle(folder).examples_path
    except Exception as exc:  # a bad folder is a usage error, in one line
        raise pytest.UsageError(f"--truss {folder}: {exc}") from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "truss_example: an example of a truss's examples.yaml, run as a test")
    asked = [Path(p) for p in config.getoption("truss")]
    folders = [p.resolve() for p in asked] + [Path(p).resolve() for p in config.getini("truss_examples")]
    files = {}
    for folder in folders:
        if not (folder / "config.yaml").is_file():
            raise pytest.UsageError(f"--truss {folder}: not a truss folder (no config.yaml)")
        path = _examples_file(folder)
        if not path.is_file():
            raise pytest.UsageError(f"--truss {folder}: no {path.name} to run (a list of {{name, input}})")
        files[path.resolve()] = folder
    config.stash[_FILES] = files
    config.stash[_CACHE] = _Trusses()
    if asked and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.args[:] = []  # `pytest --truss PATH` alone: those examples, not the project's test paths too
    config.args.extend(str(p) for p in files if str(p) not in config.args)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = config.stash.get(_CACHE, None)
    if cache is not None:
        cache.close()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    files = parent.config.stash.get(_FILES, {})
    folder = files.get(file_path.resolve())
    if folder is not None:
        return TrussExamples.from_parent(parent, path=file_path, folder=folder)
    return None


_FILES = pytest.StashKey[dict]()
_CACHE = pytest.StashKey["_Trusses"]()


class _Trusses:
    """The trusses loaded for this session, one per folder and options."""

    def __init__(self) -> None:
        self.loaded: dict[tuple, Any] = {}

    def get(self, path: str | Path, **options: Any) -> Any:
        from .live import load

        key = (str(Path(path).resolve()), tuple(sorted(options.items())))
        if key not in self.loaded:
            self.loaded[key] = load(str(path), **options)
        return self.loaded[key]

    def close(self) -> None:
        for live in self.loaded.values():
            live.close()
        self.loaded.clear()


@pytest.fixture(scope="session")
def truss(pytestconfig: pytest.Config) -> Callable[..., Any]:
    """`truss(path, **load_options)`: the truss at `path`, loaded once for the session (truss_lab.load)."""
    return pytestconfig.stash[_CACHE].get


class TrussExamples(pytest.File):
    """A truss's examples.yaml: an item per example."""

    def __init__(self, *, folder: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.folder = folder

    def collect(self):
        from .bundle import read_bundle

        for example in read_bundle(self.folder).examples:
            yield TrussExample.from_parent(self, name=example.name, example=example)


class ExampleFailed(Exception):
    """An example that did not run, or does not match its snapshot: the one-line reason."""


class TrussExample(pytest.Item):
    def __init__(self, *, example: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.example = example
        self.add_marker("truss_example")

    def runtest(self) -> None:
        config = self.config
        live = config.stash[_CACHE].get(self.parent.folder)
        outcome = ExampleOutcome.of(self.name, live.run(self.example.input))
        if not outcome.ok:
            raise ExampleFailed(outcome.error)  # "predict failed at digits/model/model.py:31: ..."
        stored = _snapshot(live.bundle).get(self.name)
        if stored is None:
            return  # no snapshot of it: running is the test
        old = ExampleOutcome(self.name, stored.get("ok", False), stored.get("output"), stored.get("error"), stored.get("stage"))
        rtol = config.getoption("truss_rtol") or float(config.getini("truss_rtol"))
        atol = config.getoption("truss_atol") or float(config.getini("truss_atol"))
        change = diff({self.name: old}, {self.name: outcome}, None, live.version, rtol, atol).changes[0]
        if change.status != "unchanged":
            raise ExampleFailed(f"{change.line()} (rtol={rtol:g}, atol={atol:g}; truss-lab snapshot "
                                f"{live.bundle.path} rewrites {snapshot_path(live.bundle).name})")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ExampleFailed):
            return str(excinfo.value)
        return f"{type(excinfo.value).__name__}: {excinfo.value}"  # truss_lab's own one-line errors

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.parent.folder.name} example {self.name}"


def _snapshot(bundle: Any) -> dict:
    path = snapshot_path(bundle)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ExampleFailed(f"{path}: not JSON: {exc}") from None

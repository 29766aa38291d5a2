"""A Truss Chain in the notebook, as it deploys (needs the `chains` extra: `truss`, for truss_chains).

    chain = truss_lab.load_chain("my_chain.py")   # the @chains.mark_entrypoint chainlet, or entrypoint="Name"
    chain.run(text="hi")                          # what the deployed entrypoint answers
    chain.predict({"text": "hi"})                 # a Result (the entrypoint's trace, output, error)
    chain.chainlets["Upper"]                      # each chainlet is a LiveModel: lock, traces, guard, reload

Every chainlet is built from the truss Truss's own code generation writes for a push (generate
only: nothing leaves the machine) - the generated `TrussChainletModel`, its stubs and its pydantic
I/O - and loaded as a LiveModel with the lock its `remote_config` gives it. The chainlets a chainlet
depends on are served on 127.0.0.1, and their URLs reach the generated code the way a deployed chain
finds them: through the `dynamic_chainlet_config` it reads (per chain here, so two chains never see
each other's URLs). So calls between chainlets cross HTTP with the deployed serialisation, retries
and errors: a value that does not survive the wire fails here as on deploy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from .errors import TrussLabError

_lock = threading.Lock()
_chains: dict[str, "Chain"] = {}  # chainlet truss folder -> its chain (whose URLs its stubs get)
_patched = False


def _require_truss_chains():
    try:
        import truss_chains  # noqa: F401  (a one-line error here, not a traceback from the generator)
    except ImportError:
        raise TrussLabError("load_chain() needs truss_chains (the `truss` package): pip install 'truss_lab[chains]'") from None


def _patch_dynamic_config() -> None:
    """The generated code reads `dynamic_chainlet_config` from a mount (cached per process): here it
    is the calling chainlet's chain's URLs (names.py tells which chainlet's code is asking)."""
    global _patched
    if _patched:
        return
    from truss_chains import private_types, public_types
    from truss_chains.remote_chainlet import utils

    from . import names

    def load_dynamic_chainlet_config() -> dict:
        code = names.caller_code(1)
        bundle = getattr(code, "bundle", None)
        chain = _chains.get(str(bundle.path)) if bundle is not None else None
        if chain is None:
            raise public_types.MissingDependencyError(
                f"No '{private_types.DYNAMIC_CHAINLET_CONFIG_KEY}' found (not a chainlet truss_lab loaded).")
        return {name: public_types.ServiceDescriptorUrls.model_validate(entry) for name, entry in chain.urls.items()}

    utils.load_dynamic_chainlet_config = load_dynamic_chainlet_config
    from truss_chains import framework

    framework._global_chainlet_registry = _ScopedRegistry(framework._global_chainlet_registry, framework._ChainletRegistry)
    _patched = True


class _ScopedRegistry:
    """truss_chains' registry of chainlet classes, one per code version of each chainlet truss (every
    chainlet's truss imports the chain's source; deployed, each is a process of its own), and the
    process-wide one for everything else (the import that finds the entrypoint)."""

    def __init__(self, default: Any, make: Any):
        import weakref

        self._default, self._make = default, make
        self._by_code: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()

    def _current(self) -> Any:
        from . import names

        code = names.caller_code(2)
        if code is None:
            return self._default
        with _lock:
            registry = self._by_code.get(code)
            if registry is None:
                registry = self._by_code[code] = self._make()
            return registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)


class Chain:
    """A chain's chainlets, each a LiveModel, wired to each other over 127.0.0.1 as deployed."""

    def __init__(self, source: str | os.PathLike, entrypoint: str | None = None, *, guard: bool = True):
        _require_truss_chains()
        from truss_chains import framework, private_types
        from truss_chains.deployment import deployment_client

        from .live import load

        self.source = Path(source).resolve()
        if not self.source.is_file():
            raise TrussLabError(f"{self.source}: no such chain source file")
        self.root = Path(tempfile.mkdtemp(prefix="truss-lab-chain-"))
        self.urls: dict[str, dict[str, str]] = {}
        self.chainlets: dict[str, Any] = {}
        self._servers: list[Any] = []
        from .names import NameProxy

        stem = self.source.stem  # a chain already loaded from this source has its Truss name in sys.modules
        hidden = sys.modules.pop(stem) if isinstance(sys.modules.get(stem), NameProxy) else None
        loaded: dict[str, Any] = {}
        try:
            with _generating(self.root), framework.ChainletImporter.import_target(self.source, entrypoint) as entry:
                self.name = entry.name
                descriptors = list(deployment_client._get_ordered_dependencies([entry]))
                order = [d.display_name for d in descriptors]
                options = private_types.PushOptionsLocalDocker(chain_name=self.name, only_generate_trusses=True, use_local_src=False)
                deployment_client.push(entry, options)
                loaded = dict(sys.modules)
        except (ValueError, TypeError, AttributeError, ImportError) as exc:  # ChainsUsageError is a TypeError
            shutil.rmtree(self.root, ignore_errors=True)  # not a chain truss_chains accepts: one line, naming the file
            raise TrussLabError(f"{self.source}: {' '.join(str(exc).split())}") from None
        finally:
            if hidden is not None:
                sys.modules[stem] = hidden
            _keep_libraries(loaded, self.source.parent)
        generated = self.root / private_types.GENERATED_CODE_DIR
        folders = {p.name.removeprefix("chainlet_"): p for p in generated.glob("*/chainlet_*")}
        for display, folder in folders.items():  # a push suffixes each model name with a random id: here the name is enough
            config = folder / "config.yaml"
            text = config.read_text()
            config.write_text("\n".join(f"model_name: {display}" if line.startswith("model_name:") else line
                                        for line in text.splitlines()) + "\n")
        depends = {d.display_name: bool(d.dependencies) for d in descriptors}
        _patch_dynamic_config()
        try:
            for display in order:  # dependencies first: a chainlet's load() may call the ones it depends on
                folder = folders[display]
                with _lock:
                    _chains[str(folder.resolve())] = self
                # a chainlet that calls others does so from predict by design: the guard watches the others
                live = load(folder, guard=guard and not depends[display],
                            secrets={"baseten_chain_api_key": "truss-lab-local"})  # only 127.0.0.1 hears it
                self.chainlets[display] = live
                if display != order[-1]:
                    server = live.serve()
                    self._servers.append(server)
                    self.urls[display] = {"predict_url": f"{server.url}/v1/models/model:predict"}
        except BaseException:
            self.close()
            raise
        self.entrypoint = order[-1]

    @property
    def entry(self):
        return self.chainlets[self.entrypoint]

    def predict(self, body: Any):
        """What the deployed entrypoint answers for this JSON body: a Result whose output is that JSON
        answer (raises on an error, naming the chainlet and what failed)."""
        import dataclasses
        import json

        from .serialization import truss_json

        result = self.entry.predict(body)
        return dataclasses.replace(result, output=json.loads(truss_json(result.output)))

    def run(self, **kwargs: Any) -> Any:
        """`chain.run(text="hi")`: the entrypoint's `run_remote(**kwargs)`, as the deployed chain runs it."""
        return self.predict(kwargs).output

    def serve(self, host: str = "127.0.0.1", port: int = 0):
        """The entrypoint over HTTP with the Truss server's routes, as the deployed chain answers
        (`POST /v1/models/model:predict` with the entrypoint's JSON body); `truss-lab serve my_chain.py`."""
        return self.entry.serve(host=host, port=port)

    def report(self) -> dict[str, Any]:
        """A Report per chainlet (its lock, waits and stages)."""
        return {name: live.report() for name, live in self.chainlets.items()}

    def close(self) -> None:
        for live in self.chainlets.values():
            live.close()
        with _lock:
            for key in [k for k, c in _chains.items() if c is self]:
                del _chains[key]
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Chain {self.name!r} from {self.source}: {', '.join(self.chainlets)} (entrypoint {self.entrypoint})>"


def _keep_libraries(loaded: dict[str, Any], chain_root: Path) -> None:
    """truss_chains drops from sys.modules every module the chain source's import brought in, libraries
    included (it keeps torch only); numpy, TensorFlow and others cannot be imported twice in a process.
    Put back all but the chain's own files."""
    root = str(chain_root) + os.sep
    for name, module in loaded.items():
        if name in sys.modules:
            continue
        path = getattr(module, "__file__", None) or ""
        if not path.startswith(root):
            sys.modules[name] = module


@contextlib.contextmanager
def _generating(root: Path):
    """Truss's code generation writes under tempfile.gettempdir() and formats with `ruff`: our folder,
    and this interpreter's scripts on PATH."""
    old_tempdir, old_path = tempfile.tempdir, os.environ.get("PATH", "")
    tempfile.tempdir = str(root)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), old_path])
    try:
        yield
    finally:
        tempfile.tempdir = old_tempdir
        os.environ["PATH"] = old_path


def load_chain(source: str | os.PathLike, entrypoint: str | None = None, *, guard: bool = True) -> Chain:
    """Load the Truss Chain in `source` as it deploys (see the module docstring)."""
    return Chain(source, entrypoint, guard=guard)



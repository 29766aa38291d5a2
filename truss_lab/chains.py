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

Every request to the entrypoint is one W3C trace; each chainlet's trace records its span and its
caller's, so `chain.trees()` / `chain.report()` / `timeline(chain)` show which chainlet called which.
A save in the chain's folder re-runs the code generation and reloads only the chainlets whose code
changed (ChainReloader); `chain.check()` runs the generated trusses on the real Truss server, wired as
deployed (serving/check.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from .carry import FileKeys, Statements
from .errors import LoadError, TrussLabError
from .reload import Reloader, ReloadEvent

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
        from . import loader

        self.source = Path(source).resolve()
        if not self.source.is_file():
            raise TrussLabError(f"{self.source}: no such chain source file")
        self.root = Path(tempfile.mkdtemp(prefix="truss-lab-chain-"))
        self.urls: dict[str, dict[str, str]] = {}
        self.chainlets: dict[str, Any] = {}
        self._on_close: list[Any] = []
        loader.OWN_ROOTS.add(self.source.parent)  # packages/ is a copy of it: the chain's code, not a library
        try:
            gen = _generate(self.source, entrypoint, self.root)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        self.name, self._entrypoint_arg = gen.name, entrypoint
        self._gen = gen
        folders = gen.folders
        _patch_dynamic_config()
        self._guard = guard
        try:
            for display in gen.order:  # dependencies first: a chainlet's load() may call the ones it depends on
                self._start_chainlet(display, folders[display], bool(gen.depends[display]), display == gen.order[-1])
        except BaseException:
            self.close()
            raise
        self.entrypoint = gen.order[-1]
        self.version = 1
        self.reloader = ChainReloader(self)

    def _start_chainlet(self, display: str, folder: Path, calls_others: bool, entrypoint: bool) -> Any:
        """Load one chainlet's generated truss as a LiveModel; serve it on 127.0.0.1 unless it is the
        entrypoint, and give its URL to the chainlets that call it."""
        from .live import load

        with _lock:
            _chains[str(folder.resolve())] = self
        # a chainlet that calls others does so from predict by design: the guard watches the others
        live = load(folder, guard=self._guard and not calls_others,
                    secrets={"baseten_chain_api_key": "truss-lab-local"})  # only 127.0.0.1 hears it
        live.chainlet = True  # its requests record their span; it passes its own on to its calls
        live.on_retire(lambda old, live=live: _close_stubs_of(old, live))  # a rebuilt chainlet's old stubs
        self.chainlets[display] = live
        if not entrypoint:  # the LiveModel stops the server it started when it closes
            self.urls[display] = {"predict_url": f"{live.serve().url}/v1/models/model:predict"}
        return live

    def _stop_chainlet(self, display: str, folder: Path) -> None:
        """A chainlet the chain no longer has: its server, its LiveModel, its generated truss."""
        live = self.chainlets.pop(display)
        self.urls.pop(display, None)
        _close_stubs(live)
        live.close()  # stops the servers it started
        with _lock:
            _chains.pop(str(folder.resolve()), None)
        shutil.rmtree(folder, ignore_errors=True)

    @property
    def entry(self):
        return self.chainlets[self.entrypoint]

    @property
    def examples_file(self) -> Path:
        return examples_file(self.source)

    @property
    def examples(self) -> list:
        """The chain's examples (see examples_file): what `truss-lab check` sends, the panel's dropdown."""
        return list(self.entry.bundle.examples)

    def check(self, inputs=None, **kwargs):
        """`truss-lab check` on this chain: every chainlet's generated truss on the real Truss server,
        wired as deployed, against this chain (serving/check.py)."""
        from .serving.check import check_chain

        return check_chain(self, inputs, **kwargs)

    def predict(self, body: Any):
        """What the deployed entrypoint answers for this JSON body: a Result whose output is that JSON
        answer (raises on an error, naming the chainlet and what failed)."""
        import json

        from .serialization import truss_json

        result = self.entry.predict(body)  # a new trace: every chainlet's part of it is a span (runner.py)
        return dataclasses.replace(result, output=json.loads(truss_json(result.output)))

    def run(self, **kwargs: Any) -> Any:
        """`chain.run(text="hi")`: the entrypoint's `run_remote(**kwargs)`, as the deployed chain runs it."""
        return self.predict(kwargs).output

    def serve(self, host: str = "127.0.0.1", port: int = 0):
        """The entrypoint over HTTP with the Truss server's routes, as the deployed chain answers
        (`POST /v1/models/model:predict` with the entrypoint's JSON body); `truss-lab serve my_chain.py`."""
        return self.entry.serve(host=host, port=port)

    def trees(self, last: int | None = None) -> list["Call"]:
        """The request trees, oldest first: per request to the entrypoint, which chainlet called which,
        each with its trace (lock wait, stages, error). Built from the chainlets' kept traces by their
        trace context (every request's chainlets share its trace id; a call's parent is its caller's span)."""
        calls: dict[str, Call] = {}
        for name, live in self.chainlets.items():
            for t in live.traces:
                if t.span_id is not None:
                    calls[t.span_id] = Call(name, t)
        roots: list[Call] = []
        for call in sorted(calls.values(), key=lambda c: c.trace.start):
            parent = calls.get(call.trace.parent_span_id or "")
            (parent.calls if parent is not None else roots).append(call)
        roots = [r for r in roots if r.chainlet == self.entrypoint] or roots
        return roots if last is None else roots[-last:] if last > 0 else []

    def report(self, last: int | None = None) -> "ChainReport":
        """A Report per chainlet (its lock, waits and stages) and the request trees (`trees()`); the
        traces of the last `last` requests to the entrypoint only, when given."""
        trees = self.trees(last)
        if last is None:
            reports = {name: live.report() for name, live in self.chainlets.items()}
        else:
            spans = {name: set() for name in self.chainlets}
            for tree in trees:
                for call in tree.walk():
                    spans[call.chainlet].add(id(call.trace))
            from .trace import Report

            reports = {name: Report.from_traces([t for t in live.traces if id(t) in spans[name]], live.concurrency)
                       for name, live in self.chainlets.items()}
        return ChainReport(self.name, reports, trees, {n: live.concurrency for n, live in self.chainlets.items()})

    def timeline(self, last: int | None = None):
        """The requests' timeline with a lane per chainlet (`truss_lab.timeline(chain)`)."""
        from .display.plots import chain_timeline

        return chain_timeline(self, last)

    # -------------------------------------------------------------- hot reload

    def reload(self, full: bool = False) -> "ChainReloadEvent":
        """Regenerate the chainlet trusses from the chain's source as it is now and reload the chainlets
        whose code changed (each by its truss rule: a method swap keeps its loaded state); the others
        are left untouched. `full=True` rebuilds every chainlet (their `__init__` runs again)."""
        return self.reloader.reload(full=full)

    def watch(self, examples: bool = False) -> "Chain":
        """Reload on every save of a file in the chain's folder (its source, the helpers it imports)."""
        self.reloader.watch()
        return self

    def unwatch(self) -> None:
        self.reloader.unwatch()

    @property
    def watching(self) -> bool:
        return self.reloader.watching

    def on_reload(self, callback):
        """Call `callback(event)` (a ChainReloadEvent) after each reload; returns the unsubscriber."""
        return self.reloader.on_reload(callback)

    @property
    def reload_history(self) -> list:
        return list(self.reloader.history)

    @property
    def reload_count(self) -> int:
        return self.reloader.count

    def wait_for_reload(self, since: int, timeout: float = 30.0) -> "ChainReloadEvent":
        """Block until the watcher has reloaded after `since` (a `reload_count` read before the edit)."""
        event = self.reloader.wait(since, timeout)
        if event is None:
            raise TimeoutError(f"no reload of the chain {self.name} within {timeout} s")
        return event

    def on_close(self, callback) -> None:
        """Call `callback()` once, when the chain is closed."""
        self._on_close.append(callback)

    def close(self) -> None:
        for callback in self.__dict__.pop("_on_close", []):
            try:
                callback()
            except Exception:
                pass
        if getattr(self, "reloader", None) is not None:
            self.reloader.unwatch()
        for live in self.chainlets.values():
            _close_stubs(live)
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


@dataclasses.dataclass
class _Generated:
    """What Truss's code generation wrote for one version of the chain's source."""

    name: str
    order: list[str]  # dependencies first, the entrypoint last
    depends: dict[str, tuple[str, ...]]  # chainlet -> the chainlets it calls
    folders: dict[str, Path]  # chainlet -> its generated truss
    classes: dict[str, tuple[str, str]]  # chainlet -> (module, class name) in the chain root


def _generate(source: Path, entrypoint: str | None, root: Path) -> _Generated:
    """Import the chain's source and write every chainlet's truss under `root` as a push does (generate
    only). A file truss_chains refuses is one TrussLabError line naming it."""
    from truss_chains import framework, private_types
    from truss_chains.deployment import deployment_client

    from .names import NameProxy, VersionLoader

    stem = source.stem  # a chain already loaded from this source has its Truss name in sys.modules
    present = sys.modules.get(stem)
    ours = isinstance(present, NameProxy) or isinstance(getattr(present, "__loader__", None), VersionLoader)
    hidden = sys.modules.pop(stem) if ours else None
    loaded: dict[str, Any] = {}
    try:
        with _generating(root), framework.ChainletImporter.import_target(source, entrypoint) as entry:
            name = entry.name
            descriptors = list(deployment_client._get_ordered_dependencies([entry]))
            options = private_types.PushOptionsLocalDocker(chain_name=name, only_generate_trusses=True, use_local_src=False)
            deployment_client.push(entry, options)
            loaded = dict(sys.modules)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:  # ChainsUsageError is a TypeError
        raise TrussLabError(f"{source}: {' '.join(str(exc).split())}") from None
    finally:
        if hidden is not None:
            sys.modules[stem] = hidden
        _keep_libraries(loaded, source.parent)
    generated = root / private_types.GENERATED_CODE_DIR
    folders = {p.name.removeprefix("chainlet_"): p for p in generated.glob(f"{name}/chainlet_*")}
    for display, folder in folders.items():  # a push suffixes each model name with a random id: here the name is enough
        config = folder / "config.yaml"
        text = config.read_text()
        config.write_text("\n".join(f"model_name: {display}" if line.startswith("model_name:") else line
                                    for line in text.splitlines()) + "\n")
    order = [d.display_name for d in descriptors]
    examples = examples_file(source)
    if examples.is_file():  # the entrypoint's truss gets the chain's examples (the panel, %truss predict --example)
        shutil.copyfile(examples, folders[order[-1]] / "examples.yaml")
    return _Generated(
        name=name,
        order=order,
        depends={d.display_name: tuple(sorted(dep.display_name for dep in d.dependencies.values())) for d in descriptors},
        folders=folders,
        classes={d.display_name: (d.chainlet_cls.__module__, d.chainlet_cls.__name__) for d in descriptors},
    )


def examples_file(source: Path) -> Path:
    """The chain's examples: `<source stem>.examples.yaml` next to it, else `examples.yaml` in its folder
    (a list of {name, input}, as a truss's examples.yaml; each input is the entrypoint's JSON body)."""
    own = source.with_name(f"{source.stem}.examples.yaml")
    return own if own.is_file() or not (source.parent / "examples.yaml").is_file() else source.parent / "examples.yaml"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _module_source(packages: Path, dotted: str) -> bytes | None:
    base = packages.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.read_bytes()
    return None


def _chainlet_keys(gen: _Generated) -> dict[str, str | None]:
    """Per chainlet, a key of its own code in the chain's source: its class and everything it uses,
    followed through (carry.Statements), with the other chainlets counted by name only - a chainlet
    depends on their API, which its generated stubs carry, not on their code."""
    chainlets = {cls for _, cls in gen.classes.values()}
    out: dict[str, str | None] = {}
    for display, (module, cls) in gen.classes.items():
        packages = gen.folders[display] / "packages"
        source = _module_source(packages, module)
        if source is None:
            out[display] = None
            continue
        keys = FileKeys(lambda dotted, p=packages: _module_source(p, dotted),
                              lambda dotted, p=packages: dotted if (p.joinpath(*dotted.split(".")) / "__init__.py").is_file()
                              else dotted.rpartition(".")[0])
        try:
            statements = _ChainletStatements(source, module, module.rpartition(".")[0], keys.key, chainlets - {cls})
            out[display] = statements.key(cls)
        except SyntaxError:
            out[display] = None
    return out


class _ChainletStatements(Statements):
    """carry.Statements with the other chainlets' classes counted by name only."""

    def __init__(self, source: bytes, module: str, package: str, file_key: Any, opaque: set[str]):
        super().__init__(source, module, package, file_key)
        self.opaque = opaque

    def key(self, name: str) -> str:
        return f"chainlet:{name}" if name in self.opaque else super().key(name)


def _sync(dst: Path, new: dict[str, bytes], old: dict[str, bytes]) -> None:
    """Make folder `dst`, which holds `old` (its `_files`), hold `new` (only the files that differ are written)."""
    for rel, data in new.items():
        if old.get(rel) != data:
            target = dst / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    for rel in set(old) - set(new):
        (dst / rel).unlink(missing_ok=True)


def _close_stubs(live: Any) -> None:
    """Close the HTTP clients a chainlet's stubs opened (aiohttp sessions on its event loop), as a
    chainlet's process exit would: else each is an "Unclosed client session" error at exit."""
    _close_stubs_of(getattr(live, "model", None), live, current=False)


def _close_stubs_of(instance: Any, live: Any, current: bool = True) -> None:
    """The stubs' clients of one model instance of `live` (a retired one: unless the serving instance
    still holds the same chainlet object, as after a method swap)."""
    try:
        from truss_chains.remote_chainlet.stub import StubBase
    except ImportError:
        return
    chainlet = getattr(instance, "_chainlet", None)
    if chainlet is None or (current and getattr(live.model, "_chainlet", None) is chainlet):
        return
    for value in list(getattr(chainlet, "__dict__", {}).values()):
        if not isinstance(value, StubBase):
            continue
        sync_client, async_client = getattr(value, "_cached_sync_client", None), getattr(value, "_cached_async_client", None)
        with contextlib.suppress(Exception):
            if sync_client is not None:
                sync_client[0].close()
            if async_client is not None and not async_client[0].closed:
                live._loop.run(async_client[0].close())


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


_generation = threading.Lock()  # tempfile.tempdir and PATH are the process's: one generation at a time


@contextlib.contextmanager
def _generating(root: Path):
    """Truss's code generation writes under tempfile.gettempdir() and formats with `ruff`: our folder,
    and this interpreter's scripts on PATH."""
    with _generation, _swapped(root), warnings.catch_warnings():
        # truss's ignore-file matching uses a pathspec API pathspec deprecates: 320 warnings per generation
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pathspec(\.|$)")
        yield


@contextlib.contextmanager
def _swapped(root: Path):
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




@dataclasses.dataclass
class ChainReloadEvent(ReloadEvent):
    """A chain's reload: `chainlets` maps each chainlet that was reloaded to its own ReloadEvent;
    `untouched` lists those whose code did not change (their instances and loaded state kept)."""

    chainlets: dict[str, ReloadEvent] = dataclasses.field(default_factory=dict)
    untouched: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)  # chainlets the source no longer has: stopped

    def summary(self) -> str:
        if self.kind == "failed" and not self.chainlets:
            return f"chain reload failed: {self.error} (still serving v{self.version})"
        if not self.chainlets and not self.removed:
            return f"chain v{self.version}: no chainlet's code changed; nothing reloaded"
        parts = []
        for name, event in self.chainlets.items():
            what = ", ".join(event.changed)
            if event.changed == ["added"]:
                parts.append(f"{name} added" + (f" FAILED: {event.error}" if event.kind == "failed" else " (loaded, served)"))
            elif event.kind == "methods":
                parts.append(f"{name} swapped ({what}; its state kept)")
            elif event.kind == "full":
                parts.append(f"{name} rebuilt ({what})")
            elif event.kind == "failed":
                parts.append(f"{name} FAILED: {event.error} (still serving its old code)")
            else:
                parts.append(f"{name} {event.kind}")
        parts += [f"{name} removed" for name in self.removed]
        kept = f"; untouched: {', '.join(self.untouched)}" if self.untouched else ""
        return f"chain v{self.version}: {'; '.join(parts)}{kept} in {self.duration_ms:.0f} ms"


class ChainReloader(Reloader):
    """Regenerates the chainlet trusses on a save and reloads only the chainlets whose code changed:
    their own generated files (model.py with the stubs, config.yaml, data/) or, in the chain's
    source and the helpers it imports, their class and everything it uses."""

    def __init__(self, chain: Chain):
        self._setup(chain)
        self.keys = _chainlet_keys(chain._gen)
        self.pending: set[str] = set()  # chainlets whose last reload failed
        self._generation = 0

    @property
    def watch_path(self) -> Path:
        return self.live.source.parent  # the chain root: what a push copies into every chainlet

    def watch_filter(self, watchfiles: Any) -> Any:
        """Python files and YAML (the chain's examples): the chain root is often the notebook's folder,
        whose autosaves and exported traces are no code of the chain's."""
        return watchfiles.PythonFilter(ignore_paths=(), extra_extensions=(".yaml", ".yml"))

    def _reload(self, full: bool) -> ChainReloadEvent | None:
        chain: Chain = self.live
        self._generation += 1
        root = chain.root / f"regenerated-{self._generation}"
        root.mkdir()
        try:
            return self._reload_from(chain, root, full)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _reload_from(self, chain: Chain, root: Path, full: bool) -> ChainReloadEvent:
        try:
            gen = _generate(chain.source, chain._entrypoint_arg, root)
        except TrussLabError as exc:
            return ChainReloadEvent(chain.version, "failed", error=str(exc), exception=exc)
        except (Exception, SystemExit) as exc:  # what the chain's source raised on import: file:line
            err = LoadError.from_exception(exc, [chain.source.parent], what=f"importing {chain.source.name}")
            return ChainReloadEvent(chain.version, "failed", error=str(err), location=err.location, exception=err)
        was = chain._gen
        if gen.name != was.name or gen.order[-1] != was.order[-1]:
            return ChainReloadEvent(chain.version, "failed", ["entrypoint"],
                                    error=f"{chain.source.name}: the entrypoint changed ({was.order[-1]} -> {gen.order[-1]}); "
                                          f"load the chain again to rebuild it")
        added = [n for n in gen.order if n not in was.order]
        removed = [n for n in was.order if n not in gen.order]
        base = next(iter(was.folders.values())).parent  # .chains_generated/<chain>: where the live chainlet trusses are
        folders = {n: was.folders.get(n) or base / f"chainlet_{n}" for n in gen.order}
        keys = _chainlet_keys(gen)
        todo = []
        for name in gen.order:
            if name in added:  # its generated truss, where the chain's live chainlet trusses are
                shutil.copytree(gen.folders[name], folders[name])
                continue
            new, old = _files(gen.folders[name]), _files(folders[name])
            own = [rel for rel in sorted(set(new) | set(old)) if not rel.startswith("packages" + os.sep) and new.get(rel) != old.get(rel)]
            if full or own or keys[name] is None or keys[name] != self.keys.get(name) or name in self.pending:
                todo.append(name)  # its own generated files (stubs, config, data) or its code changed, or it failed last time
            _sync(folders[name], new, old)  # its truss as a push would write it now (a later full reload reads it)
        events: dict[str, ReloadEvent] = {}
        not_added: list[str] = []
        for name in gen.order:  # dependencies first: a new chainlet is served before the ones calling it reload
            if name in added:
                try:
                    live = chain._start_chainlet(name, folders[name], bool(gen.depends[name]), False)
                    events[name] = ReloadEvent(live.version, "full", ["added"])
                    self.keys[name] = keys[name]
                except Exception as exc:  # its load() raised: the next save tries again
                    chain.chainlets.pop(name, None)
                    shutil.rmtree(folders.pop(name), ignore_errors=True)
                    not_added.append(name)
                    events[name] = ReloadEvent(chain.version, "failed", ["added"], error=str(exc),
                                               location=getattr(exc, "location", None), exception=exc)
            elif name in todo:
                events[name] = chain.chainlets[name].reload(full=full)
                if events[name].ok:
                    self.keys[name] = keys[name]
                    self.pending.discard(name)
                else:  # its folder already holds the new files: the next save must try it again
                    self.pending.add(name)
        failed = {n: e for n, e in events.items() if not e.ok}
        # a chainlet the source no longer has goes once nothing calls it: if a reload failed, old code may
        kept = removed if failed else []  # still call it, so it stays until a save that reloads cleanly
        for name in removed:
            if name not in kept:
                chain._stop_chainlet(name, was.folders[name])
                self.keys.pop(name, None)
        order = kept + [n for n in gen.order if n not in not_added]
        chain._gen = _Generated(
            name=gen.name, order=order,
            depends={**{n: was.depends[n] for n in kept}, **{n: gen.depends[n] for n in order if n not in kept}},
            folders={**{n: was.folders[n] for n in kept}, **{n: folders[n] for n in order if n not in kept}},
            classes={**{n: was.classes[n] for n in kept}, **{n: gen.classes[n] for n in order if n not in kept}},
        )
        chain.chainlets = {n: chain.chainlets[n] for n in order}
        gone = [n for n in removed if n not in kept]
        if gone or any(e.kind in ("methods", "full") for e in events.values()):
            chain.version += 1
        untouched = [n for n in order if n not in events or events[n].kind == "unchanged"]
        if failed:
            name, event = next(iter(failed.items()))
            return ChainReloadEvent(chain.version, "failed", list(events), error=f"{name}: {event.error}",
                                    location=event.location, exception=event.exception, chainlets=events,
                                    untouched=untouched, removed=gone)
        kind = "full" if gone or any(e.kind == "full" for e in events.values()) else "methods" if events else "unchanged"
        return ChainReloadEvent(chain.version, kind, [n for n in events if n not in untouched],
                                chainlets={n: e for n, e in events.items() if n not in untouched}, untouched=untouched,
                                removed=gone)

@dataclasses.dataclass
class Call:
    """One chainlet's part of a request: its trace, and the calls it made (in the order they started)."""

    chainlet: str
    trace: Any
    calls: list["Call"] = dataclasses.field(default_factory=list)

    def walk(self):
        yield self
        for call in self.calls:
            yield from call.walk()

    def edges(self):
        """(caller, call) for every call below this one, callers before their calls."""
        for call in self.calls:
            yield self, call
            yield from call.edges()

    def lines(self, indent: str = "", last: bool = True, top: bool = True) -> list[str]:
        t = self.trace
        what = f"{t.total_ms:.1f} ms (lock wait {t.lock_wait_ms:.1f}, predict {t.predict_ms:.1f})"
        if not t.ok:
            what += f" FAILED in {t.error_stage}: {t.error}"
        branch = "" if top else ("└─ " if last else "├─ ")
        out = [f"{indent}{branch}{self.chainlet} #{t.request_id} {what}"]
        inner = indent + ("" if top else ("   " if last else "│  "))
        for i, call in enumerate(self.calls):
            out += call.lines(inner, i == len(self.calls) - 1, top=False)
        return out


@dataclasses.dataclass
class ChainReport:
    """`chain.report()`: a Report per chainlet and the request trees (which chainlet called which)."""

    chain: str
    reports: dict[str, Any]
    trees: list[Call]
    locks: dict[str, int]

    def __getitem__(self, chainlet: str):
        return self.reports[chainlet]

    def to_chrome_trace(self, path: Any = None) -> dict:
        """Chrome trace-event JSON (Perfetto): a process per chainlet, a flow arrow per call (export.py)."""
        from .export import chain_chrome_trace

        return chain_chrome_trace(self, path)

    def to_otel(self, path: Any = None, exporter: Any = None) -> int:
        """OpenTelemetry spans, one trace per request, a service per chainlet (export.py)."""
        from .export import chain_otel

        return chain_otel(self, path, exporter)

    def table(self) -> str:
        rows = [f"chain {self.chain}: {len(self.trees)} requests"]
        rows.append(f"  {'chainlet':<14}{'lock':>5}{'calls':>7}{'max held':>9}{'wait p50':>10}{'predict p50':>12}{'failed':>8}")
        for name, r in self.reports.items():
            rows.append(f"  {name:<14}{self.locks[name]:>5}{r.count:>7}{r.max_lock_holders:>9}"
                        f"{r.stages['lock_wait'].p50:>8.1f}ms{r.stages['predict'].p50:>10.1f}ms{sum(r.failures.values()):>8}")
        return "\n".join(rows)

    def __str__(self) -> str:
        shown = self.trees[-5:]
        tree_lines = [line for tree in shown for line in tree.lines("  ")]
        more = f"  ... {len(self.trees) - len(shown)} earlier requests (report.trees)" if len(self.trees) > len(shown) else ""
        return "\n".join([self.table(), "request trees:" if shown else "no requests yet", *tree_lines] + ([more] if more else []))

    def _repr_mimebundle_(self, include=None, exclude=None):
        from .display.style import esc

        text = str(self)
        return {"text/plain": text, "text/html": f"<pre class='truss-lab truss-lab-chain-report'>{esc(text)}</pre>"}

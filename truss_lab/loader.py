"""Import a truss's code as Truss's image does: in this process, under its real names.

Truss runs one truss per process, and so does truss_lab: the process that loads a truss (the kernel,
or a worker process, worker.py) holds its code the way the image holds it -

* the truss root (the folder holding `model/`) first on `sys.path`, as the image's `/app` is, and
  `packages/` appended, as the image appends `/packages`;
* `model/model.py` loaded from its file as Truss's model wrapper loads it (`model.model`, or the
  file's stem when it is not named like its folder), every other module by Python's own path-based
  finder, under its real name in `sys.modules` (`model.helper`, `utils`).

So everything that finds code by name - pickle from any thread, spawn / fork / forkserver / loky
workers, `importlib.resources`, `pkgutil.get_data`, namespace packages, `importlib.reload`,
`sys.path` tricks - behaves as deployed. The one addition: the loader of the truss's own `.py` files
is a `SourceFileLoader` that compiles from the source on every import (a save within the same
second never runs stale bytecode) and records each module's source and its values right after its
body ran, which the swap rule (carry.py) compares.

`Resident` is the truss this process holds; `Code` the truss's modules at one moment (what a reload
replaces and, if the new import fails, puts back).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import carry, held
from .bundle import Bundle
from .errors import SHOWN_AS, LoadError, TrussLabError


def model_package(bundle: Bundle) -> str:
    """The Truss name of the model folder: `model` for `model_module_dir: model`."""
    return ".".join(Path(bundle.model_module_dir).parts)


def model_module_name(bundle: Bundle) -> str:
    """What Truss's model wrapper names model.py: `<folder>.<stem>` when the two are named alike
    (`model/model.py` -> `model.model`), else the stem alone (`model/my_model.py` -> `my_model`)."""
    stem = Path(bundle.model_class_filename).stem
    return f"{bundle.model_dir.name}.{stem}" if bundle.model_dir.name == stem else stem


def truss_root(bundle: Bundle) -> Path:
    """The folder the image's `/app` is: the one holding the model folder."""
    return bundle.model_dir.parents[len(Path(bundle.model_module_dir).parts) - 1]


def user_roots(bundle: Bundle) -> list[Path]:
    """Where the user's own code lives (for file:line in errors and filtered tracebacks). A chainlet's
    `packages/` first: it is the chain's folder, copied, and shown as it (errors.SHOWN_AS, chainlet.py)."""
    packages = bundle.packages_dir.resolve()
    return [packages, bundle.path] if packages in SHOWN_AS else [bundle.path]


def load_error(exc: BaseException, bundle: Bundle, what: str) -> LoadError:
    return LoadError.from_exception(exc, user_roots(bundle), what=what)


def refuse_non_python(bundle: Bundle) -> None:
    """A docker_server or trt_llm truss has no Python Model to run: say what it is, in one line."""
    if bundle.config.get("docker_server"):
        raise LoadError(
            f"{bundle.config_path}: a docker_server truss (Truss runs its container image and proxies to it); "
            f"truss_lab runs trusses whose Model is Python code in {bundle.model_module_dir}/{bundle.model_class_filename}"
        )
    if bundle.config.get("trt_llm") and not bundle.model_file.is_file():
        raise LoadError(
            f"{bundle.config_path}: a trt_llm truss (Truss serves it with its TensorRT-LLM engine, no model.py); "
            f"truss_lab runs trusses whose Model is Python code in {bundle.model_module_dir}/{bundle.model_class_filename}"
        )


# ------------------------------------------------------------------------------ what an import recorded


@dataclass
class Code:
    """The truss's modules in this process at one moment, with what their imports recorded: what the
    swap rule compares (carry.py reads `modules`, `compiled`, `import_state`, `source_of`, `package_of`)."""

    modules: dict[str, types.ModuleType]
    compiled: dict[str, bytes] = field(default_factory=dict)  # module name -> the source its body ran
    import_state: dict[str, carry.ImportState] = field(default_factory=dict)  # module name -> values right after import
    baseline: "held.Baseline | None" = None  # its classes' reference counts right after the import (held.py)

    def source_of(self, name: str) -> bytes | None:
        if name in self.compiled:
            return self.compiled[name]
        path = getattr(self.modules.get(name), "__file__", None)
        return Path(path).read_bytes() if path and path.endswith(".py") and os.path.isfile(path) else None

    def package_of(self, name: str) -> str:
        module = self.modules.get(name)
        if module is not None and getattr(module, "__package__", None) is not None:
            return module.__package__
        return name.rpartition(".")[0]


class TrussLoader(importlib.machinery.SourceFileLoader):
    """Python's source loader for the truss's own files, compiling from the source every time and
    recording, once the body ran, the source and the module's values (carry.ImportState)."""

    def __init__(self, fullname: str, path: str, resident: "Resident"):
        super().__init__(fullname, path)
        self.resident = resident

    def get_code(self, fullname):
        source = self.resident.sources.get(self.path)  # the version's own file, even imported after a save
        if source is None:
            source = self.get_data(self.path)
        self._source = source
        return compile(source, self.path, "exec", dont_inherit=True)

    def exec_module(self, module):
        nesting = self.resident._nesting
        nesting.depth = getattr(nesting, "depth", 0) + 1
        try:
            super().exec_module(module)
        finally:
            nesting.depth -= 1
        self.resident._record(module.__name__, getattr(self, "_source", b""), module)
        if nesting.depth == 0:  # the outermost import is done: nothing built at run time exists yet
            self.resident.baseline = held.Baseline.take(self.resident.code().modules)


class _Finder(importlib.abc.MetaPathFinder):
    """First on sys.meta_path: Python's own PathFinder, with the truss's `.py` files given a
    TrussLoader. Every other name (and namespace folders) is left to the import system as it is."""

    def __init__(self, resident: "Resident"):
        self.resident = resident

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in sys.builtin_module_names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        origin = getattr(spec, "origin", None)
        if spec is not None and origin is None and spec.submodule_search_locations is not None:
            if any(self.resident.owns(str(p)) for p in spec.submodule_search_locations):
                self.resident.known.add(name)  # a namespace package (model/ without __init__.py): one to evict
            return None
        if spec is None or type(spec.loader) is not importlib.machinery.SourceFileLoader or not self.resident.owns(origin):
            return None
        spec.loader = TrussLoader(name, origin, self.resident)
        return spec

    def invalidate_caches(self) -> None:
        pass


# ------------------------------------------------------------------------------ the truss this process holds

_resident_lock = threading.Lock()
_resident: "Resident | None" = None


class ProcessTaken(TrussLabError):
    """This process already holds a truss (another thread's load won the race, or one is loaded)."""


def resident() -> "Resident | None":
    """The truss this process holds, if any."""
    return _resident


class Resident:
    """The one truss whose code this process holds (see the module docstring). `release()` lets go:
    its modules leave sys.modules, its path entries and finder go, its environment variables are
    put back."""

    def __init__(self, bundle: Bundle):
        global _resident
        with _resident_lock:
            if _resident is not None:
                raise ProcessTaken(f"this process already holds the truss {_resident.bundle.model_name!r} "
                                    f"({_resident.bundle.path}); one truss per process, as in Truss's image")
            _resident = self
        self.bundle = bundle
        self.root = truss_root(bundle).resolve()
        folders = (bundle.model_dir, bundle.packages_dir)
        self.dirs = tuple({os.path.join(os.path.abspath(p), "") for p in folders} | {os.path.join(p.resolve(), "") for p in folders})
        self._records: dict[str, tuple[bytes, carry.ImportState, int]] = {}  # name -> (source, state, id(module))
        self.known: set[str] = set()  # every name the truss's code was imported under (what a reload looks at)
        self.sources: dict[str, bytes] = {}  # resolved path -> the bytes the serving version imports (snapshot.Snapshot)
        self.before_import: list[Callable[[], None]] = []  # what forgets the last import's registrations (a chainlet's)
        self.baseline: held.Baseline | None = None  # after the latest import: what held.py compares reference counts to
        self._nesting = threading.local()  # how deep in the truss's imports each thread is
        self._finder = _Finder(self)
        self.env = EnvironmentVariables()
        sys.meta_path.insert(0, self._finder)
        self._path = [str(self.root)]
        sys.path.insert(0, str(self.root))  # the image's /app
        if bundle.packages_dir.is_dir():
            self._path.append(str(bundle.packages_dir.resolve()))
            sys.path.append(self._path[-1])  # the image's /packages, appended as Truss does
        importlib.invalidate_caches()

    def _inside(self, entry: str) -> bool:
        """Whether a sys.path entry is the truss's folder or lies inside it."""
        folder = os.path.abspath(entry or os.curdir)
        return folder == str(self.root) or folder.startswith(str(self.root) + os.sep)

    def owns(self, path: str | None) -> bool:
        """Whether `path` is a file (or folder) of the truss's code: under model/ or packages/."""
        return bool(path) and os.path.join(path, "").startswith(self.dirs)

    def _record(self, name: str, source: bytes, module: types.ModuleType) -> None:
        self.known.add(name)
        self._records[name] = (source, carry.ImportState.of(module), id(module))

    def _is_ours(self, module: object) -> bool:
        """A module of the truss's files: its file is, or every folder of a package without one (a
        namespace package an installed one shares - `google` - stays: only its portions here are ours).
        Asked of every module in sys.modules on a reload: a string comparison for all but namespace packages."""
        attrs = getattr(module, "__dict__", None)
        if not isinstance(module, types.ModuleType) or attrs is None:
            return False
        path = attrs.get("__file__")
        if path is not None:
            return isinstance(path, str) and path.startswith(self.dirs)
        try:
            folders = [str(p) for p in (attrs.get("__path__") or ())]
        except Exception:  # a namespace path whose parent left sys.modules cannot be told: not ours
            return False
        return bool(folders) and all(self.owns(f) for f in folders)

    def code(self, everywhere: bool = False) -> Code:
        """The truss's modules in sys.modules now, with what their imports recorded: those imported
        through this truss's loader (a reload), or - `everywhere` - every module of its files."""
        if everywhere:
            modules = {name: m for name, m in list(sys.modules.items()) if self._is_ours(m)}
        else:
            modules = {name: m for name in list(self.known) if self._is_ours(m := sys.modules.get(name))}
        compiled, state = {}, {}
        for name, module in modules.items():
            record = self._records.get(name)
            if record is not None and record[2] == id(module):
                compiled[name], state[name] = record[0], record[1]
        return Code(modules, compiled, state, self.baseline)

    def evict(self, everywhere: bool = False) -> Code:
        """Take the truss's modules out of sys.modules (Truss's hot_reload does this for model/; here
        packages/ too, so its edits reload): the next import reads the files again. Returns them."""
        old = self.code(everywhere)
        for name in old.modules:
            sys.modules.pop(name, None)
        self._forget_listings()
        return old

    def _forget_listings(self) -> None:
        """Python's path finders cache each folder's listing: those of the truss's folders go (a file
        added by the save is found), the others' stay (invalidating every cache costs a millisecond
        with TensorFlow imported)."""
        for folder, finder in list(sys.path_importer_cache.items()):
            if finder is not None and (folder + os.sep).startswith(self.dirs + (str(self.root) + os.sep,)):
                finder.invalidate_caches()

    def restore(self, old: Code) -> None:
        """Put `old` back, dropping whatever a failed import left: the old code keeps serving."""
        for name in list(self.known):
            module = sys.modules.get(name)
            if module is not None and self._is_ours(module) and old.modules.get(name) is not module:
                del sys.modules[name]
        sys.modules.update(old.modules)
        self.baseline = old.baseline
        for name, module in old.modules.items():
            if name in old.compiled:
                self._records[name] = (old.compiled[name], old.import_state[name], id(module))

    def import_model(self, also: list[str] = ()) -> types.ModuleType:
        """Import model.py as Truss's wrapper does (and the modules in `also`: those the code it
        replaces had, so their state can be carried); a failure is a LoadError with file:line, and
        leaves none of the new modules in sys.modules."""
        bundle = self.bundle
        refuse_non_python(bundle)
        if not bundle.model_dir.is_dir():
            raise LoadError(f"{bundle.model_dir}: model folder missing (config key 'model_module_dir')")
        if not bundle.model_file.is_file():
            raise LoadError(f"{bundle.model_file}: missing (config key 'model_class_filename')")
        what = f"importing {bundle.model_class_filename}"
        name = model_module_name(bundle)
        for forget in self.before_import:
            forget()
        try:
            path = str(bundle.model_file.resolve())
            spec = importlib.util.spec_from_file_location(name, path, loader=TrussLoader(name, path, self))
            module = importlib.util.module_from_spec(spec)
            if "." in name:
                module.__package__ = None  # as Truss's wrapper: no relative imports in the top-level model file
            sys.modules[name] = module  # before exec: sys.modules[cls.__module__] resolves during the import
            self.known.add(name)
            spec.loader.exec_module(module)
            for other in also:
                if other != name and other not in sys.modules:
                    what = f"importing {other}"
                    try:
                        importlib.import_module(other)
                    except ModuleNotFoundError as exc:
                        if exc.name != other:
                            raise
        except (Exception, SystemExit) as exc:  # sys.exit() at the top of model.py is a load error too
            self.evict()
            raise load_error(exc, bundle, what) from exc
        return module

    def release(self) -> None:
        """Let go of the process: the truss's modules, path entries, finder and environment variables."""
        global _resident
        self.evict(everywhere=True)
        self._records.clear()
        self.known.clear()
        self.baseline = None
        with _resident_lock:
            if _resident is self:
                _resident = None
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        # its own entries, and those its code added inside the truss (`sys.path.append(dirname(__file__))`
        # puts model/ there, whose model.py would stand in for the next truss's `model` package)
        sys.path[:] = [e for e in sys.path if e not in self._path and not self._inside(e)]
        for folder in [f for f in sys.path_importer_cache if self._inside(f)]:
            sys.path_importer_cache.pop(folder, None)
        self.env.restore()
        importlib.invalidate_caches()


class EnvironmentVariables:
    """config.yaml's `environment_variables`, set in this process as the Truss container has them:
    applied exactly on every full reload (a variable no longer declared goes back to the value it had
    before this truss set it, or is unset), and all put back when the model closes."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.before: dict[str, str | None] = {}  # name -> its value before this truss set it

    def apply(self, declared: dict[str, str]) -> "Callable[[], None]":
        """Set exactly `declared`; returns an undo (a failed reload keeps the serving version's)."""
        with self._lock:
            touched = set(self.before) | set(declared)
            was = {n: os.environ.get(n) for n in touched}
            before = dict(self.before)
            for name in [n for n in self.before if n not in declared]:
                self._put_back(name)
            for name, value in declared.items():
                if name not in self.before:
                    self.before[name] = os.environ.get(name)
                os.environ[name] = value

        def undo() -> None:
            with self._lock:
                self.before = before
                for name, value in was.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value

        return undo

    def restore(self) -> None:
        with self._lock:
            for name in list(self.before):
                self._put_back(name)

    def _put_back(self, name: str) -> None:
        old = self.before.pop(name)
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

"""Import a Truss's code as Truss's image does, one version at a time (wrapper.py builds the Model).

A `Version` is one snapshot of the truss's code: its real modules, under their Truss names
(`model.model` - or the file's stem when it is not named like its folder, as Truss names it -
`model.<helper>`, and the names under `packages/`), compiled from the sources as they were when the
version was made. A request that imports a helper only after a save still gets its own version's
file. Every module's `__loader__` is its version's `names.VersionLoader`, which is how a Truss name
used by that code (an `import`, a pickle, `importlib`) finds this version's module (names.py).

A `Space` is one LiveModel's versions and the Truss names they provide. Releasing a version drops
its modules; nothing else (no `sys.modules` entry) holds them.
"""

from __future__ import annotations

import importlib.machinery
import os
import threading
import types
from pathlib import Path
from typing import Any, Callable

from . import carry, names
from .bundle import Bundle
from .errors import LoadError


def model_package(bundle: Bundle) -> str:
    """The Truss name of the model folder: `model` for `model_module_dir: model`."""
    return ".".join(Path(bundle.model_module_dir).parts)


def model_module_name(bundle: Bundle) -> str:
    """What Truss's model wrapper names model.py: `<folder>.<stem>` when the two are named alike
    (`model/model.py` -> `model.model`), else the stem alone (`model/my_model.py` -> `my_model`)."""
    stem = Path(bundle.model_class_filename).stem
    return f"{model_package(bundle)}.{stem}" if bundle.model_dir.name == stem else stem


OWN_ROOTS: set[Path] = set()  # folders a truss's packages/ copies (a chain's root): never "installed" modules


def packages_names(folder: Path) -> list[str]:
    """Top-level names packages/ provides that an installed or standard-library module does not shadow
    (packages/ is appended to sys.path in Truss's image, so those win there too)."""
    import sys

    own = {Path.cwd().resolve(), *OWN_ROOTS}  # the folder you work in holds your code, not installed libraries
    others = [p for p in sys.path if p and p != str(folder) and Path(p).resolve() not in own]
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.suffix == ".py" and entry.stem.isidentifier():
            name = entry.stem
        elif entry.is_dir() and entry.name.isidentifier():
            name = entry.name
        else:
            continue
        if name in sys.builtin_module_names or name in sys.stdlib_module_names:
            continue
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, others)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.origin is not None:
            continue  # an installed module of that name: it wins, as on Truss
        if entry.is_dir() and not (entry / "__init__.py").is_file() and spec is not None:
            continue  # two namespace portions: leave it to Python
        found.append(name)
    return found


class Version:
    """One version of a truss's code: its real modules by Truss name, imported on first use."""

    def __init__(self, space: "Space", bundle: Bundle, number: int, sources: dict[str, bytes]):
        self.space, self.bundle, self.number = space, bundle, number
        self.sources = sources  # absolute path -> the bytes this version compiles
        self.loader = names.VersionLoader(self)
        self.package = model_package(bundle)
        self.model_name = model_module_name(bundle)
        self.packages = packages_names(bundle.packages_dir) if bundle.packages_dir.is_dir() else []
        self.tops = frozenset({self.package.partition(".")[0], self.model_name.partition(".")[0], *self.packages})
        self.modules: dict[str, types.ModuleType] = {}
        self.compiled: dict[str, bytes] = {}  # module name -> the source it ran (carry.py compares them)
        self.import_state: dict[str, carry.ImportState] = {}  # module name -> its values right after import
        self.collectors: list = []  # Prometheus collectors its code registered (collectors.py)
        self.replaced_collectors: list = []  # an older version's, whose names it took over
        self._lock = threading.RLock()
        self._importing: dict[str, tuple[int, threading.Event]] = {}  # module name -> (importing thread, done)

    def __repr__(self) -> str:
        return f"<truss_lab code {self.bundle.model_name!r} v{self.number}>"

    # ------------------------------------------------------------------ names.Code

    def sys_path(self) -> list[str]:
        roots = [str(self.bundle.model_dir.parents[len(Path(self.bundle.model_module_dir).parts) - 1])]
        if self.model_name.partition(".")[0] != self.package.partition(".")[0]:
            roots.append(str(self.bundle.model_dir))  # model/my_model.py is `my_model`
        if self.bundle.packages_dir.is_dir():
            roots.append(str(self.bundle.packages_dir))
        return roots

    def module(self, name: str) -> types.ModuleType:
        """The real module `name`, imported into this version now if it is not yet (its parent
        package first, as Python imports it); ModuleNotFoundError if this version has none."""
        parent, _, child = name.rpartition(".")
        if parent and name not in self.modules:
            self.module(parent)
        me = threading.get_ident()
        with self._lock:
            found = self.modules.get(name)
            importing = self._importing.get(name)
            if found is not None and (importing is None or importing[0] == me):
                return found  # imported, or being imported by this very thread (an import cycle)
            if importing is None:
                path, package_dir = self._locate(name)
                module = self._new_module(name, path, package_dir)
                done = threading.Event()
                self._importing[name] = (me, done)
                self.modules[name] = module
        names.ensure_proxy(name)
        if importing is not None:  # another thread is importing it: wait for its result
            importing[1].wait()
            with self._lock:
                if name in self.modules:
                    return self.modules[name]
            raise ModuleNotFoundError(f"No module named {name!r} (its import failed in another thread)", name=name)
        try:
            self._exec(name, module, path)
            if parent:
                setattr(self.modules[parent], child, module)
        except BaseException:
            with self._lock:
                self.modules.pop(name, None)
            raise
        finally:
            with self._lock:
                self._importing.pop(name, None)
            done.set()
        return module

    def _locate(self, name: str) -> tuple[Path | None, Path | None]:
        """(file, its folder if `name` is a package) in this version; (None, folder) for a namespace folder."""
        bundle = self.bundle
        if name == self.model_name:
            return bundle.model_file, None
        top, _, rest = name.partition(".")
        if name == self.package or name.startswith(self.package + "."):
            base = bundle.model_dir
            rest = name[len(self.package) + 1:] if name != self.package else ""
        elif top in self.packages:
            base, rest = bundle.packages_dir / top, rest
        else:
            raise ModuleNotFoundError(f"No module named {name!r} in the truss {bundle.model_name!r}", name=name)
        folder = base.joinpath(*rest.split(".")) if rest else base
        if (folder / "__init__.py").is_file() or str(folder / "__init__.py") in self.sources:
            return folder / "__init__.py", folder
        as_file = folder.with_suffix(".py") if rest or base != bundle.model_dir else None
        if as_file is not None and (str(as_file) in self.sources or as_file.is_file()):
            return as_file, None
        if folder.is_dir():
            return None, folder
        raise ModuleNotFoundError(f"No module named {name!r} in the truss {bundle.model_name!r}", name=name)

    def _new_module(self, name: str, path: Path | None, package_dir: Path | None) -> types.ModuleType:
        module = types.ModuleType(name)
        is_package = package_dir is not None
        spec = importlib.machinery.ModuleSpec(name, self.loader, origin=str(path) if path else None, is_package=is_package)
        if is_package:
            spec.submodule_search_locations = [str(package_dir)]
            module.__path__ = [str(package_dir)]
        spec.has_location = path is not None
        module.__spec__, module.__loader__ = spec, self.loader
        module.__package__ = name if is_package else name.rpartition(".")[0]
        if path is not None:
            module.__file__ = str(path)
        return module

    def _exec(self, name: str, module: types.ModuleType, path: Path | None) -> None:
        if path is None:
            return
        source = self.sources.get(str(path))
        if source is None:
            source = path.read_bytes()  # a file the snapshot did not hold (outside model/ and packages/)
        self.compiled[name] = source
        code = compile(source, str(path), "exec", dont_inherit=True)
        exec(code, module.__dict__)
        self.import_state[name] = carry.ImportState.of(module)

    def source_of(self, name: str) -> bytes | None:
        """The source this version has for module `name` (None: not a module of the truss, or a folder)."""
        try:
            path, _ = self._locate(name)
        except ModuleNotFoundError:
            return None
        if path is None:
            return None
        source = self.sources.get(str(path))
        if source is None and path.is_file():
            source = path.read_bytes()
        return source

    def package_of(self, name: str) -> str:
        """The package a relative import in module `name` is relative to."""
        module = self.modules.get(name)
        if module is not None and module.__package__ is not None:
            return module.__package__
        return name.rpartition(".")[0]

    def exec_module(self, module: types.ModuleType) -> None:
        """`importlib.util.module_from_spec(spec)` + `spec.loader.exec_module(m)` on one of our specs."""
        origin = getattr(module.__spec__, "origin", None)
        if origin:
            source = self.sources.get(origin) or Path(origin).read_bytes()
            exec(compile(source, origin, "exec", dont_inherit=True), module.__dict__)

    def release(self) -> None:
        """Drop this version's modules: once nothing else holds them, their globals are collected."""
        with self._lock:
            self.modules.clear()
            self.compiled.clear()
            self.import_state.clear()
            self.sources = {}


class Space:
    """One LiveModel's code: its versions, the one serving, and the Truss names they provide."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.current: Version | None = None
        self.env = EnvironmentVariables()
        self.activity: Any = None  # the LiveModel's trace.ActivityLog (origins.py adds what its code starts)

    def current_code(self) -> Version | None:
        return self.current

    def new_version(self, bundle: Bundle, number: int, sources: dict[str, bytes]) -> Version:
        version = Version(self, bundle, number, sources)
        names.register(self, version.tops, last=self.current is None)  # a first load is the truss loaded last
        return version

    def serve(self, version: Version) -> None:
        """`version` now serves: Truss names used outside model code resolve to it when this truss
        is the one loaded last."""
        self.current = version
        names.register(self, version.tops, last=False)

    def close(self) -> None:
        from . import collectors

        collectors.forget(self)
        names.unregister(self)
        self.env.restore()
        self.current = None


def user_roots(bundle: Bundle) -> list[Path]:
    """Where the user's own code lives (for file:line in errors and filtered tracebacks)."""
    return [bundle.path]


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


def import_model(version: Version, also: list[str] = ()) -> types.ModuleType:
    """Import `version`'s model.py (and the modules in `also`: those the version it replaces had
    imported, so their state can be carried); a failure is a LoadError with file:line."""
    bundle = version.bundle
    refuse_non_python(bundle)
    if not bundle.model_dir.is_dir():
        raise LoadError(f"{bundle.model_dir}: model folder missing (config key 'model_module_dir')")
    if not bundle.model_file.is_file():
        raise LoadError(f"{bundle.model_file}: missing (config key 'model_class_filename')")
    what = f"importing {bundle.model_class_filename}"
    try:
        with names.active(version):
            module = version.module(version.model_name)
            for name in also:
                what = f"importing {name}"
                try:
                    version.module(name)
                except ModuleNotFoundError as exc:
                    if exc.name != name:
                        raise
    except (Exception, SystemExit) as exc:  # sys.exit() at the top of model.py is a load error too
        version.release()
        raise load_error(exc, bundle, what) from exc
    return module


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

"""Import a Truss's model.py as a module of its own, as Truss's image lays it out (wrapper.py builds the Model).

Each (truss folder, code version) gets its own package name, `_truss_lab.<slug>_<hash>.v<k>`, bound
to the model folder: two trusses that both have `model/model.py` load side by side, relative imports
inside the model folder (`from .helpers import x`) work, and a reload imports into fresh modules.
`packages/` goes on sys.path, as it does in a Truss server.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import re
import sys
import types
from pathlib import Path

from .bundle import Bundle
from .errors import LoadError

ROOT_PACKAGE = "_truss_lab"


class SourceLoader(importlib.machinery.SourceFileLoader):
    """Compile from the source file every time; never read or write __pycache__.

    A .pyc is trusted when the source's mtime (whole seconds) and size match, so two saves of the
    same length within one second would run stale code after a reload. User code is small; compiling
    it is cheap.
    """

    def get_code(self, fullname):
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


class TrussFinder:
    """Finds modules under a loaded truss's model folder or packages/ and loads them with SourceLoader.

    Top-level names are looked up only in the registered packages/ folders, and submodules only when
    their parent lives under a registered folder, so other imports pay one cheap check.
    """

    roots: dict[str, None] = {}  # folders (as str), in registration order
    packages: dict[str, None] = {}  # packages/ folders: where top-level names may come from

    @classmethod
    def register(cls, folder: Path, *, top_level: bool) -> None:
        cls.roots[str(folder)] = None
        if top_level:
            cls.packages[str(folder)] = None
        if cls not in sys.meta_path:
            sys.meta_path.insert(0, cls)

    @classmethod
    def owns(cls, filename: str) -> bool:
        return any(filename.startswith(root + os.sep) for root in cls.roots)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is None:
            if not cls.packages:
                return None
            search = list(cls.packages)
        else:
            search = [p for p in path if cls.owns(p + os.sep)]  # p itself, or a folder under a root
            if not search:
                return None
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return spec if path is None and spec is not None else None
        return importlib.util.spec_from_file_location(
            name,
            spec.origin,
            loader=SourceLoader(name, spec.origin),
            submodule_search_locations=spec.submodule_search_locations,
        )


def _ensure_root() -> None:
    if ROOT_PACKAGE not in sys.modules:
        root = types.ModuleType(ROOT_PACKAGE)
        root.__path__ = []  # a namespace for the per-truss packages
        sys.modules[ROOT_PACKAGE] = root


def _exec_source_module(name: str, path: Path, package_dir: Path | None = None) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        name,
        path,
        loader=SourceLoader(name, str(path)),
        submodule_search_locations=[str(package_dir)] if package_dir else None,
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def package_prefix(bundle: Bundle) -> str:
    slug = re.sub(r"\W", "_", bundle.path.name)[:40] or "truss"
    digest = hashlib.sha1(str(bundle.path).encode()).hexdigest()[:8]
    return f"{ROOT_PACKAGE}.{slug}_{digest}"


def user_roots(bundle: Bundle) -> list[Path]:
    """Where the user's own code lives (for file:line in errors and filtered tracebacks)."""
    return [bundle.path]


def load_error(exc: BaseException, bundle: Bundle, what: str) -> LoadError:
    return LoadError.from_exception(exc, user_roots(bundle), what=what)


def import_model_module(bundle: Bundle, version: int) -> types.ModuleType:
    """Import the model folder as a fresh package and return its model.py module."""
    if not bundle.model_dir.is_dir():
        raise LoadError(f"{bundle.model_dir}: model folder missing (config key 'model_module_dir')")
    if not bundle.model_file.is_file():
        raise LoadError(f"{bundle.model_file}: missing (config key 'model_class_filename')")
    add_packages_to_path(bundle)
    TrussFinder.register(bundle.model_dir, top_level=False)
    _ensure_root()
    pkg_name = f"{package_prefix(bundle)}_v{version}"
    init_file = bundle.model_dir / "__init__.py"
    mod_name = f"{pkg_name}.{Path(bundle.model_class_filename).stem}"
    try:
        if init_file.is_file():
            _exec_source_module(pkg_name, init_file, package_dir=bundle.model_dir)
        else:
            pkg = types.ModuleType(pkg_name)
            pkg.__path__ = [str(bundle.model_dir)]
            sys.modules[pkg_name] = pkg
        module = _exec_source_module(mod_name, bundle.model_file)
    except Exception as exc:
        forget_modules(pkg_name)
        raise load_error(exc, bundle, f"importing {bundle.model_class_filename}") from exc
    return module


@contextlib.contextmanager
def imported(bundle: Bundle, version: int):
    """Import one version of model.py; if the block using it fails, drop that version from sys.modules."""
    module = import_model_module(bundle, version)
    try:
        yield module
    except BaseException:
        forget_modules(version_package(module))
        raise


def version_package(module: types.ModuleType) -> str:
    """`_truss_lab.<slug>_<hash>_v<k>` for that version's model.py module."""
    return module.__name__.rpartition(".")[0]


@contextlib.contextmanager
def fresh_packages(bundle: Bundle, refresh: bool):
    """Import packages/ modules anew inside this block (when `refresh`); put the old ones back on failure."""
    if not refresh:
        yield
        return
    root = str(bundle.packages_dir) + os.sep

    def take_out() -> dict[str, types.ModuleType]:
        found = {n: m for n, m in list(sys.modules.items()) if (getattr(m, "__file__", None) or "").startswith(root)}
        for name in found:
            del sys.modules[name]
        return found

    saved = take_out()
    try:
        yield
    except BaseException:
        take_out()  # the half-imported new ones
        sys.modules.update(saved)
        raise


def forget_modules(pkg_name: str) -> None:
    """Drop a version's package and every module under it from sys.modules."""
    for name in [n for n in sys.modules if n == pkg_name or n.startswith(pkg_name + ".")]:
        del sys.modules[name]


def add_packages_to_path(bundle: Bundle) -> None:
    if bundle.packages_dir.is_dir():
        TrussFinder.register(bundle.packages_dir, top_level=True)
        if str(bundle.packages_dir) not in sys.path:
            sys.path.insert(0, str(bundle.packages_dir))


def apply_environment_variables(bundle: Bundle) -> None:
    """Set config.yaml's environment_variables in this process, as the Truss container does."""
    for name, value in bundle.environment_variables.items():
        os.environ[name] = value

"""Import a Truss's model.py as a module of its own, as Truss's image lays it out (wrapper.py builds the Model).

Each LiveModel has a `Space` of module names: `_truss_lab.<slug>_<hash>_<n>_v<k>` per code version
(bound to the model folder) and `..._pk<g>` per generation of packages/. Two trusses that both have
`model/model.py` or `packages/utils.py` load side by side, as do two LiveModels of one folder;
relative imports inside the model folder (`from .helpers import x`) work; `from model.helper import
x` works as in Truss's image (whose truss root is on the path) and stays within the version; a
reload imports into fresh modules. packages/ is appended to sys.path as in a Truss server, for
code outside the truss.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import itertools
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

from .bundle import Bundle
from .errors import LoadError

ROOT_PACKAGE = "_truss_lab"


COMPILED: dict[str, bytes] = {}  # module name -> the source it was compiled from (until it is forgotten)
IMPORT_TIME: dict[str, tuple[dict, dict]] = {}  # model module name -> (its globals, its model class's attributes) right after import


def import_time_state(module: types.ModuleType) -> tuple[dict, dict, bytes] | None:
    """(globals, model-class attributes, source) of a model module as they were right after its import."""
    name = module.__name__
    if name not in IMPORT_TIME or name not in COMPILED:
        return None
    return (*IMPORT_TIME[name], COMPILED[name])


class SourceLoader(importlib.machinery.SourceFileLoader):
    """Compile from the source file every time; never read or write __pycache__.

    A .pyc is trusted when the source's mtime (whole seconds) and size match, so two saves of the
    same length within one second would run stale code after a reload. User code is small; compiling
    it is cheap.
    """

    def get_code(self, fullname):
        source = self.get_data(self.path)
        if fullname.startswith(ROOT_PACKAGE + "."):
            COMPILED[fullname] = source  # what this version was compiled from (hot reload compares it)
        names = Space.import_map(fullname)
        if names:
            source = rewrite_imports(source, self.path, names)
        return compile(source, self.path, "exec", dont_inherit=True)


def rewrite_imports(source: bytes, filename: str, names: dict[str, str]) -> Any:
    """`source` with absolute imports of `names` (top-level name -> this truss's module for it) made
    to import this truss's own copy: `from model.helper import X` (the truss root is on the path in
    Truss's image) and `import utils` (from packages/) stay inside this truss and this version.

    Only an absolute import whose first name is in `names` changes; line numbers are kept. Returns
    the source untouched (bytes) when no line can match, else an AST for compile().
    """
    text = source.decode("utf-8", errors="replace") if isinstance(source, bytes) else source
    if not any(re.search(rf"\b(?:import|from)\s+{re.escape(n)}\b", text) for n in names):
        return source
    tree = ast.parse(source, filename)
    _ImportRewriter(names).visit(tree)
    return ast.fix_missing_locations(tree)


class _ImportRewriter(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]):
        self.names = names

    def _target(self, dotted: str) -> str | None:
        top, _, rest = dotted.partition(".")
        base = self.names.get(top)
        if base is None:
            return None
        return f"{base}.{rest}" if rest else base

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if node.level == 0 and node.module:
            target = self._target(node.module)
            if target is not None:
                node.module = target
        return node

    def visit_Import(self, node: ast.Import) -> Any:
        out: list[ast.stmt] = []
        kept: list[ast.alias] = []
        for alias in node.names:
            target = self._target(alias.name)
            if target is None:
                kept.append(alias)
                continue
            top = alias.name.partition(".")[0]
            if alias.asname:  # `import model.x as m`: m is model.x
                out.append(ast.copy_location(ast.Import(names=[ast.alias(target, alias.asname)]), node))
            else:  # `import model.x`: imports model.x, binds `model`
                out.append(ast.copy_location(ast.Import(names=[ast.alias(target, top)]), node))
                if "." in alias.name:
                    out.append(ast.copy_location(ast.Import(names=[ast.alias(self._target(top), top)]), node))
        if kept:
            out.insert(0, ast.copy_location(ast.Import(names=kept), node))
        return out


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


class Space:
    """One LiveModel's own module names: `<space>_v<k>` per code version (the model folder), and
    `<space>_pk<g>` per generation of packages/. Two LiveModels, of one folder or of two, never share
    a module; a reload imports into new names while requests in flight keep the old ones.

    User code is compiled with its absolute imports of the truss's own top-level names rewritten
    (`rewrite_imports`): the model folder's name (`model`, as the truss root is on the path in
    Truss's image) and every module in packages/ that an installed module does not shadow.
    """

    _counter = itertools.count(1)
    _maps: dict[str, dict[str, str]] = {}  # package name (a version or a packages generation) -> import map

    def __init__(self, bundle: Bundle):
        slug = re.sub(r"\W", "_", bundle.path.name)[:40] or "truss"
        digest = hashlib.sha1(str(bundle.path).encode()).hexdigest()[:8]
        self.name = f"{ROOT_PACKAGE}.{slug}_{digest}_{next(self._counter)}"
        self.generation = 0
        self._packages: dict[str, str] = {}  # top-level name -> module name, for this generation

    @classmethod
    def import_map(cls, fullname: str) -> dict[str, str] | None:
        if not fullname.startswith(ROOT_PACKAGE + "."):
            return None
        return cls._maps.get(".".join(fullname.split(".")[:2]))

    def version_package(self, version: int) -> str:
        return f"{self.name}_v{version}"

    def packages_package(self) -> str:
        return f"{self.name}_pk{self.generation}"

    def prepare_packages(self, bundle: Bundle) -> None:
        """Make this generation's packages/ namespace (once) and the names it provides."""
        name = self.packages_package()
        if name in sys.modules or not bundle.packages_dir.is_dir():
            return
        _ensure_root()
        TrussFinder.register(bundle.packages_dir, top_level=False)
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(bundle.packages_dir)]
        sys.modules[name] = pkg
        self._packages = {n: f"{name}.{n}" for n in packages_names(bundle.packages_dir)}
        self._maps[name] = self._map(bundle, None)
        # As in Truss's image, packages/ is also on sys.path (appended: installed modules win), so code
        # outside the truss that imports a name from it (a pickle naming a class) still finds it.
        PACKAGES_ON_PATH.add(str(bundle.packages_dir))
        if str(bundle.packages_dir) not in sys.path:
            sys.path.append(str(bundle.packages_dir))

    def _map(self, bundle: Bundle, version_pkg: str | None) -> dict[str, str]:
        names = dict(self._packages)
        top = Path(bundle.model_module_dir).parts
        if version_pkg is not None and len(top) == 1:
            names[top[0]] = version_pkg
        return names

    def register_version(self, bundle: Bundle, version: int) -> str:
        pkg = self.version_package(version)
        self._maps[pkg] = self._map(bundle, pkg)
        return pkg

    @contextlib.contextmanager
    def fresh_packages(self, bundle: Bundle, refresh: bool):
        """Import packages/ anew inside this block (a new generation) when `refresh`; keep the old
        generation if the block fails."""
        if not refresh:
            yield
            return
        old_generation, old_packages = self.generation, self._packages
        self.generation += 1
        try:
            yield
        except BaseException:
            forget_modules(self.packages_package())
            self._maps.pop(self.packages_package(), None)
            self.generation, self._packages = old_generation, old_packages
            raise

    def forget_version(self, version_pkg: str) -> None:
        forget_modules(version_pkg)
        self._maps.pop(version_pkg, None)


PACKAGES_ON_PATH: set[str] = set()  # packages/ folders of loaded trusses, appended to sys.path


def packages_names(folder: Path) -> list[str]:
    """Top-level names packages/ provides that an installed or standard-library module does not
    shadow (packages/ is appended to sys.path in Truss's image, so those win there too)."""
    others = [p for p in sys.path if p and p not in PACKAGES_ON_PATH and p != str(folder)]
    names = []
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
        names.append(name)
    return names


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


def user_roots(bundle: Bundle) -> list[Path]:
    """Where the user's own code lives (for file:line in errors and filtered tracebacks)."""
    return [bundle.path]


def load_error(exc: BaseException, bundle: Bundle, what: str) -> LoadError:
    return LoadError.from_exception(exc, user_roots(bundle), what=what)


def import_model_module(bundle: Bundle, version: int, space: Space) -> types.ModuleType:
    """Import the model folder as a fresh package and return its model.py module."""
    refuse_non_python(bundle)
    if not bundle.model_dir.is_dir():
        raise LoadError(f"{bundle.model_dir}: model folder missing (config key 'model_module_dir')")
    if not bundle.model_file.is_file():
        raise LoadError(f"{bundle.model_file}: missing (config key 'model_class_filename')")
    TrussFinder.register(bundle.model_dir, top_level=False)
    _ensure_root()
    space.prepare_packages(bundle)
    pkg_name = space.register_version(bundle, version)
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
        cls = getattr(module, bundle.model_class_name, None)
        IMPORT_TIME[mod_name] = (dict(vars(module)), dict(vars(cls)) if isinstance(cls, type) else {})
    except (Exception, SystemExit) as exc:  # sys.exit() at the top of model.py is a load error too
        space.forget_version(pkg_name)
        raise load_error(exc, bundle, f"importing {bundle.model_class_filename}") from exc
    return module


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


@contextlib.contextmanager
def imported(bundle: Bundle, version: int, space: Space):
    """Import one version of model.py; if the block using it fails, drop that version from sys.modules."""
    module = import_model_module(bundle, version, space)
    try:
        yield module
    except BaseException:
        space.forget_version(version_package(module))
        raise


def version_package(module: types.ModuleType) -> str:
    """`_truss_lab.<slug>_<hash>_v<k>` for that version's model.py module."""
    return module.__name__.rpartition(".")[0]


def forget_modules(pkg_name: str) -> None:
    """Drop a version's package and every module under it from sys.modules (and what we kept of them)."""
    for name in [n for n in sys.modules if n == pkg_name or n.startswith(pkg_name + ".")]:
        del sys.modules[name]
    for kept in (COMPILED, IMPORT_TIME):
        for name in [n for n in kept if n == pkg_name or n.startswith(pkg_name + ".")]:
            del kept[name]


def apply_environment_variables(bundle: Bundle) -> None:
    """Set config.yaml's environment_variables in this process, as the Truss container does."""
    for name, value in bundle.environment_variables.items():
        os.environ[name] = value

"""Truss's module names in one process that holds many trusses: `model.model`, `model.helper`, `utils`.

In a Truss image the truss root is on `sys.path`, so model code is `model.model`, its helpers
`model.<helper>` and `packages/` modules go by their own names - and pickles, joblib files,
`importlib.import_module`, `sys.modules[cls.__module__]`, spawn workers and loggers all find code by
those names. A notebook holds several trusses (and several versions of each, while a reload lands
and requests finish), so one name has many modules. The rule:

* each code version (`loader.Version`) holds its own real modules, named exactly as on Truss
  (`__name__`, `cls.__module__`, tracebacks, `logging.getLogger(__name__)`);
* `sys.modules[name]` holds a `NameProxy` that forwards every attribute to the module of that name
  in the version the caller runs on: the innermost model frame on the caller's stack decides (each
  real module's `__loader__` knows its version), else the version named by `with tr.active():`, else
  the truss that was loaded (or made active) last;
* a version that does not have the module answers ModuleNotFoundError, as its own image would: two
  trusses never see each other's modules.

A spawn worker (multiprocessing, ProcessPoolExecutor) started from model code gets that truss's root
and packages/ on its `sys.path`, so it imports the real files by the same names, as on Truss.
"""

from __future__ import annotations

import contextvars
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from typing import Any, Protocol

MAX_FRAMES = 200  # how far up the stack a lookup looks for model code


class Code(Protocol):
    """What a name resolves to: one version of one truss's code (loader.Version)."""

    tops: frozenset[str]  # the top-level names it provides: 'model', packages/ names, ...

    def module(self, name: str) -> types.ModuleType:
        """The real module `name` of this version, imported now if needed (ModuleNotFoundError if none)."""

    def sys_path(self) -> list[str]:
        """What a spawned worker needs on sys.path to import this code by its names."""


_EXPLICIT: contextvars.ContextVar[Code | None] = contextvars.ContextVar("truss_lab_active", default=None)
_lock = threading.RLock()
_providers: dict[str, list[Any]] = {}  # top-level name -> Spaces providing it, most recently active last


class VersionLoader(importlib.abc.Loader):
    """The `__loader__` of every real module of one version: how a frame's code is traced to its version."""

    def __init__(self, code: Code):
        self.code = code

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        """`importlib.util.module_from_spec(spec)` then `spec.loader.exec_module(m)`: runs this version's source."""
        self.code.exec_module(module)


def caller_code(skip: int = 2) -> Code | None:
    """The version whose code is running on this thread: the innermost frame of a real truss module."""
    try:
        frame = sys._getframe(skip)
    except ValueError:
        return None
    for _ in range(MAX_FRAMES):
        if frame is None:
            return None
        loader = frame.f_globals.get("__loader__")
        if type(loader) is VersionLoader:
            return loader.code
        frame = frame.f_back
    return None


def resolve(top: str) -> Code | None:
    """The version a lookup of a name under `top` answers from (see the module docstring)."""
    code = caller_code(3)
    if code is not None:
        return code
    code = _EXPLICIT.get()
    if code is not None:
        return code
    with _lock:
        spaces = _providers.get(top)
        return spaces[-1].current_code() if spaces else None


def active(code: Code | None):
    """`with active(code):` Truss names used outside model code (a notebook cell's `joblib.load`,
    pydantic resolving a model's forward references while a server parses a body) resolve to `code`.
    Returns the context manager (one that does nothing for None)."""
    import contextlib

    return _Active(code) if code is not None else contextlib.nullcontext()


class _Active:
    def __init__(self, code: Code):
        self.code = code

    def __enter__(self):
        self.token = _EXPLICIT.set(self.code)
        return self.code

    def __exit__(self, *exc):
        _EXPLICIT.reset(self.token)


class NameProxy(types.ModuleType):
    """`sys.modules[name]` for a Truss name: every attribute is the resolved version's module's.

    `import model.helper`, `from model.helper import X`, `importlib.import_module`, pickle's
    `find_class` and `sys.modules[cls.__module__]` all go through it; code that already holds a real
    module (every `import` inside model code binds the real one) never does."""

    def __init__(self, name: str):
        super().__init__(name)
        object.__setattr__(self, "_truss_name", name)
        object.__setattr__(self, "_truss_top", name.partition(".")[0])
        spec = importlib.machinery.ModuleSpec(name, _PROXY_LOADER, is_package=True)
        object.__setattr__(self, "__spec__", spec)

    def _truss_real(self) -> types.ModuleType:
        name = object.__getattribute__(self, "_truss_name")
        code = resolve(object.__getattribute__(self, "_truss_top"))
        if code is None:
            raise ModuleNotFoundError(f"No module named {name!r} (no loaded truss provides it)", name=name)
        return code.module(name)

    def __getattribute__(self, attr: str) -> Any:
        if attr in _OWN:
            return object.__getattribute__(self, attr)
        try:
            real = NameProxy._truss_real(self)
        except ModuleNotFoundError as exc:
            if attr == "__spec__":  # the import system asks whether it is initialising: it is not
                return object.__getattribute__(self, "__spec__")
            # an AttributeError: code that walks sys.modules (`getattr(m, "__file__", None)`) skips it,
            # and `from name import x` still fails with ImportError
            raise AttributeError(f"{exc} (looking up {attr!r})") from None
        try:
            return getattr(real, attr)
        except AttributeError:
            if getattr(real, "__path__", None) is None or attr.startswith("__"):
                raise
            # `import model.helper` once, then `model.helper` in another version: import it there too
            try:
                return _code_of(real).module(f"{real.__name__}.{attr}")
            except ModuleNotFoundError:
                raise AttributeError(f"module {real.__name__!r} has no attribute {attr!r}") from None

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr.startswith("__") and attr.endswith("__"):  # the import system's own (__spec__, __path__, ...): the proxy's
            object.__setattr__(self, attr, value)
            return
        if isinstance(value, NameProxy):  # the import system binding a submodule to its parent: ours already is
            return
        setattr(NameProxy._truss_real(self), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(NameProxy._truss_real(self), attr)

    def __dir__(self):
        try:
            return dir(NameProxy._truss_real(self))
        except ModuleNotFoundError:
            return []

    def __repr__(self) -> str:
        name = object.__getattribute__(self, "_truss_name")
        try:
            return f"<truss name {name!r}: {NameProxy._truss_real(self)!r}>"
        except ModuleNotFoundError:
            return f"<truss name {name!r}: no loaded truss provides it>"


_OWN = frozenset({"_truss_name", "_truss_top", "_truss_real", "__class__", "__repr__", "__dir__",
                  "__setattr__", "__delattr__", "__getattribute__", "__init__", "__reduce__", "__reduce_ex__"})


def _code_of(module: types.ModuleType) -> Code:
    loader = getattr(module, "__loader__", None)
    if type(loader) is not VersionLoader:
        raise ModuleNotFoundError(module.__name__)
    return loader.code


class _ProxyLoader(importlib.abc.Loader):
    """Loads a Truss name the first time anything imports it: the proxy goes in sys.modules, and the
    resolved version imports its real module (or says it has none)."""

    def create_module(self, spec):
        return NameProxy(spec.name)

    def exec_module(self, module):
        NameProxy._truss_real(module)  # ModuleNotFoundError if the version lacks it: the import fails


_PROXY_LOADER = _ProxyLoader()


class TrussNameFinder:
    """On sys.meta_path, first: claims every name under a top-level Truss name (`model.x`, `utils`)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] not in _providers:
            return None
        return importlib.machinery.ModuleSpec(name, _PROXY_LOADER, is_package=True)

    @classmethod
    def invalidate_caches(cls) -> None:
        pass


def register(space: Any, tops: frozenset[str], last: bool = True) -> None:
    """`space` (one LiveModel's code, `current_code()` its serving version) provides `tops`; with
    `last`, it is now the most recently loaded one for each (else it keeps its place). Installs the
    finder, the proxies and the spawn hook once."""
    with _lock:
        for top in tops:
            spaces = _providers.setdefault(top, [])
            if space in spaces:
                if not last:
                    continue
                spaces.remove(space)
            spaces.append(space)
            if not isinstance(sys.modules.get(top), NameProxy):
                sys.modules[top] = NameProxy(top)
        if TrussNameFinder not in sys.meta_path:
            sys.meta_path.insert(0, TrussNameFinder)
        _hook_spawn()


def ensure_proxy(name: str) -> None:
    """`sys.modules[name]` is the proxy for that Truss name (a module a version imported itself:
    `sys.modules[cls.__module__]` must find it before anything imported it by name)."""
    if not isinstance(sys.modules.get(name), NameProxy):
        with _lock:
            if name.partition(".")[0] in _providers and not isinstance(sys.modules.get(name), NameProxy):
                sys.modules[name] = NameProxy(name)


def unregister(space: Any) -> None:
    """`space` is closed: its names resolve to the other trusses that provide them (or to nothing)."""
    with _lock:
        for top in [t for t, spaces in _providers.items() if space in spaces]:
            _providers[top].remove(space)
            if not _providers[top]:
                del _providers[top]
                for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                    if isinstance(sys.modules.get(name), NameProxy):
                        del sys.modules[name]


_spawn_hooked = False


def _hook_spawn() -> None:
    """Spawned workers re-import model code by name: give them the truss's root and packages/."""
    global _spawn_hooked
    if _spawn_hooked:
        return
    import multiprocessing.spawn as spawn

    original = spawn.get_preparation_data

    def get_preparation_data(name):
        data = original(name)
        code = caller_code(2) or _EXPLICIT.get() or _only_code()
        if code is not None:
            extra = code.sys_path()
            data["sys_path"] = [p for p in extra if p not in data.get("sys_path", [])] + list(data.get("sys_path", []))
        return data

    get_preparation_data.__wrapped__ = original
    spawn.get_preparation_data = get_preparation_data
    _spawn_hooked = True


def _only_code() -> Code | None:
    """The serving version of the truss loaded last (a worker started outside model code)."""
    with _lock:
        last = None
        for spaces in _providers.values():
            if spaces:
                last = spaces[-1]
        return last.current_code() if last is not None else None

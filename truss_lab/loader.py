"""Import a Truss's model.py as a module of its own and build its Model, as Truss's model wrapper does.

Each (truss folder, code version) gets its own package name, `_truss_lab.<slug>_<hash>.v<k>`, bound
to the model folder: two trusses that both have `model/model.py` load side by side, relative imports
inside the model folder (`from .helpers import x`) work, and a reload imports into fresh modules.
`packages/` goes on sys.path, as it does in a Truss server.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .bundle import Bundle, Secrets
from .errors import LoadError, describe, user_location

ROOT_PACKAGE = "_truss_lab"
MODEL_KWARGS = ("config", "data_dir", "secrets", "environment")


def _ensure_root() -> None:
    if ROOT_PACKAGE not in sys.modules:
        root = types.ModuleType(ROOT_PACKAGE)
        root.__path__ = []  # a namespace for the per-truss packages
        sys.modules[ROOT_PACKAGE] = root


def package_prefix(bundle: Bundle) -> str:
    slug = re.sub(r"\W", "_", bundle.path.name)[:40] or "truss"
    digest = hashlib.sha1(str(bundle.path).encode()).hexdigest()[:8]
    return f"{ROOT_PACKAGE}.{slug}_{digest}"


def user_roots(bundle: Bundle) -> list[Path]:
    """Where the user's own code lives (for file:line in errors and filtered tracebacks)."""
    return [bundle.path]


def load_error(exc: BaseException, bundle: Bundle, what: str) -> LoadError:
    location = user_location(exc, user_roots(bundle))
    where = f" at {location}" if location else ""
    return LoadError(f"{what} failed{where}: {describe(exc)}", location=location)


def import_model_module(bundle: Bundle, version: int) -> types.ModuleType:
    """Import the model folder as a fresh package and return its model.py module."""
    if not bundle.model_dir.is_dir():
        raise LoadError(f"{bundle.model_dir}: model folder missing (config key 'model_module_dir')")
    if not bundle.model_file.is_file():
        raise LoadError(f"{bundle.model_file}: missing (config key 'model_class_filename')")
    add_packages_to_path(bundle)
    _ensure_root()
    pkg_name = f"{package_prefix(bundle)}_v{version}"
    init_file = bundle.model_dir / "__init__.py"
    mod_name = f"{pkg_name}.{Path(bundle.model_class_filename).stem}"
    try:
        if init_file.is_file():
            spec = importlib.util.spec_from_file_location(
                pkg_name, init_file, submodule_search_locations=[str(bundle.model_dir)]
            )
            pkg = importlib.util.module_from_spec(spec)
            sys.modules[pkg_name] = pkg
            spec.loader.exec_module(pkg)
        else:
            pkg = types.ModuleType(pkg_name)
            pkg.__path__ = [str(bundle.model_dir)]
            sys.modules[pkg_name] = pkg
        spec = importlib.util.spec_from_file_location(mod_name, bundle.model_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        forget_modules(pkg_name)
        raise load_error(exc, bundle, f"importing {bundle.model_class_filename}") from exc
    return module


def forget_modules(pkg_name: str) -> None:
    """Drop a version's package and every module under it from sys.modules."""
    for name in [n for n in sys.modules if n == pkg_name or n.startswith(pkg_name + ".")]:
        del sys.modules[name]


def add_packages_to_path(bundle: Bundle) -> None:
    packages = str(bundle.packages_dir)
    if bundle.packages_dir.is_dir() and packages not in sys.path:
        sys.path.insert(0, packages)


def model_class(bundle: Bundle, module: types.ModuleType) -> type:
    cls = getattr(module, bundle.model_class_name, None)
    if cls is None:
        raise LoadError(
            f"{bundle.model_file}: no class {bundle.model_class_name!r} "
            f"(config key 'model_class_name')"
        )
    if not isinstance(cls, type):
        raise LoadError(f"{bundle.model_file}: {bundle.model_class_name!r} is not a class")
    return cls


@dataclass(frozen=True)
class ModelMethods:
    """What a Model class defines, checked once (as Truss's model wrapper computes its descriptors)."""

    has_preprocess: bool
    has_postprocess: bool
    predict_is_generator: bool

    @classmethod
    def check(cls, bundle: Bundle, model_cls: type) -> "ModelMethods":
        predict = getattr(model_cls, "predict", None)
        if predict is None or not callable(predict):
            raise LoadError(f"{bundle.model_file}: class {model_cls.__name__} has no predict() method")
        is_gen = inspect.isgeneratorfunction(predict) or inspect.isasyncgenfunction(predict)
        has_post = callable(getattr(model_cls, "postprocess", None))
        if is_gen and has_post:
            line = _def_line(model_cls, "postprocess")
            raise LoadError(
                f"{bundle.model_file}{line}: predict is a generator (streaming), so postprocess "
                f"cannot be defined: a Truss server refuses this model"
            )
        return cls(
            has_preprocess=callable(getattr(model_cls, "preprocess", None)),
            has_postprocess=has_post,
            predict_is_generator=is_gen,
        )


def _def_line(cls: type, name: str) -> str:
    try:
        return f":{inspect.getsourcelines(getattr(cls, name))[1]}"
    except (OSError, TypeError):
        return ""


def model_kwargs(bundle: Bundle, secrets: Secrets, environment: Any) -> dict[str, Any]:
    return {
        "config": bundle.config,
        "data_dir": bundle.data_dir,
        "secrets": secrets,
        "environment": environment,
    }


def accepted_kwargs(model_cls: type, available: dict[str, Any]) -> dict[str, Any]:
    """Only the keyword arguments __init__ accepts (all of them if it takes **kwargs)."""
    if model_cls.__init__ is object.__init__:  # no __init__ of its own: takes nothing
        return {}
    try:
        sig = inspect.signature(model_cls.__init__)
    except (TypeError, ValueError):
        return {}
    params = list(sig.parameters.values())[1:]  # drop self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(available)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in available.items() if k in names}


def apply_environment_variables(bundle: Bundle) -> None:
    """Set config.yaml's environment_variables in this process, as the Truss container does."""
    for name, value in bundle.environment_variables.items():
        os.environ[name] = value


def build_instance(bundle: Bundle, model_cls: type, kwargs: dict[str, Any]) -> Any:
    try:
        return model_cls(**accepted_kwargs(model_cls, kwargs))
    except Exception as exc:
        raise load_error(exc, bundle, f"{model_cls.__name__}.__init__") from exc


def run_load(bundle: Bundle, instance: Any, run_coroutine: Callable[[Any], Any]) -> float:
    """Run load() once (sync or async); return its duration in ms."""
    load = getattr(instance, "load", None)
    t0 = time.perf_counter()
    if load is not None:
        try:
            out = load()
            if inspect.isawaitable(out):
                run_coroutine(out)
        except Exception as exc:
            raise load_error(exc, bundle, "load()") from exc
    return (time.perf_counter() - t0) * 1000.0

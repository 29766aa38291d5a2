"""Truss's model-wrapper rules, in one place to hold against Truss's `model_wrapper.py`.

What a Truss server decides about a Model class, once, when it loads: which class, which keyword
arguments `__init__` gets, how `load()` runs, which of preprocess / predict / postprocess exist and
whether predict streams; and, per version of the code, the bound methods a request calls (`Serving`).
The runner (runner.py) executes requests with these; the loader (loader.py) only imports code.
"""

from __future__ import annotations

import inspect
import json
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from .bundle import Bundle, Secrets
from .errors import LoadError
from .jsoncheck import first_non_json
from .loader import load_error

MODEL_KWARGS = ("config", "data_dir", "secrets", "environment")
STREAM_WITH_POSTPROCESS = (
    "If the predict function returns a generator (streaming), you cannot use postprocessing. "
    "Include all processing in the predict method."
)  # Truss's ModelDefinitionError message, word for word


class ModelDefinitionWarning(UserWarning):
    """The model loads, but a Truss server would refuse some or all of its requests."""


class ModelDefinitionError(TypeError):
    """A request the model's own definition makes fail on a Truss server (raised in the stage)."""


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

    @classmethod
    def check(cls, bundle: Bundle, model_cls: type) -> "ModelMethods":
        predict = getattr(model_cls, "predict", None)
        if predict is None or not callable(predict):
            raise LoadError(f"{bundle.model_file}: class {model_cls.__name__} has no predict() method")
        is_gen = inspect.isgeneratorfunction(predict) or inspect.isasyncgenfunction(predict)
        has_post = callable(getattr(model_cls, "postprocess", None))
        if is_gen and has_post:
            # Truss loads this model and answers every request with a 500: so do we, but say so now.
            line = _def_line(model_cls, "postprocess")
            warnings.warn(
                f"{bundle.model_file}{line}: predict is a generator (streaming) and postprocess is "
                f"defined: every request will fail, here as on a Truss server ({STREAM_WITH_POSTPROCESS})",
                ModelDefinitionWarning,
                stacklevel=2,
            )
        return cls(
            has_preprocess=callable(getattr(model_cls, "preprocess", None)),
            has_postprocess=has_post,
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


@dataclass(frozen=True)
class Serving:
    """One version of the model code, bound to a live instance. Replaced whole, never mutated."""

    version: int
    instance: Any
    module: types.ModuleType
    model_cls: type
    preprocess: Callable | None
    predict: Callable
    postprocess: Callable | None

    @classmethod
    def bind(cls, version: int, instance: Any, module, model_cls: type, methods: ModelMethods) -> "Serving":
        return cls(
            version=version,
            instance=instance,
            module=module,
            model_cls=model_cls,
            preprocess=_bound(model_cls, instance, "preprocess") if methods.has_preprocess else None,
            predict=_bound(model_cls, instance, "predict"),
            postprocess=_bound(model_cls, instance, "postprocess") if methods.has_postprocess else None,
        )


def _bound(model_cls: type, instance: Any, name: str) -> Callable:
    """`model_cls.name` bound to `instance` (the class of this version, whatever instance.__class__ is)."""
    attr = inspect.getattr_static(model_cls, name)
    if isinstance(attr, (staticmethod, classmethod)):
        return getattr(model_cls, name)
    return types.MethodType(getattr(model_cls, name), instance)


def share_state(instance: Any, new_cls: type, bundle: Bundle) -> Any:
    """An instance of `new_cls` whose attributes *are* `instance`'s (one shared __dict__, no copy).

    Requests still running on the old instance keep their class; the new one sees the same weights.
    A class with __slots__ has no __dict__ to share: then the class is swapped in place, as Truss does.
    """
    try:
        view = new_cls.__new__(new_cls)
        view.__dict__ = instance.__dict__
        return view
    except (TypeError, AttributeError):
        try:
            instance.__class__ = new_cls
            return instance
        except TypeError as exc:
            raise LoadError(
                f"{bundle.model_file}: cannot move the live model to the new class ({exc}); "
                f"use a full reload: tr.reload(full=True)"
            ) from None


def is_stream(y: Any) -> bool:
    return inspect.isgenerator(y) or inspect.isasyncgen(y)


def refuse_postprocess(s: "Serving", stream: Any) -> None:
    """A stream returned next to a postprocess: Truss fails the request (500); close the stream first."""
    if s.postprocess is not None:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        raise ModelDefinitionError(STREAM_WITH_POSTPROCESS)


def join_chunks(chunks: list[Any]) -> str:
    """A stream as one value, as the Truss server gathers it for `Accept: application/json`: bytes
    joined and decoded, any other chunk as str(chunk)."""
    return b"".join(c if isinstance(c, (bytes, bytearray)) else str(c).encode() for c in chunks).decode()


class _TrussEncoder(json.JSONEncoder):
    """The Truss server's DeepNumpyEncoder: numpy integers, floats and arrays as JSON; NaN as NaN."""

    def default(self, obj: Any) -> Any:
        if type(obj).__module__ == "numpy":
            import numpy as np

            if isinstance(obj, np.integer):
                return int(obj)
            if isinstance(obj, np.floating):
                return float(obj)
            if isinstance(obj, np.ndarray):
                return obj.tolist()
        return super().default(obj)


def is_pydantic(value: Any) -> bool:
    return any(c.__module__.startswith("pydantic") and c.__name__ == "BaseModel" for c in type(value).__mro__)


def truss_json(output: Any) -> str:
    """The JSON body a Truss server sends for `output` (a pydantic model as its own .json())."""
    if is_pydantic(output):
        return output.model_dump_json() if hasattr(output, "model_dump_json") else output.json()
    return json.dumps(output, cls=_TrussEncoder)


def truss_json_check(output: Any) -> tuple[str, str] | None:
    """(path, type) of the first value the Truss server's JSON encoder refuses, or None if it can send it."""
    if is_pydantic(output) or is_response(output):
        return None
    return first_non_json(output, numpy=True)


def is_response(value: Any) -> bool:
    return any(c.__module__.startswith("starlette.") and c.__name__ == "Response" for c in type(value).__mro__)

"""Truss's model-wrapper rules, in one place to hold against Truss's `model_wrapper.py`.

What a Truss server decides about a Model class, once, when it loads: which class, which keyword
arguments `__init__` gets, how `load()` runs, which of preprocess / predict / postprocess exist and
whether predict streams; and, per version of the code, the bound methods a request calls (`Serving`).
The runner (runner.py) executes requests with these; the loader (loader.py) only imports code.
"""

from __future__ import annotations

import copy
import enum
import inspect
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from .bundle import Bundle, Secrets, coerce_int, env_str
from .errors import LoadError, describe
from .loader import load_error
from .serialization import _mro_has

MODEL_KWARGS = ("config", "data_dir", "secrets", "lazy_data_resolver", "environment")
ENDPOINTS = ("chat_completions", "completions", "embeddings", "messages", "responses")  # OpenAI-compatible
ENDPOINT_ROUTES = {
    "chat_completions": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "messages": "/v1/messages",
    "responses": "/v1/responses",
}
METHOD_NAMES = ("preprocess", "predict", "postprocess", *ENDPOINTS, "is_healthy", "setup_environment", "websocket")
STREAM_WITH_POSTPROCESS = (
    "If the predict function returns a generator (streaming), you cannot use postprocessing. "
    "Include all processing in the predict method."
)  # Truss's ModelDefinitionError message, word for word
RESPONSE_WITH_POSTPROCESS = "If the predict function returns a response object, you cannot use postprocessing."


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


class ArgConfig(enum.Enum):
    """Which arguments a model method takes, decided from its signature as Truss's ArgConfig does."""

    NONE = enum.auto()
    INPUTS_ONLY = enum.auto()
    REQUEST_ONLY = enum.auto()
    INPUTS_AND_REQUEST = enum.auto()


_NONE, _INPUTS_ONLY, _REQUEST_ONLY = ArgConfig.NONE, ArgConfig.INPUTS_ONLY, ArgConfig.REQUEST_ONLY


@dataclass(frozen=True)
class MethodSpec:
    """One model method as Truss's MethodDescriptor sees it."""

    name: str
    args: ArgConfig
    is_async: bool
    is_generator: bool


@dataclass(frozen=True)
class ModelMethods:
    """What a Model class defines, checked once with Truss's rules (its ModelDescriptor.from_model).

    A definition Truss refuses is refused here at load, with Truss's reason.
    """

    specs: dict[str, MethodSpec]
    input_type: type | None = None  # a pydantic model the body is parsed into (Truss's TrussSchema)
    skip_input_parsing: bool = False  # predict (and preprocess, if any) take only the request: Truss never parses the body

    @property
    def has_preprocess(self) -> bool:
        return "preprocess" in self.specs

    @property
    def has_postprocess(self) -> bool:
        return "postprocess" in self.specs

    @property
    def endpoints(self) -> list[str]:
        """The OpenAI-compatible methods this model defines (each has its own route)."""
        return [m for m in ENDPOINTS if m in self.specs]

    @classmethod
    def check(cls, bundle: Bundle, model_cls: type) -> "ModelMethods":
        def refuse(message: str, name: str | None = None) -> LoadError:
            line = _def_line(model_cls, name) if name else ""
            return LoadError(f"{bundle.model_file}{line}: {message}")

        specs: dict[str, MethodSpec] = {}
        for name in METHOD_NAMES:
            if not callable(getattr(model_cls, name, None)):
                continue
            try:
                specs[name] = _method_spec(model_cls, name)
            except ModelDefinitionError as exc:
                raise refuse(str(exc), name) from None
        # The rules below are Truss's ModelDescriptor.from_model, its messages word for word.
        healthy, ws, pred, pre, post = (specs.get(n) for n in ("is_healthy", "websocket", "predict", "preprocess", "postprocess"))
        if healthy and healthy.args is not ArgConfig.NONE:
            raise refuse("`is_healthy` must have only one argument: `self`.", "is_healthy")
        if ws and (pred or pre or post):
            raise refuse(
                "Truss model cannot have both `websocket` and any of `predict`, `preprocess`, or `postprocess methods.",
                "websocket",
            )
        if not (ws or pred):
            raise refuse(f"class {model_cls.__name__}: Truss model must have a `predict` or `websocket` method.")
        if ws:
            if ws.args is not ArgConfig.INPUTS_ONLY:
                raise refuse("`websocket` must have only one argument: `websocket`.", "websocket")
            if not ws.is_async:
                raise refuse("`websocket` endpoints must be async function definitions.", "websocket")
        else:
            if pre and pred.args is ArgConfig.REQUEST_ONLY:
                raise refuse(
                    "When using `preprocess`, the predict method cannot only have the request argument "
                    "(because the result of `preprocess` would be  discarded).",
                    "predict",
                )
            if post and post.args is ArgConfig.REQUEST_ONLY:
                raise refuse(
                    "The `postprocess` method cannot only have the request argument (because the result "
                    "of `predict` would be discarded).",
                    "postprocess",
                )
        if pred and pred.is_generator and post:
            # Truss loads this model and answers every request with a 500: so do we, but say so now.
            warn_at(
                f"{bundle.model_file}{_def_line(model_cls, 'postprocess')}: predict is a generator (streaming) and "
                f"postprocess is defined: every request will fail, here as on a Truss server ({STREAM_WITH_POSTPROCESS})",
                ModelDefinitionWarning, bundle, model_cls, "postprocess",
            )
        input_type = None
        if pred and not ws:
            first = _bound_signature(model_cls, "preprocess" if pre else "predict").parameters
            params = list(first.values())
            if params and _is_pydantic_class(params[0].annotation):
                input_type = params[0].annotation
        skip = bool(pred and pred.args is ArgConfig.REQUEST_ONLY and (not pre or pre.args is ArgConfig.REQUEST_ONLY))
        return cls(specs=specs, input_type=input_type, skip_input_parsing=skip)


def _bound_signature(model_cls: type, name: str) -> inspect.Signature:
    """The signature of `name` as called on an instance (no `self`), as Truss inspects the live model."""
    attr = inspect.getattr_static(model_cls, name)
    sig = inspect.signature(getattr(model_cls, name))
    if isinstance(attr, (staticmethod, classmethod)) or not inspect.isfunction(attr):
        return sig
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def _method_spec(model_cls: type, name: str) -> MethodSpec:
    """Truss's ArgConfig.from_method and MethodDescriptor, for one method."""
    fn = getattr(model_cls, name)
    sig = _bound_signature(model_cls, name)
    params = list(sig.parameters.values())
    if len(params) == 0:
        args = ArgConfig.NONE
    elif len(params) == 1:
        args = ArgConfig.REQUEST_ONLY if _is_request_type(params[0].annotation) else ArgConfig.INPUTS_ONLY
    elif len(params) == 2:
        first, second = params
        if first.annotation and _is_request_type(first.annotation):
            raise ModelDefinitionError(
                f"`{name}` method with two arguments is not allowed to have request as first argument, "
                f"request must be second. Got: {sig}"
            )
        if not (second.annotation and _is_request_type(second.annotation)):
            raise ModelDefinitionError(
                f"`{name}` method with two arguments must have request as second argument (type annotated). Got: {sig} "
            )
        args = ArgConfig.INPUTS_AND_REQUEST
    else:
        raise ModelDefinitionError(f"`{name}` method cannot have more than two arguments. Got: {sig}")
    return MethodSpec(
        name=name,
        args=args,
        is_async=inspect.iscoroutinefunction(fn),
        is_generator=inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
    )


def _is_request_type(annotation: Any) -> bool:
    return _mro_has(annotation, "starlette.requests", "Request")


def _is_pydantic_class(annotation: Any) -> bool:
    return _mro_has(annotation, "pydantic", "BaseModel")


def _def_line(cls: type, name: str) -> str:
    try:
        return f":{inspect.getsourcelines(getattr(cls, name))[1]}"
    except (OSError, TypeError):
        return ""


def warn_at(message: str, category: type[Warning], bundle: Bundle, cls: type, name: str) -> None:
    """Warn at the model's own `def name` (where the user looks, and where the filter's once-per-place
    applies), never at the truss_lab line that noticed."""
    target = inspect.unwrap(getattr(cls, name, None) or cls)
    try:
        path, line = inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (OSError, TypeError):
        path, line = None, 1
    warnings.warn_explicit(message, category, path or str(bundle.model_file), line,
                           module=getattr(cls, "__module__", None))


# Every config key the Truss server's model gets, with its default: TrussConfig (truss 0.18.36) writes
# them all into the image's config.yaml. tests/conformance compares `truss_config` with Truss's own.
TRUSS_CONFIG_DEFAULTS: dict[str, Any] = {'apply_library_patches': True,
 'base_image': None,
 'bdn': {'access': [], 'hotload': {'enabled': False}, 'mounts': []},
 'bis_llm': None,
 'build': {'arguments': {}, 'model_server': 'TrussServer', 'no_cache': False, 'secret_to_path_mapping': {}},
 'build_commands': [],
 'bundled_packages_dir': 'packages',
 'cache_internal': [],
 'data_dir': 'data',
 'description': None,
 'docker_server': None,
 'environment_variables': {},
 'examples_filename': 'examples.yaml',
 'external_data': None,
 'external_package_dirs': [],
 'input_type': 'Any',
 'live_reload': False,
 'model_cache': [],
 'model_class_filename': 'model.py',
 'model_class_name': 'Model',
 'model_framework': 'custom',
 'model_metadata': {},
 'model_module_dir': 'model',
 'model_type': 'Model',
 'python_version': 'py313',
 'requirements': [],
 'requirements_file': None,
 'resources': {'accelerator': None, 'cpu': '1', 'memory': '2Gi', 'use_gpu': False},
 'runtime': {'egress_restrictions': None,
             'enable_debug_logs': False,
             'enable_tracing_data': False,
             'health_checks': {'restart_check_delay_seconds': None,
                               'restart_threshold_seconds': None,
                               'startup_threshold_seconds': None,
                               'stop_traffic_threshold_seconds': None},
             'is_websocket_endpoint': False,
             'oidc': {'enabled': None},
             'predict_concurrency': 1,
             'remote_ssh': {'enabled': False},
             'streaming_read_timeout': 60,
             'transport': {'kind': 'http'},
             'truss_server_version_override': None},
 'secrets': {},
 'spec_version': '2.0',
 'system_packages': [],
 'training_checkpoints': None,
 'trt_llm': None,
 'use_local_src': False,
 'weights': []}


def truss_config(config: dict) -> dict:
    """`config` as the Truss server hands it to the model: every default filled in (nested mappings
    merged), `predict_concurrency` as an int and environment variable values as strings."""
    out = _merge(TRUSS_CONFIG_DEFAULTS, config)
    runtime = out.get("runtime")
    if isinstance(runtime, dict):
        runtime["predict_concurrency"] = coerce_int(runtime.get("predict_concurrency"), 1)
    env = out.get("environment_variables")
    if isinstance(env, dict):
        out["environment_variables"] = {str(k): env_str(v) for k, v in env.items()}
    return out


def _merge(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is None and isinstance(out.get(key), (dict, list)):
            continue  # `key:` left empty in YAML: Truss keeps the default
        else:
            out[key] = copy.deepcopy(value)
    return out


def model_kwargs(bundle: Bundle, secrets: Secrets, environment: Any) -> dict[str, Any]:
    return {
        "config": truss_config(bundle.config),
        "data_dir": bundle.data_dir,
        "secrets": secrets,
        "lazy_data_resolver": LazyDataResolver(bundle.data_dir),
        "environment": environment,
    }


class LazyDataResolver:
    """What Truss passes as `lazy_data_resolver`. Truss downloads `model_cache`/`weights` in the
    background only when the image has a bptr manifest, which a local run never has: as on a Truss
    server without one, there is nothing to wait for and `block_until_download_complete()` returns ""."""

    def __init__(self, data_dir):
        self._data_dir = data_dir

    def block_until_download_complete(self, log_stats: bool = True, issue_collect: bool = True) -> str:
        return ""

    def raise_if_not_collected(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"LazyDataResolver({str(self._data_dir)!r}: no remote data to fetch)"


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
    except (Exception, SystemExit) as exc:
        raise load_error(exc, bundle, f"{model_cls.__name__}.__init__") from exc


LOAD_RETRIES = 1  # Truss's NUM_LOAD_RETRIES_TRUSS default: a failing load() is tried once more


def run_load(bundle: Bundle, instance: Any, run_coroutine: Callable[[Any], Any], methods: ModelMethods | None = None,
             environment: Any = None) -> float:
    """Run load() as the Truss server does; return its duration in ms.

    setup_environment(environment) first, when the model has one and there is an environment; then
    load(), retried LOAD_RETRIES times after a failure, 1 s apart (Truss's retry). An `async def
    load` is never awaited by the Truss server: its body does not run there, so it does not run here
    either, and a ModelDefinitionWarning says so.
    """
    t0 = time.perf_counter()
    if methods is not None and "setup_environment" in methods.specs and environment is not None:
        try:
            out = instance.setup_environment(environment)
            if inspect.isawaitable(out):
                run_coroutine(out)
        except (Exception, SystemExit) as exc:
            raise load_error(exc, bundle, "setup_environment()") from exc
    load = getattr(instance, "load", None)
    if load is None:
        return (time.perf_counter() - t0) * 1000.0
    if inspect.iscoroutinefunction(load):
        warn_at(
            f"{bundle.model_file}{_def_line(type(instance), 'load')}: load() is `async def`: the Truss server "
            f"calls it without awaiting it, so its body never runs there - and truss_lab does not run it "
            f"either. Make it a plain `def load(self)`.",
            ModelDefinitionWarning, bundle, type(instance), "load",
        )
    for attempt in range(LOAD_RETRIES + 1):
        try:
            out = load()
            if inspect.iscoroutine(out):
                out.close()  # never awaited on Truss; closed here so Python does not warn a second time
            break
        except (Exception, SystemExit) as exc:
            if attempt == LOAD_RETRIES:
                raise load_error(exc, bundle, "load()") from exc
            warn_at(f"{bundle.model_name}: load() failed ({describe(exc)}); retrying once, as Truss does",
                    RuntimeWarning, bundle, type(instance), "load")
            time.sleep(1.0)
    return (time.perf_counter() - t0) * 1000.0


@dataclass(frozen=True)
class Serving:
    """One version of the model code, bound to a live instance. Replaced whole, never mutated."""

    version: int
    instance: Any
    module: types.ModuleType
    model_cls: type
    methods: ModelMethods
    bound: dict[str, Callable]  # method name -> bound method, for every method in `methods.specs`
    code: Any = None  # what this version put into process-wide registries (live.Held)

    @classmethod
    def bind(cls, version: int, instance: Any, module, model_cls: type, methods: ModelMethods, code: Any = None) -> "Serving":
        bound = {name: _bound(model_cls, instance, name) for name in methods.specs}
        return cls(version, instance, module, model_cls, methods, bound, code)

    @property
    def preprocess(self) -> Callable | None:
        return self.bound.get("preprocess")

    @property
    def predict(self) -> Callable | None:
        return self.bound.get("predict")

    @property
    def postprocess(self) -> Callable | None:
        return self.bound.get("postprocess")

    def call(self, name: str, inputs: Any, request: Callable[[], Any]) -> Any:
        """Call method `name` with the arguments its signature asks for; `request()` makes the request
        object only when the method takes one. (Every request runs this: no enum or dict work here.)"""
        fn = self.bound[name]
        args = self.methods.specs[name].args
        if args is _INPUTS_ONLY:
            return fn(inputs)
        if args is _NONE:
            return fn()
        if args is _REQUEST_ONLY:
            return fn(request())
        return fn(inputs, request())


def _bound(model_cls: type, instance: Any, name: str) -> Callable:
    """`model_cls.name` bound to `instance` (the class of this version, whatever instance.__class__ is)."""
    attr = inspect.getattr_static(model_cls, name)
    if isinstance(attr, (staticmethod, classmethod)):
        return getattr(model_cls, name)
    return types.MethodType(getattr(model_cls, name), instance)


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


def is_http_exception(exc: Any) -> bool:
    """FastAPI's HTTPException, which the Truss server passes through with its status."""
    return _mro_has(type(exc), "fastapi", "HTTPException")

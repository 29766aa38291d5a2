"""Serialisation as the Truss server does it (its `templates/shared/serialization.py` and the JSON and
pydantic parts of its model wrapper): the JSON body (numpy-aware, pydantic models as their own JSON),
msgpack bodies, the pydantic input a method's signature names, and the schema of typed I/O.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Callable, get_args, get_origin

from .jsoncheck import first_non_json


def _mro_has(obj: Any, module_prefix: str, class_name: str) -> bool:
    """Whether `obj` is a class with `module_prefix...class_name` among its bases (without importing it)."""
    return isinstance(obj, type) and any(
        c.__module__.startswith(module_prefix) and c.__name__ == class_name for c in obj.__mro__
    )


# ------------------------------------------------------------------------------ JSON


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
    return _type_kind(type(value)) == "pydantic"


@functools.lru_cache(maxsize=1024)
def _type_kind(cls: type) -> str:
    """"pydantic", "response" or "": per output type, once (every request asks)."""
    if _mro_has(cls, "pydantic", "BaseModel"):
        return "pydantic"
    if _mro_has(cls, "starlette.", "Response"):
        return "response"
    return ""


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
    return _type_kind(type(value)) == "response"


# ------------------------------------------------------------------------------ typed input


def parse_input(input_type: type | None, inputs: Any) -> Any:
    """`inputs` as the pydantic model `input_type` (Truss parses the body into it); as is without one."""
    if input_type is None or isinstance(inputs, input_type):
        return inputs
    return _validated(getattr(input_type, "model_validate", None) or input_type.parse_obj, inputs)


def parse_input_json(input_type: type, body: bytes) -> Any:
    """The raw body parsed into the pydantic model, as the Truss server does (`parse_raw`)."""
    return _validated(getattr(input_type, "model_validate_json", None) or input_type.parse_raw, body)


def _validated(validate: Callable[[Any], Any], value: Any) -> Any:
    """`validate(value)`, a pydantic ValidationError turned into Truss's InputParsingError (its 400 text)."""
    try:
        return validate(value)
    except Exception as exc:
        if type(exc).__name__ == "ValidationError":
            raise InputParsingError(pydantic_error_text(exc)) from exc
        raise


class InputParsingError(ValueError):
    """The input does not validate against the model's pydantic input type (Truss answers 400)."""


def pydantic_error_text(exc: Any) -> str:
    """Truss's format_pydantic_validation_error, word for word."""
    parts = ["Input Parsing Error:" if exc.error_count() == 1 else "Input Parsing Errors:"]
    try:
        for error in exc.errors(include_url=False, include_input=False):
            loc = "".join(
                (("." if i > 0 else "") + x) if isinstance(x, str) else f"[{x}]" for i, x in enumerate(error["loc"])
            )
            msg = error["msg"] or str({k: v for k, v in error.items() if k != "loc"})
            parts.append(f"  `{loc}`: {msg}.")
    except Exception:
        return f"Input Parsing Error, {exc}"
    return "\n".join(parts)


# ------------------------------------------------------------------------------ msgpack


def _msgpack_encoder(obj: Any) -> Any:
    import datetime as dt
    import decimal
    import uuid

    import msgpack_numpy

    if isinstance(obj, dt.datetime):
        r = obj.isoformat()
        return {b"__dt_datetime_iso__": True, b"data": r[:-6] + "Z" if r.endswith("+00:00") else r}
    if isinstance(obj, dt.date):
        return {b"__dt_date_iso__": True, b"data": obj.isoformat()}
    if isinstance(obj, dt.time):
        if obj.utcoffset() is not None:
            raise ValueError("Cannot represent timezone-aware times.")
        return {b"__dt_time_iso__": True, b"data": obj.isoformat()}
    if isinstance(obj, dt.timedelta):
        return {b"__dt_timedelta__": True, b"data": (obj.days, obj.seconds, obj.microseconds)}
    if isinstance(obj, decimal.Decimal):
        return {b"__decimal__": True, b"data": str(obj)}
    if isinstance(obj, uuid.UUID):
        return {b"__uuid__": True, b"data": str(obj)}
    return msgpack_numpy.encode(obj)


def _msgpack_decoder(obj: dict) -> Any:
    import datetime as dt
    import decimal
    import uuid

    import msgpack_numpy

    if obj.get(b"nd") is True and obj.get(b"kind") == b"O":
        raise ValueError("unsupported payload")
    try:
        if b"__dt_datetime_iso__" in obj:
            return dt.datetime.fromisoformat(obj[b"data"])
        if b"__dt_date_iso__" in obj:
            return dt.date.fromisoformat(obj[b"data"])
        if b"__dt_time_iso__" in obj:
            return dt.time.fromisoformat(obj[b"data"])
        if b"__dt_timedelta__" in obj:
            days, seconds, microseconds = obj[b"data"]
            return dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)
        if b"__decimal__" in obj:
            return decimal.Decimal(obj[b"data"])
        if b"__uuid__" in obj:
            return uuid.UUID(obj[b"data"])
    except KeyError:
        pass
    return msgpack_numpy.decode(obj)


def truss_msgpack_serialize(obj: Any) -> bytes:
    """A `application/octet-stream` answer body as the Truss server packs it (numpy arrays included)."""
    import msgpack

    return msgpack.packb(obj, default=_msgpack_encoder)


def truss_msgpack_deserialize(data: bytes) -> Any:
    """A `application/octet-stream` request body as the Truss server unpacks it."""
    import msgpack

    return msgpack.unpackb(data, object_hook=_msgpack_decoder)


# ------------------------------------------------------------------------------ the schema of typed I/O (Truss's TrussSchema)


def _is_pydantic_model_class(annotation: Any) -> bool:
    return _mro_has(annotation, "pydantic", "BaseModel")


def _is_generator_type(annotation: Any) -> bool:
    from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator

    origin = get_origin(annotation)
    return isinstance(origin, type) and issubclass(origin, (Generator, AsyncGenerator, Iterator, AsyncIterator))


def _awaited(annotation: Any) -> Any:
    from collections.abc import Awaitable

    origin = get_origin(annotation)
    if isinstance(origin, type) and issubclass(origin, Awaitable):
        (inner,) = get_args(annotation)
        return inner if _is_pydantic_model_class(inner) else None
    return None


def output_type(annotation: Any) -> tuple[type | None, bool] | None:
    """(pydantic output type, supports streaming) from a return annotation, Truss's four cases: a
    model, a generator, an awaitable of a model, a union of a model (or its awaitable) and a generator."""
    import typing

    if _is_pydantic_model_class(annotation):
        return annotation, False
    if _is_generator_type(annotation):
        return None, True
    if _awaited(annotation) is not None:
        return _awaited(annotation), False
    if get_origin(annotation) is typing.Union:
        args = get_args(annotation)
        models = [_awaited(a) or a for a in args if _awaited(a) is not None or _is_pydantic_model_class(a)]
        generators = [a for a in args if _is_generator_type(a)]
        if len(args) == 2 and len(models) == 1 and len(generators) == 1:
            return models[0], True
    return None


def truss_schema(model_cls: type, input_type: type | None) -> dict | None:
    """What `GET /v1/models/{name}/schema` answers: the input and output JSON schemas of a model with
    typed I/O (input from the first stage's first parameter, output from the last stage's return
    annotation), None when it has neither - as the Truss server computes it."""
    last = "postprocess" if callable(getattr(model_cls, "postprocess", None)) else "predict"
    try:
        annotation = inspect.signature(getattr(model_cls, last)).return_annotation
    except (TypeError, ValueError, AttributeError):
        annotation = inspect.Signature.empty
    out = output_type(annotation) if annotation is not inspect.Signature.empty else None
    if input_type is None and out is None:
        return None

    def schema(cls: type | None) -> dict | None:
        if cls is None:
            return None
        return cls.model_json_schema() if hasattr(cls, "model_json_schema") else cls.schema()

    return {"input_schema": schema(input_type), "output_schema": schema(out[0]) if out else None,
            "supports_streaming": out[1] if out else None}

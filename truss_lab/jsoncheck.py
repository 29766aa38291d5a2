"""Would a Truss server be able to send this output as JSON? Find the first value that would not."""

from __future__ import annotations

from typing import Any

_SCALARS = (str, int, float, bool, type(None))


def type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


MAX_DEPTH = 900  # json.dumps raises RecursionError a little deeper than this
MAX_VALUES = 1_000_000  # beyond this the check stops (the encoder itself will still tell)
_EXIT = object()


def first_non_json(value: Any, path: str = "", numpy: bool = False) -> tuple[str, str] | None:
    """(path, type name) of the first value json.dumps would refuse, e.g. ('predictions[0][3]', 'numpy.float32').

    `numpy=True`: numpy integers, floats and numeric arrays pass, as the Truss server's JSON encoder
    (`DeepNumpyEncoder`: int(), float(), .tolist()) sends them; numpy.bool_ does not.

    Bounded: a container that contains itself is reported ("circular reference"), as is nesting deeper
    than the encoder can go; after MAX_VALUES values the check stops. It never hangs.
    """
    stack: list[tuple[str, Any, int]] = [(path, value, 0)]
    active: set[int] = set()  # containers on the path from the root to here
    seen = 0
    while stack:
        where, v, depth = stack.pop()
        if where is _EXIT:
            active.discard(v)
            continue
        seen += 1
        if seen > MAX_VALUES:
            return None
        t = type(v)
        if t in _SCALARS:
            continue
        if t is list or t is tuple or t is dict:
            if id(v) in active:
                return (where or "<output>", f"{t.__name__} (circular reference: it contains itself)")
            if depth >= MAX_DEPTH:
                return (where or "<output>", f"{t.__name__} (nested more than {MAX_DEPTH} levels deep)")
            active.add(id(v))
            stack.append((_EXIT, id(v), depth))
            if t is dict:
                items = []
                for k, item in v.items():
                    if not isinstance(k, _SCALARS):  # json takes subclasses as keys too (numpy.str_, numpy.float64)
                        return (f"{where}[{k!r}] (key)", type_name(k))
                    items.append((f"{where}.{k}" if where else str(k), item, depth + 1))
                stack.extend(reversed(items))
            else:
                stack.extend((f"{where}[{i}]", item, depth + 1) for i, item in reversed(list(enumerate(v))))
        elif isinstance(v, _SCALARS):  # subclasses (IntEnum, numpy.float64 is a float subclass)
            continue
        elif numpy and t.__module__ == "numpy":
            kind = _numpy_kind(v)
            if kind == "object array":  # only these can hold something the encoder refuses
                stack.append((where, v.tolist(), depth))
            elif kind == "other":
                return (where or "<output>", type_name(v))
        else:
            return (where or "<output>", type_name(v))
    return None


def _numpy_kind(v: Any) -> str:
    import numpy as np  # only reached for a numpy value, so numpy is already imported

    if isinstance(v, np.ndarray):
        # bool/int/uint/float/str arrays .tolist() to JSON scalars: accept them without converting
        return "number" if v.dtype.kind in "biufU" else "object array"
    if isinstance(v, (np.integer, np.floating)):
        return "number"
    return "other"

"""Plain-text forms of values: stable one-line summaries for terminals, `repr` and nbval."""

from __future__ import annotations

import json
import threading
from typing import Any

from ..jsoncheck import type_name

MAX_TEXT = 400


def short(value: Any, limit: int = MAX_TEXT) -> str:
    """A compact one-value summary: arrays by shape/dtype/range, bytes by length, long text cut.

    Any value a model may return shows: pydantic models, dataclasses, datetimes, sets and objects of
    its own become JSON-like values or, at worst, their (cut) `repr`. Never recursive, always bounded."""
    arr = array_info(value)
    if arr is not None:
        return arr
    if isinstance(value, (bytes, bytearray)):
        kind = image_kind(bytes(value[:12]))
        return f"<{len(value)} bytes{' ' + kind if kind else ''}>"
    if is_pil(value):
        return f"<PIL image {value.mode} {value.size[0]}x{value.size[1]}>"
    try:
        text = json.dumps(summarised(value), ensure_ascii=False, default=json_fallback)
    except (TypeError, ValueError, RecursionError):
        text = safe_repr(value, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_fallback(value: Any) -> Any:
    """json.dumps's `default`: a JSON-able stand-in for a value it cannot encode (never `value` itself,
    so the encoder cannot loop)."""
    plainer = plain_value(value)
    if plainer is not _NO_PLAIN:
        return summarised(plainer, 1)
    arr = array_info(value)
    if arr is not None:
        return arr
    if isinstance(value, (bytes, bytearray)) or is_pil(value):
        return short(value, 80)
    return safe_repr(value, 80)


_NO_PLAIN = object()


def plain_value(value: Any) -> Any:
    """The JSON-like value behind a pydantic model, a dataclass, a datetime, a set, an enum or a numpy
    scalar; `_NO_PLAIN` for anything else."""
    import dataclasses
    import datetime
    import enum
    import uuid
    from decimal import Decimal
    from pathlib import PurePath

    dump = getattr(value, "model_dump", None)  # pydantic v2
    if callable(dump) and not isinstance(value, type):
        try:
            return dump(mode="json")
        except Exception:
            return _NO_PLAIN
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        except Exception:
            return _NO_PLAIN
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return f"{value.total_seconds():g} s"
    if isinstance(value, (set, frozenset)):
        items = list(value)[:51]
        try:
            items.sort()
        except TypeError:
            pass
        return items
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, (str, int, float)) else value.name
    if isinstance(value, (uuid.UUID, Decimal, PurePath)):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "shape", None) == ():
        try:
            return item()
        except Exception:
            return _NO_PLAIN
    return _NO_PLAIN


def safe_repr(value: Any, limit: int = MAX_TEXT) -> str:
    """`repr(value)`, cut to `limit`; a repr that raises (or recurses) says so instead."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<{type(value).__qualname__} object (repr too deep)>"
    except Exception as exc:  # a model's own __repr__ may fail: still show something
        text = f"<{type(value).__qualname__} object (repr failed: {type(exc).__name__})>"  # short: it may be cut
    return text if len(text) <= limit else text[: limit - 3] + "..."


def array_info(value: Any) -> str | None:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not hasattr(value, "min"):
        return None
    try:
        rng = f" min={float(value.min()):.4g} max={float(value.max()):.4g}" if getattr(value, "size", 0) else ""
    except (TypeError, ValueError):
        rng = ""
    return f"{type_name(value)} shape={tuple(shape)} dtype={dtype}{rng}"


def summarised(value: Any, depth: int = 0, budget: list[int] | None = None) -> Any:
    """Long lists of numbers become a one-line summary; nesting is kept down to MAX_DEPTH levels, a
    container is cut after MAX_ITEMS entries, and at most MAX_NODES values are visited (display only:
    the value itself is untouched)."""
    budget = [MAX_NODES] if budget is None else budget
    budget[0] -= 1
    if depth > MAX_DEPTH or budget[0] < 0:
        return "..."
    if isinstance(value, (list, tuple, dict)):
        if id(value) in _ON_PATH.ids:
            return "<circular reference>"
        _ON_PATH.ids.add(id(value))
        try:
            return _summarised_container(value, depth, budget)
        finally:
            _ON_PATH.ids.discard(id(value))
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    plainer = plain_value(value)
    return value if plainer is _NO_PLAIN else summarised(plainer, depth + 1, budget)


class _Path(threading.local):
    def __init__(self) -> None:
        self.ids: set[int] = set()


_ON_PATH = _Path()  # containers being summarised on this thread's path from the root (cycles)


def _summarised_container(value: Any, depth: int, budget: list[int]) -> Any:
    if isinstance(value, (list, tuple)):
        n = len(value)
        if 20 < n <= MAX_SCAN and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return f"[{n} numbers, min {min(value):.4g}, max {max(value):.4g}]"
        if n > MAX_ITEMS:
            return [summarised(v, depth + 1, budget) for v in value[:20]] + [f"... {n - 20} more"]
        return [summarised(v, depth + 1, budget) for v in value]
    if isinstance(value, dict):
        out = {}
        for i, (k, v) in enumerate(value.items()):
            if i == MAX_ITEMS:
                out["..."] = f"{len(value) - MAX_ITEMS} more"
                break
            out[k if isinstance(k, str) else short(k, 80)] = summarised(v, depth + 1, budget)
        return out


MAX_DEPTH = 20
MAX_ITEMS = 50
MAX_SCAN = 100_000
MAX_NODES = 2_000


def timing_table(trace) -> str:
    rows = [
        ("preprocess", trace.pre_ms),
        ("lock wait", trace.lock_wait_ms),
        ("predict", trace.predict_ms),
        ("postprocess", trace.post_ms),
        ("total", trace.total_ms),
    ]
    return "\n".join(f"  {name:<12}{ms:>10.2f} ms" for name, ms in rows)


def result_text(result) -> str:
    t = result.trace
    head = f"Result from {result.model_name or 'model'} v{t.version}"
    if result.error is not None:
        return f"{head}: {result.error.stage} error\n  {result.error}"
    lines = [f"{head}: ok in {t.total_ms:.1f} ms", f"  output: {short(result.output)}"]
    if t.chunks is not None:
        lines.append(f"  streamed {t.chunks} chunks")
    lines.extend(f"  warning: {w}" for w in t.warnings)
    lines.extend(f"  lock misuse: {f.message}" for f in t.findings)
    return "\n".join(lines)


def plain(value: Any) -> str:
    from ..reload import ReloadEvent
    from ..trace import Result
    from ..trace import Report, Trace

    if isinstance(value, Result):
        return result_text(value)
    if isinstance(value, Trace):
        return value.summary()
    if isinstance(value, Report):
        return value.table()
    if isinstance(value, ReloadEvent):
        return value.summary()
    from ..examples import ExamplesDiff

    if isinstance(value, ExamplesDiff):
        return str(value)
    from ..profile import Profile

    if isinstance(value, Profile):
        return value.text()
    return repr(value)


def image_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "size")


"""Plain-text forms of values: stable one-line summaries for terminals, `repr` and nbval."""

from __future__ import annotations

import json
from typing import Any

from ..jsoncheck import type_name

MAX_TEXT = 400


def short(value: Any, limit: int = MAX_TEXT) -> str:
    """A compact one-value summary: arrays by shape/dtype/range, bytes by length, long text cut."""
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
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_fallback(value: Any) -> str:
    return short(value, 80)


def array_info(value: Any) -> str | None:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not hasattr(value, "min"):
        return None
    try:
        rng = f" min={float(value.min()):.4g} max={float(value.max()):.4g}" if getattr(value, "size", 0) else ""
    except (TypeError, ValueError):
        rng = ""
    return f"{type_name(value)} shape={tuple(shape)} dtype={dtype}{rng}"


def summarised(value: Any, depth: int = 0) -> Any:
    """Long lists of numbers become a one-line summary; nesting is kept."""
    if isinstance(value, (list, tuple)):
        if len(value) > 20 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return f"[{len(value)} numbers, min {min(value):.4g}, max {max(value):.4g}]"
        if len(value) > 50:
            return [summarised(v, depth + 1) for v in value[:20]] + [f"... {len(value) - 20} more"]
        return [summarised(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): summarised(v, depth + 1) for k, v in value.items()}
    return value


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
    from ..runner import Result
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


"""Turn truss_lab values into MIME bundles: `text/plain` always (stable, for nbval and terminals)."""

from __future__ import annotations

import json
from typing import Any

from .jsoncheck import type_name

MAX_TEXT = 400


def short(value: Any, limit: int = MAX_TEXT) -> str:
    """A compact one-value summary: arrays by shape/dtype/range, long text cut."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None and hasattr(value, "min"):
        try:
            rng = f" min={float(value.min()):.4g} max={float(value.max()):.4g}" if value.size else ""
        except (TypeError, ValueError):
            rng = ""
        return f"{type_name(value)} shape={tuple(shape)} dtype={dtype}{rng}"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    try:
        text = json.dumps(value, ensure_ascii=False, default=_fallback)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fallback(value: Any) -> str:
    return short(value, 80)


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
    return "\n".join(lines)


def bundle(value: Any) -> dict[str, str]:
    """The MIME bundle for a Result, Trace or Report."""
    return {"text/plain": plain(value)}


def plain(value: Any) -> str:
    from .runner import Result
    from .trace import Report, Trace

    if isinstance(value, Result):
        return result_text(value)
    if isinstance(value, Trace):
        return value.summary()
    if isinstance(value, Report):
        return value.table()
    return repr(value)

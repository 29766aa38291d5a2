"""Turn truss_lab values into MIME bundles: `text/plain` always (stable, for nbval and terminals) and
`text/html` for notebooks. Every string that comes from a model goes through `esc()`.

Images are found wherever they sit in an input or output: numpy HxW / HxWx1|3|4 (uint8, or float in
[0, 1] or [-1, 1] as `preprocess_input` gives) and batches of one, PIL images, PNG/JPEG bytes, data
URIs and image file paths. They are shown as an inline PNG (scaled down when big) with shape and dtype.
A {label: score} mapping (or a list of {label, score} dicts) is drawn as sorted bars.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .jsoncheck import type_name

MAX_TEXT = 400
MAX_IMAGE_SIDE = 256  # displayed size; the PNG itself is at most 2x that
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
LABEL_KEYS = ("label", "class", "name", "category")
SCORE_KEYS = ("score", "probability", "prob", "confidence", "percent", "percentage")
STAGE_COLOURS = {
    "preprocess": "#4e79a7",
    "lock_wait": "#bab0ac",
    "predict": "#e15759",
    "postprocess": "#59a14f",
}
STAGE_LABELS = {"preprocess": "pre", "lock_wait": "lock wait", "predict": "predict", "postprocess": "post"}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ----------------------------------------------------------------------------------- text


def short(value: Any, limit: int = MAX_TEXT) -> str:
    """A compact one-value summary: arrays by shape/dtype/range, bytes by length, long text cut."""
    arr = _array_info(value)
    if arr is not None:
        return arr
    if isinstance(value, (bytes, bytearray)):
        kind = _image_kind(bytes(value[:12]))
        return f"<{len(value)} bytes{' ' + kind if kind else ''}>"
    if _is_pil(value):
        return f"<PIL image {value.mode} {value.size[0]}x{value.size[1]}>"
    try:
        text = json.dumps(_summarised(value), ensure_ascii=False, default=_fallback)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fallback(value: Any) -> str:
    return short(value, 80)


def _array_info(value: Any) -> str | None:
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not hasattr(value, "min"):
        return None
    try:
        rng = f" min={float(value.min()):.4g} max={float(value.max()):.4g}" if getattr(value, "size", 0) else ""
    except (TypeError, ValueError):
        rng = ""
    return f"{type_name(value)} shape={tuple(shape)} dtype={dtype}{rng}"


def _summarised(value: Any, depth: int = 0) -> Any:
    """Long lists of numbers become a one-line summary; nesting is kept."""
    if isinstance(value, (list, tuple)):
        if len(value) > 20 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return f"[{len(value)} numbers, min {min(value):.4g}, max {max(value):.4g}]"
        if len(value) > 50:
            return [_summarised(v, depth + 1) for v in value[:20]] + [f"... {len(value) - 20} more"]
        return [_summarised(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _summarised(v, depth + 1) for k, v in value.items()}
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
    from .reload import ReloadEvent
    from .runner import Result
    from .trace import Report, Trace

    if isinstance(value, Result):
        return result_text(value)
    if isinstance(value, Trace):
        return value.summary()
    if isinstance(value, Report):
        return value.table()
    if isinstance(value, ReloadEvent):
        return value.summary()
    return repr(value)


def bundle(value: Any) -> dict[str, str]:
    """The MIME bundle for a Result, Trace, Report or ReloadEvent."""
    return {"text/plain": plain(value), "text/html": to_html(value)}


# ----------------------------------------------------------------------------------- html


def to_html(value: Any) -> str:
    from .reload import ReloadEvent
    from .runner import Result
    from .trace import Report, Trace

    if isinstance(value, Result):
        return result_html(value)
    if isinstance(value, Trace):
        return f'<div class="truss-lab-trace">{timing_bar(value)}</div>'
    if isinstance(value, Report):
        return report_html(value)
    if isinstance(value, ReloadEvent):
        return reload_html(value)
    return f"<pre>{esc(repr(value))}</pre>"


_STYLE = (
    "<style>"
    ".truss-lab{font-family:var(--jp-ui-font-family,sans-serif);font-size:13px;max-width:960px}"
    ".truss-lab .tl-cols{display:flex;gap:16px;align-items:flex-start}"
    ".truss-lab .tl-col{flex:1;min-width:0;border:1px solid #ddd;border-radius:4px;padding:6px}"
    ".truss-lab .tl-head{font-weight:600;margin:2px 0 6px}"
    ".truss-lab .tl-muted{color:#666;font-size:11px}"
    ".truss-lab pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:12px}"
    ".truss-lab table{border-collapse:collapse}"
    ".truss-lab td,.truss-lab th{padding:1px 6px;text-align:right;border-bottom:1px solid #eee}"
    ".truss-lab td.k{text-align:left;vertical-align:top;color:#555}"
    ".truss-lab .tl-warn{border:1px solid #e0a800;background:#fff8e1;color:#6d4c00;border-radius:4px;"
    "padding:4px 6px;margin-top:6px}"
    ".truss-lab .tl-warn ul{margin:2px 0 0 16px;padding:0}"
    ".truss-lab .tl-error{border:1px solid #d33;background:#fdecea;color:#8a1c1c;border-radius:4px;padding:6px}"
    "</style>"
)


def result_html(result) -> str:
    token = _SEARCH_DIRS.set(tuple(getattr(result, "search_dirs", ())))
    try:
        return _result_html(result)
    finally:
        _SEARCH_DIRS.reset(token)


def _result_html(result) -> str:
    t = result.trace
    status = "ok" if result.ok else f"{esc(result.error.stage)} error"
    head = (
        f'<div class="tl-head">{esc(result.model_name or "model")} '
        f'<span class="tl-muted">v{t.version} · {status} · {t.total_ms:.1f} ms</span></div>'
    )
    if result.ok:
        right = value_html(result.output)
        warns = "".join(f'<div class="tl-muted">⚠ {esc(w)}</div>' for w in t.warnings)
        right += warns
    else:
        right = error_html(result.error)
    right += findings_html(t.findings)
    body = (
        '<div class="tl-cols">'
        f'<div class="tl-col"><div class="tl-head">input</div>{value_html(result.input, labels=False)}</div>'
        f'<div class="tl-col"><div class="tl-head">output</div>{right}</div>'
        "</div>"
    )
    return f'<div class="truss-lab truss-lab-result">{_STYLE}{head}{body}{timing_bar(t)}</div>'


def findings_html(findings) -> str:
    """Lock-misuse findings (guard.py) as an amber note: the advice is the point, so say it plainly."""
    if not findings:
        return ""
    return misuse_panel([f.message for f in findings])


def misuse_panel(lines: list[str]) -> str:
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return f'<div class="tl-warn"><b>lock misuse</b><ul>{items}</ul></div>' if items else ""


def error_html(error) -> str:
    where = f" at {esc(error.location)}" if getattr(error, "location", None) else ""
    tb = error.model_traceback() if hasattr(error, "model_traceback") else None
    detail = f"<details><summary>model traceback</summary><pre>{esc(tb)}</pre></details>" if tb else ""
    return (
        f'<div class="tl-error"><b>{esc(error.stage)} error</b>{where}'
        f"<pre>{esc(error)}</pre>{detail}</div>"
    )


def timing_bar(trace, width: int = 480) -> str:
    """One stacked bar: pre / lock wait / predict / post, in ms, with the lock's share marked."""
    parts = [
        ("preprocess", trace.pre_ms),
        ("lock_wait", trace.lock_wait_ms),
        ("predict", trace.predict_ms),
        ("postprocess", trace.post_ms),
    ]
    total = sum(ms for _, ms in parts) or 1.0
    segs = []
    for stage, ms in parts:
        if ms <= 0:
            continue
        pct = 100.0 * ms / total
        segs.append(
            f'<div title="{STAGE_LABELS[stage]}: {ms:.2f} ms" style="width:{pct:.3f}%;'
            f'background:{STAGE_COLOURS[stage]};height:14px"></div>'
        )
    lock_share = 100.0 * (trace.lock_wait_ms + trace.predict_ms) / total
    legend = " · ".join(
        f'<span style="color:{STAGE_COLOURS[s]}">■</span> {STAGE_LABELS[s]} {ms:.2f} ms' for s, ms in parts
    )
    return (
        f'<div class="truss-lab-timing" style="margin-top:6px">'
        f'<div style="display:flex;width:{width}px;max-width:100%;border:1px solid #ccc">{"".join(segs)}</div>'
        f'<div class="tl-muted">{legend} · total {trace.total_ms:.2f} ms · '
        f"lock (wait + predict) {lock_share:.0f}% of the stages</div></div>"
    )


def reload_html(event) -> str:
    colour = {"methods": "#2e7d32", "full": "#1565c0", "unchanged": "#666", "failed": "#c62828"}[event.kind]
    return (
        f'<div class="truss-lab truss-lab-reload" style="color:{colour};font-family:monospace;font-size:12px">'
        f"⟳ {esc(event.summary())}</div>"
    )


def report_html(report) -> str:
    from .trace import STAGES

    if not report.count:
        return f'<div class="truss-lab truss-lab-report">{_STYLE}<div class="tl-muted">{esc(report.table())}</div></div>'

    rows = "".join(
        f"<tr><td class='k'>{name}</td>"
        + "".join(f"<td>{getattr(report.stages[name], k):.2f}</td>" for k in ("mean", "p50", "p95", "p99", "max"))
        + "</tr>"
        for name in STAGES
    )
    from .plots import timeline

    failures = ", ".join(f"{esc(k)} {v}" for k, v in sorted(report.failures.items())) or "none"
    head = f"{report.count} requests · failures: {failures}"
    if getattr(report, "concurrency", None):
        head = f"bench {esc(report.label)} · {report.concurrency} workers · " + head
    waits = report.lock_wait_distribution() if report.count else []
    most = max((n for _, n in waits), default=0) or 1
    wait_rows = "".join(
        f"<tr><td class='k'>{esc(label)}</td><td style='text-align:left;width:160px'>"
        f"<div style='background:{STAGE_COLOURS['lock_wait']};height:10px;width:{100 * n / most:.1f}%'></div></td>"
        f"<td>{n}</td></tr>"
        for label, n in waits
    )
    misuse = misuse_panel(
        [f"{n} requests: {report.finding_messages[kind]}" for kind, n in sorted(report.findings.items())]
    )
    picture = timeline(report, last=200).svg() if report.traces else ""
    return (
        f'<div class="truss-lab truss-lab-report">{_STYLE}'
        f'<div class="tl-head">{head}</div>'
        '<div class="tl-cols"><div>'
        f"<table><tr><th class='k'>ms</th><th>mean</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>{rows}</table>"
        "</div><div><div class='tl-muted'>lock wait (requests)</div>"
        f"<table>{wait_rows}</table></div></div>"
        f'<div style="margin-top:4px">throughput <b>{report.throughput:.2f}</b> req/s · bound {report.bound:.2f} req/s '
        f"(lock {report.lock_size} / mean predict) · efficiency <b>{report.efficiency:.2f}</b> · "
        f"lock utilization {report.lock_utilization:.0%} · max holders {report.max_lock_holders}/{report.lock_size}</div>"
        f"{misuse}{picture}</div>"
    )


# ----------------------------------------------------------------------------------- values


def value_html(value: Any, depth: int = 0, labels: bool = True) -> str:
    """Render one value: images, label bars (outputs only: `labels`), nested dicts, else collapsible JSON.

    An input like {"top_k": 5} is a parameter, not a score table, so inputs never get bars.
    """
    img = image_html(value)
    if img is not None:
        return img
    bars = label_bars_html(value) if labels else None
    if bars is not None:
        return bars
    arr = _array_info(value)
    if arr is not None:
        return f"<pre>{esc(arr)}</pre>"
    if isinstance(value, (bytes, bytearray)):
        return f"<pre>{esc(short(value))}</pre>"
    def rich(v: Any) -> bool:
        return image_array(v) is not None or _is_image_ref(v) or (labels and _labels(v) is not None)

    if isinstance(value, dict) and depth < 3 and value and any(rich(v) for v in value.values()):
        rows = "".join(
            f"<tr><td class='k'>{esc(k)}</td><td style='text-align:left'>{value_html(v, depth + 1, labels)}</td></tr>"
            for k, v in value.items()
        )
        return f"<table>{rows}</table>"
    if isinstance(value, (list, tuple)) and 0 < len(value) <= 8 and depth < 3 and any(rich(v) for v in value):
        return "".join(f"<div>{value_html(v, depth + 1, labels)}</div>" for v in value)
    if isinstance(value, str) and len(value) <= MAX_TEXT:
        return f"<pre>{esc(json.dumps(value, ensure_ascii=False))}</pre>"
    text = json.dumps(_summarised(value), indent=1, ensure_ascii=False, default=_fallback)
    if len(text) <= 300:
        return f"<pre>{esc(text)}</pre>"
    return f"<details><summary>{esc(short(value, 80))}</summary><pre>{esc(text)}</pre></details>"


def label_bars_html(value: Any) -> str | None:
    pairs = _labels(value)
    if pairs is None:
        return None
    top = max((abs(s) for _, s in pairs), default=1.0) or 1.0
    rows = "".join(
        f"<tr><td class='k'>{esc(label)}</td>"
        f"<td style='text-align:left;width:220px'><div style='background:#4e79a7;height:12px;"
        f"width:{max(0.0, 100.0 * score / top):.1f}%'></div></td><td>{_num(score)}</td></tr>"
        for label, score in pairs
    )
    return f'<table class="truss-lab-labels">{rows}</table>'


def _num(x: float) -> str:
    return f"{x:.2f}" if abs(x) >= 1 else f"{x:.4f}"


def _labels(value: Any) -> list[tuple[str, float]] | None:
    """[(label, score)] sorted by score, from {label: score} or [{label:..., score:...}], else None."""
    pairs = None
    if isinstance(value, dict) and 1 <= len(value) <= 50:
        if all(isinstance(k, str) for k in value) and all(_is_number(v) for v in value.values()):
            pairs = [(k, float(v)) for k, v in value.items()]
    elif isinstance(value, list) and 1 <= len(value) <= 50 and all(isinstance(d, dict) for d in value):
        found = []
        for d in value:
            label = next((d[k] for k in LABEL_KEYS if k in d), None)
            score = next((d[k] for k in SCORE_KEYS if k in d), None)
            if label is None or not _is_number(score):
                return None
            found.append((str(label), float(score)))
        pairs = found
    if pairs is None:
        return None
    return sorted(pairs, key=lambda p: -p[1])


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    try:
        return isinstance(v, (int, float)) or (hasattr(v, "dtype") and getattr(v, "shape", None) == () and math.isfinite(float(v)))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------- images


def _image_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "size")


def _is_image_ref(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return _image_kind(bytes(value[:12])) is not None
    if isinstance(value, str):
        if value.startswith("data:image/"):
            return True
        return _image_path(value) is not None
    return _is_pil(value)


# Relative image paths in a Result are looked up here too (the truss's data/ and root), so an example
# input such as {"image": "samples/3.png"} shows as the picture it names.
_SEARCH_DIRS: ContextVar[tuple[Path, ...]] = ContextVar("truss_lab_render_dirs", default=())


def _image_path(value: str) -> Path | None:
    if len(value) >= 4096 or Path(value).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [path, *(d / path for d in _SEARCH_DIRS.get())]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        except OSError:
            continue
    return None


def image_array(value: Any):
    """`value` as an HxW or HxWxC array if it looks like an image, else None."""
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or not hasattr(value, "__array__"):
        return None
    shape = tuple(shape)
    while len(shape) == 4 and shape[0] == 1:  # a batch of one
        value, shape = value[0], shape[1:]
    if len(shape) == 3 and shape[-1] not in (1, 3, 4):
        return None
    if len(shape) not in (2, 3) or min(shape[:2]) < 8:
        return None
    if getattr(dtype, "kind", "") not in "uif":
        return None
    import numpy as np

    return np.asarray(value)


def to_uint8(arr):
    """Scale an image array to uint8: uint8 as is, floats in [0,1] or [-1,1], anything else min-max."""
    import numpy as np

    if arr.dtype == np.uint8:
        out = arr
    else:
        a = arr.astype(np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if lo >= 0 and hi <= 1:
            a = a * 255
        elif lo >= -1 and hi <= 1:
            a = (a + 1) * 127.5
        elif lo >= 0 and hi <= 255:
            pass
        else:
            a = (a - lo) / ((hi - lo) or 1) * 255
        out = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
    if out.ndim == 3 and out.shape[-1] == 1:
        out = out[..., 0]
    return out


def _png_img(png: bytes, caption: str, width: int, height: int) -> str:
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height, 1))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    if max(width, height) < 64:  # tiny images (digits) are shown bigger, pixelated
        f = 128 / max(width, height)
        w, h = round(width * f), round(height * f)
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure style="margin:0"><img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
        f'style="image-rendering:pixelated;border:1px solid #ddd" alt="{esc(caption)}"/>'
        f'<figcaption class="tl-muted">{esc(caption)}</figcaption></figure>'
    )


def _encode_pil(img) -> bytes:
    if max(img.size) > 2 * MAX_IMAGE_SIDE:
        img = img.copy()
        img.thumbnail((2 * MAX_IMAGE_SIDE, 2 * MAX_IMAGE_SIDE))
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_html(value: Any) -> str | None:
    """An <img> for anything image-like, else None. Never fetches a URL."""
    arr = image_array(value)
    if arr is not None:
        from PIL import Image

        shape, dtype = tuple(getattr(value, "shape")), getattr(value, "dtype")
        img = Image.fromarray(to_uint8(arr))
        return _png_img(_encode_pil(img), f"{type_name(value)} {shape} {dtype}", img.size[0], img.size[1])
    if not _is_image_ref(value):
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        if _is_pil(value):
            img, caption = value, f"PIL image {value.mode} {value.size[0]}x{value.size[1]}"
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(bytes(value)))
            caption = f"{len(value)} bytes {img.format} {img.size[0]}x{img.size[1]}"
        elif value.startswith("data:image/"):
            payload = value.split(",", 1)[1]
            raw = base64.b64decode(payload)
            img = Image.open(io.BytesIO(raw))
            caption = f"data URI {img.format} {img.size[0]}x{img.size[1]}"
        else:
            img = Image.open(_image_path(value))
            caption = f"{Path(value).name} {img.format} {img.size[0]}x{img.size[1]}"
        img.load()
        return _png_img(_encode_pil(img), caption, img.size[0], img.size[1])
    except (UnidentifiedImageError, OSError, ValueError, IndexError) as exc:
        return f'<pre>{esc(short(value, 80))} (not a readable image: {esc(exc)})</pre>'

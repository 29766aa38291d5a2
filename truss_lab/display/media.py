"""Values drawn as HTML: images wherever they sit in an input or output, label bars, collapsible JSON.

Images: numpy HxW / HxWx1|3|4 (uint8, or float in [0, 1] or [-1, 1] as `preprocess_input` gives) and
batches of one, PIL images, PNG/JPEG bytes, data URIs and image file paths, shown as an inline PNG
(scaled down when big) with shape and dtype. A {label: score} mapping (or a list of {label, score}
dicts) is drawn as sorted bars. Every string that comes from a model goes through `esc()`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

from ..jsoncheck import type_name
from .style import esc
from .text import MAX_TEXT, array_info, image_kind, is_pil, json_fallback, safe_repr, short, summarised

MAX_IMAGE_SIDE = 256  # displayed size; the PNG itself is at most 2x that
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"}
LABEL_KEYS = ("label", "class", "name", "category")
SCORE_KEYS = ("score", "probability", "prob", "confidence", "percent", "percentage")


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
    arr = array_info(value)
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
    try:
        text = json.dumps(summarised(value), indent=1, ensure_ascii=False, default=json_fallback)
    except (TypeError, ValueError, RecursionError):
        text = safe_repr(value)
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


def _is_image_ref(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return image_kind(bytes(value[:12])) is not None
    if isinstance(value, str):
        if value.startswith("data:image/"):
            return True
        return _image_path(value) is not None
    return is_pil(value)


# Relative image paths in a Result are looked up here too (the truss's data/ and root), so an example
# input such as {"image": "samples/3.png"} shows as the picture it names.
_SEARCH_DIRS: ContextVar[tuple[Path, ...]] = ContextVar("truss_lab_render_dirs", default=())


@contextlib.contextmanager
def search_dirs(dirs: tuple[Path, ...]) -> Iterator[None]:
    """Look up relative image paths in `dirs` too while drawing (a Result's truss data/ and root)."""
    token = _SEARCH_DIRS.set(tuple(dirs))
    try:
        yield
    finally:
        _SEARCH_DIRS.reset(token)


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
        if is_pil(value):
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

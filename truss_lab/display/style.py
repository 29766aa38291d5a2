"""What every drawing of truss_lab's values shares: HTML escaping, stage colours, the CSS."""

from __future__ import annotations

import html
from typing import Any

STAGE_COLOURS = {
    "preprocess": "#4e79a7",
    "lock_wait": "#bab0ac",
    "predict": "#e15759",
    "predict_idle": "#f4b6b7",  # the part of predict (the lock held) not computing: drawn lighter, hatched
    "postprocess": "#59a14f",
}
STAGE_LABELS = {"preprocess": "pre", "lock_wait": "lock wait", "predict": "predict",
                "predict_idle": "predict, idle", "postprocess": "post"}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


STYLE = (
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

"""Where two JSON-like values differ: paths with both values, numbers within a tolerance, NaN equal to NaN.

Used by `truss-lab check` (Truss server vs truss_lab) and by the examples diff (before vs after a save).
"""

from __future__ import annotations

import json
import math
from typing import Any

RTOL, ATOL = 1e-6, 1e-9
MISSING = "<missing>"


def diff_paths(a: Any, b: Any, rtol: float = RTOL, atol: float = ATOL, limit: int = 20, path: str = "") -> list[tuple[str, Any, Any]]:
    """Up to `limit` (path, a value, b value) where `a` and `b` differ, in document order."""
    out: list[tuple[str, Any, Any]] = []
    _walk(a, b, rtol, atol, limit, path, out)
    return out


def first_difference(a: Any, b: Any, rtol: float = RTOL, atol: float = ATOL) -> tuple[str, Any, Any] | None:
    found = diff_paths(a, b, rtol, atol, limit=1)
    return found[0] if found else None


def _walk(a: Any, b: Any, rtol: float, atol: float, limit: int, path: str, out: list) -> None:
    if len(out) >= limit:
        return
    if isinstance(a, bool) or isinstance(b, bool):
        if not (type(a) is type(b) and a == b):
            out.append((path, a, b))
        return
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=atol):
            out.append((path, a, b))
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            where = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                out.append((where, a.get(k, MISSING), b.get(k, MISSING)))
            else:
                _walk(a[k], b[k], rtol, atol, limit, where, out)
            if len(out) >= limit:
                return
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append((f"{path} (length)", len(a), len(b)))
            return
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, rtol, atol, limit, f"{path}[{i}]", out)
            if len(out) >= limit:
                return
        return
    if a != b:
        out.append((path, a, b))


def rank_changes(a: Any, b: Any, limit: int = 10) -> list[str]:
    """For top-k outputs ({label: score} mappings, or lists of {label, score}): 'seven: #1 -> #2' for
    each label whose rank moved (a label that entered or left the list too). [] for anything else."""
    ra, rb = _ranking(a), _ranking(b)
    if ra is None or rb is None:
        return []
    out = []
    for label in list(ra) + [x for x in rb if x not in ra]:
        before, after = ra.get(label), rb.get(label)
        if before != after:
            out.append(f"{label}: {'#' + str(before) if before else 'absent'} -> {'#' + str(after) if after else 'absent'}")
        if len(out) >= limit:
            break
    return out


def _ranking(value: Any) -> dict[str, int] | None:
    if isinstance(value, dict) and len(value) == 1:  # {"predictions": {...}} and the like
        inner = next(iter(value.values()))
        if isinstance(inner, (dict, list)):
            found = _ranking(inner)
            if found is not None:
                return found
    pairs = None
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
        pairs = list(value.items())
    elif isinstance(value, list) and value and all(isinstance(x, dict) and "label" in x and "score" in x for x in value):
        pairs = [(x["label"], x["score"]) for x in value]
    if pairs is None:
        return None
    ordered = sorted(pairs, key=lambda kv: -float(kv[1]))
    return {str(label): i + 1 for i, (label, _) in enumerate(ordered)}


def short_json(value: Any, limit: int = 60) -> str:
    """`value` as JSON on one line (bytes and what JSON cannot hold as repr), cut to `limit` characters."""
    if isinstance(value, (bytes, bytearray)):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"

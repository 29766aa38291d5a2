"""Turn truss_lab's values (Result, Trace, Report, ReloadEvent) into MIME bundles: `text/plain` always
(stable, for nbval and terminals; see text.py) and `text/html` for notebooks. Every string that comes
from a model goes through `esc()`.
"""

from __future__ import annotations

from typing import Any

from .media import search_dirs, value_html
from ..jsondiff import short_json
from .style import STAGE_COLOURS, STAGE_LABELS, STYLE, esc
from .text import plain


def bundle(value: Any) -> dict[str, str]:
    """The MIME bundle for a Result, Trace, Report or ReloadEvent."""
    return {"text/plain": plain(value), "text/html": to_html(value)}


# ----------------------------------------------------------------------------------- html


def to_html(value: Any) -> str:
    from ..reload import ReloadEvent
    from ..trace import Result
    from ..trace import Report, Trace

    if isinstance(value, Result):
        return result_html(value)
    if isinstance(value, Trace):
        return f'<div class="truss-lab-trace">{timing_bar(value)}</div>'
    if isinstance(value, Report):
        return report_html(value)
    if isinstance(value, ReloadEvent):
        return reload_html(value)
    from ..examples import ExamplesDiff

    if isinstance(value, ExamplesDiff):
        return examples_diff_html(value)
    from ..profile import Profile

    if isinstance(value, Profile):
        return profile_html(value)
    return f"<pre>{esc(repr(value))}</pre>"


def profile_html(profile, n: int = 8) -> str:
    """Per stage: its time per request, its call tree (the truss's code expanded, library calls folded)
    with a bar of each call's share, then - where the tree nests - the hot spots with total and own time
    (every name escaped)."""
    from .style import STAGE_COLOURS

    per = 1000.0 / max(1, profile.count)
    num = "style='white-space:nowrap'"

    def row(name: str, location: str, library: bool, seconds: float, own: float, share: float, colour: str, level: int = 0) -> str:
        return (f"<tr><td class='k' style='padding-left:{0.3 + 1.2 * level:.1f}em;white-space:nowrap'>{esc(name)}</td>"
                f"<td style='text-align:left;color:#666'>{esc(location)}{' <i>(library)</i>' if library else ''}</td>"
                f"<td style='text-align:left;width:140px'><div style='background:{colour};height:10px;width:{100 * min(1.0, share):.1f}%'></div></td>"
                f"<td {num}>{share:.1%}</td><td {num}>{seconds * per:.2f} ms</td><td {num} class='tl-muted'>{own * per:.2f} ms</td></tr>")

    parts = [f"<div class='tl-muted'>{esc(profile.text().splitlines()[0])}</div>"]
    head = "<tr><th></th><th></th><th></th><th>share</th><th>total</th><th>self</th></tr>"
    for stage in ("preprocess", "lock_wait", "predict", "postprocess"):
        colour = STAGE_COLOURS.get(stage, "#999")
        if stage == "lock_wait":
            parts.append(f"<div style='margin-top:6px'><b>lock wait</b> {profile.stage_seconds(stage) * per:.2f} ms/request "
                         "<span class='tl-muted'>(measured by the trace, not sampled)</span></div>")
            continue
        if not profile.sessions.get(stage):
            continue
        total = profile.stage_seconds(stage) or 1e-12
        title = f"<div style='margin-top:6px'><b>{esc(stage)}</b> {total * per:.2f} ms/request</div>"
        tree = profile.tree_rows(stage)
        if not tree:
            parts.append(title + f"<div class='tl-muted'>{esc(profile.unsampled(stage))}</div>")
            continue
        rows = "".join(row(node.function, node.location, node.library, node.seconds, node.self_seconds, node.seconds / total, colour, level)
                       for level, node in tree)
        if profile.nested(stage):
            rows += (f"<tr><td colspan='6' class='tl-muted' style='text-align:left;padding-top:4px'>hot spots: "
                     f"the functions {esc(stage)} spends its time in, by total time</td></tr>")
            rows += "".join(row(h.function, h.location, h.library, h.seconds, h.self_seconds, h.share, colour)
                            for h in profile.hotspots(stage, n))
        parts.append(f"{title}<table>{head}{rows}</table>")
    body = "".join(parts)
    return f'<div class="truss-lab truss-lab-profile">{STYLE}{body}</div>'


STATUS_COLOURS = {"unchanged": "#666", "changed": "#ef6c00", "now failing": "#c62828", "fixed": "#2e7d32",
                  "still failing": "#c62828", "new": "#1565c0", "removed": "#666",
                  "first run": "#1565c0"}


def examples_diff_html(d) -> str:
    """An ExamplesDiff: one row per example - status, changed paths or rank moves, stage times old -> new."""
    rows = []
    for c in d.changes:
        colour = STATUS_COLOURS.get(c.status, "#333")
        what = "; ".join(esc(r) for r in c.ranks) if c.ranks else "; ".join(
            f"<code>{esc(p or '<output>')}</code>: {esc(short_json(a))} → {esc(short_json(b))}" for p, a, b in c.paths[:5])
        if c.error:
            what = (what + " " if what else "") + f"<span style='color:#c62828'>{esc(c.error)}</span>"
        pictures = _image_pair(c.old, c.new) if c.status == "changed" else None
        if pictures:
            what = pictures + what
        times = ", ".join(f"{esc(s)} {a:.1f} → {b:.1f} ms" for s, (a, b) in c.stage_ms.items())
        rows.append(f"<tr><td style='text-align:left'>{esc(c.name)}</td><td style='color:{colour};text-align:left'>"
                    f"<b>{esc(c.status)}</b></td><td style='text-align:left'>{what}</td><td>{times}</td></tr>")
    return (f'<div class="truss-lab truss-lab-examples-diff">{STYLE}<div class="tl-head">{esc(d.summary())}</div>'
            f"<table>{''.join(rows)}</table></div>")


def _image_pair(old, new) -> str | None:
    """Old and new side by side when an example's output is an image (a data URI, or an HxW[xC] array
    sent as nested lists); None otherwise."""
    from .media import image_html

    def picture(value):
        found = image_html(value)
        if found is None and isinstance(value, list):
            try:
                import numpy as np

                found = image_html(np.asarray(value))
            except (ValueError, TypeError):
                found = None
        return found

    a, b = picture(old), picture(new)
    if a is None or b is None:
        return None
    return (f"<div style='display:flex;gap:8px;align-items:flex-start'><div>before<br>{a}</div>"
            f"<div>after<br>{b}</div></div>")


def result_html(result) -> str:
    with search_dirs(getattr(result, "search_dirs", ())):
        return _result_html(result)


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
    return f'<div class="truss-lab truss-lab-result">{STYLE}{head}{body}{timing_bar(t)}</div>'


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
    colour = {"methods": "#2e7d32", "full": "#1565c0", "examples": "#6a1b9a", "unchanged": "#666", "failed": "#c62828"}[event.kind]
    return (
        f'<div class="truss-lab truss-lab-reload" style="color:{colour};font-family:monospace;font-size:12px">'
        f"⟳ {esc(event.summary())}</div>"
    )


def report_html(report) -> str:
    from ..trace import STAGES

    if not report.count:
        return f'<div class="truss-lab truss-lab-report">{STYLE}<div class="tl-muted">{esc(report.table())}</div></div>'

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
        f'<div class="truss-lab truss-lab-report">{STYLE}'
        f'<div class="tl-head">{head}</div>'
        '<div class="tl-cols"><div>'
        f"<table><tr><th class='k'>ms</th><th>mean</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>{rows}</table>"
        "</div><div><div class='tl-muted'>lock wait (requests)</div>"
        f"<table>{wait_rows}</table></div></div>"
        f'<div style="margin-top:4px">throughput <b>{report.throughput:.2f}</b> req/s · bound {report.bound:.2f} req/s '
        f"(lock {report.lock_size} / mean predict) · efficiency <b>{report.efficiency:.2f}</b> · "
        f"lock utilization {report.lock_utilization:.0%} · max holders {report.max_lock_holders}/{report.lock_size}</div>"
        f'<div><b>{esc(report.idle_sentence())}</b>'
        + (f" · compute bound {report.compute_bound:.2f} req/s (if predict only computed)" if report.compute_bound == report.compute_bound else "")
        + "</div>"
        f"{misuse}{picture}{profile_html(report.profile) if getattr(report, 'profile', None) is not None else ''}</div>"
    )

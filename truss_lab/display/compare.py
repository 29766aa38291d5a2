"""Two runs side by side: `truss_lab.compare(report_a, report_b)`.

For the questions the lock raises: what did moving the download from predict to preprocess buy? What
does a lock of 2 do against a lock of 1? Each figure is shown for both runs with the ratio b / a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .style import STYLE, esc
from ..trace import Report

# (name, unit, how to read it from a Report, True when higher is better, None: no verdict)
# A verdict only where a higher (or lower) value is better for the same workload whatever the design:
# utilization and efficiency are measured against each run's own bound (from its own predict time, a
# download inside predict included), so they are shown without one.
METRICS = (
    ("throughput", "req/s", lambda r: r.throughput, True),
    ("latency p50", "ms", lambda r: r.stages["total"].p50, False),
    ("latency p95", "ms", lambda r: r.stages["total"].p95, False),
    ("lock wait p95", "ms", lambda r: r.stages["lock_wait"].p95, False),
    ("predict mean", "ms", lambda r: r.stages["predict"].mean, False),
    ("lock held idle", "%", lambda r: 100.0 * r.lock_idle_share, False),
    ("compute bound", "req/s", lambda r: r.compute_bound, None),
    ("lock utilization", "%", lambda r: 100.0 * r.lock_utilization, None),
    ("efficiency", "", lambda r: r.efficiency, None),
    ("failures", "", lambda r: float(sum(r.failures.values())), False),
)


@dataclass
class Row:
    name: str
    unit: str
    a: float
    b: float
    higher_is_better: bool | None

    @property
    def ratio(self) -> float:
        if self.a == 0 or math.isnan(self.a) or math.isnan(self.b):
            return math.nan
        return self.b / self.a

    @property
    def verdict(self) -> str:
        """'better', 'worse' or '' (within 5 %, or a figure that is neither)."""
        r = self.ratio
        if self.higher_is_better is None or math.isnan(r) or abs(r - 1) < 0.05:
            return ""
        return "better" if (r > 1) == self.higher_is_better else "worse"


@dataclass
class Comparison:
    a: Report
    b: Report
    labels: tuple[str, str]
    rows: list[Row]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    @property
    def throughput_ratio(self) -> float:
        return self.row("throughput").ratio

    def table(self) -> str:
        la, lb = self.labels
        width = max(12, len(la), len(lb))
        lines = [f"{'':<18}{la:>{width}}{lb:>{width}}{'b / a':>9}"]
        for r in self.rows:
            unit = f" {r.unit}" if r.unit else ""
            lines.append(
                f"{r.name + unit:<18}{_num(r.a):>{width}}{_num(r.b):>{width}}{_ratio(r.ratio):>9}"
                + (f"  {r.verdict}" if r.verdict else "")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": self.table(), "text/html": self.html()}

    def html(self) -> str:
        from .plots import timeline

        la, lb = (esc(x) for x in self.labels)
        colour = {"better": "#2e7d32", "worse": "#c62828", "": "#666"}
        rows = "".join(
            f"<tr><td class='k'>{esc(r.name)}{' (' + esc(r.unit) + ')' if r.unit else ''}</td>"
            f"<td>{_num(r.a)}</td><td>{_num(r.b)}</td>"
            f"<td style='color:{colour[r.verdict]}'><b>{_ratio(r.ratio)}</b> {r.verdict}</td></tr>"
            for r in self.rows
        )
        pics = "".join(
            f'<div class="tl-col"><div class="tl-head">{label}</div>{timeline(rep).svg(width=460)}</div>'
            for label, rep in ((la, self.a), (lb, self.b))
            if rep.traces
        )
        return (
            f'<div class="truss-lab truss-lab-compare">{STYLE}'
            f"<table><tr><th class='k'></th><th>{la}</th><th>{lb}</th><th>b / a</th></tr>{rows}</table>"
            f'<div class="tl-cols" style="margin-top:8px">{pics}</div></div>'
        )


def compare(a: Report, b: Report, labels: tuple[str, str] | None = None) -> Comparison:
    """Compare two Reports (two `tr.bench(...)` runs, say): each figure for both, and b / a.

    Args:
        a: the first Report (the baseline).
        b: the second.
        labels: what to call them (default: their labels, else "a" and "b").

    Returns:
        A Comparison: a table in a notebook, text when printed; throughput, latency percentiles, lock
        wait, utilization and idle share, with their ratios.

    Raises:
        TypeError: `a` or `b` is not a Report.

    Example:
        ```python
        print(truss_lab.compare(before, after))
        ```
    """
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, Report):
            raise TypeError(f"compare() takes two Reports (from tr.bench or tr.report); {name} is {type(value).__name__}")
    if labels is None:
        la, lb = getattr(a, "label", "") or "a", getattr(b, "label", "") or "b"
        if la == lb:
            la, lb = f"{la} (a)", f"{lb} (b)"
        labels = (la, lb)
    rows = [Row(name, unit, get(a), get(b), better) for name, unit, get, better in METRICS]
    return Comparison(a, b, (str(labels[0]), str(labels[1])), rows)


def _num(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}"


def _ratio(x: float) -> str:
    return "–" if math.isnan(x) else f"×{x:.2f}"

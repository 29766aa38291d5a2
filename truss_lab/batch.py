"""Many requests at once, for a model in this process or in a worker (live.py, worker.py): a batch of
inputs, a load test (`bench`), and the handle `watch()` returns."""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterable

from . import cpu
from .errors import TrussLabError
from .trace import BenchReport, Trace


def predict_batch(model: Any, inputs: Iterable[Any], workers: int = 8) -> list:
    """Every input from `workers` concurrent threads; Results in input order (a model error stays in its Result)."""
    inputs = list(inputs)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise TrussLabError(f"workers must be a positive integer, got {workers!r}")
    if not inputs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(inputs)), thread_name_prefix="truss-lab-worker") as pool:
        futures = [pool.submit(model.run, x) for x in inputs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def bench(model: Any, inputs: Iterable[Any] | None, n: int, concurrency: int, *, progress: bool = True, label: str = "",
          on_result: Callable[[Any], None] | None = None, profile: bool = False) -> BenchReport:
    """`n` requests (cycling over `inputs`, or the model's examples) from `concurrency` threads (see LiveModel.bench)."""
    inputs = list(model.examples.values()) if inputs is None else list(inputs)
    if not inputs:
        where = getattr(model, "examples_source", None) or model.bundle.examples_path
        raise TrussLabError(f"{where}: no inputs given and no examples to cycle over")
    for name, value in (("n", n), ("concurrency", concurrency)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrussLabError(f"{name} must be a positive integer, got {value!r}")
    traces: list[Trace] = []
    failed = 0
    profiler = None
    if profile:
        from .profile import Profiler

        profiler = Profiler()
    bar = _progress_bar(n, f"{model.name} ×{concurrency}", progress)
    cpu0 = (cpu.machine_cpu_s(), model._cpu_s(), time.perf_counter())
    extra = {"profiler": profiler} if profiler is not None else {}
    try:
        with ThreadPoolExecutor(max_workers=min(concurrency, n), thread_name_prefix="truss-lab-bench") as pool:
            futures = [pool.submit(model.run, inputs[i % len(inputs)], **extra) for i in range(n)]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    traces.append(result.trace)
                    if on_result is not None:
                        on_result(result)
                    if not result.ok:
                        failed += 1
                        bar.set_postfix(failed=failed, refresh=False)
                    bar.update(1)
            except BaseException:  # Ctrl-C in the notebook: drop what has not started
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()
    others, mine = _cpu_shares(cpu0, (cpu.machine_cpu_s(), model._cpu_s(), time.perf_counter()))
    report = BenchReport.from_traces(traces, model.concurrency, concurrency=concurrency, label=label or model.name,
                                     others_cpu_share=others, model_cpu_share=mine)
    if profiler is not None:
        from .profile import Profile

        report.profile = Profile(model.name, model.roots, profiler.sessions, traces, profiler.interval)
    return report


def _cpu_shares(before: tuple, after: tuple) -> tuple[float, float]:
    """(other processes', the model's) share of the machine's CPUs between two (machine busy CPU s, the
    model's CPU s, wall s) readings; NaN where Linux does not say."""
    if None in before or None in after:
        return math.nan, math.nan
    capacity = (after[2] - before[2]) * (os.cpu_count() or 1)
    if capacity <= 0:
        return math.nan, math.nan
    mine = max(0.0, after[1] - before[1])
    return max(0.0, after[0] - before[0] - mine) / capacity, mine / capacity


def _progress_bar(total: int, desc: str, enabled: bool):
    """tqdm.auto's bar (notebook widget or terminal text), imported only when a bench runs."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=True)


class Watching:
    """What `watch()` returns: leaving a `with` block stops watching."""

    def __init__(self, live: Any):
        self.live = live

    def __enter__(self) -> Any:
        return self.live

    def __exit__(self, *exc) -> None:
        self.live.unwatch()

    def __repr__(self) -> str:
        return f"<watching {self.live.path} for changes>" if self.live.watching else "<not watching>"

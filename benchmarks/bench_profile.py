"""Profiling's cost (issue 25), measured in one run: examples/digits, the same requests with and
without `tr.profile`'s sampling profiler on every stage. (With profiling off the runner is untouched:
bench_core's overhead is the figure for that.)

    python benchmarks/bench_profile.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import truss_lab
from truss_lab.profile import Profiler

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "digits"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    n = 10 if args.quick else 60
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = truss_lab.load(DIGITS)
    with tr:
        x = tr.example("three")
        for _ in range(10):  # warm up both paths
            tr.run(x)
            tr.run(x, profiler=Profiler())
        plain, profiled = [], []
        for _ in range(n):  # interleaved, so both see the same machine
            t0 = time.perf_counter()
            tr.run(x)
            plain.append((time.perf_counter() - t0) * 1000)
            profiler = Profiler()
            t0 = time.perf_counter()
            tr.run(x, profiler=profiler)
            profiled.append((time.perf_counter() - t0) * 1000)
    a, b = statistics.median(plain), statistics.median(profiled)
    print(f"profiling examples/digits: {a:.2f} ms -> {b:.2f} ms per request (+{b - a:.2f} ms, x{b / a:.2f}), medians of {n}")
    return {"plain_ms": a, "profiled_ms": b, "overhead_ms": b - a, "ratio": b / a}


if __name__ == "__main__":
    main()

"""What the lock-misuse guard's audit hook costs work that is not a guarded predict (issue 15).

Python calls an audit hook on every audited event in the process (`id()`, `sys._getframe()`, imports,
`open`, ...) once it is installed, forever. Each workload runs in fresh processes, with the hook
installed (a guarded model loaded) and never installed, alternately; the best time of each is compared.

- digits: the example TensorFlow model's request (preprocess -> predict -> postprocess), guard on vs off
- python: a pure-Python preprocess (tokenise, build dicts, deepcopy a config, sort) - the events a
  hook sees most (`id()` inside deepcopy) are here
- imports: a cell that imports a dozen standard-library packages for the first time

    python benchmarks/bench_guard.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_PCT = 2.0


def _python_work() -> None:
    import copy

    config = {"model": {"name": "digits", "layers": [64, 32, 10], "labels": [str(i) for i in range(10)]},
              "runtime": {"predict_concurrency": 1}}
    text = "the quick brown fox jumps over the lazy dog " * 20
    for _ in range(50):
        tokens = text.split()
        counts: dict[str, int] = {}
        for t in tokens:
            counts[t] = counts.get(t, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        request = copy.deepcopy(config)
        request["tokens"] = [t.upper() for t in tokens[:50]]
        json.dumps({"ranked": ranked, "request": request})


IMPORTS = ("xml.dom.minidom", "sqlite3", "decimal", "fractions", "statistics", "tarfile", "zipfile", "csv",
           "wave", "calendar", "difflib", "ftplib", "imaplib", "json.tool", "pydoc", "configparser", "plistlib")


def worker(workload: str, hook: bool, reps: int) -> float:
    """Seconds for one unit of `workload` (best of `reps`), in this process."""
    sys.path.insert(0, str(ROOT))
    from truss_lab import guard

    if workload == "imports":
        import socket, subprocess, urllib.request  # noqa: E401,F401 - what install() imports, in both runs

        if hook:
            guard.install()
        t0 = time.perf_counter()
        for name in IMPORTS:
            __import__(name)
        return time.perf_counter() - t0
    if workload == "python":
        if hook:
            guard.install()
        _python_work()  # warm up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            _python_work()
            best = min(best, time.perf_counter() - t0)
        return best
    if workload == "digits":
        import warnings

        import truss_lab

        warnings.simplefilter("ignore")
        tr = truss_lab.load(ROOT / "examples" / "digits", guard=hook)
        assert guard._installed == hook
        x = tr.bundle.examples[0].input
        for _ in range(10):
            tr.predict(x)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(20):
                tr.predict(x)
            best = min(best, (time.perf_counter() - t0) / 20)
        tr.close()
        return best
    raise SystemExit(f"unknown workload {workload}")


def measure(workload: str, rounds: int, reps: int) -> dict:
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for hook in (False, True):
            out = subprocess.run([sys.executable, __file__, "--worker", workload, "--hook", "on" if hook else "off",
                                  "--reps", str(reps)], capture_output=True, text=True, check=True)
            times[hook].append(float(out.stdout.strip().splitlines()[-1]))
    on, off = min(times[True]), min(times[False])
    return {"on_ms": round(on * 1000, 3), "off_ms": round(off * 1000, 3), "overhead_pct": round((on - off) / off * 100, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hook", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(worker(args.worker, args.hook == "on", args.reps))
        return {}
    rounds, reps = (1, 3) if args.quick else (5, 20)
    workloads = ("python", "imports") if args.quick else ("digits", "python", "imports")
    results = {w: measure(w, rounds, reps) for w in workloads}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        parts = [f"{w} {r['overhead_pct']:+.1f}% ({r['off_ms']:.2f} -> {r['on_ms']:.2f} ms)" for w, r in results.items()]
        worst = max(r["overhead_pct"] for r in results.values())
        print(f"guard hook cost on other work: {', '.join(parts)} (target <= {TARGET_PCT:g}% each: "
              f"{'met' if worst <= TARGET_PCT else 'not met'})")
    return results


if __name__ == "__main__":
    main()

"""Cost of `%load_ext truss_lab` (issue 5): time and heavy imports, in a fresh interpreter each round.

Target: <= 300 ms, and no tensorflow or matplotlib imported.

    python benchmarks/bench_magics.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

PROBE = """
import json, sys, time
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
t0 = time.perf_counter()
ip.run_line_magic("load_ext", "truss_lab")
ms = (time.perf_counter() - t0) * 1000
print(json.dumps({"ms": ms, "heavy": [m for m in ("tensorflow", "matplotlib") if m in sys.modules]}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    runs = []
    for _ in range(2 if args.quick else 7):
        out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ms = statistics.median(r["ms"] for r in runs)
    heavy = sorted({m for r in runs for m in r["heavy"]})
    print(
        f"%load_ext truss_lab: {ms:.1f} ms median of {len(runs)} fresh interpreters "
        f"(target <= 300 ms: {'met' if ms <= 300 else 'MISSED'}); heavy imports: {heavy or 'none'}"
    )
    return {"load_ext_ms": ms, "heavy": heavy}


if __name__ == "__main__":
    main()

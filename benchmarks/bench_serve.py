"""HTTP serving benchmark (issue 9), measured in one run.

A no-op model, 2,000 requests from 16 concurrent clients: through the in-process runner (`tr.bench`)
and through the HTTP server on 127.0.0.1 (httpx clients, keep-alive). Throughput and p95 latency of
each, and the ratio: what HTTP, JSON and uvicorn add on top of the runner.

    python benchmarks/bench_serve.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import truss_lab
from bench_core import NOOP, write
from truss_lab.trace import percentile


def measure(n: int, workers: int = 16) -> dict:
    with tempfile.TemporaryDirectory() as tmp, truss_lab.load(write(Path(tmp) / "noop", NOOP), trace_capacity=n) as tr:
        tr.bench([1], n=200, concurrency=workers, progress=False)  # warm up
        local = tr.bench([1], n=n, concurrency=workers, progress=False)
        with tr.serve() as server:
            limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
            with httpx.Client(base_url=server.url, limits=limits, timeout=30) as client:

                def one(_):
                    t0 = time.perf_counter()
                    client.post("/v1/models/model:predict", json=1).raise_for_status()
                    return (time.perf_counter() - t0) * 1000

                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(one, range(200)))  # warm up
                    t0 = time.perf_counter()
                    latencies = sorted(pool.map(one, range(n)))
                    wall = time.perf_counter() - t0
    http_rps = n / wall
    return {
        "requests": n,
        "workers": workers,
        "runner_rps": round(local.throughput),
        "runner_p95_ms": round(local.stages["total"].p95, 3),
        "http_rps": round(http_rps),
        "http_p95_ms": round(percentile(latencies, 95), 3),
        "throughput_ratio_http_to_runner": round(http_rps / local.throughput, 3),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run, not a measurement)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args(argv)
    results = {"http_vs_runner": measure(300 if args.quick else 2000)}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        r = results["http_vs_runner"]
        print(
            f"no-op model, {r['requests']} requests from {r['workers']} clients: runner {r['runner_rps']} req/s "
            f"(p95 {r['runner_p95_ms']:.2f} ms), HTTP {r['http_rps']} req/s (p95 {r['http_p95_ms']:.2f} ms) "
            f"-> HTTP carries x{r['throughput_ratio_http_to_runner']} of the runner's throughput"
        )
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

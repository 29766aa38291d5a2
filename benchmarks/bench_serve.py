"""HTTP serving benchmark (issue 9), measured in one run.

A no-op model, 2,000 requests from 16 concurrent clients: through the in-process runner (`tr.bench`)
and through the HTTP server on 127.0.0.1 (httpx clients, keep-alive). Throughput and p95 latency of
each, and the ratio: what HTTP, JSON and uvicorn add on top of the runner.

Then truss_lab's HTTP server against the real Truss server (truss_lab.serving.truss_server, the pinned
version, no Docker) on the same no-op truss, with the same keep-alive client, in one run.

    python benchmarks/bench_serve.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import truss_lab
from bench_core import NOOP, write
from truss_lab.trace import percentile


def _hammer(url: str, n: int, workers: int, pid: int | None = None) -> tuple[float, list[float], float]:
    """(requests per second, sorted latencies in ms, server CPU ms per request) for n POSTs from
    `workers` keep-alive clients. The CPU figure needs the server's `pid` (else NaN): on a small
    machine the client's own CPU caps the throughput of any server, so it is the fairer measure."""
    import psutil

    proc = psutil.Process(pid) if pid is not None else None
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    with httpx.Client(base_url=url, limits=limits, timeout=30) as client:

        def one(_):
            t0 = time.perf_counter()
            client.post("/v1/models/model:predict", json=1).raise_for_status()
            return (time.perf_counter() - t0) * 1000

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(200)))  # warm up
            cpu0 = _cpu(proc)
            t0 = time.perf_counter()
            latencies = sorted(pool.map(one, range(n)))
            wall = time.perf_counter() - t0
            cpu_ms = (_cpu(proc) - cpu0) * 1000 / n
    return n / wall, latencies, cpu_ms


def _cpu(proc) -> float:
    if proc is None:
        return float("nan")
    times = proc.cpu_times()
    return times.user + times.system


@contextlib.contextmanager
def _truss_lab_server(root: Path):
    """`truss-lab serve` in a process of its own (as the Truss server runs): yields its URL once ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "truss_lab.cli", "serve", str(root), "--port", str(port), "--no-watch"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for line in proc.stdout:  # the server says when load() finished
            if "ready at" in line:
                break
        else:
            raise RuntimeError(f"truss-lab serve exited with {proc.wait()}")
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_vs_truss(n: int, workers: int = 16) -> dict:
    """truss_lab's HTTP server and the real Truss server on the same no-op truss, one after the other."""
    from truss_lab.serving.truss_server import ServerEnv

    env = ServerEnv.ensure()
    with tempfile.TemporaryDirectory() as tmp:
        root = write(Path(tmp) / "noop", NOOP)
        with env.start(root, apps=Path(tmp) / "apps") as oracle:
            truss_rps, truss_lat, truss_cpu = _hammer(oracle.url, n, workers, oracle.proc.pid)
        with _truss_lab_server(root) as (url, pid):  # its own process, as the Truss server has
            lab_rps, lab_lat, lab_cpu = _hammer(url, n, workers, pid)
    return {
        "requests": n,
        "workers": workers,
        "truss_version": env.version,
        "truss_server_rps": round(truss_rps),
        "truss_server_p95_ms": round(percentile(truss_lat, 95), 3),
        "truss_server_cpu_ms_per_request": round(truss_cpu, 3),
        "truss_lab_rps": round(lab_rps),
        "truss_lab_p95_ms": round(percentile(lab_lat, 95), 3),
        "truss_lab_cpu_ms_per_request": round(lab_cpu, 3),
        "throughput_ratio_truss_lab_to_truss": round(lab_rps / truss_rps, 2),
        "cpu_ratio_truss_to_truss_lab": round(truss_cpu / lab_cpu, 2),
    }


def measure(n: int, workers: int = 16) -> dict:
    with tempfile.TemporaryDirectory() as tmp, truss_lab.load(write(Path(tmp) / "noop", NOOP), trace_capacity=n) as tr:
        tr.bench([1], n=200, concurrency=workers, progress=False)  # warm up
        local = tr.bench([1], n=n, concurrency=workers, progress=False)
        with tr.serve() as server:
            http_rps, latencies, _ = _hammer(server.url, n, workers)
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
    n = 300 if args.quick else 2000
    results = {"http_vs_runner": measure(n), "truss_lab_vs_truss_server": measure_vs_truss(n)}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        r = results["http_vs_runner"]
        print(
            f"no-op model, {r['requests']} requests from {r['workers']} clients: runner {r['runner_rps']} req/s "
            f"(p95 {r['runner_p95_ms']:.2f} ms), HTTP {r['http_rps']} req/s (p95 {r['http_p95_ms']:.2f} ms) "
            f"-> HTTP carries x{r['throughput_ratio_http_to_runner']} of the runner's throughput"
        )
        t = results["truss_lab_vs_truss_server"]
        print(
            f"same no-op truss over HTTP: Truss server {t['truss_version']} {t['truss_server_rps']} req/s "
            f"(p95 {t['truss_server_p95_ms']:.2f} ms), truss_lab {t['truss_lab_rps']} req/s "
            f"(p95 {t['truss_lab_p95_ms']:.2f} ms) -> truss_lab x{t['throughput_ratio_truss_lab_to_truss']}; server CPU per "
            f"request: Truss {t['truss_server_cpu_ms_per_request']:.3f} ms, truss_lab {t['truss_lab_cpu_ms_per_request']:.3f} ms "
            f"(truss_lab x{t['cpu_ratio_truss_to_truss_lab']} cheaper)"
        )
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)

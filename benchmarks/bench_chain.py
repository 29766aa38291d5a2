"""Chain benchmarks (issue 26), each measured in one run.

* span cost: a chainlet's runner (every request gets a W3C span) vs the same no-op truss as a plain
  LiveModel, interleaved best-of-5 rounds. Target: <= 2 us per request.
* a call across the wire: `chain.run` of a two-chainlet chain (Entry -> Echo, both no-ops) minus
  Entry's own predict time spent outside the call - the price of a deployed chain's HTTP hop, here.
* trees(): rebuilding the request trees of 1,000 requests (it reads every chainlet's kept traces).
* a save that changes one chainlet: `chain.reload()` (code generation + that chainlet's swap), median.

    python benchmarks/bench_chain.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import truss_lab

NOOP = """
class Model:
    def predict(self, x):
        return x
"""

CHAIN = """
import truss_chains as chains


class Echo(chains.ChainletBase):
    async def run_remote(self, text: str) -> str:
        return text


@chains.mark_entrypoint
class Entry(chains.ChainletBase):
    remote_config = chains.RemoteConfig(compute=chains.Compute(predict_concurrency=8))

    def __init__(self, echo: Echo = chains.depends(Echo)):
        self._echo = echo

    async def run_remote(self, text: str) -> str:
        return await self._echo.run_remote(text) + "!"
"""


def span_cost(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "noop"
        (root / "model").mkdir(parents=True)
        (root / "config.yaml").write_text("model_name: noop\n")
        (root / "model" / "model.py").write_text(NOOP)
        def best(tr) -> float:  # the fastest of 5 rounds of n requests, after 1000 to warm up
            for _ in range(1000):
                tr.run(1)
            fastest = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    tr.run(1)
                fastest = min(fastest, (time.perf_counter() - t0) / n)
            return fastest

        with truss_lab.load(root, trace_capacity=n) as plain:  # one truss a process: one after the other
            best_plain = best(plain)
            assert plain.traces[-1].span_id is None
        with truss_lab.load(root, trace_capacity=n) as chainlet:
            chainlet.chainlet = True
            best_chainlet = best(chainlet)
            assert chainlet.traces[-1].span_id is not None
    return {"plain_us": round(best_plain * 1e6, 2), "chainlet_us": round(best_chainlet * 1e6, 2),
            "span_us": round((best_chainlet - best_plain) * 1e6, 2), "target_us": 2}


def chain_numbers(n: int, saves: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "echo_chain.py"
        source.write_text(CHAIN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chain = truss_lab.load_chain(source)
        with chain:
            for _ in range(50):
                chain.run(text="warm")  # then n more: each chainlet keeps its last 1,000 traces
            t0 = time.perf_counter()
            for _ in range(n):
                chain.run(text="x")
            per_request = (time.perf_counter() - t0) / n
            trees = chain.trees()[-n:]
            echo_ms = statistics.median(t.calls[0].trace.total_ms for t in trees)
            entry_ms = statistics.median(t.trace.total_ms for t in trees)
            t0 = time.perf_counter()
            rebuilt = chain.trees()
            trees_ms = (time.perf_counter() - t0) * 1000
            durations = []
            text = source.read_text()
            for i in range(saves):
                source.write_text(text.replace('+ "!"', f'+ "!{i}"'))
                event = chain.reload()
                assert event.changed == ["Entry"] and event.kind == "methods", event
                durations.append(event.duration_ms)
    return {
        "request_ms": round(per_request * 1000, 3),
        "entry_ms": round(entry_ms, 3),
        "echo_ms": round(echo_ms, 3),
        "hop_ms": round(entry_ms - echo_ms, 3),
        "trees": len(rebuilt),
        "trees_ms": round(trees_ms, 2),
        "reload_ms": round(statistics.median(durations), 1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    spans = span_cost(2_000 if args.quick else 20_000)
    chain = chain_numbers(100 if args.quick else 950, 3 if args.quick else 7)
    out = {"span": spans, "chain": chain}
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    met = "met" if spans["span_us"] <= spans["target_us"] else "NOT met"
    print(f"span per chainlet request: {spans['span_us']:.2f} us ({spans['chainlet_us']:.2f} vs {spans['plain_us']:.2f} us; "
          f"target <= {spans['target_us']} us: {met})")
    print(f"chain.run through Entry -> Echo (no-ops): {chain['request_ms']:.2f} ms/request; Entry {chain['entry_ms']:.2f} ms "
          f"of which the Echo call {chain['echo_ms']:.2f} ms -> the HTTP hop and stub {chain['hop_ms']:.2f} ms (medians)")
    print(f"trees() over {chain['trees']} requests: {chain['trees_ms']:.1f} ms")
    print(f"a save that changes one chainlet -> reloaded: {chain['reload_ms']:.0f} ms median (code generation + its swap)")
    return out


if __name__ == "__main__":
    main()

"""The benchmark scripts still run (small counts; the numbers themselves live in docs/benchmarks.md)."""

import sys

from conftest import ROOT


def test_benchmarks_run_quick(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import run_all

    run_all.main(["--quick"])
    out = capsys.readouterr().out
    assert "runner overhead:" in out and "lock efficiency:" in out and "guard overhead:" in out
    assert "guard hook cost on other work:" in out
    assert "bench throughput, no-op model:" in out and "lock-demo twins, 8 workers:" in out
    assert "method swap:" in out and "save -> live:" in out and "save -> examples diff:" in out
    assert "%load_ext truss_lab:" in out and "heavy imports: none" in out
    assert "profiling examples/digits:" in out and "memory over 5 re-loads" in out
    assert "the worker adds" in out and "a worker ready" in out and "save -> live in a worker" in out
    for name in list(sys.modules):
        if name.startswith("bench_") or name == "run_all":
            del sys.modules[name]

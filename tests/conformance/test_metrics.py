"""GET /metrics against the real Truss server: what the model registers with prometheus_client is
exported by both; truss_lab adds its own request counts and stage latencies; a swap keeps counting."""

from __future__ import annotations

import textwrap
import warnings

import httpx

import truss_lab
from conftest import write_truss

PREDICT = "/v1/models/model:predict"

MODEL = """
from prometheus_client import Counter

HITS = Counter("conformance_hits", "predicts served")

class Model:
    def predict(self, x):
        HITS.inc()
        return x
"""


def _model_lines(url: str) -> list[str]:
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(2):
            assert client.post(PREDICT, json=i).status_code == 200
        r = client.get("/metrics/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert client.get("/metrics").status_code == 307  # the mounted app's redirect, on both
        return r.text, [line for line in r.text.splitlines() if line.startswith("conformance_hits_total")]


def _families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_metrics_the_model_registers_are_exported_as_on_the_truss_server(truss_env, tmp_path):
    root = write_truss(tmp_path / "metrics", MODEL)
    with truss_env.start(root, apps=tmp_path / "apps") as oracle:
        expected_text, expected = _model_lines(oracle.url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = truss_lab.load(root)
    try:
        url = tr.serve().url
        text, got = _model_lines(url)
        assert got == expected == ["conformance_hits_total 2.0"]
        # none of the collectors the Truss server unregisters, no *_created samples (it disables them)
        assert not [f for f in _families(text) if f.startswith(("process_", "python_gc_", "python_info"))] and "_created" not in text
        assert "_created" not in text
        assert 'truss_lab_requests_total{method="predict",model="metrics",status="ok"} 2.0' in text
        assert 'truss_lab_stage_seconds_count{model="metrics",stage="predict"} 2.0' in text
        # a method swap keeps the model's counter (and its count); a second registration does not fail the reload
        (root / "model" / "model.py").write_text(textwrap.dedent(MODEL).replace("return x", "return x + 1"))
        assert tr.reload().kind == "methods"
        assert tr.predict(1).output == 2
        after = httpx.get(url + "/metrics/").text
        assert "conformance_hits_total 3.0" in after
    finally:
        tr.close()
    from prometheus_client import REGISTRY

    assert not [n for names in REGISTRY._collector_to_names.values() for n in names if n.startswith("conformance_hits")]


SLOW_LOAD = """
import time

class Model:
    def load(self):
        time.sleep(10)  # long enough to ask every route while it runs, on a busy machine too

    def predict(self, x):
        return x
"""


def test_routes_while_the_model_loads_answer_as_on_the_truss_server(truss_env, tmp_path):
    """Before load() has finished: readiness, /ping, /invocations, the schema and predict say 503 on both."""
    from truss_lab.serving.http import LiveBackend
    from truss_lab.serving.server import Server

    root = write_truss(tmp_path / "slow", SLOW_LOAD)
    requests = [("GET", "/v1/models/model"), ("GET", "/ping"), ("GET", "/v1/models/model/schema"),
                ("POST", "/invocations"), ("POST", PREDICT), ("GET", "/")]

    def statuses(url: str) -> list[int]:
        with httpx.Client(base_url=url, timeout=30) as client:
            return [client.request(m, p, json=1 if m == "POST" else None).status_code for m, p in requests]

    with truss_env.start(root, apps=tmp_path / "apps", wait=False) as oracle:
        expected = statuses(oracle.url)  # load() sleeps 10 s: still loading
    with Server(LiveBackend(name="slow")).start() as loading:  # `truss-lab serve` before its load() has finished
        got = statuses(loading.url)
    assert got == expected and expected[:5] == [503] * 5 and expected[5] == 200


def test_truss_lab_serve_exports_exactly_the_models_metrics_as_the_truss_server_does(truss_env, tmp_path):
    """Truss's own test asserts /metrics lists exactly the model's metrics. `truss-lab serve` runs one
    truss in its own process, as the Truss server does: the same families, plus truss_lab's two
    (docs/parity.md: deliberate differences)."""
    import subprocess
    import sys
    import time

    from conftest import free_port

    root = write_truss(tmp_path / "metrics", MODEL)
    with truss_env.start(root, apps=tmp_path / "apps") as oracle:
        expected_text, _ = _model_lines(oracle.url)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "truss_lab.cli", "serve", str(root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/v1/models/model", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling the server with a deadline
        text, _ = _model_lines(url)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    ours = {f for f in _families(text) if f.startswith("truss_lab_")}
    assert {f.removesuffix("_total") for f in ours} == {"truss_lab_requests", "truss_lab_stage_seconds"}
    assert {f.startswith("conformance_hits") for f in _families(expected_text)} == {True}
    assert _families(text) - ours == _families(expected_text)

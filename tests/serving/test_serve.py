"""The HTTP server: Truss's routes on FastAPI/uvicorn, through the same runner, lock and traces."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import truss_lab
from conftest import free_port, sigint_default_in_child, write_truss

PREDICT = "/v1/models/model:predict"

STAGED = """
class Model:
    def preprocess(self, x):
        if x == "bad": raise ValueError("bad input")
        return x
    def predict(self, x):
        if x == "boom": raise RuntimeError("boom")
        if x == "object": return object()
        return {"y": x}
"""


@pytest.fixture
def served(live):
    servers = []

    def serve(model=STAGED, **kw):
        max_body = kw.pop("max_body", None)
        tr = live(model, **kw)
        server = tr.serve(max_body=max_body)
        servers.append(server)
        client = httpx.Client(base_url=server.url, timeout=30)
        client.server = server  # for the tests that stop it themselves
        return tr, client

    yield serve
    for server in servers:
        server.stop()


@pytest.mark.filterwarnings("ignore::truss_lab.OutputWarning")
def test_routes_and_status_codes(served):
    tr, client = served()
    assert client.get("/").json() is True  # the Truss server's liveness and readiness bodies
    assert client.get("/v1/models/model").json() == {}
    assert client.get("/v1/models/any-name").json() == {} and client.get("/v1/models/x/loaded").json() == {}
    assert client.post(PREDICT, json=[1, 2]).json() == {"y": [1, 2]}
    assert client.post("/v1/models/other-name:predict", json=[3]).json() == {"y": [3]}  # any name, as on Truss
    bad = client.post(PREDICT, json="bad")
    assert bad.status_code == 500 and bad.json()["stage"] == "preprocess"  # Truss: 500 from any stage
    assert bad.headers["x-baseten-error-source"] == "04" and bad.headers["x-baseten-error-code"] == "600"
    assert bad.json()["error"] == "preprocess failed at t/model/model.py:4: ValueError: bad input"
    assert bad.json()["location"] == "t/model/model.py:4" and "Traceback" not in bad.text
    boom = client.post(PREDICT, json="boom")
    assert boom.status_code == 500 and boom.json()["stage"] == "predict" and "RuntimeError: boom" in boom.json()["error"]
    obj = client.post(PREDICT, json="object")
    assert obj.status_code == 500 and obj.json() == {
        "error": "output is not JSON-serialisable at <output>: object", "stage": "postprocess", "model": "t"
    }
    not_json = client.post(PREDICT, content=b"{nope")
    assert not_json.status_code == 400 and not_json.json()["stage"] == "request"
    assert not_json.headers["x-baseten-error-code"] == "700" and "Invalid JSON payload" in not_json.json()["error"]
    assert client.put(PREDICT).status_code == 405
    # the same runner: HTTP requests are traced like notebook ones
    report = tr.report()
    assert report.count == 5 and report.failures == {"preprocess": 1, "predict": 1} and tr.lock_available == 1


def test_oversized_bodies_are_refused(served):
    tr, client = served(max_body=1000)
    big = client.post(PREDICT, json="x" * 2000)
    assert big.status_code == 413 and big.json()["stage"] == "request" and "1000-byte limit" in big.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 200

    chunked = client.post(PREDICT, content=chunks())
    assert chunked.status_code == 413
    assert client.post(PREDICT, json="small").status_code == 200
    assert tr.report().count == 1  # refused bodies never reach the model


def test_streaming_predict_streams(served):
    tr, client = served(
        """
        import threading
        class Model:
            def __init__(self, **kw):
                self.gate = threading.Event()
            def predict(self, x):
                yield "first,"
                if not self.gate.wait(20):
                    raise TimeoutError("the client never got the first chunk")
                yield memoryview(f"then {x}".encode())
        """
    )
    with client.stream("POST", PREDICT, json=7) as response:
        chunks = response.iter_raw()
        assert next(chunks) == b"first,"  # arrives while predict still holds the lock
        assert tr.lock_available == 0
        tr.model.gate.set()
        assert b"".join(chunks) == b"then 7"  # a memoryview is sent as its bytes, as the Truss server sends it
    assert tr.traces[-1].chunks == 2 and tr.lock_available == 1


def test_a_chunk_the_truss_server_cannot_stream_cuts_the_stream_and_says_which(served):
    import httpx

    tr, client = served("class Model:\n    def predict(self, x):\n        yield 'a,'\n        yield {'then': x}\n        yield 'c'\n")
    body = b""
    with pytest.raises(httpx.RemoteProtocolError):  # the cut body, as the Truss server sends it (tests/conformance)
        with client.stream("POST", PREDICT, json=7) as response:
            for part in response.iter_raw():
                body += part
    assert body == b"a,"
    (warning,) = [w for w in tr.traces[-1].warnings if "chunk 2 of type dict" in w]
    assert "cuts the stream" in warning and tr.lock_available == 1


def test_hot_reload_while_serving(served):
    tr, client = served("class Model:\n    def predict(self, x):\n        return {'v': 1}\n")
    tr.watch()
    n = tr.reload_count
    (tr.path / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return {'v': 2}\n")
    tr.wait_for_reload(since=n)
    assert client.post(PREDICT, json=0).json() == {"v": 2}


def test_cli_serve_is_live_at_once_and_ready_after_load(make_truss):
    root = make_truss(
        """
        import time
        from pathlib import Path
        class Model:
            def __init__(self, data_dir, **kw):
                self.go = Path(data_dir) / "go"
            def load(self):
                deadline = time.monotonic() + 60
                while not self.go.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            def predict(self, x):
                return x
        """
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "truss_lab.cli", "serve", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=sigint_default_in_child,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)

    def wait_for(predicate, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling the server with a deadline
        raise AssertionError("condition not reached in time")

    try:
        wait_for(lambda: client.get("/").status_code == 200)
        not_ready = client.get("/v1/models/model")
        assert not_ready.status_code == 503 and "not ready" in not_ready.json()["error"]
        assert client.post(PREDICT, json=1).status_code == 503
        (root / "data" / "go").touch()
        wait_for(lambda: client.get("/v1/models/model").status_code == 200)
        assert client.post(PREDICT, json={"a": 1}).json() == {"a": 1}
        model_py = root / "model" / "model.py"
        model_py.write_text(model_py.read_text().replace("return x", "return [x]"))
        wait_for(lambda: client.post(PREDICT, json={"a": 1}).json() == [{"a": 1}])  # the watcher swapped it
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "swapped predict" in out, out  # each reload is a line in the server's output
    assert "ready at http://127.0.0.1" in out


def test_cli_serve_bad_folder_is_a_usage_error(tmp_path, capsys):
    from truss_lab.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "truss-lab serve:" in capsys.readouterr().err


FAULTY = """
VERSION = {version}

class Model:
    def preprocess(self, x):
        if x % 30 == 0: raise ValueError("injected preprocess failure")
        return x
    def predict(self, x):
        if x % 30 == 10: raise RuntimeError("injected predict failure")
        return x
    def postprocess(self, x):
        if x % 30 == 20: raise KeyError("injected postprocess failure")
        return {{"x": x, "version": VERSION}}
"""


@pytest.mark.parametrize("edits", [False, True], ids=["steady", "with-edits"])
def test_load_and_faults(served, edits):
    """5,000 requests at concurrency 16, 10 % failing across the three stages; with edits landing meanwhile."""
    n, workers, budget_s = 5000, 16, 240
    before = {t.ident for t in threading.enumerate()}
    tr, probe = served(FAULTY.format(version=1))
    server_url = str(probe.base_url)
    if edits:
        tr.watch()
    stop = threading.Event()
    versions_written = [1]

    def editor():
        model = tr.path / "model" / "model.py"
        while not stop.is_set() and versions_written[-1] < 6:
            n_before = tr.reload_count
            versions_written.append(versions_written[-1] + 1)
            model.write_text(FAULTY.format(version=versions_written[-1]))
            tr.wait_for_reload(since=n_before, timeout=30)
            stop.wait(0.3)  # spread the edits over the run

    statuses: collections.Counter = collections.Counter()
    stages: collections.Counter = collections.Counter()
    seen_versions: set[int] = set()
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    t0 = time.monotonic()
    with httpx.Client(base_url=server_url, timeout=30, limits=limits) as client, ThreadPoolExecutor(workers) as pool:
        edit_thread = threading.Thread(target=editor) if edits else None
        if edit_thread:
            edit_thread.start()

        def one(i):
            return i, client.post(PREDICT, json=i)

        for i, response in pool.map(one, range(n)):
            statuses[response.status_code] += 1
            body = response.json()
            if response.status_code == 200:
                assert body["x"] == i
                seen_versions.add(body["version"])
            else:
                stages[body["stage"]] += 1
                assert "injected" in body["error"] and "Traceback" not in response.text
        stop.set()
        if edit_thread:
            edit_thread.join(60)
    elapsed = time.monotonic() - t0
    assert elapsed < budget_s
    assert sum(statuses.values()) == n  # every request answered
    assert statuses[200] + sum(stages.values()) == n
    assert stages == {"preprocess": 167, "predict": 167, "postprocess": 166}  # i % 30 in {0, 10, 20}
    assert statuses == {200: n - 500, 500: 500}  # the Truss server answers 500 for a failure in any stage
    assert tr.lock_available == tr.concurrency  # the lock is fully free after
    if edits:
        assert len(seen_versions) > 1 and tr.version > 1
        tr.unwatch()
    probe.server.stop()
    tr.close()
    # nothing this test started outlives it (anyio keeps its idle worker pool for reuse: not ours)
    leaked = [
        t for t in threading.enumerate()
        if t.ident not in before and t.is_alive() and not t.name.startswith("AnyIO worker thread")
    ]
    assert not leaked, leaked
    print(f"\n{'with edits' if edits else 'steady'}: {n} requests in {elapsed:.1f} s = {n / elapsed:.0f} req/s")


def test_close_stops_the_servers_it_started(live):
    tr = live()
    server = tr.serve()
    assert httpx.get(f"{server.url}/").status_code == 200
    tr.close()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/", timeout=2)


def test_missing_extras_are_one_line_errors(live, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_web(name, *args, **kwargs):
        if name in ("fastapi", "ray") or name.startswith(("fastapi.", "ray.")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for module in [m for m in sys.modules if m in ("truss_lab.serving.http", "truss_lab.serving.routes", "truss_lab.serving.server",
                                                   "truss_lab.serving.ray_serve", "truss_lab.ray_serve")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setattr(builtins, "__import__", no_web)
    with pytest.raises(truss_lab.TrussLabError, match=r"serve\(\) needs FastAPI and uvicorn: pip install 'truss_lab\[serve\]'"):
        live().serve()
    from truss_lab.cli import main

    assert main(["serve", str(live(name="u").path), "--ray"]) == 2
    assert "needs Ray Serve: pip install 'truss_lab[ray]'" in capsys.readouterr().err


def test_a_busy_port_is_a_one_line_error(live, capsys):
    tr = live()
    server = tr.serve()
    with pytest.raises(truss_lab.TrussLabError, match=rf"t: cannot listen on 127.0.0.1:{server.port}: Address already in use"):
        tr.serve(port=server.port)
    from truss_lab.cli import main

    assert main(["serve", str(tr.path), "--port", str(server.port)]) == 2
    assert f"cannot listen on 127.0.0.1:{server.port}" in capsys.readouterr().err


def test_metrics_a_model_registers_through_opentelemetry_are_served(tmp_path):
    pytest.importorskip("opentelemetry.exporter.prometheus")
    model = """
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider

class Model:
    def load(self):
        self.provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
        self.hits = self.provider.get_meter("lab").create_counter("otel_lab_hits")
    def predict(self, x):
        self.hits.add(1)
        return x
"""
    root = write_truss(tmp_path / "otel", model)
    with truss_lab.load(root) as tr:
        url = tr.serve().url
        for i in range(3):
            assert httpx.post(url + "/v1/models/model:predict", json=i).status_code == 200
        text = httpx.get(url + "/metrics/").text
        assert any(line.startswith("otel_lab_hits_total") and line.endswith(" 3.0") for line in text.splitlines()), text[-2000:]
        assert 'truss_lab_stage_seconds_count{model="otel",stage="lock_wait"} 3.0' in text


def test_a_request_with_a_traceparent_records_its_trace_context(served):
    tr, client = served("import starlette.requests\n\nclass Model:\n    def predict(self, x, request: starlette.requests.Request):\n"
                        "        return request.headers.get('traceparent')\n")
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert client.post("/v1/models/model:predict", json=1, headers={"traceparent": parent}).json() == parent  # as sent
    t = tr.traces[-1]
    assert (t.trace_id, t.parent_span_id) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    assert len(t.span_id) == 16 and t.span_id != t.parent_span_id  # its own span in the caller's trace
    client.post("/v1/models/model:predict", json=1)
    assert tr.traces[-1].span is None  # no header, no context (only a chain's chainlets start one)
    client.post("/v1/models/model:predict", json=1, headers={"traceparent": "garbage"})
    assert tr.traces[-1].span is None

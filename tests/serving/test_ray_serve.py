"""The same truss on Ray Serve: predict in a deployment whose max_ongoing_requests is the lock size."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import free_port, write_truss

PREDICT = "/v1/models/model:predict"

MODEL = """
import time
class Model:
    def load(self):
        self.factor = 2                      # pre/postprocess replicas run load() too
    def preprocess(self, x):
        if x == "bad": raise ValueError("bad input")
        return x
    def predict(self, x):
        if x == "boom": raise RuntimeError("boom")
        time.sleep(0.02)                     # long enough for requests to overlap
        return x * self.factor
    def postprocess(self, y):
        return {"y": y}
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from truss_lab import ray_serve

    root = write_truss(tmp_path_factory.mktemp("ray") / "doubler", MODEL, config={"runtime": {"predict_concurrency": 2}})
    url = ray_serve.deploy(
        root, port=free_port(), num_replicas=2, stage_replicas=1, num_cpus=0.25,
        ray_init={"num_cpus": 2, "include_dashboard": False},
    )
    try:
        yield url, ray_serve
    finally:
        ray_serve.shutdown()


def test_results_and_errors_match_the_local_server(deployed):
    url, _ = deployed
    client = httpx.Client(base_url=url, timeout=60)
    assert client.get("/").json() is True  # the Truss server's liveness and readiness bodies
    assert client.get("/v1/models/model").json() == {}
    assert client.post(PREDICT, json=21).json() == {"y": 42}
    bad = client.post(PREDICT, json="bad")
    assert bad.status_code == 500 and bad.json()["stage"] == "preprocess"  # as the Truss server: 500 from any stage
    assert bad.json()["location"] == "doubler/model/model.py:7"
    boom = client.post(PREDICT, json="boom")
    assert boom.status_code == 500 and boom.json()["stage"] == "predict" and "RuntimeError: boom" in boom.json()["error"]
    assert client.post(PREDICT, content=b"{nope").status_code == 400


def test_predict_concurrency_per_replica_never_exceeds_the_lock(deployed):
    url, ray_serve = deployed
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with httpx.Client(base_url=url, timeout=120, limits=limits) as client, ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: client.post(PREDICT, json=i), range(160)))
    assert [r.json() for r in replies] == [{"y": 2 * i} for i in range(160)]
    stats = ray_serve.predict_stats()
    assert len(stats) == 2  # both predict replicas served
    for replica in stats:
        assert replica["lock"] == 2
        assert 1 <= replica["max_in_flight"] <= 2, stats  # max_ongoing_requests = the lock, per replica
        assert replica["lock_free"] == 2
    assert sum(r["calls"] for r in stats) >= 160
    assert max(r["max_in_flight"] for r in stats) == 2  # 16 clients did fill the slots


ROUTES = [  # (method, path, body): every route of the Truss server
    ("GET", "/", None), ("GET", "/v1/models/model", None), ("GET", "/v1/models/model/loaded", None),
    ("POST", PREDICT, 4), ("POST", "/v1/models/model:predict_binary", None), ("POST", "/invocations", 5),
    ("GET", "/ping", None), ("GET", "/v1/models/model/schema", None), ("POST", "/v1/chat/completions", {"messages": []}),
    ("POST", "/v1/completions", {}), ("POST", "/v1/embeddings", {}), ("POST", "/v1/messages", {}), ("POST", "/v1/responses", {}),
    ("POST", "/hot-reload", None),
]


def test_every_route_answers_as_truss_lab_serve_does(deployed, tmp_path):
    import msgpack

    import truss_lab

    url, _ = deployed
    root = write_truss(tmp_path / "doubler", MODEL, config={"runtime": {"predict_concurrency": 2}})
    with truss_lab.load(root) as tr, httpx.Client(base_url=url, timeout=60) as ray_client, \
            httpx.Client(base_url=tr.serve().url, timeout=60) as local:
        for method, path, body in ROUTES:
            kwargs = {}
            if path.endswith(":predict_binary"):
                kwargs = {"content": msgpack.packb(6), "headers": {"content-type": "application/octet-stream"}}
            elif method == "POST" and body is not None:
                kwargs = {"json": body}
            a, b = ray_client.request(method, path, **kwargs), local.request(method, path, **kwargs)
            assert (a.status_code, a.content) == (b.status_code, b.content), (path, a.status_code, a.text, b.status_code, b.text)
        metrics = ray_client.get("/metrics/")
        assert metrics.status_code == 200 and "truss_lab_requests_total" in metrics.text
        from websockets.sync.client import connect

        with connect(url.replace("http://", "ws://") + "/v1/websocket", open_timeout=10) as ws:
            try:
                ws.recv(timeout=10)
            except Exception:
                pass
            assert ws.close_code == 1003  # this model has no websocket(): Truss's answer, over Ray too

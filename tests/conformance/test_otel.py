"""`report.to_otel()` against the real Truss server's own trace file (OTEL_TRACING_NDJSON_FILE with
`runtime.enable_tracing_data: true`): the same spans, parents, events and attributes."""

from __future__ import annotations

import json
import time

import httpx

import truss_lab
from conftest import write_truss

MODEL = """
class Model:
    def preprocess(self, x):
        return x + 1

    def predict(self, x):
        return x * 2

    def postprocess(self, y):
        return {"y": y}
"""


def _shape(spans: list[dict]) -> dict:
    by_id = {s["context"]["span_id"]: s for s in spans}
    shape: dict = {}
    for s in spans:
        parent = by_id.get(s["parent_id"], {}).get("name") if s["parent_id"] else None
        events = [(e["name"], sorted(e["attributes"])) for e in s["events"]]
        shape[s["name"]] = {"parent": parent, "events": events, "kind": s["kind"], "attributes": sorted(s["attributes"])}
    return shape


def test_to_otel_spans_read_like_the_truss_servers(truss_env, tmp_path):
    root = write_truss(tmp_path / "otel", MODEL, config={"runtime": {"enable_tracing_data": True}})
    theirs_file = tmp_path / "truss.ndjson"
    with truss_env.start(root, env={"OTEL_TRACING_NDJSON_FILE": str(theirs_file)}, apps=tmp_path / "apps") as oracle:
        assert httpx.post(oracle.url + "/v1/models/model:predict", json=1).json() == {"y": 4}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(theirs_file.read_text().splitlines() if theirs_file.exists() else []) < 4:
            time.sleep(0.05)
    theirs = [json.loads(line) for line in theirs_file.read_text().splitlines()]
    with truss_lab.load(root) as tr:
        assert httpx.post(tr.serve().url + "/v1/models/model:predict", json=1).json() == {"y": 4}
        ours_file = tmp_path / "lab.ndjson"
        assert tr.report().to_otel(ours_file) == 4
    ours = [json.loads(line) for line in ours_file.read_text().splitlines()]
    a, b = _shape(theirs), _shape(ours)
    assert set(a) == set(b) == {"predict-endpoint", "call-pre", "call-predict", "call-post"}
    for name in ("call-pre", "call-predict", "call-post"):
        assert a[name] == b[name], (name, a[name], b[name])  # parent, events and their attributes, kind
    # the request span: its model-call section as the server's (which also times JSON de/serialisation over HTTP)
    assert b["predict-endpoint"]["parent"] is None and all(e in a["predict-endpoint"]["events"] for e in b["predict-endpoint"]["events"])
    assert set(theirs[0]) == set(ours[0])  # the same JSON fields per span

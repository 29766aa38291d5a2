"""Differential tests: the same requests to the real Truss server and to truss_lab's server, compared.

Each case is a truss plus requests. Compared: HTTP status, content type, the body (JSON-equal where
JSON, bytes otherwise), whether the answer was streamed, and the `x-baseten-error-*` headers. For an
error answer truss_lab may add detail to the body (the stage, file:line), so only status and headers
are compared there. The in-process API (`tr.predict`, `tr.stream`) must agree with the HTTP answer.

Cases: trusses shipped inside the installed `truss` package (`truss/tests/test_data`, used in place,
never copied into this repo) that run on a CPU without downloads, plus small trusses of our own, one
per behaviour.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import truss_lab

PREDICT = "/v1/models/model:predict"


@dataclass
class Req:
    json: Any = None
    path: str = PREDICT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


@dataclass
class Case:
    name: str
    requests: list[Req]
    shipped: str | None = None  # a truss under the truss package's tests/test_data
    model: str | None = None  # else: our own truss, this model.py
    config: str = "model_name: conformance\n"
    files: dict[str, str] = field(default_factory=dict)


GEN_PREDICT = """
class Model:
    def predict(self, x):
        for i in range(3):
            yield f"{i},"
"""

CASES = [
    # ---- Truss's own test trusses
    Case("shipped-basic", [Req({"x": 1}), Req([1, 2]), Req(path="/v1/models/model"), Req(path="/", method="GET")], shipped="test_basic_truss"),
    Case("shipped-async", [Req({"a": 1})], shipped="test_async_truss"),
    Case("shipped-error", [Req({"x": 1})], shipped="test_truss_with_error"),
    Case("shipped-async-generator", [Req({"x": 1}), Req({"x": 1}, headers={"accept": "application/json"})],
         shipped="test_streaming_async_generator_truss"),
    Case("shipped-streaming-error", [Req({"throw_error": False}), Req({"throw_error": True})], shipped="test_streaming_truss_with_error"),
    Case("shipped-server-conformance", [Req({"x": 1})], shipped="server_conformance_test_truss"),
    Case("shipped-concurrency", [Req({"x": 1})], shipped="test_concurrency_truss"),
    # ---- our own, one behaviour each
    Case("echo-dict", [Req({"a": [1, 2, {"b": None}]}), Req("text"), Req(3.5), Req(None), Req(True)],
         model="class Model:\n    def predict(self, x):\n        return x\n"),
    Case("any-model-name", [Req([1], path="/v1/models/whatever:predict"), Req(path="/v1/models/whatever", method="GET"),
                            Req(path="/v1/models/model/loaded", method="GET")],
         model="class Model:\n    def predict(self, x):\n        return {'got': x}\n"),
    Case("bad-json", [Req(content=b"{not json"), Req(content=b"")],
         model="class Model:\n    def predict(self, x):\n        return x\n"),
    Case("pre-and-post", [Req({"v": 2})], model="""
class Model:
    def preprocess(self, x):
        return x["v"] * 10
    def predict(self, x):
        return x + 1
    def postprocess(self, y):
        return {"y": y}
"""),
    Case("error-in-preprocess", [Req(1)], model="""
class Model:
    def preprocess(self, x):
        raise ValueError("bad input")
    def predict(self, x):
        return x
"""),
    Case("error-in-predict", [Req(1)], model="class Model:\n    def predict(self, x):\n        raise RuntimeError('boom')\n"),
    Case("error-in-postprocess", [Req(1)], model="""
class Model:
    def predict(self, x):
        return x
    def postprocess(self, y):
        raise KeyError("k")
"""),
    Case("numpy-output", [Req(1)], model="""
import numpy as np
class Model:
    def predict(self, x):
        return {"arr": np.arange(4).reshape(2, 2), "f": np.float32(0.5), "i": np.int64(7), "list": [np.float64(1.5)]}
"""),
    Case("nan-and-infinity", [Req(1)], model="""
class Model:
    def predict(self, x):
        return {"nan": float("nan"), "inf": float("inf"), "ninf": -float("inf")}
"""),
    Case("not-json-output", [Req(1)], model="class Model:\n    def predict(self, x):\n        return {'s': {1, 2}}\n"),
    Case("generator-function", [Req(1), Req(1, headers={"accept": "application/json"})], model=GEN_PREDICT),
    Case("returned-generator", [Req(1), Req(1, headers={"accept": "application/json"})], model="""
class Model:
    def predict(self, x):
        def gen():
            yield "a"
            yield "b"
        return gen()
"""),
    Case("async-returns-async-generator", [Req(2), Req(2, headers={"accept": "application/json"})], model="""
class Model:
    async def predict(self, x):
        async def gen():
            for i in range(x):
                yield f"tok{i} "
        return gen()
"""),
    Case("bytes-chunks", [Req(1), Req(1, headers={"accept": "application/json"})], model="""
class Model:
    def predict(self, x):
        yield b"ab"
        yield "cd"
"""),
    Case("generator-with-postprocess", [Req(1)], model="""
class Model:
    def predict(self, x):
        yield "a"
    def postprocess(self, y):
        return y
"""),
    Case("error-mid-stream", [Req(1), Req(1, headers={"accept": "application/json"})], model="""
class Model:
    def predict(self, x):
        yield "first "
        raise RuntimeError("mid-stream")
"""),
    Case("async-predict", [Req({"n": 3})], model="""
import asyncio
class Model:
    async def preprocess(self, x):
        await asyncio.sleep(0)
        return x["n"]
    async def predict(self, x):
        return list(range(x))
"""),
    Case("string-and-list-outputs", [Req("s"), Req([])], model="""
class Model:
    def predict(self, x):
        return "a string" if x == "s" else [1, "two", 3.0, None]
"""),
    Case("config-kwargs", [Req(1)], config="model_name: kw\nmodel_metadata: {answer: 42}\n", model="""
class Model:
    def __init__(self, config, data_dir, **kwargs):
        self.answer = config["model_metadata"]["answer"]
        self.data = data_dir.name
    def predict(self, x):
        return {"answer": self.answer, "data": self.data}
"""),
    Case("packages-import", [Req(2)], config="model_name: pk\n", files={"packages/helper_mod.py": "def double(x):\n    return 2 * x\n"}, model="""
from helper_mod import double
class Model:
    def predict(self, x):
        return double(x)
"""),
    Case("predict-concurrency-config", [Req(5)], config="model_name: pc\nruntime: {predict_concurrency: 2}\n",
         model="class Model:\n    def predict(self, x):\n        return x * 2\n"),
    Case("big-nested-output", [Req(1)], model="""
class Model:
    def predict(self, x):
        return {"rows": [{"id": i, "v": [i, i * 0.5, str(i)]} for i in range(200)]}
"""),
    Case("unicode", [Req("héllo ✓")], model="class Model:\n    def predict(self, x):\n        return {'echo': x, 'len': len(x)}\n"),
]


def shipped_dir(env, name: str) -> Path:
    site = next((env.root / "venv-cli" / "lib").glob("python*/site-packages"))
    return site / "truss" / "tests" / "test_data" / name


def make_truss(tmp: Path, case: Case) -> Path:
    root = tmp / case.name
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(case.config)
    (root / "model" / "model.py").write_text(textwrap.dedent(case.model))
    (root / "data").mkdir()
    for rel, text in case.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    streamed: bool
    error_headers: dict[str, str]

    def comparable(self) -> dict:
        out = {"status": self.status, "error_headers": self.error_headers}
        if self.status < 400:
            out["content_type"] = self.content_type
            out["streamed"] = self.streamed
            out["body"] = _body(self.body, self.content_type)
        return out


def _body(raw: bytes, content_type: str) -> Any:
    if content_type.startswith("application/json"):
        try:
            return json.loads(raw)  # NaN/Infinity are read back as Python floats on both sides
        except ValueError:
            return raw
    return raw


def send(client: httpx.Client, req: Req) -> Answer:
    kwargs: dict[str, Any] = {"headers": req.headers}
    if req.method == "POST":
        kwargs["content"] = req.content if req.content is not None else json.dumps(req.json).encode()
    with client.stream(req.method, req.path, **kwargs) as r:
        body = r.read()
        streamed = "content-length" not in r.headers and r.headers.get("transfer-encoding") == "chunked"
        errs = {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-baseten-error")}
        return Answer(r.status_code, r.headers.get("content-type", "").split(";")[0], body, streamed, errs)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True  # NaN
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_answers_as_the_truss_server(case: Case, truss_env, tmp_path):
    root = shipped_dir(truss_env, case.shipped) if case.shipped else make_truss(tmp_path, case)
    with truss_env.start(root, apps=tmp_path / "apps") as oracle, httpx.Client(base_url=oracle.url, timeout=60) as client:
        expected = [send(client, r) for r in case.requests]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = truss_lab.load(str(root))
    try:
        server = tr.serve()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            got = [send(client, r) for r in case.requests]
        for req, want, have in zip(case.requests, expected, got):
            w, h = want.comparable(), have.comparable()
            assert _same(w, h), f"{req}:\n  Truss:     {w}\n  truss_lab: {h}"
            if req.method == "POST" and req.path == PREDICT and req.content is None and w["status"] == 200 and not req.headers:
                in_process = _chunks_until_error(tr, req.json) if want.streamed else [tr.predict(req.json).output]
                if want.streamed:
                    assert b"".join(c if isinstance(c, bytes) else str(c).encode() for c in in_process) == want.body
                else:
                    assert _same(json.loads(truss_lab.wrapper.truss_json(in_process[0])), w["body"])
        assert tr.lock_available == tr.concurrency
    finally:
        tr.close()


def _chunks_until_error(tr, x) -> list:
    """tr.stream's chunks; an error mid-stream raises there (a deliberate difference, see README) after
    the chunks the HTTP client also got."""
    chunks = []
    try:
        for chunk in tr.stream(x):
            chunks.append(chunk)
    except truss_lab.ModelError:
        pass
    return chunks


def test_at_least_forty_requests_are_compared():
    assert sum(len(c.requests) for c in CASES) >= 40 and len(CASES) >= 25

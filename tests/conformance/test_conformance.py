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
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

import truss_lab
from conftest import CONTEXTVAR_STREAM_MODEL

PREDICT = "/v1/models/model:predict"


@dataclass
class Req:
    json: Any = None
    path: str = PREDICT
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    error_value: bool = False  # an error answer's `error` value is compared too (an HTTPException's detail)


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

MSGPACK_IN = b"\x81\xa1a\x93\x01\x02\x03"  # msgpack of {"a": [1, 2, 3]}

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
    # every chunk type: bytes, memoryview and str are streamed; any other cuts the stream (the client sees
    # an incomplete body), and joined for `Accept: application/json` each is str(chunk)
    Case("chunk-types", [Req(kind, headers=accept) for kind in ("bytes", "bytearray", "memoryview", "str", "dict", "int", "none", "numpy")
                         for accept in ({}, {"accept": "application/json"}) if not (kind == "memoryview" and accept)], model="""
import numpy as np
CHUNKS = {"bytes": b"bc", "bytearray": bytearray(b"bc"), "memoryview": memoryview(b"bc"), "str": "bc", "dict": {"b": "c"},
          "int": 7, "none": None, "numpy": np.float32(1.5)}
class Model:
    def predict(self, kind):
        def gen():
            yield b"a"
            yield CHUNKS[kind]
            yield "d"
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
    Case("async-stream-one-context", [Req(7), Req(7, headers={"accept": "application/json"})], model=CONTEXTVAR_STREAM_MODEL),
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
    # ---- method signatures: a `request` parameter gets the request (Truss's ArgConfig)
    Case("request-only", [Req({"q": 1}, headers={"x-user": "ann"}), Req(content=b"{not json", headers={"x-user": "bob"})], model="""
import fastapi
class Model:
    async def predict(self, request: fastapi.Request):
        body = await request.body()
        return {"user": request.headers.get("x-user"), "body": body.decode(), "method": request.method,
                "disconnected": await request.is_disconnected()}
"""),
    Case("inputs-and-request", [Req({"q": 2}, headers={"x-trace": "t1"})], model="""
from starlette.requests import Request
class Model:
    def preprocess(self, x, request: Request):
        return {"q": x["q"], "trace": request.headers.get("x-trace")}
    def predict(self, x):
        return x
    def postprocess(self, y, request: Request):
        with request.state.watch_disconnect() as gone:
            return {**y, "gone": gone.is_set()}
"""),
    Case("no-argument-predict", [Req(1)], model="class Model:\n    def predict(self):\n        return 'no input'\n"),
    # ---- typed I/O
    Case("pydantic-io", [Req({"prompt": "hi", "n": 2}), Req({"n": 2}), Req({"prompt": "x", "n": "many"}), Req(content=b"{bad")], model="""
import pydantic
class In(pydantic.BaseModel):
    prompt: str
    n: int = 1
class Out(pydantic.BaseModel):
    text: str
    repeats: list[str]
class Model:
    def predict(self, x: In) -> Out:
        return Out(text=x.prompt, repeats=[x.prompt] * x.n)
"""),
    Case("pydantic-via-preprocess", [Req({"v": 3}), Req({"v": "x"})], model="""
from pydantic import BaseModel
class In(BaseModel):
    v: int
class Model:
    def preprocess(self, x: In):
        return x.v * 2
    def predict(self, x):
        return x
"""),
    Case("annotated-and-string-annotations", [Req({"prompt": "a"})], model="""
from typing import Annotated
import pydantic
class In(pydantic.BaseModel):
    prompt: str
class Model:
    def predict(self, x: Annotated[In, "the prompt"]):
        return type(x).__name__
"""),
    Case("future-annotations", [Req({"prompt": "a"})], model="""
from __future__ import annotations
import pydantic
class In(pydantic.BaseModel):
    prompt: str
class Model:
    def predict(self, x: In):
        return type(x).__name__
"""),
    # ---- Responses and HTTPException
    Case("returned-responses", [Req("json"), Req("text"), Req("error"), Req("stream")], model="""
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
class Model:
    def predict(self, x):
        if x == "json":
            return JSONResponse({"made": "here"}, status_code=201, headers={"x-custom": "1"})
        if x == "text":
            return PlainTextResponse("plain")
        if x == "error":
            return JSONResponse({"why": "teapot"}, status_code=418)
        return StreamingResponse(iter([b"s1", b"s2"]), media_type="text/event-stream")
"""),
    Case("response-with-postprocess", [Req(1)], model="""
from fastapi.responses import PlainTextResponse
class Model:
    def predict(self, x):
        return PlainTextResponse("p")
    def postprocess(self, y):
        return y
"""),
    # ("number" last: the Truss server closes the connection after its unhandled-exception 500)
    Case("http-exception", [Req(kind, error_value=True) for kind in ("pre", "dict", "list", "none", "nested", "number")], model="""
from fastapi import HTTPException
DETAILS = {"dict": {"field": "bad", "why": ["too", "long"]}, "list": [1, "two"], "number": 3, "none": None,
           "nested": {"error": {"reason": "quota", "retry_after": 2.5}}}
class Model:
    def preprocess(self, x):
        if x == "pre":
            raise HTTPException(status_code=401, detail="who are you")
        return x
    def predict(self, x):
        raise HTTPException(status_code=422, detail=DETAILS[x])
"""),
    # ---- OpenAI-compatible routes
    Case("openai-routes", [
        Req({"messages": [{"role": "user", "content": "hi"}]}, path="/v1/chat/completions"),
        Req({"prompt": "ab", "stream": True}, path="/v1/completions"),
        Req({"prompt": "ab", "stream": True}, path="/v1/completions", headers={"accept": "application/json"}),
        Req({"prompt": "ab", "stream": True}, path="/v1/completions",
            headers={"accept": "application/json", "user-agent": "OpenAI/Python 1.61.0"}),
        Req({"input": ["a", "bb"]}, path="/v1/embeddings", headers={"x-key": "k"}),
        Req({"model": "m"}, path="/v1/messages"),
        Req({"model": "m"}, path="/v1/responses"),
        Req({"raise": True}, path="/v1/chat/completions"),
        Req({"x": 1}),
    ], model="""
from starlette.requests import Request
class Model:
    def predict(self, x):
        return {"predict": x}
    async def chat_completions(self, body):
        if body.get("raise"):
            raise ValueError("bad chat")
        return {"choices": [{"message": {"role": "assistant", "content": body["messages"][0]["content"].upper()}}]}
    def completions(self, body):
        def gen():
            for ch in body["prompt"]:
                yield f"data: {ch}\\n\\n"
        return gen()
    def embeddings(self, body, request: Request):
        return {"data": [[float(len(s))] for s in body["input"]], "key": request.headers.get("x-key")}
    def responses(self):
        return {"id": "r1"}
"""),
    # ---- readiness decided by is_healthy
    Case("is-healthy-false", [Req(path="/v1/models/model", method="GET"), Req(path="/v1/models/model/loaded", method="GET"), Req(1)], model="""
class Model:
    def is_healthy(self):
        return False
    def predict(self, x):
        return x
"""),
    Case("is-healthy-raises", [Req(path="/v1/models/model", method="GET")], model="""
class Model:
    async def is_healthy(self):
        raise RuntimeError("sick")
    def predict(self, x):
        return x
"""),
    Case("is-healthy-true", [Req(path="/v1/models/model", method="GET")], model="""
class Model:
    def is_healthy(self):
        return True
    def predict(self, x):
        return x
"""),
    # ---- msgpack
    Case("msgpack-binary", [
        Req(content=MSGPACK_IN, headers={"content-type": "application/octet-stream"}),
        Req(content=MSGPACK_IN, headers={"content-type": "application/octet-stream"}, path="/v1/models/model:predict_binary"),
        Req({"a": [1, 2]}, path="/v1/models/model:predict_binary"),
        Req(content=b"\xc1", headers={"content-type": "application/octet-stream"}),
    ], model="""
import numpy as np
class Model:
    def predict(self, x):
        return {"doubled": np.asarray(x["a"]) * 2, "n": len(x["a"])}
"""),
    # ---- model construction
    Case("config-defaults", [Req(1)], config="model_name: defaults\nmodel_metadata: {k: v}\nruntime: {predict_concurrency: '2'}\n"
         "environment_variables: {FLAG: true, N: 3, EMPTY: null}\n", model="""
import os
class Model:
    def __init__(self, config, **kwargs):
        self.config = config
    def predict(self, x):
        env = {k: os.environ.get(k) for k in ("FLAG", "N", "EMPTY")}
        return {"config": self.config, "env": env}
"""),
    Case("lazy-data-resolver", [Req(1)], model="""
class Model:
    def __init__(self, lazy_data_resolver, data_dir):
        self.resolver = lazy_data_resolver
    def load(self):
        self.got = self.resolver.block_until_download_complete()
    def predict(self, x):
        return {"got": self.got}
"""),
    Case("async-load", [Req(1)], model="""
import asyncio
class Model:
    async def load(self):
        await asyncio.sleep(0)
        self.loaded = True
    def predict(self, x):
        return getattr(self, "loaded", "never ran")
"""),
    Case("load-retried", [Req(1)], model="""
TRIES = []
class Model:
    def load(self):
        TRIES.append(1)
        if len(TRIES) == 1:
            raise OSError("flaky")
    def predict(self, x):
        return len(TRIES)
"""),
    Case("setup-environment-without-environment", [Req(1)], model="""
class Model:
    def __init__(self, environment, **kwargs):
        self.environment = environment
        self.calls = []
    def setup_environment(self, environment):
        self.calls.append(environment)
    def predict(self, x):
        return {"environment": self.environment, "calls": self.calls}
"""),
    Case("secrets-rules", [Req(1)], config="model_name: sec\nsecrets: {token: abc, empty: '', unset: null}\n", model="""
class Model:
    def __init__(self, secrets, **kwargs):
        self.secrets = secrets
    def predict(self, x):
        def attempt(fn):
            try:
                return fn()
            except BaseException as exc:
                return type(exc).__name__
        s = self.secrets
        return {"token": attempt(lambda: s["token"]), "empty": attempt(lambda: s["empty"]),
                "unset": attempt(lambda: s["unset"]), "undeclared": attempt(lambda: s["nope"]),
                "get": attempt(lambda: s.get("nope", "dflt")), "get_declared": attempt(lambda: s.get("token")),
                "in": attempt(lambda: "nope" in s), "in_declared": attempt(lambda: "token" in s),
                "iter": attempt(lambda: list(s)), "len": attempt(lambda: len(s))}
"""),
    # ---- imports as in Truss's image
    Case("from-model-import", [Req(3)], config="model_name: mi\n", files={
        "model/helper.py": "K = 10\ndef times(x):\n    return x * K\n",
        "model/sub/__init__.py": "",
        "model/sub/deep.py": "from model.helper import K\nDEEP = K + 1\n",
    }, model="""
from model.helper import times
import model.sub.deep
import model.helper as h
class Model:
    def predict(self, x):
        from model.sub.deep import DEEP
        return [times(x), DEEP, model.sub.deep.DEEP, h.K]
"""),
    Case("packages-do-not-shadow-stdlib", [Req(1)], config="model_name: ps\n", files={
        "packages/csv.py": "MARK = 'packages copy'\n",
        "packages/own_util.py": "MARK = 'own'\n",
    }, model="""
import csv
import own_util
class Model:
    def predict(self, x):
        return [getattr(csv, "MARK", "stdlib"), own_util.MARK]
"""),
    # ---- issue 24: a postprocess that yields streams; a secret the model lacks is its stage's error
    Case("postprocess-generator", [Req(1), Req(1, headers={"accept": "application/json"})], model="""
class Model:
    def predict(self, x):
        return [1, 2, 3]
    def postprocess(self, y):
        for v in y:
            yield f"{v},"
"""),
    Case("postprocess-async-generator", [Req(1), Req(1, headers={"accept": "application/json"})], model="""
class Model:
    def predict(self, x):
        return [x, x + 1]
    async def postprocess(self, y):
        for v in y:
            yield f"{v};"
"""),
    Case("secret-not-found-in-predict", [Req(1)], config="model_name: sec\nsecrets: {declared: null}\n", model="""
class Model:
    def __init__(self, secrets, **kwargs):
        self._secrets = secrets
    def predict(self, x):
        return self._secrets["declared"] if x else self._secrets["undeclared"]
"""),
    # ---- issue 24: the rest of the server's routes
    Case("schema-typed", [Req(path="/v1/models/model/schema", method="GET"), Req({"prompt": "hi"}, path="/invocations"),
                          Req(path="/ping", method="GET"), Req({"prompt": 1}, path="/invocations")], model="""
import pydantic
class In(pydantic.BaseModel):
    prompt: str
class Out(pydantic.BaseModel):
    text: str
    n: int = 0
class Model:
    def predict(self, x: In) -> Out:
        return Out(text=x.prompt)
"""),
    Case("schema-streaming", [Req(path="/v1/models/model/schema", method="GET")], model="""
from typing import Generator
import pydantic
class In(pydantic.BaseModel):
    prompt: str
class Model:
    def predict(self, x: In) -> Generator[str, None, None]:
        yield x.prompt
"""),
    Case("schema-none", [Req(path="/v1/models/whatever/schema", method="GET"), Req(path="/metrics", method="GET"),
                         Req(path="/hot-reload"), Req([1], path="/invocations")],
         model="class Model:\n    def predict(self, x):\n        return x\n"),
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
    complete: bool = True  # False: the server cut the body (the client saw an incomplete chunked body)

    def comparable(self, error_value: bool = False) -> dict:
        out = {"status": self.status, "error_headers": self.error_headers, "complete": self.complete}
        if self.status >= 400 and error_value:
            out["error"] = json.loads(self.body)["error"]
        if self.status < 400:
            out["content_type"] = self.content_type
            out["streamed"] = self.streamed
            out["body"] = _body(self.body, self.content_type)
        return out


def _body(raw: bytes, content_type: str) -> Any:
    if content_type == "application/octet-stream":
        try:  # msgpack: compared as the structure it packs (numpy arrays as their msgpack-numpy maps)
            return msgpack.unpackb(raw, strict_map_key=False)
        except Exception:
            return raw
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
        body, complete = b"", True
        try:
            for part in r.iter_bytes():
                body += part
        except httpx.RemoteProtocolError:  # the server cut the stream (a chunk it cannot send)
            complete = False
        streamed = "content-length" not in r.headers and r.headers.get("transfer-encoding") == "chunked"
        errs = {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("x-baseten-error")}
        return Answer(r.status_code, r.headers.get("content-type", "").split(";")[0], body, streamed, errs, complete)


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
            w, h = want.comparable(req.error_value), have.comparable(req.error_value)
            assert _same(w, h), f"{req}:\n  Truss:     {w}\n  truss_lab: {h}"
            plain = req.method == "POST" and req.path == PREDICT and req.content is None and not req.headers
            if plain and w["status"] == 200 and (want.streamed or w["content_type"] == "application/json") \
                    and not truss_lab.serialization.is_response(tr.run(req.json).output):  # a Response is sent as it is
                in_process = _chunks_until_error(tr, req.json) if want.streamed else [tr.predict(req.json).output]
                if want.streamed:
                    assert _as_streamed(in_process) == (want.body, want.complete)
                else:
                    assert _same(json.loads(truss_lab.serialization.truss_json(in_process[0])), w["body"])
        assert tr.lock_available == tr.concurrency
    finally:
        tr.close()


def _as_streamed(chunks: list) -> tuple[bytes, bool]:
    """What a client reads of these chunks from the Truss server (starlette's StreamingResponse sends bytes
    and memoryview as they are and str as UTF-8, and fails on anything else): (body, complete)."""
    body = b""
    for c in chunks:
        if not isinstance(c, (bytes, memoryview, str)):
            return body, False
        body += c.encode() if isinstance(c, str) else bytes(c)
    return body, True


def _chunks_until_error(tr, x) -> list:
    """tr.stream's chunks; an error mid-stream raises there (a deliberate difference, docs/parity.md) after
    the chunks the HTTP client also got."""
    chunks = []
    try:
        for chunk in tr.stream(x):
            chunks.append(chunk)
    except truss_lab.ModelError:
        pass
    return chunks


def test_at_least_forty_cases_are_compared():
    assert len(CASES) >= 45 and sum(len(c.requests) for c in CASES) >= 90


REFUSED = {
    "two-args": ("class Model:\n    def predict(self, x, y):\n        return x\n",
                 "`predict` method with two arguments must have request as second argument"),
    "is-healthy-arg": ("class Model:\n    def predict(self, x):\n        return x\n    def is_healthy(self, x):\n        return True\n",
                       "`is_healthy` must have only one argument: `self`."),
    "websocket-and-predict": ("class Model:\n    def predict(self, x):\n        return x\n    async def websocket(self, ws):\n        pass\n",
                              "cannot have both `websocket` and any of"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_definition_truss_refuses_fails_both_loads_with_its_reason(name, truss_env, tmp_path):
    model, reason = REFUSED[name]
    root = make_truss(tmp_path, Case(name, [], model=model))
    with truss_env.start(root, apps=tmp_path / "apps") as oracle:
        assert not oracle.wait_ready(30)  # a failed load() shuts the real server down
        assert reason in oracle.output()
    with pytest.raises(truss_lab.LoadError) as info:
        truss_lab.load(str(root))
    assert reason in str(info.value)


WEBSOCKET_MODEL = """
class Model:
    async def websocket(self, ws):
        while True:
            text = await ws.receive_text()
            if text == "bye":
                return
            if text == "boom":
                raise RuntimeError("boom")
            await ws.send_text(text.upper())
"""


def _websocket_session(url: str, messages: list[str]) -> tuple[list[str], int | None, str | None]:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    got = []
    with connect(url.replace("http://", "ws://") + "/v1/websocket", open_timeout=10) as ws:
        try:
            for m in messages:
                ws.send(m)
                if m not in ("bye", "boom"):
                    got.append(ws.recv(timeout=10))
            ws.recv(timeout=10)
        except ConnectionClosed:
            pass
        return got, ws.close_code, ws.close_reason  # the reason too: a client may show it


@pytest.mark.parametrize("ending", ["bye", "boom"])
def test_websocket_sessions_match(ending, truss_env, tmp_path):
    root = make_truss(tmp_path, Case("ws", [], model=WEBSOCKET_MODEL))
    messages = ["hi", "there", ending]
    with truss_env.start(root, apps=tmp_path / "apps") as oracle:
        expected = _websocket_session(oracle.url, messages)
        predict_expected = send(httpx.Client(base_url=oracle.url), Req(1))
    with truss_lab.load(str(root)) as tr:
        server = tr.serve()
        got = _websocket_session(server.url, messages)
        predict_got = send(httpx.Client(base_url=server.url), Req(1))
        assert predict_got.comparable() == predict_expected.comparable()
        with pytest.raises(truss_lab.TrussLabError, match="websocket"):
            tr.predict(1)
    assert got == expected and expected[0] == ["HI", "THERE"]


def test_streaming_read_timeout_cuts_the_stream_as_truss_does(truss_env, tmp_path):
    case = Case("read-timeout", [], config="model_name: rt\nruntime: {streaming_read_timeout: 1}\n", model="""
import time
class Model:
    def predict(self, x):
        yield "a"
        time.sleep(2.5)
        yield "b"
""")
    root = make_truss(tmp_path, case)

    def read(url: str) -> tuple[list[bytes], str | None]:
        got, error = [], None
        with httpx.Client(base_url=url, timeout=30) as client:
            try:
                with client.stream("POST", PREDICT, json=1) as r:
                    got.extend(r.iter_bytes())
            except httpx.RemoteProtocolError as exc:
                error = type(exc).__name__
        return got, error

    with truss_env.start(root, apps=tmp_path / "apps") as oracle:
        expected = read(oracle.url)
    with truss_lab.load(str(root)) as tr:
        assert tr.bundle.streaming_read_timeout == 1.0
        got = read(tr.serve().url)
        # The cut stream's generator is closed once its pull returns: the lock is free for the next request.
        done = threading.Event()
        threading.Thread(target=lambda: (tr.run(1), done.set()), daemon=True).start()
        assert done.wait(20)
    assert got == expected == ([b"a"], "RemoteProtocolError")

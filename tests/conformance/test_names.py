"""Truss's module names, against the real Truss server: the same names, pickles that load both ways,
`importlib`, `sys.modules[cls.__module__]`, logger names and spawn workers."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import pytest

import truss_lab
from conftest import write_truss

PREDICT = "/v1/models/model:predict"

TRANSFORMERS = """
class Scale:
    def __init__(self, k):
        self.k = k

    def transform(self, xs):
        return [x * self.k for x in xs]


def triple(x):
    return x * 3
"""

MODEL = """
import base64, importlib, logging, pickle, sys
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from model.transformers import Scale, triple
import utils

log = logging.getLogger(__name__)


class Model:
    def __init__(self, data_dir, **kwargs):
        self._data_dir = data_dir

    def load(self):
        with open(self._data_dir / "scaler.pkl", "rb") as f:
            self.scaler = pickle.load(f)  # written by a training script: it names model.transformers.Scale

    def predict(self, req):
        op = req["op"]
        if op == "names":
            return {"model": type(self).__module__, "helper": Scale.__module__, "package_module": utils.__name__,
                    "logger": log.name, "helper_logger": logging.getLogger(Scale.__module__).name,
                    "import_module": importlib.import_module("model.transformers").Scale is Scale,
                    "sys_modules": sys.modules[type(self).__module__].Model is type(self),
                    "scaled": self.scaler.transform([1, 2]), "scaler_is_ours": type(self.scaler) is Scale}
        if op == "dump":
            return base64.b64encode(pickle.dumps({"scale": Scale(req["k"]), "fn": triple, "model": Model}, protocol=4)).decode()
        if op == "load":
            obj = pickle.loads(base64.b64decode(req["blob"]))
            return {"k": obj["scale"].k, "fn": obj["fn"](2), "same_class": type(obj["scale"]) is Scale, "model": obj["model"] is Model}
        if op == "spawn":
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                return pool.submit(triple, req["x"]).result(timeout=120)
"""


@pytest.fixture
def names_truss(tmp_path) -> Path:
    root = write_truss(tmp_path / "names", MODEL, files={"model/transformers.py": TRANSFORMERS,
                                                          "packages/utils.py": "NAME = 'utils'\n"})
    # the training script, run from the truss root as one would: it pickles model.transformers.Scale
    subprocess.run([sys.executable, "-c", "import pickle, sys; sys.path.insert(0, '.'); from model.transformers import Scale; "
                    "pickle.dump(Scale(10), open('data/scaler.pkl', 'wb'), protocol=4)"], cwd=root, check=True)
    return root


def _ask(client: httpx.Client, body) -> object:
    r = client.post(PREDICT, json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def test_module_names_and_pickles_match_the_truss_server_both_ways(truss_env, names_truss, tmp_path):
    ops = [{"op": "names"}, {"op": "dump", "k": 4}, {"op": "spawn", "x": 5}]
    with truss_env.start(names_truss, apps=tmp_path / "apps") as oracle, httpx.Client(base_url=oracle.url) as truss:
        expected = [_ask(truss, op) for op in ops]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = truss_lab.load(names_truss)
        try:
            server = tr.serve()
            with httpx.Client(base_url=server.url) as lab:
                got = [_ask(lab, op) for op in ops]
                assert got == expected  # names, the very pickle bytes, the spawn worker's answer
                assert expected[0]["model"] == "model.model" and expected[0]["scaled"] == [10, 20]
                # a pickle written on each side loads on the other, into the same classes
                from_truss, from_lab = expected[1], got[1]
                on_lab = _ask(lab, {"op": "load", "blob": from_truss})
                on_truss = _ask(truss, {"op": "load", "blob": from_lab})
                assert on_lab == on_truss == {"k": 4, "fn": 6, "same_class": True, "model": True}
            assert tr.predict({"op": "names"}).output == expected[0]  # in the notebook too
        finally:
            tr.close()

"""Model code under its Truss module names (issue 23), one truss per process (issue 31): a second truss
runs in a worker process of its own; versions released."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import types
import weakref

import pytest

import truss_lab
from conftest import write_truss

TRANSFORMERS = """
from sklearn.base import BaseEstimator, TransformerMixin

class Scale(BaseEstimator, TransformerMixin):
    def __init__(self, k=2.0):
        self.k = k
    def fit(self, X, y=None):
        self.n_features_in_ = len(X[0])
        return self
    def transform(self, X):
        return X * self.k
"""

JOBLIB_MODEL = """
import joblib
import numpy as np

class Model:
    def __init__(self, data_dir, **kwargs):
        self._data_dir = data_dir
    def load(self):
        self.pipe = joblib.load(self._data_dir / "pipeline.joblib")
    def predict(self, x):
        return self.pipe.transform(np.asarray(x, dtype=float)).tolist()
"""


def test_a_joblib_pipeline_naming_the_trusss_own_transformer_loads(tmp_path):
    pytest.importorskip("sklearn")
    root = write_truss(tmp_path / "pipe", JOBLIB_MODEL, files={"model/transformers.py": TRANSFORMERS})
    # the training script, as one is written: from the truss root, importing model.transformers
    subprocess.run([sys.executable, "-c",
                    "import joblib, sys; sys.path.insert(0, '.'); from sklearn.pipeline import make_pipeline; "
                    "from model.transformers import Scale; joblib.dump(make_pipeline(Scale(3.0)).fit([[0.0, 0.0]]), 'data/pipeline.joblib')"],
                   cwd=root, check=True)
    with truss_lab.load(root) as tr:
        assert tr.predict([[1.0, 2.0]]).output == [[3.0, 6.0]]
        step = tr.model.pipe.steps[0][1]
        assert type(step).__module__ == "model.transformers" and type(step).__name__ == "Scale"
        assert importlib.import_module("model.transformers").Scale is type(step)  # from a notebook cell, too


HELPER_MODEL = """
import importlib, logging, pickle, sys
from model.helper import Item
log = logging.getLogger(__name__)

class Model:
    def __init__(self, data_dir, **kwargs):
        self._data_dir = data_dir
    def load(self):
        cache = self._data_dir / "cache.pkl"
        if cache.exists():
            self.items = pickle.loads(cache.read_bytes())  # the cache an earlier load() wrote
        else:
            self.items = [Item(1), Item(2)]
            cache.write_bytes(pickle.dumps(self.items))
    def predict(self, x):
        return {"module": type(self).__module__, "logger": log.name, "item": Item.__module__,
                "by_name": importlib.import_module("model.helper").Item is Item,
                "by_module": sys.modules[Item.__module__].Item is Item, "items": [i.n for i in self.items]}
"""


def test_code_has_its_truss_names_and_a_cache_it_pickles_survives_full_reloads(tmp_path):
    root = write_truss(tmp_path / "cache", HELPER_MODEL, files={"model/helper.py": "class Item:\n    def __init__(self, n):\n        self.n = n\n"})
    with truss_lab.load(root) as tr:
        out = tr.predict(None).output
        assert out == {"module": "model.model", "logger": "model.model", "item": "model.helper", "by_name": True,
                       "by_module": True, "items": [1, 2]}
        blob = (root / "data" / "cache.pkl").read_bytes()
        assert b"model.helper" in blob and b"_truss_lab" not in blob  # it would load on Truss too
        for _ in range(2):  # the second and later full reloads read that cache
            event = tr.reload(full=True)
            assert event.kind == "full", event
            assert tr.predict(None).output["items"] == [1, 2]


SPAWN_MODEL = """
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from model.work import square

class Model:
    def predict(self, xs):
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(square, xs))
"""


def test_a_spawn_process_pool_runs_model_code(tmp_path):
    root = write_truss(tmp_path / "spawn", SPAWN_MODEL, files={"model/work.py": "def square(x):\n    return x * x\n"})
    with truss_lab.load(root) as tr:
        assert tr.predict([1, 2, 3]).output == [1, 4, 9]


def test_spawn_from_a_thread_the_model_started(tmp_path):
    model = SPAWN_MODEL.replace("    def predict(self, xs):\n", "    def predict(self, xs):\n        return self._in_thread(xs)\n\n    def _work(self, xs):\n")
    model += "\n    def _in_thread(self, xs):\n        import threading\n        box = []\n        t = threading.Thread(target=lambda: box.append(self._work(xs)))\n        t.start(); t.join()\n        return box[0]\n"
    root = write_truss(tmp_path / "spawn2", model, files={"model/work.py": "def square(x):\n    return x * x\n"})
    with truss_lab.load(root) as tr:
        assert tr.predict([4]).output == [16]


# ------------------------------------------------------------------ isolation

TWIN = """
import utils
from model.helper import WHO

class Model:
    def predict(self, x):
        import importlib
        return [WHO, utils.WHO, importlib.import_module("model.helper").WHO]
"""


def _twin(tmp_path, name):
    return write_truss(tmp_path / name, TWIN, files={"model/helper.py": f"WHO = {name!r}\n",
                                                     "packages/utils.py": f"WHO = {name!r} + '-utils'\n"})


def test_a_second_truss_runs_in_a_worker_and_never_sees_the_kernels_modules(tmp_path):
    a_root, b_root = _twin(tmp_path, "a"), _twin(tmp_path, "b")
    with truss_lab.load(a_root) as a, truss_lab.load(b_root) as b:
        assert (a.process, b.process) == ("kernel", "worker") and a.pid != b.pid
        results = {}

        def hammer(tr, key):
            results[key] = [tr.predict(None).output for _ in range(50)]

        threads = [threading.Thread(target=hammer, args=(tr, k)) for tr, k in ((a, "a"), (b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(map(tuple, results["a"])) == {("a", "a-utils", "a")}
        assert set(map(tuple, results["b"])) == {("b", "b-utils", "b")}
        # the kernel holds a's code under its real names, as Truss's image would: real modules, no stand-ins
        assert importlib.import_module("model.helper").WHO == "a" and sys.modules["utils"].WHO == "a-utils"
        assert type(sys.modules["model.helper"]) is types.ModuleType
    assert "model.helper" not in sys.modules and "utils" not in sys.modules  # gone with the truss


def test_a_truss_without_a_module_does_not_get_anothers(tmp_path):
    a_root = _twin(tmp_path, "a")
    lone = write_truss(tmp_path / "lone", "class Model:\n    def predict(self, x):\n        import utils\n        return utils.WHO\n")
    with truss_lab.load(a_root) as a, truss_lab.load(lone) as tr:
        assert a.predict(None).ok
        result = tr.run(None)
        assert not result.ok and "No module named 'utils'" in str(result.error)


def test_loading_the_folder_the_kernel_holds_again_replaces_it_and_a_worker_keeps_its_own_state(tmp_path):
    root = write_truss(tmp_path / "twice", "import model.registry as registry\nclass Model:\n    def load(self):\n"
                       "        registry.COUNT.append(1)\n    def predict(self, x):\n        return len(registry.COUNT)\n",
                       files={"model/registry.py": "COUNT = []\n"})
    one = truss_lab.load(root)
    with truss_lab.load(root, process="worker") as two:
        assert one.predict(None).output == 1 and two.predict(None).output == 1
    again = truss_lab.load(root)  # re-running the cell that loaded it: the new one replaces it
    try:
        assert again.predict(None).output == 1 and again.process == "kernel"
        with pytest.raises(truss_lab.TrussLabError, match="closed"):
            one.predict(None)
    finally:
        again.close()


# ------------------------------------------------------------------ versions released


def test_replaced_and_closed_versions_are_collected(tmp_path):
    root = write_truss(tmp_path / "free", "import numpy as np\nBIG = np.ones(1000)\nclass Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(root) as tr:
        refs = [weakref.ref(tr.serving.module.BIG)]
        for i in range(3):
            (root / "model" / "model.py").write_text(f"import numpy as np\nBIG = np.ones(1000) * {i}\nclass Model:\n    def predict(self, x):\n        return x\n")
            assert tr.reload().ok
            refs.append(weakref.ref(tr.serving.module.BIG))
        gc.collect()
        assert [r() is None for r in refs] == [True, True, True, False]
    gc.collect()
    assert refs[-1]() is None  # closed: its version went too


def test_five_reloads_of_a_truss_with_a_200_mb_global_keep_one_copy(tmp_path):
    psutil = pytest.importorskip("psutil")
    root = write_truss(tmp_path / "big", "import numpy as np\nWEIGHTS = np.ones(25_000_000)  # 200 MB, touched\n"
                                         "class Model:\n    def predict(self, x):\n        return float(WEIGHTS[0])\n")
    me = psutil.Process()
    tr = truss_lab.load(root)
    gc.collect()
    one = me.memory_info().rss
    for _ in range(5):  # as re-running `%truss load` does: the truss the kernel holds is replaced
        tr = truss_lab.load(root)
        gc.collect()
    after = me.memory_info().rss
    tr.close()
    assert after - one < 100 * 2**20, f"grew {(after - one) / 2**20:.0f} MB over five re-loads"


# ------------------------------------------------------------------ environment, loggers, messages


def test_a_removed_environment_variable_is_unset_and_never_leaks(tmp_path, monkeypatch):
    monkeypatch.delenv("TL_GONE", raising=False)
    monkeypatch.setenv("TL_KEPT", "outer")
    root = write_truss(tmp_path / "env", "import os\nclass Model:\n    def predict(self, x):\n        return [os.environ.get('TL_GONE'), os.environ.get('TL_KEPT')]\n",
                       config={"environment_variables": {"TL_GONE": "1", "TL_KEPT": "inner"}})
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == ["1", "inner"]
        import yaml

        (root / "config.yaml").write_text(yaml.safe_dump({"model_name": "env"}))
        assert tr.reload().kind == "full"
        assert tr.predict(None).output == [None, "outer"]  # unset; the other back to what it was before
    other = write_truss(tmp_path / "other", "import os\nclass Model:\n    def predict(self, x):\n        return os.environ.get('TL_GONE')\n",
                        config={"environment_variables": {"TL_GONE": "2"}})
    with truss_lab.load(other) as tr:
        assert tr.predict(None).output == "2"
    assert "TL_GONE" not in os.environ and os.environ["TL_KEPT"] == "outer"


def test_one_logger_per_module_name_whatever_the_reloads(tmp_path):
    root = write_truss(tmp_path / "logs", "import logging\nlog = logging.getLogger(__name__)\nlog.addHandler(logging.NullHandler()) if not log.handlers else None\n"
                                          "class Model:\n    def predict(self, x):\n        return log.name\n")
    before = set(logging.Logger.manager.loggerDict)
    with truss_lab.load(root) as tr:
        for i in range(4):
            (root / "model" / "model.py").write_text((root / "model" / "model.py").read_text() + f"\n# {i}\nX{i} = {i}\n")
            assert tr.reload().ok
        assert tr.predict(None).output == "model.model"
        assert len(logging.getLogger("model.model").handlers) == 1  # each import's handler replaced the one before
    added = set(logging.Logger.manager.loggerDict) - before
    assert added <= {"model", "model.model"}, added
    assert logging.getLogger("model.model").handlers == []  # closed: the handlers its code added went with it


def test_errors_and_tracebacks_say_the_truss_names(tmp_path):
    root = write_truss(tmp_path / "err", "from model import helper\nclass Model:\n    def predict(self, x):\n        return helper.missing\n",
                       files={"model/helper.py": "X = 1\n"})
    with truss_lab.load(root) as tr:
        result = tr.run(None)
        assert "module 'model.helper' has no attribute 'missing'" in str(result.error)
        assert "_truss_lab" not in str(result.error) and "_truss_lab" not in (result.error.model_traceback() or "")


def test_a_notebook_pickle_of_model_objects_needs_no_active_model(tmp_path):
    root = write_truss(tmp_path / "nb", "from model.helper import Item\nclass Model:\n    def predict(self, x):\n        return Item(x)\n",
                       files={"model/helper.py": "class Item:\n    def __init__(self, n):\n        self.n = n\n"})
    with truss_lab.load(root) as tr:
        item = tr.predict(3).output
        again = pickle.loads(pickle.dumps(item))  # in a notebook cell: the truss the kernel holds
        assert type(again) is type(item) and again.n == 3
        assert type(sys.modules["model.helper"]) is types.ModuleType


def test_cloudpickle_pickles_model_code_by_reference(tmp_path):
    cloudpickle = pytest.importorskip("cloudpickle")
    model = ("import cloudpickle\nfrom model.helper import double\nclass Model:\n    def predict(self, x):\n"
             "        blob = cloudpickle.dumps(double)\n        return [b'model.helper' in blob, len(blob) < 200, cloudpickle.loads(blob)(x)]\n")
    root = write_truss(tmp_path / "cp", model, files={"model/helper.py": "def double(x):\n    return 2 * x\n"})
    with truss_lab.load(root) as tr:
        assert tr.predict(21).output == [True, True, 42]  # by name, as on Truss: not by value


FORWARD = """
import pydantic

class In(pydantic.BaseModel):
    item: "Item"  # defined below: pydantic resolves it on first use, by the module's name

class Item(pydantic.BaseModel):
    {field}: int

class Model:
    def predict(self, x: In) -> dict:
        return x.item.model_dump()
"""


def test_pydantic_forward_references_resolve_in_their_own_truss(tmp_path):
    a = write_truss(tmp_path / "fa", FORWARD.format(field="a"))
    b = write_truss(tmp_path / "fb", FORWARD.format(field="b"))
    with truss_lab.load(a) as ta, truss_lab.load(b) as tb:  # b is the truss loaded last
        assert ta.predict({"item": {"a": 1}}).output == {"a": 1}
        assert tb.predict({"item": {"b": 2}}).output == {"b": 2}


def test_pydantic_forward_references_over_http_too(tmp_path):
    httpx = pytest.importorskip("httpx")
    a = write_truss(tmp_path / "ha", FORWARD.format(field="a"))
    b = write_truss(tmp_path / "hb", FORWARD.format(field="b"))
    with truss_lab.load(a) as ta, truss_lab.load(b):
        r = httpx.post(ta.serve().url + "/v1/models/model:predict", json={"item": {"a": 3}})
        assert r.status_code == 200 and r.json() == {"a": 3}
        assert ta.schema()["input_schema"]["$defs"]["Item"]["required"] == ["a"]


def test_code_that_walks_sys_modules_skips_another_trusss_names(tmp_path):
    a = _twin(tmp_path, "a")  # provides `utils`
    walker = write_truss(tmp_path / "walker", "import sys\nclass Model:\n    def predict(self, x):\n"
                         "        return len([m for m in list(sys.modules.values()) if getattr(m, '__file__', None)])\n")
    with truss_lab.load(a), truss_lab.load(walker) as tr:  # as inspect, pickle's whichmodule or a framework does
        assert tr.run(None).ok, tr.run(None).error


def test_prometheus_metrics_survive_a_swap_and_cost_nothing_to_models_without_them(tmp_path):
    pytest.importorskip("prometheus_client")
    root = write_truss(tmp_path / "prom", "class Model:\n    def predict(self, x):\n        return x\n")
    script = f"""
import sys
import truss_lab
from pathlib import Path
root = Path({str(root)!r})
with truss_lab.load(root):
    assert "prometheus_client" not in sys.modules, "a model without metrics imported prometheus_client"
code = "from prometheus_client import Counter\\nHITS = Counter('swap_hits', 'h')\\nclass Model:\\n    def predict(self, x):\\n        HITS.inc()\\n        return V\\n"
(root / "model" / "model.py").write_text(code.replace("V", "1"))
with truss_lab.load(root) as tr:
    tr.predict(1)
    (root / "model" / "model.py").write_text(code.replace("V", "2"))
    assert tr.reload().kind == "methods" and tr.predict(1).output == 2  # registering HITS again did not fail
    from prometheus_client import REGISTRY
    print([m.samples[0].value for m in REGISTRY.collect() if m.name == "swap_hits"])
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.strip() == "[2.0]"  # the carried counter kept counting across the swap

"""Issue 31: a reload as honest as Truss's own. What import builds (registries, constants, Enum and ABC
bookkeeping, files read at import) comes from the new import; what load() and requests built is kept;
where neither is honest the reload is a full one that says why; a request never mixes versions; and
nothing leaks across reloads (metrics, log handlers, failed instances)."""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time

import pytest

import truss_lab
from conftest import write_truss


def save(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


REGISTRIES = """
import abc
import enum
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import pydantic

HANDLERS = {}


def handler(name):
    def register(fn):
        HANDLERS[name] = fn
        return fn
    return register


@handler("greet")
def greet(x):
    return f"hello {x}"


class Plugin:
    KINDS = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Plugin.KINDS[cls.__name__] = cls


class Upper(Plugin):
    def run(self, x):
        return x.upper()


class Params(pydantic.BaseModel):
    k: int = 1


DEFAULT = Params()


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


MODE = Mode.FAST


@dataclass
class Point:
    x: int


ORIGIN = Point(0)


class Shape(abc.ABC):
    pass


class Square:
    pass


Shape.register(Square)
LABELS = json.loads((Path(__file__).parent / "labels.json").read_text())


class Model:
    def predict(self, x):
        return {
            "greet": HANDLERS["greet"](x),
            "plugin": Plugin.KINDS["Upper"]().run(x),
            "params": Params.model_validate(DEFAULT).k,
            "mode": MODE is Mode.FAST and Mode(1) is Mode.FAST,
            "pickle": pickle.loads(pickle.dumps(ORIGIN)) == ORIGIN,
            "abc": isinstance(Square(), Shape),
            "labels": LABELS,
        }
"""


def test_what_import_builds_comes_from_the_new_import(tmp_path):
    root = write_truss(tmp_path / "reg", REGISTRIES, files={"model/labels.json": '["cat", "dog"]'})
    mf = root / "model" / "model.py"
    with truss_lab.load(root) as tr:
        expected = {"greet": "hello a", "plugin": "A", "params": 1, "mode": True, "pickle": True, "abc": True, "labels": ["cat", "dog"]}
        assert tr.predict("a").output == expected
        save(mf, 'return f"hello {x}"', 'return f"hi {x}"')  # the decorated handler
        save(mf, "return x.upper()", "return x.upper() + '!'")  # the __init_subclass__-registered class
        save(mf, "    return {\n            \"greet\"", "    return {\n            \"v\": 2,\n            \"greet\"")
        event = tr.reload()
        assert event.kind == "methods", event
        assert tr.predict("a").output == {**expected, "v": 2, "greet": "hi a", "plugin": "A!"}
        (root / "model" / "labels.json").write_text('["cat", "dog", "bird"]')  # a file model.py reads at import
        event = tr.reload()  # read at import or by load(): either way, both run again
        assert event.kind == "full" and "model/labels.json" in event.changed, event
        assert tr.predict("a").output["labels"] == ["cat", "dog", "bird"]
        save(mf, 'return f"hi {x}"', 'return f"hey {x}"')  # a later swap keeps the new labels
        assert tr.reload().kind == "methods"
        assert tr.predict("a").output["labels"] == ["cat", "dog", "bird"] and tr.predict("a").output["greet"] == "hey a"


STATE = """
import threading

CACHE = {}
CALLS = [0]


class Model:
    def load(self):
        CACHE["built"] = "by load"
        self.weights = object()
        self.queue = []
        self.done = threading.Event()
        self.results = []
        self.worker = threading.Thread(target=self._batcher, daemon=True)
        self.worker.start()

    def _batcher(self):
        while not self.done.wait(0.005):
            if self.queue:
                self.results.append(self._compute(self.queue.pop()))

    def _compute(self, x):
        return x * 2

    def predict(self, x):
        if x == "state":
            CALLS[0] += 1
            return [CACHE.get("built"), CALLS[0], id(self.weights)]
        self.queue.append(x)
        deadline = __import__("time").monotonic() + 30
        while not self.results and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.005)
        return self.results.pop()
"""


def test_run_time_state_is_kept_and_a_thread_load_started_answers_with_the_new_method(tmp_path):
    root = write_truss(tmp_path / "state", STATE)
    mf = root / "model" / "model.py"
    with truss_lab.load(root) as tr:
        built, calls, weights = tr.predict("state").output
        assert built == "by load" and calls == 1 and tr.predict(3).output == 6
        save(mf, "return x * 2", "return x * 10")  # the batcher thread calls self._compute: swapped in place
        event = tr.reload()
        assert event.kind == "methods", event
        assert tr.predict(3).output == 30  # as the Truss server answers: the thread sees the new method
        assert tr.predict("state").output == ["by load", 2, weights]  # load()'s state and the counter kept
        save(mf, "while not self.done.wait(0.005):", "while not self.done.wait(0.004):")  # the function the thread runs
        event = tr.reload()
        assert event.kind == "full" and any("runs Model._batcher" in c for c in event.changed), event
        tr.model.done.set()


def test_a_request_in_flight_during_a_save_finishes_on_the_code_it_started_with(tmp_path):
    model = """
    import threading

    ENTERED, GO = threading.Event(), threading.Event()


    class Codec:
        def encode(self, x):
            return f"v1:{x}"

        def decode(self, y):
            return f"{y}/v1"


    class Model:
        def load(self):
            self.codec = Codec()

        def predict(self, x):
            y = self.codec.encode(x)
            if x == "slow":
                ENTERED.set()
                GO.wait(30)
            return self.codec.decode(y)
    """
    root = write_truss(tmp_path / "inflight", model)
    mf = root / "model" / "model.py"
    with truss_lab.load(root) as tr:
        module = tr.serving.module
        box = []
        request = threading.Thread(target=lambda: box.append(tr.predict("slow").output))
        request.start()
        assert module.ENTERED.wait(30)
        save(mf, 'return f"v1:{x}"', 'return f"v2:{x}"')
        save(mf, 'return f"{y}/v1"', 'return f"{y}/v2"')
        reloading = threading.Thread(target=lambda: box.append(tr.reload()))
        reloading.start()
        time.sleep(0.2)  # the reload is waiting at the gate: a request arriving now waits behind it
        assert reloading.is_alive() and tr.version == 1
        module.GO.set()
        request.join(30)
        reloading.join(30)
        assert box[0] == "v1:slow/v1"  # encode and decode from one version, never one from each
        assert box[1].kind == "methods" and tr.predict("x").output == "v2:x/v2"


def test_a_reload_that_waits_too_long_for_requests_in_flight_is_not_applied(tmp_path):
    model = "import threading\nGO = threading.Event()\nclass Model:\n    def predict(self, x):\n        GO.wait(30)\n        return 'v1'\n"
    root = write_truss(tmp_path / "long", model)
    with truss_lab.load(root) as tr:
        tr.reload_drain_timeout = 0.3
        module = tr.serving.module
        request = threading.Thread(target=tr.predict, args=(None,))
        request.start()
        deadline = time.monotonic() + 30
        while tr.lock_available and time.monotonic() < deadline:
            time.sleep(0.01)
        save(root / "model" / "model.py", "return 'v1'", "return 'v2'")
        event = tr.reload()
        assert event.kind == "failed" and "1 request still in flight" in event.error and tr.version == 1, event
        module.GO.set()
        request.join(30)
        assert tr.reload().kind == "methods" and tr.predict(None).output == "v2"


def test_rerunning_the_cell_that_loads_a_truss_with_metrics_never_fails(tmp_path):
    pytest.importorskip("prometheus_client")
    model = "from prometheus_client import Counter\nHITS = Counter('rerun_hits', 'h')\nclass Model:\n    def predict(self, x):\n        HITS.inc()\n        return x\n"
    root = write_truss(tmp_path / "rerun", model)
    for _ in range(3):  # `%truss load rerun`, three times: the truss the kernel holds is replaced
        tr = truss_lab.load(root)
        assert tr.predict(1).output == 1
    with truss_lab.load(root, process="worker") as twin:  # the same metric name in another process
        assert twin.predict(2).output == 2
    tr.close()
    from prometheus_client import REGISTRY

    assert "rerun_hits" not in REGISTRY._names_to_collectors


def test_failed_full_reloads_hold_no_instance_and_loggers_keep_one_handler(tmp_path):
    model = """
    import logging

    log = logging.getLogger("reloaded.model")


    class Model:
        def load(self):
            self.handler = logging.StreamHandler()
            log.addHandler(self.handler)
            self.weights = bytearray(10_000_000)

        def predict(self, x):
            return len(log.handlers)
    """
    root = write_truss(tmp_path / "leaks", model)
    mf = root / "model" / "model.py"
    with truss_lab.load(root) as tr:
        for i in range(3):  # three full reloads: one handler, not four
            save(mf, "self.weights = bytearray", f"self.n = {i}\n        self.weights = bytearray")
            assert tr.reload().kind == "full"
        assert tr.predict(None).output == 1 and len(logging.getLogger("reloaded.model").handlers) == 1
        for i in range(3):  # three typos in load(): each builds an instance (and its weights), then fails
            save(mf, "self.weights = bytearray(10_000_000)",
                 f"self.weights = bytearray(10_000_000)\n        __import__('builtins').__dict__.setdefault('_tl_refs', [])"
                 f".append(__import__('weakref').ref(self))\n        1 / 0  # {i}")
            event = tr.reload()
            assert event.kind == "failed", event
        import builtins

        held = builtins.__dict__.pop("_tl_refs")
        gc.collect()
        assert len(held) >= 3 and all(r() is None for r in held), "a failed reload kept its instance (and its weights) alive"
        assert tr.predict(None).output == 1  # the old code keeps serving, one handler


def test_logging_configured_in_load_keeps_working_across_full_reloads_and_prints_once(tmp_path):
    """load() calls basicConfig() (a no-op while the replaced version's handler is there) or adds its
    own handler: after each full reload one handler prints each line once; a failed one keeps the old."""
    import io

    model = """
    import logging, sys

    log = logging.getLogger("configured")


    class Model:
        def load(self):
            logging.basicConfig(level=logging.INFO, stream=sys.modules["configured_stream"], format="%(message)s")
            log.info("loading")

        def predict(self, x):
            log.info("predicting %s", x)
            return x
    """
    stream = sys.modules["configured_stream"] = io.StringIO()
    root = write_truss(tmp_path / "logcfg", model)
    mf = root / "model" / "model.py"
    root_logger = logging.getLogger()
    before, root_logger.handlers = root_logger.handlers, []  # a fresh process's (pytest's capture is one)
    try:
        with truss_lab.load(root) as tr:
            for i in range(3):
                tr.predict(i)
                assert tr.reload(full=True).kind == "full"
            tr.predict(3)
            save(mf, 'log.info("loading")', 'log.info("loading")\n        1 / 0')  # tried twice, as Truss does
            assert tr.reload().kind == "failed"
            tr.predict(4)
        assert stream.getvalue().splitlines() == ["loading", "predicting 0", "loading", "predicting 1", "loading",
                                                  "predicting 2", "loading", "predicting 3", "loading", "loading", "predicting 4"]
        assert root_logger.handlers == []  # closed: what load() configured went with it
    finally:
        del sys.modules["configured_stream"]
        root_logger.handlers = before


def test_a_function_the_model_holds_whose_code_changed_makes_the_reload_full(tmp_path):
    model = """
    class Model:
        def load(self):
            self.forward = self._forward  # a bound method kept on the model, as some models do

        def _forward(self, x):
            return x + 1

        def predict(self, x):
            return self.forward(x)
    """
    root = write_truss(tmp_path / "held", model)
    with truss_lab.load(root) as tr:
        assert tr.predict(1).output == 2
        save(root / "model" / "model.py", "return x + 1", "return x + 2")
        event = tr.reload()
        assert event.kind == "full" and any("self.forward holds Model._forward" in c for c in event.changed), event
        assert tr.predict(1).output == 3  # never the old code through the stored method


# ------------------------------------------------------------------ what the model holds, wherever it holds it

FEATURES = """
import enum

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


class Mode(enum.Enum):
    FAST = 1
    SLOW = 2


class Scale(BaseEstimator, TransformerMixin):
    def __init__(self, k=2.0):
        self.k = k

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        return np.asarray(X, dtype=float) * self.k


class Cache:
    def __init__(self):
        self.hits = 0

    def lookup(self, key):
        self.hits += 1
        return f"v1:{key}"
"""

HOLDS = """
import pickle

from sklearn.pipeline import Pipeline

from model.features import Cache, Mode, Scale

CACHES = {}  # a module-level cache load() fills, as many models keep one


class Model:
    def load(self):
        CACHES["main"] = Cache()
        self.mode = Mode.SLOW  # an Enum member held by the model
        self.modes = {Mode.FAST: "fast", Mode.SLOW: "slow"}
        blob = pickle.dumps(Pipeline([("scale", Scale(3.0))]).fit([[0.0]]))  # a pickled artifact, as real models ship them
        self.pipe = pickle.loads(blob)

    def predict(self, x):
        return {
            "cache": CACHES["main"].lookup(x),
            "hits": CACHES["main"].hits,
            "mode": self.mode is Mode.SLOW and self.modes[Mode.SLOW] == "slow",
            "scaled": self.pipe.transform([[x]]).tolist(),
        }
"""


def test_objects_held_by_module_caches_and_library_containers_and_enum_members_move_to_the_new_code(tmp_path):
    pytest.importorskip("sklearn")
    root = write_truss(tmp_path / "holds", HOLDS, files={"model/features.py": FEATURES})
    features = root / "model" / "features.py"
    with truss_lab.load(root) as tr:
        assert tr.predict(1).output == {"cache": "v1:1", "hits": 1, "mode": True, "scaled": [[3.0]]}
        pipe, cache = tr.model.pipe, tr.model.modes
        save(features, 'return f"v1:{key}"', 'return f"v2:{key}"')  # the cached object's method
        save(features, "return np.asarray(X, dtype=float) * self.k", "return np.asarray(X, dtype=float) * self.k + 1")  # inside the Pipeline
        save(features, "    SLOW = 2\n", "    SLOW = 2\n    OFF = 3\n")  # a new Enum class
        event = tr.reload()
        assert event.kind == "methods", event
        out = tr.predict(1).output
        assert out == {"cache": "v2:1", "hits": 2, "mode": True, "scaled": [[4.0]]}, out  # state kept, new code everywhere
        assert tr.model.pipe is pipe and tr.model.modes is cache


def test_an_enum_member_held_where_it_cannot_be_replaced_makes_the_reload_full(tmp_path):
    model = """
    import enum


    class Mode(enum.Enum):
        FAST = 1


    class Model:
        def load(self):
            self.modes = (Mode.FAST,)  # a tuple: no slot to put the new member in

        def predict(self, x):
            return self.modes[0] is Mode.FAST
    """
    root = write_truss(tmp_path / "tup", model)
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output is True
        save(root / "model" / "model.py", "FAST = 1", "FAST = 1\n    SLOW = 2")
        event = tr.reload()
        assert event.kind == "full" and any("tuple holds Mode.FAST" in c for c in event.changed), event
        assert tr.predict(None).output is True


LOKY_SWAP = """
from joblib import Parallel, delayed

from model.items import square


class Model:
    def predict(self, xs):
        return Parallel(n_jobs=2)(delayed(square)(x) for x in xs)
"""


def test_a_reload_reaches_joblibs_reused_workers_and_a_held_process_pool_rebuilds(tmp_path):
    pytest.importorskip("joblib")
    items = "def square(x):\n    return x * x\n"
    root = write_truss(tmp_path / "loky", LOKY_SWAP, files={"model/items.py": items})
    with truss_lab.load(root) as tr:
        assert tr.predict([2, 3]).output == [4, 9]  # loky's workers start and import model.items
        save(root / "model" / "items.py", "x * x", "x * x * x")
        assert tr.reload().kind == "methods"
        assert tr.predict([2, 3]).output == [8, 27]  # not the old square a reused worker imported
    pooled = """
    from concurrent.futures import ProcessPoolExecutor

    from model.items import square


    class Model:
        def load(self):
            self.pool = ProcessPoolExecutor(1)

        def predict(self, xs):
            return list(self.pool.map(square, xs))
    """
    root = write_truss(tmp_path / "pool", pooled, files={"model/items.py": items})
    with truss_lab.load(root) as tr:
        assert tr.predict([2]).output == [4]
        save(root / "model" / "items.py", "x * x", "x + 100")
        event = tr.reload()
        assert event.kind == "full" and any("self.pool is a process pool" in c for c in event.changed), event
        assert tr.predict([2]).output == [102]
        tr.model.pool.shutdown()

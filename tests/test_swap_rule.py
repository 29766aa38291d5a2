"""Issue 23: the swap rule (carry.py) - what a method swap carries, what comes from the new import,
and when run-time state forces a full reload. Never a silently stale value."""

from __future__ import annotations

import threading

import pytest

import truss_lab
from conftest import write_truss
from truss_lab import carry

HELPER = """
CLASSES = ["cat", "dog"]

def make_cfg():
    return {"size": 224}

class Normalizer:
    def __init__(self):
        self.mean = 0.5
"""

MODEL = """
from model import helper
from model.helper import Normalizer, make_cfg

CLASSES = helper.CLASSES
CFG = make_cfg()
NORMALIZER = Normalizer()
CACHE = {}
TOKENIZER = None

class Model:
    vocab = None

    def load(self):
        global TOKENIZER
        TOKENIZER = "tok-v1"
        CACHE["warm"] = True
        Model.vocab = ["a", "b"]

    def predict(self, x):
        return {"classes": CLASSES, "cfg": CFG, "mean": NORMALIZER.mean, "cache": dict(CACHE),
                "tokenizer": TOKENIZER, "vocab": Model.vocab}
"""


def _write(root, rel, text):
    (root / rel).write_text(text)


@pytest.fixture
def tr(tmp_path):
    root = write_truss(tmp_path / "swap", MODEL, files={"model/helper.py": HELPER})
    with truss_lab.load(root) as live:
        yield live


def test_values_built_from_edited_code_are_never_stale(tr):
    root = tr.path
    _write(root, "model/helper.py", HELPER.replace('["cat", "dog"]', '["cat", "dog", "owl"]')
           .replace('{"size": 224}', '{"size": 299}').replace("self.mean = 0.5", "self.mean = 0.25"))
    event = tr.reload()
    assert event.kind == "methods", event  # none of them is state: no load() needed
    out = tr.predict(None).output
    assert out["classes"] == ["cat", "dog", "owl"] and out["cfg"] == {"size": 299} and out["mean"] == 0.25
    assert out["tokenizer"] == "tok-v1" and out["cache"] == {"warm": True} and out["vocab"] == ["a", "b"]  # state kept


def test_state_whose_code_did_not_change_is_carried(tr):
    root = tr.path
    _write(root, "model/model.py", MODEL.replace('"vocab": Model.vocab}', '"vocab": Model.vocab, "v": 2}'))
    event = tr.reload()
    assert event.kind == "methods"
    out = tr.predict(None).output
    assert out["v"] == 2 and out["tokenizer"] == "tok-v1" and out["cache"] == {"warm": True} and out["vocab"] == ["a", "b"]


def test_state_whose_statement_changed_forces_a_full_reload_that_names_it(tr):
    root = tr.path
    _write(root, "model/model.py", MODEL.replace("CACHE = {}", "CACHE = {'seed': 1}"))
    event = tr.reload()
    assert event.kind == "full" and any(c.startswith("model.model.CACHE") for c in event.changed), event.changed
    assert tr.predict(None).output["cache"] == {"seed": 1, "warm": True}  # load() ran again on the new value


def test_state_whose_inputs_changed_forces_a_full_reload(tmp_path):
    model = MODEL.replace("CACHE = {}", "CACHE = make_cfg()")
    root = write_truss(tmp_path / "dep", model, files={"model/helper.py": HELPER})
    with truss_lab.load(root) as live:
        _write(root, "model/helper.py", HELPER.replace('{"size": 224}', '{"size": 512}'))
        event = live.reload()
        assert event.kind == "full" and any("model.model.CACHE" in c for c in event.changed), event.changed
        assert live.predict(None).output["cache"] == {"size": 512, "warm": True}


REGISTRY_MODEL = """
from model import registry

class Model:
    def load(self):
        registry.TOKENIZER = {"hello": 1}

    def predict(self, x):
        return registry.TOKENIZER[x]
"""


def test_state_load_put_in_a_helper_module_survives_a_swap(tmp_path):
    root = write_truss(tmp_path / "reg", REGISTRY_MODEL, files={"model/registry.py": "TOKENIZER = None\n"})
    with truss_lab.load(root) as live:
        _write(root, "model/model.py", REGISTRY_MODEL.replace("return registry.TOKENIZER[x]", "return registry.TOKENIZER[x] + 1"))
        event = live.reload()
        assert event.kind == "methods"
        assert live.predict("hello").output == 2  # load() did not run again, and its tokenizer is there
        _write(root, "model/registry.py", "TOKENIZER = None\n\ndef helper():\n    return 1\n")  # the helper itself edited
        assert live.reload().kind == "methods" and live.predict("hello").output == 2


def test_a_package_module_gets_the_same_rule(tmp_path):
    model = "import store\nclass Model:\n    def load(self):\n        store.ITEMS.append('x')\n    def predict(self, x):\n        return [store.ITEMS, store.LIMIT]\n"
    root = write_truss(tmp_path / "pkg", model, files={"packages/store.py": "ITEMS = []\nLIMIT = 3\n"})
    with truss_lab.load(root) as live:
        _write(root, "packages/store.py", "ITEMS = []\nLIMIT = 4\n")
        assert live.reload().kind == "methods"
        assert live.predict(None).output == [["x"], 4]
        _write(root, "packages/store.py", "ITEMS = ['seed']\nLIMIT = 4\n")
        event = live.reload()
        assert event.kind == "full" and any("store.ITEMS" in c for c in event.changed)
        assert live.predict(None).output == [["seed", "x"], 4]


def test_the_rules_are_one_table():
    assert [outcome for _, outcome, _ in carry.RULES] == ["new", "new", "carry", "full", "full"]
    v = carry.Value("X", "m", code=False, dunder=False, same_statement=False, state=None)
    assert carry.decide(v)[0] == "full"
    assert carry.decide(carry.Value("X", "m", code=False, dunder=False, same_statement=True, state=True))[0] == "carry"
    assert carry.decide(carry.Value("f", "m", code=True, dunder=False, same_statement=False, state=True))[0] == "new"
    # what the import built (untouched since), the new import builds again, even from the same statement
    assert carry.decide(carry.Value("REGISTRY", "m", code=False, dunder=False, same_statement=True, state=False))[0] == "new"
    assert carry.decide(carry.Value("C._abc_impl", "m", code=False, dunder=False, same_statement=True, state=True,
                                    machinery=True))[0] == "new"


def test_fingerprints_see_changes_in_place():
    import numpy as np

    data = {"a": [1, 2], "arr": np.zeros(3)}
    before = carry.fingerprint(data)
    data["arr"][0] = 1
    assert carry.fingerprint(data) != before
    assert carry.fingerprint(threading.Lock()) is None  # opaque: cannot be told


BACKGROUND = """
import threading
from pathlib import Path

class Model:
    def __init__(self, data_dir, **kwargs):
        self._data_dir = data_dir
        self.done = threading.Event()

    def load(self):
        def download():
            for i in range(3):
                (self._data_dir / "weights.bin").write_bytes(bytes(1000 * (i + 1)))
            self.done.set()
        threading.Thread(target=download, daemon=True).start()

    def predict(self, x):
        return self.done.is_set()
"""


def test_files_a_background_thread_of_load_writes_never_reload(tmp_path):
    root = write_truss(tmp_path / "bg", BACKGROUND)
    with truss_lab.load(root) as live:
        assert live.model.done.wait(30)
        assert live.reload().kind == "unchanged"  # the thread's writes are the model's: no reload (no loop)
        live.watch()
        n = live.reload_count
        (root / "data" / "labels.txt").write_text("a user's edit\n")
        event = live.wait_for_reload(since=n, timeout=30)
        assert event.kind == "full" and event.changed == ["data/labels.txt"]
        assert live.model.done.wait(30)  # the new load() downloaded again ...
        assert live.reload().kind == "unchanged"  # ... and that started no reload either


TOKENIZER_PY = """
import threading

class Vocab:
    def __init__(self, words):
        self.words = list(words)

    def lookup(self, w):
        return self.words.index(w)


class Tokenizer:
    def __init__(self, words):
        self.vocab = Vocab(words)
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return [self.vocab.lookup(w) for w in text.split()]
"""

HOLDER = """
from model.tokenizer import Tokenizer

class Model:
    def load(self):
        self.tok = Tokenizer(["a", "b", "c"])
        self.pipes = {"main": self.tok}

    def predict(self, text):
        return {"ids": self.tok.encode(text), "calls": self.tok.calls, "same": self.pipes["main"] is self.tok}
"""


def test_objects_load_built_from_truss_classes_answer_with_the_new_class(tmp_path):
    """`self.tok = Tokenizer()`: an edit to Tokenizer.encode (or to a class it holds) serves at once,
    with the state load() built (the object itself, its counters) kept - never the old method."""
    root = write_truss(tmp_path / "held", HOLDER, files={"model/tokenizer.py": TOKENIZER_PY})
    with truss_lab.load(root) as tr:
        assert tr.predict("a c").output == {"ids": [0, 2], "calls": 1, "same": True}
        tok = tr.model.tok
        _write(root, "model/tokenizer.py", TOKENIZER_PY.replace("return [self.vocab", "return [10 + self.vocab")
               .replace("return self.words.index(w)", "return 100 * self.words.index(w)"))
        event = tr.reload()
        assert event.kind == "methods", event
        out = tr.predict("b c").output
        assert out == {"ids": [110, 210], "calls": 2, "same": True}, out  # new code, old object, old counter
        assert tr.model.tok is tok and type(tok).__module__ == "model.tokenizer"


def test_an_object_whose_class_init_changed_forces_a_full_reload_that_names_it(tmp_path):
    root = write_truss(tmp_path / "held", HOLDER, files={"model/tokenizer.py": TOKENIZER_PY})
    with truss_lab.load(root) as tr:
        tr.predict("a")
        _write(root, "model/tokenizer.py", TOKENIZER_PY.replace("self.calls = 0", "self.calls = 100"))
        event = tr.reload()
        assert event.kind == "full", event
        assert any("self.tok" in c and "Tokenizer.__init__" in c for c in event.changed), event.changed
        assert tr.predict("a").output["calls"] == 101  # load() ran again with the new __init__


def test_a_class_bound_by_assignment_is_code_not_state(tmp_path):
    """`Output = helper.Pixels` (as Truss's chainlet code generation writes): an edit to the helper gives
    the new class; it is no run-time state that would force a full reload."""
    helper = "class Pixels:\n    def scale(self):\n        return 1\n"
    model = ("from model import helper\n\nOutput = helper.Pixels\n\nclass Model:\n    def load(self):\n        self.n = 1\n\n"
             "    def predict(self, x):\n        return Output().scale()\n")
    root = write_truss(tmp_path / "alias", model, files={"model/helper.py": helper})
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == 1
        _write(root, "model/helper.py", helper.replace("return 1", "return 2"))
        event = tr.reload()
        assert event.kind == "methods", event
        assert tr.predict(None).output == 2

"""Hardening (issue 15): nothing a model does stops the watcher, hangs a request or loses the facts of an error."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

import truss_lab
from truss_lab.errors import describe
from truss_lab.jsoncheck import first_non_json


def _watch_events(tr):
    arrived = threading.Event()
    events = []
    tr.on_reload(lambda e: (events.append(e), arrived.set()))
    return events, arrived


@pytest.mark.parametrize(
    "broken, location",
    [
        ("import sys\nsys.exit(3)\nclass Model:\n    def predict(self, x):\n        return x\n", "model/model.py:2"),
        (
            "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass Model:\n    def predict(self, x):\n        return ('new', x)\n",
            None,
        ),
    ],
    ids=["sys-exit-in-model-py", "frozen-dataclass-model"],
)
def test_the_watcher_survives_any_exception_from_user_code(make_truss, broken, location):
    frozen = "dataclass" in broken
    first = broken.replace("('new', x)", "('old', x)") if frozen else "class Model:\n    def predict(self, x):\n        return ('old', x)\n"
    root = make_truss(first)
    mf = root / "model" / "model.py"
    with truss_lab.load(root) as tr, tr.watch():
        events, arrived = _watch_events(tr)
        mf.write_text(broken)
        assert arrived.wait(10)
        if frozen:  # a frozen dataclass model: the swap moves it to the new class all the same
            assert events[-1].ok, events[-1].error
            assert tr.predict(1).output == ("new", 1)
        else:
            assert events[-1].kind == "failed" and "SystemExit: 3" in events[-1].error and location in events[-1].error
            assert tr.predict(1).output == ("old", 1)
        arrived.clear()
        mf.write_text("class Model:\n    def predict(self, x):\n        return ('fixed', x)\n")
        assert arrived.wait(10), "the watcher stopped"
        assert events[-1].ok and tr.predict(1).output == ("fixed", 1)


def test_a_cyclic_output_is_reported_not_hung(live):
    tr = live("class Model:\n    def predict(self, x):\n        a = [1]\n        a.append(a)\n        return {'a': a}\n")
    done = threading.Event()
    box = {}

    def call():
        with pytest.warns(truss_lab.OutputWarning, match=r"at a\[1\]: list \(circular reference"):
            box["result"] = tr.run(1)
        done.set()

    threading.Thread(target=call, daemon=True).start()
    assert done.wait(20), "the output check hung on a cycle"
    assert box["result"].ok
    deep: dict = {}
    cur = deep
    for _ in range(2000):
        cur["k"] = {}
        cur = cur["k"]
    assert "nested more than" in first_non_json(deep)[1]
    shared = [1, 2]
    assert first_non_json({"a": shared, "b": shared}) is None  # shared is not circular


def test_a_deeply_nested_json_body_is_a_400(live):
    tr = live()
    with tr.serve() as server:
        r = httpx.post(f"{server.url}/v1/models/model:predict", content=b"[" * 100_000 + b"]" * 100_000, timeout=30)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]
    assert r.headers["x-baseten-error-code"] == "700"


def test_describe_keeps_the_informative_lines_of_a_long_message():
    tf_like = (
        "Graph execution error:\n\nDetected at node 'sequential/dense/MatMul' defined at (most recent call last):\n"
        '  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main\n    return _run_code(code)\n'
        "Node: 'sequential/dense/MatMul'\nMatrix size-incompatible: In[0]: [1,64], In[1]: [32,10]\n"
        "\t [[{{node sequential/dense/MatMul}}]] [Op:__inference_predict_function_123]"
    )
    text = describe(RuntimeError(tf_like))
    assert text == ("RuntimeError: Graph execution error: | Node: 'sequential/dense/MatMul' | "
                    "Matrix size-incompatible: In[0]: [1,64], In[1]: [32,10]")
    assert "\n" not in describe(ValueError("x\n" * 1000)) and len(describe(ValueError("y" * 5000))) < 420


def test_the_facts_reach_the_http_body_and_the_reload_event(live):
    tr = live("class Model:\n    def predict(self, x):\n        raise ValueError('Graph execution error:\\n\\nMatrix size-incompatible: In[0]: [1,64]')\n")
    with tr.serve() as server:
        body = httpx.post(f"{server.url}/v1/models/model:predict", json=1).json()
    assert "Matrix size-incompatible: In[0]: [1,64]" in body["error"]
    (tr.path / "model" / "model.py").write_text(
        "class Model:\n    def load(self):\n        raise ValueError('Graph execution error:\\n\\nshape mismatch [1,64]')\n"
        "    def predict(self, x):\n        return x\n"
    )
    event = tr.reload()
    assert not event.ok and "shape mismatch [1,64]" in event.error
    assert "model/model.py\", line 3, in load" in event.exception.model_traceback()  # %truss traceback shows it
    json.dumps(event.error)


GATED = """
import threading
GATE = threading.Event()
EVENTS = []
ENTERED = threading.Semaphore(0)
class Model:
    def predict(self, x):
        EVENTS.append(("in", x))
        ENTERED.release()
        GATE.wait(30)
        EVENTS.append(("out", x))
        return x
"""


def test_shrinking_the_lock_never_over_admits(live):
    tr = live(GATED, concurrency=2)
    m = tr.serving.module
    threads = [threading.Thread(target=tr.predict, args=(i,)) for i in range(4)]
    for t in threads[:2]:
        t.start()
    assert m.ENTERED.acquire(timeout=10) and m.ENTERED.acquire(timeout=10)  # two hold the lock
    for t in threads[2:]:
        t.start()
    tr.concurrency = 1  # while two hold it and (soon) two wait
    assert tr.lock_available == 0
    m.GATE.set()
    for t in threads:
        t.join(30)
    later = [e for e in m.EVENTS if e[1] in (2, 3)]
    # the two that waited ran one after the other: in, out, in, out
    assert [kind for kind, _ in later] == ["in", "out", "in", "out"], later
    assert tr.lock_available == 1 == tr.concurrency


def test_growing_the_lock_admits_waiters_at_once(live):
    tr = live(GATED, concurrency=1)
    m = tr.serving.module
    threads = [threading.Thread(target=tr.predict, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert m.ENTERED.acquire(timeout=10)
    tr.concurrency = 2
    assert m.ENTERED.acquire(timeout=10), "the waiter was not admitted when the lock grew"
    m.GATE.set()
    for t in threads:
        t.join(30)


def test_a_runtime_lock_size_lasts_until_config_changes_it(make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    mf, cfg = root / "model" / "model.py", root / "config.yaml"
    with truss_lab.load(root) as tr:
        tr.concurrency = 4
        mf.write_text("class Model:\n    def predict(self, x):\n        return x + 1\n")
        assert tr.reload().kind == "methods" and tr.concurrency == 4
        assert tr.reload(full=True).ok and tr.concurrency == 4
        cfg.write_text(cfg.read_text() + "runtime: {predict_concurrency: 2}\n")
        assert tr.reload().ok and tr.concurrency == 2  # config.yaml changed it: that wins
    with truss_lab.load(root, concurrency=3) as tr:
        mf.write_text("class Model:\n    def predict(self, x):\n        return x + 2\n")
        assert tr.reload().ok and tr.concurrency == 3

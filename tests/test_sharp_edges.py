"""Issue 22: the sharp edges a new user hit. Each test failed on the main it was filed against."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
import warnings

import pytest
import yaml

import truss_lab
from conftest import ROOT, write_truss
from truss_lab import cpu, guard
from truss_lab.display import render
from truss_lab.examples import ExampleOutcome

# ------------------------------------------------------------------ 1. nothing shown depends on speed


class _FakeTrace:
    def __init__(self, pre, predict, post):
        self.pre_start, self.predict_start, self.post_start = (0.0 if pre is not None else None), 0.0, (0.0 if post is not None else None)
        self.pre_ms, self.predict_ms, self.post_ms = pre or 0.0, predict, post or 0.0


class _FakeResult:
    def __init__(self, trace, output):
        self.trace, self.output, self.error = trace, output, None


@pytest.mark.parametrize("pre_ms", [0.001, 0.04, 0.06, 12.0])
def test_the_examples_diff_lists_every_stage_that_ran_however_fast(pre_ms):
    a = ExampleOutcome.of("one", _FakeResult(_FakeTrace(pre_ms, 0.002, None), {"v": 1}))
    b = ExampleOutcome.of("one", _FakeResult(_FakeTrace(pre_ms * 3, 0.001, None), {"v": 2}))
    assert set(a.stage_ms) == {"pre", "predict"}  # post did not run: not listed
    from truss_lab.examples import diff

    (change,) = diff({"one": a}, {"one": b}, 1, 2).changes
    line = change.line()
    assert " — pre " in line and ", predict " in line and "post" not in line, line


# ------------------------------------------------------------------ 2. every output displays


PYDANTIC_MODEL = """
import datetime
import pydantic

class Reply(pydantic.BaseModel):
    text: str
    when: datetime.datetime

class Thing:
    def __repr__(self):
        return "<Thing <b>bold</b>>"

class Broken:
    def __repr__(self):
        raise RuntimeError("no repr")

class Model:
    def predict(self, kind):
        when = datetime.datetime(2024, 5, 1, 12, 0)
        cyc = []
        cyc.append(cyc)
        return {
            "pydantic": Reply(text="hi", when=when),
            "datetime": when,
            "set": {"b", "a"},
            "object": Thing(),
            "broken": Broken(),
            "cycle": cyc,
            "big": list(range(10_000)),
        }[kind]
"""


@pytest.mark.parametrize("kind", ["pydantic", "datetime", "set", "object", "broken", "cycle", "big"])
def test_any_output_a_model_returns_displays_bounded(tmp_path, kind):
    root = write_truss(tmp_path / "outs", PYDANTIC_MODEL)
    with warnings.catch_warnings(), truss_lab.load(root) as tr:
        warnings.simplefilter("ignore")  # most of these are not JSON a Truss server can send: it warns so
        result = tr.predict(kind)
    text = repr(result)
    assert text.startswith("Result from outs v1: ok") and len(text) < 2000, text
    bundle = render.bundle(result)
    assert len(bundle["text/html"]) < 50_000
    assert "<b>bold</b>" not in bundle["text/html"]  # a model's own string is escaped
    expected = {"pydantic": '"when": "2024-05-01T12:00:00"', "datetime": "2024-05-01T12:00:00", "set": '["a", "b"]',
                "object": "<Thing <b>bold</b>>", "broken": "repr failed: RuntimeError", "cycle": "circular reference",
                "big": "10000 numbers"}[kind]
    assert expected in text, text


def test_truss_lab_predict_prints_a_pydantic_output(tmp_path):
    root = write_truss(tmp_path / "outs", PYDANTIC_MODEL)
    out = subprocess.run([sys.executable, "-m", "truss_lab.cli", "predict", str(root), "--input", '"pydantic"'],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"text": "hi", "when": "2024-05-01T12:00:00"}


# ------------------------------------------------------------------ 6. examples.yaml edits are seen


EXAMPLES_MODEL = """
class Model:
    def __init__(self, **kwargs):
        self.loads = 0
    def load(self):
        self.loads += 1
    def predict(self, x):
        return x * 2
"""


def test_an_examples_yaml_edit_is_picked_up_without_reloading_the_model(tmp_path):
    root = write_truss(tmp_path / "ex", EXAMPLES_MODEL, examples=[{"name": "one", "input": 1}])
    with truss_lab.load(root) as tr:
        model = tr.model
        (root / "examples.yaml").write_text(yaml.safe_dump([{"name": "one", "input": 10}, {"name": "two", "input": 2}]))
        event = tr.reload()
        assert event.kind == "examples" and event.ok and "examples.yaml" in event.summary(), event
        assert tr.examples == {"one": 10, "two": 2} and tr.example("two") == 2
        assert tr.model is model and tr.model.loads == 1 and tr.version == 1  # the model was not touched
        assert tr.bench(n=2, concurrency=1, progress=False).count == 2
        # with the watcher, as a save in an editor
        tr.watch(examples=True)
        assert tr.wait_for_examples(30)
        n = tr.reload_count
        (root / "examples.yaml").write_text(yaml.safe_dump([{"name": "three", "input": 3}]))
        event = tr.wait_for_reload(since=n, timeout=30)
        assert event.kind == "examples" and list(tr.examples) == ["three"]
        assert tr.wait_for_examples(30)
        assert "1 new" in tr.examples_diff.summary() and tr.model is model


# ------------------------------------------------------------------ 7. the guard leaves builtins alone


def test_the_guard_stand_ins_behave_like_the_builtins(tmp_path):
    root = write_truss(tmp_path / "g", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(root, guard=False) as tr:  # the guard is installed once any guarded model loads
        guard.install()
        for builtin in (open, io.open, time.sleep):
            assert getattr(builtin, "__get__", None) is None, builtin  # never binds as a method

        class Reader:
            opener = open
            nap = time.sleep

        path = tmp_path / "f.txt"
        path.write_text("text")
        with Reader().opener(path) as f:  # `self.opener(path)` raised TypeError when open was a function
            assert f.read() == "text"
        Reader().nap(0)
        assert repr(open) == "<built-in function open>" and open.__name__ == "open"
        import pickle

        assert pickle.loads(pickle.dumps(open)) is open
        assert tr.predict(1).output == 1


def test_sleep_zero_is_not_lock_misuse(tmp_path):
    root = write_truss(tmp_path / "yield", "import time\nclass Model:\n    def predict(self, x):\n        time.sleep(0)\n        return x\n")
    with truss_lab.load(root) as tr:
        assert tr.run(1).trace.findings == []


# ------------------------------------------------------------------ 8. --last 0 draws nothing


def test_a_report_of_the_last_zero_traces_is_empty(tmp_path):
    root = write_truss(tmp_path / "z", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(root) as tr:
        tr.predict(1)
        tr.predict(2)
        assert tr.report(last=0).count == 0 and tr.report(last=1).count == 1 and tr.report().count == 2
        with pytest.raises(truss_lab.TrussLabError, match="last must be"):
            tr.report(last=-1)


# ------------------------------------------------------------------ 9. make lab opens with nothing to dismiss


def test_make_lab_turns_off_the_news_prompt(tmp_path, monkeypatch):
    from truss_lab.devtools.lab import lab_environment

    monkeypatch.delenv("JUPYTERLAB_SETTINGS_DIR", raising=False)
    env = lab_environment(tmp_path / "ipython", tmp_path / "settings")
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    assert env["JUPYTERLAB_SETTINGS_DIR"] == str(tmp_path / "settings")
    assert json.loads(settings.read_text()) == {"fetchNews": "false", "checkForUpdates": False}
    schema = ROOT / ".venv" / "share" / "jupyter" / "lab" / "schemas" / "@jupyterlab" / "apputils-extension" / "notification.json"
    if schema.is_file():  # the keys are JupyterLab's own (its schema says which values they take)
        props = json.loads(schema.read_text())["properties"]
        assert "false" in json.dumps(props["fetchNews"]) and props["checkForUpdates"]["type"] == "boolean"


# ------------------------------------------------------------------ 10. a busy machine is not idleness


def _spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


COMPUTE_MODEL = """
import threading

def work(n):
    x = 0
    for i in range(n):
        x = (x * 31 + i) % 1000003
    return x

class Model:
    def predict(self, how):
        if how == "here":  # compute in predict's own thread
            return work(400_000)
        box = []  # compute in another thread, as a framework's thread pool does; predict waits for it
        t = threading.Thread(target=lambda: box.append(work(400_000)))
        t.start()
        t.join()
        return box[0]
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/schedstat"), reason="needs Linux's per-thread run-queue times")
def test_on_a_busy_machine_computing_is_not_called_idle(tmp_path):
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(2 * (os.cpu_count() or 2))]
    for p in busy:
        p.start()
    try:
        root = write_truss(tmp_path / "busy", COMPUTE_MODEL)
        with truss_lab.load(root) as tr:
            traces = [tr.run(how).trace for how in ("here", "here", "pool", "pool")]
    finally:
        for p in busy:
            p.terminate()
        for p in busy:
            p.join(5)
    for t in traces:
        assert not [f for f in t.findings if f.kind == "idle"], (t.findings, t.predict_ms, t.predict_cpu_ms, t.predict_cpu_wait_ms)
    for t in traces[:2]:  # its own thread: the wait for a CPU is measured, and it is not idle time
        assert t.predict_cpu_wait_ms is not None and t.predict_cpu_wait_ms > 0
        assert t.predict_idle_ms <= 0.5 * t.predict_ms, (t.predict_ms, t.predict_cpu_ms, t.predict_cpu_wait_ms)


def test_a_predict_that_really_waits_is_still_called_idle(tmp_path):
    root = write_truss(tmp_path / "waits", "import threading\nclass Model:\n    def predict(self, x):\n"
                                           "        threading.Event().wait(0.15)\n        return x\n")
    stall0 = cpu.cpu_stall_ms()
    with truss_lab.load(root) as tr, warnings.catch_warnings():
        warnings.simplefilter("ignore", guard.LockMisuseWarning)
        t = tr.run(1).trace
    if t.findings:
        assert [f.kind for f in t.findings] == ["idle"] and t.predict_idle_ms >= 100
    else:  # only a machine busy for most of that wait may hide it (CI shares its machine)
        assert stall0 is not None and cpu.cpu_stall_ms() - stall0 > 0.5 * t.predict_ms, "no idle finding on a quiet machine"


# ------------------------------------------------------------------ issue 24 in the notebook


def test_in_the_notebook_a_postprocess_generator_streams_and_nobody_disconnects(tmp_path):
    model = """
import asyncio
from fastapi import Request

class Model:
    async def predict(self, x, request: Request):
        return [x, await request.is_disconnected()]

    async def postprocess(self, y):
        for v in y:
            yield f"{v};"
"""
    root = write_truss(tmp_path / "postgen", model)
    with truss_lab.load(root) as tr:
        assert list(tr.stream(1)) == ["1;", "False;"]  # the chunks, not the generator object
        result = tr.run(2)
        assert result.ok and result.output == "2;False;" and result.trace.chunks == 2


def test_a_secret_the_model_lacks_is_its_stages_error(tmp_path):
    root = write_truss(tmp_path / "sec", "class Model:\n    def __init__(self, secrets, **kw):\n        self.s = secrets\n"
                                         "    def predict(self, x):\n        return self.s['missing']\n")
    with truss_lab.load(root) as tr:
        result = tr.run(1)  # returned, not raised
        assert not result.ok and result.error.stage == "predict" and "SecretNotFound" in str(result.error)


def test_schema_of_typed_io(tmp_path):
    model = ("import pydantic\nclass In(pydantic.BaseModel):\n    prompt: str\nclass Out(pydantic.BaseModel):\n    text: str\n"
             "class Model:\n    def predict(self, x: In) -> Out:\n        return Out(text=x.prompt)\n")
    root = write_truss(tmp_path / "typed", model)
    with truss_lab.load(root) as tr:
        schema = tr.schema()
        assert schema["input_schema"]["title"] == "In" and schema["output_schema"]["title"] == "Out"
        assert schema["supports_streaming"] is False
    plain = write_truss(tmp_path / "plain", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(plain) as tr:
        assert tr.schema() is None

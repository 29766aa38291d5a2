"""Hot reload, with real files saved the way editors save them."""

import gc
import os
import sys
import threading
import time
from pathlib import Path

import pytest

import truss_lab

MODEL = """
import os
import threading


class Model:
    def __init__(self, **kwargs):
        self.inits = 1

    def load(self):
        # counted outside the module: a full reload imports model.py afresh
        os.environ["TL_LOADS"] = str(int(os.environ["TL_LOADS"]) + 1)
        self.loads = int(os.environ["TL_LOADS"])
        self.weights = object()

    def preprocess(self, x):
        return x

    def predict(self, x):
        return {"label": self.label(x), "weights": id(self.weights)}

    def label(self, x):
        return f"cat:{x}"

    def postprocess(self, y):
        return y
"""


def save(path: Path, text: str, how: str = "inplace") -> None:
    """Save as editors do: rewrite in place, or write a temp file and rename it over the original."""
    if how == "inplace":
        path.write_text(text)
    else:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


@pytest.fixture
def model(live, monkeypatch):
    monkeypatch.setenv("TL_LOADS", "0")
    tr = live(MODEL)
    return tr, tr.path / "model" / "model.py"


def edit(path: Path, old: str, new: str, how: str = "inplace") -> None:
    text = path.read_text()
    assert old in text, old
    save(path, text.replace(old, new), how)


def test_method_swap_keeps_weights_and_does_not_reload(model):
    tr, mf = model
    before = tr.predict(1).output
    edit(mf, 'return f"cat:{x}"', 'return f"dog:{x}"')
    event = tr.reload()
    assert event.kind == "methods" and event.changed == ["label"] and event.version == 2 and event.ok
    after = tr.predict(1)
    assert after.output == {"label": "dog:1", "weights": before["weights"]}  # same weights object
    assert after.trace.version == 2
    assert tr.model.loads == 1  # load() did not run again
    assert "swapped label" in str(event) and "load() not re-run" in str(event)


def test_on_retire_hands_over_each_replaced_instance(model):
    tr, mf = model
    retired = []
    tr.on_retire(retired.append)
    first = tr.model
    edit(mf, 'return f"cat:{x}"', 'return f"dog:{x}"')
    assert tr.reload().kind == "methods"
    assert retired == [] and tr.model is first  # a swap keeps the instance: its class changes in place, as on Truss
    assert type(first).__module__ == "model.model" and tr.predict(1).output["label"] == "dog:1"
    assert tr.reload(full=True).kind == "full"
    assert retired == [first] and tr.model is not first  # a rebuilt one replaces it


def test_added_and_removed_methods_swap(model):
    tr, mf = model
    edit(mf, "    def postprocess(self, y):\n        return y\n", "    def postprocess(self, y):\n        return self.extra(y)\n\n    def extra(self, y):\n        return [y]\n")
    event = tr.reload()
    assert event.kind == "methods" and event.changed == ["extra", "postprocess"]
    assert tr.predict(1).output[0]["label"] == "cat:1"
    edit(mf, "    def postprocess(self, y):\n        return self.extra(y)\n", "")
    event = tr.reload()
    assert event.kind == "methods" and event.changed == ["postprocess"]
    assert tr.predict(1).output["label"] == "cat:1" and tr.serving.postprocess is None


def test_module_level_helper_change_is_a_swap(model):
    tr, mf = model
    edit(mf, "import threading\n", "import threading\nPREFIX = 'cow'\n")
    edit(mf, 'return f"cat:{x}"', 'return f"{PREFIX}:{x}"')
    assert tr.reload().kind == "methods"
    assert tr.predict(2).output["label"] == "cow:2"
    edit(mf, "PREFIX = 'cow'", "PREFIX = 'pig'")
    event = tr.reload()
    assert event.kind == "methods" and event.changed == ["module-level code"]
    assert tr.predict(2).output["label"] == "pig:2" and tr.model.loads == 1


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda root, mf: edit(mf, "self.inits = 1", "self.inits = 2"), "__init__"),
        (lambda root, mf: edit(mf, "self.weights = object()", "self.weights = object()  # new\n        self.v = 2"), "load"),
        (lambda root, mf: (root / "config.yaml").write_text((root / "config.yaml").read_text() + "model_metadata: {a: 1}\n"), "config.yaml"),
        (lambda root, mf: (root / "data" / "labels.txt").write_text("cat\ndog\n"), "data/labels.txt"),
    ],
    ids=["init", "load", "config", "data"],
)
def test_full_reload_reruns_load(model, change, expected):
    tr, mf = model
    old_weights = tr.predict(1).output["weights"]
    change(tr.path, mf)
    event = tr.reload()
    assert event.kind == "full" and expected in event.changed, event
    out = tr.predict(1).output
    assert tr.model.loads == 2 and out["weights"] != old_weights
    assert "load() re-run" in str(event)


def test_whitespace_and_comments_are_no_change(model):
    tr, mf = model
    edit(mf, "    def label(self, x):\n", "\n    # a comment\n    def label(self, x):  # and another\n\n")
    event = tr.reload()
    assert event.kind == "unchanged" and event.version == 1 and tr.version == 1
    assert "no change in behaviour" in str(event) and event.changed == ["line numbers"]
    assert tr.reload().kind == "unchanged"  # nothing on disk changed since


def test_a_save_that_only_moves_lines_is_imported_again_so_errors_name_the_new_line(live):
    tr = live("class Model:\n    def predict(self, x):\n        return 1 / x\n")
    mf = tr.path / "model" / "model.py"
    assert tr.run(0).error.location.endswith("model/model.py:3")
    mf.write_text("# a comment\n\n" + mf.read_text())
    event = tr.reload()
    assert event.kind == "unchanged" and tr.version == 1, event
    assert tr.run(0).error.location.endswith("model/model.py:5")  # the line the file has now


def test_full_flag_forces_reload(model):
    tr, _ = model
    event = tr.reload(full=True)
    assert event.kind == "full" and tr.model.loads == 2


BROKEN = [  # (id, edit, line marker to find in model.py or a literal location, message)
    ("syntax", lambda mf: edit(mf, "def label(self, x):", "def label(self, x)"), "def label(self, x)", "SyntaxError"),
    ("import", lambda mf: edit(mf, "import threading", "import no_such_module_zz"), "import no_such_module_zz", "ModuleNotFoundError"),
    ("class-missing", lambda mf: edit(mf, "class Model:", "class Modle:"), None, "no class 'Model'"),
    ("no-predict", lambda mf: edit(mf, "def predict(self, x):", "def predikt(self, x):"), None, "must have a `predict`"),
    ("load-raises", lambda mf: edit(mf, "self.weights = object()", "self.weights = 1 / 0"), "self.weights = 1 / 0", "ZeroDivisionError"),
    ("init-raises", lambda mf: edit(mf, "self.inits = 1", "self.inits = {}['x']"), "self.inits = {}['x']", "KeyError"),
    ("bad-config", lambda mf: (mf.parent.parent / "config.yaml").write_text("runtime:\n  predict_concurrency: x\n"), "=config.yaml", "runtime.predict_concurrency"),
]


@pytest.mark.parametrize("name, breakit, location, message", BROKEN, ids=[b[0] for b in BROKEN])
def test_failure_keeps_old_code_and_next_good_save_recovers(model, name, breakit, location, message):
    tr, mf = model
    good = mf.read_text()
    config = (tr.path / "config.yaml").read_text()
    before = tr.predict(1).output
    breakit(mf)
    event = tr.reload()
    assert event.kind == "failed" and not event.ok and event.version == 1
    assert message in event.error, event.error
    if location:
        where = location[1:] if location.startswith("=") else f"t/model/model.py:{line_of(mf, location)}"
        assert where in event.error, (where, event.error)
    assert "\n" not in event.error
    assert tr.predict(1).output == before and tr.version == 1 and tr.model.loads == 1
    assert "still serving v1" in str(event)
    # recover: the next good save
    (tr.path / "config.yaml").write_text(config)
    save(mf, good.replace('return f"cat:{x}"', 'return f"ok:{x}"'))
    event = tr.reload()
    assert event.ok and event.version == 2
    assert tr.predict(1).output["label"] == "ok:1"


def test_a_config_edit_whose_reload_failed_is_applied_by_the_next_reload(live):
    """The reload that read the new config.yaml failed (load() raised for another reason); the next
    one, with config.yaml as it is, must build with it - not with the config the model still serves."""
    tr = live("""
    from pathlib import Path


    class Model:
        def __init__(self, config, data_dir, **kwargs):
            self.k = config["model_metadata"]["k"]
            self.data_dir = data_dir

        def load(self):
            if (self.data_dir / "broken").exists():
                raise RuntimeError("the weights are being copied")

        def predict(self, x):
            return x * self.k
    """, config={"model_metadata": {"k": 1}})
    config = tr.path / "config.yaml"
    assert tr.predict(3).output == 3
    (tr.path / "data" / "broken").write_text("")
    config.write_text(config.read_text().replace("k: 1", "k: 2"))
    assert tr.reload().kind == "failed"
    (tr.path / "data" / "broken").unlink()
    event = tr.reload()
    assert event.kind == "full", event
    assert tr.predict(3).output == 6


def test_helper_modules_in_model_folder_and_packages(live):
    tr = live(
        """
        import shout
        from .helpers import suffix
        class Model:
            def predict(self, x):
                return shout.shout(x) + suffix()
        """,
        files={"model/helpers.py": "def suffix():\n    return '!'\n", "packages/shout.py": "def shout(x):\n    return x.upper()\n"},
    )
    assert tr.predict("hi").output == "HI!"
    save(tr.path / "model" / "helpers.py", "def suffix():\n    return '?'\n")
    event = tr.reload()
    assert event.kind == "methods" and "model/helpers.py" in event.changed
    assert tr.predict("hi").output == "HI?"
    save(tr.path / "packages" / "shout.py", "def shout(x):\n    return x.lower()\n", how="rename")
    event = tr.reload()
    assert event.kind == "methods" and "packages/shout.py" in event.changed
    assert tr.predict("HI").output == "hi?"
    # a broken package module: old code keeps serving, and the old module is back in sys.modules
    save(tr.path / "packages" / "shout.py", "def shout(x)\n    return x\n")
    event = tr.reload()
    assert event.kind == "failed" and "packages/shout.py:1" in event.error
    assert tr.predict("HI").output == "hi?"


def test_request_finishes_on_the_version_it_started_on(model):
    tr, mf = model
    inside, gate = threading.Event(), threading.Event()
    tr.model.inside, tr.model.gate = inside, gate
    edit(mf, "        return {\"label\": self.label(x)", "        self.inside.set()\n        self.gate.wait(10)\n        return {\"label\": self.label(x)")
    assert tr.reload().version == 2
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", tr.run(1)))
    first.start()
    assert inside.wait(10)  # the request is inside predict, on v2
    edit(mf, 'return f"cat:{x}"', 'return f"dog:{x}"')  # change the helper predict calls
    assert tr.reload().version == 3
    gate.set()
    first.join(10)
    r1 = results["first"]
    assert r1.ok and r1.output["label"] == "cat:1" and r1.trace.version == 2  # all of v2, helper included
    r2 = tr.predict(1)
    assert r2.output["label"] == "dog:1" and r2.trace.version == 3


def test_callbacks_and_history(model):
    tr, mf = model
    seen = []
    remove = tr.on_reload(seen.append)
    tr.on_reload(lambda e: 1 / 0)  # a broken callback must not break reloading
    edit(mf, 'return f"cat:{x}"', 'return f"a:{x}"')
    with pytest.warns(RuntimeWarning, match="callback"):
        event = tr.reload()
    assert seen == [event] and tr.reload_history[-1] is event
    remove()
    edit(mf, 'return f"a:{x}"', 'return f"b:{x}"')
    with pytest.warns(RuntimeWarning):
        tr.reload()
    assert len(seen) == 1 and len(tr.reload_history) == 2


@pytest.mark.parametrize("how", ["inplace", "rename"])
def test_watcher_reloads_on_save_and_stops_cleanly(model, how):
    tr, mf = model
    events = []
    arrived = threading.Event()

    def got(event):
        events.append(event)
        arrived.set()

    tr.on_reload(got)
    with tr.watch():
        assert tr.watching
        watchers = [t for t in threading.enumerate() if t.name.startswith("truss-lab-watch")]
        tr.watch()  # a second call does not start a second watcher
        assert [t for t in threading.enumerate() if t.name.startswith("truss-lab-watch")] == watchers
        edit(mf, 'return f"cat:{x}"', 'return f"fox:{x}"', how=how)
        assert arrived.wait(10), "watcher did not notice the save"
        assert events[-1].kind == "methods" and events[-1].trigger == "watch"
        assert tr.predict(3).output["label"] == "fox:3"
    assert not tr.watching
    assert not any(t.is_alive() for t in watchers)


def test_a_save_seen_between_truncating_and_writing_the_file_is_one_good_reload(model):
    """An editor that truncates the file and then writes it, on a machine busy enough for the watcher to
    see the empty file first: one reload, of what was written - no failed import of an empty file."""
    tr, mf = model
    events = []
    arrived = threading.Event()
    tr.on_reload(lambda e: (events.append(e), arrived.set()))
    new = mf.read_text().replace('return f"cat:{x}"', 'return f"gnu:{x}"')
    with tr.watch():
        with open(mf, "w") as f:  # truncated...
            f.flush()
            time.sleep(0.06)  # the gap under test: longer than the watcher's 12 ms step, as on a busy machine
            f.write(new)  # ...then written
        assert arrived.wait(10)
        assert [e.kind for e in events] == ["methods"], events
        assert tr.predict(1).output["label"] == "gnu:1"


def test_watcher_reports_broken_save_then_recovers(model):
    tr, mf = model
    arrived = threading.Event()
    events = []
    tr.on_reload(lambda e: (events.append(e), arrived.set()))
    good = mf.read_text()
    with tr.watch():
        save(mf, good.replace("def label(self, x):", "def label(self, x)"))
        assert arrived.wait(10)
        assert events[-1].kind == "failed" and f"model/model.py:{line_of(mf, 'def label')}" in events[-1].error
        assert tr.predict(1).output["label"] == "cat:1"
        arrived.clear()
        save(mf, good.replace('return f"cat:{x}"', 'return f"emu:{x}"'))
        assert arrived.wait(10)
        assert events[-1].ok and tr.predict(1).output["label"] == "emu:1"


def test_reload_under_load(model):
    """200 edits alternating valid and broken code while a thread sends requests."""
    psutil = pytest.importorskip("psutil")
    tr, mf = model
    good = mf.read_text()
    stop = threading.Event()
    failures, versions = [], set()
    served = 0

    def traffic():
        nonlocal served
        while not stop.wait(0.0005):  # a client sending about a request per millisecond
            r = tr.run(1)
            if r.ok:
                served += 1
                versions.add(r.trace.version)
            else:
                failures.append(r.error)

    def cycle(i):
        if i % 2:
            save(mf, good.replace("def label(self, x):", "def label(self, x)"))  # broken
        else:
            save(mf, good.replace('return f"cat:{x}"', f'return f"v{i}:{{x}}"'))
        return tr.reload()

    for i in range(20):  # warm up allocator and caches before measuring
        cycle(i)
    gc.collect()
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    modules_before = len(sys.modules)
    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        events = [cycle(i) for i in range(200)]
    finally:
        stop.set()
        sender.join(30)
    gc.collect()
    assert not failures, failures[0]
    assert served > 0
    assert [e.kind for e in events] == ["methods", "failed"] * 100
    assert len(tr.reload_history) == 200  # bounded history, every event reported
    assert len(sys.modules) <= modules_before
    growth_mb = (proc.memory_info().rss - rss_before) / 2**20
    assert growth_mb < 5, f"RSS grew {growth_mb:.1f} MB over 200 reloads"
    assert len(versions) > 1  # traffic really ran across reloads
    assert tr.lock_available == tr.concurrency


def test_wait_for_reload_returns_the_watchers_event(live):
    tr = live("class Model:\n    def predict(self, x):\n        return x\n")
    model = tr.path / "model" / "model.py"
    with pytest.raises(truss_lab.TrussLabError, match=r"no reload within 0.05 s \(the watcher is off"):
        tr.wait_for_reload(since=tr.reload_count, timeout=0.05)
    tr.watch()
    n = tr.reload_count
    model.write_text("class Model:\n    def predict(self, x):\n        return [x]\n")
    event = tr.wait_for_reload(since=n)
    assert event.kind == "methods" and event.trigger == "watch" and tr.reload_count == n + 1
    assert tr.predict(1).output == [1]
    tr.unwatch()


@pytest.mark.parametrize("style", ["rename", "three-writes"])
def test_an_editors_burst_of_writes_is_one_reload(model, style):
    tr, mf = model
    good = mf.read_text()
    new = good.replace('return f"cat:{x}"', 'return f"owl:{x}"')
    with tr.watch():
        n = tr.reload_count
        if style == "rename":  # write a temp file, rename it over the original
            save(mf, new, how="rename")
        else:  # truncate, write in two parts, as some editors do
            with open(mf, "w") as f:
                f.flush()
                f.write(new[: len(new) // 2])
                f.flush()
                f.write(new[len(new) // 2:])
        event = tr.wait_for_reload(since=n)
        assert event.ok and event.kind == "methods", event
        # a later, separate save: if the burst had been split, its extra reload would come first
        save(mf, new.replace("owl", "elk"))
        last = tr.wait_for_reload(since=n + 1)
        assert tr.reload_count == n + 2 and last.ok, tr.reload_history[-3:]
        assert tr.predict(1).output["label"] == "elk:1"


def test_a_process_that_exits_with_a_watcher_running_exits_cleanly(tmp_path):
    import subprocess

    root = tmp_path / "w"
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text("model_name: w\n")
    (root / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return x\n")
    script = f"import truss_lab\ntr = truss_lab.load({str(root)!r})\ntr.watch()\nprint('bye')\n"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bye" in out.stdout, (out.returncode, out.stderr[-500:])  # no abort at exit

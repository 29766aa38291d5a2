"""Issue 31: one truss per process, under its real module names, as Truss runs it - the kernel holds the
truss you develop, every other truss runs in a worker process behind the same API.

Written the way real model code is: pickles, thread and process pools in load(), loky, vendored
libraries that read their own data files, namespace packages, `sys.path` tricks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import truss_lab
from conftest import write_truss

ITEMS = "from dataclasses import dataclass\n\n@dataclass\nclass Item:\n    n: int\n\n\ndef square(x):\n    return x * x\n"


# ------------------------------------------------------------------ code that finds code by name


POOLS_IN_LOAD = """
import multiprocessing as mp
import pickle
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from model.items import Item, square


class Model:
    def load(self):
        blob = pickle.dumps([Item(1), Item(2)])
        with ThreadPoolExecutor(2) as pool:  # pickle.loads in a thread with no model frame on its stack
            self.items = pool.submit(pickle.loads, blob).result()
        self.pooled = {}
        for method in ("spawn", "fork", "forkserver"):
            with ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as pool:
                self.pooled[method] = list(pool.map(square, [2, 3]))
                self.pooled[method + "-item"] = pool.submit(pickle.dumps, Item(5)) .result() == pickle.dumps(Item(5))

    def predict(self, x):
        return {"items": [i.n for i in self.items], "pooled": self.pooled, "item": type(self.items[0]).__module__}
"""


def test_thread_and_process_pools_in_load_find_the_trusss_code_by_name(tmp_path):
    root = write_truss(tmp_path / "pools", POOLS_IN_LOAD, files={"model/items.py": ITEMS})
    with truss_lab.load(root) as tr:
        out = tr.predict(None).output
    assert out["items"] == [1, 2] and out["item"] == "model.items"
    for method in ("spawn", "fork", "forkserver"):
        assert out["pooled"][method] == [4, 9] and out["pooled"][method + "-item"] is True, method


LOKY = """
from joblib import Parallel, delayed

from model.items import square


class Model:
    def predict(self, xs):
        return Parallel(n_jobs=2)(delayed(square)(x) for x in xs)  # loky, as sklearn's n_jobs uses it
"""


def test_joblib_loky_workers_import_the_trusss_code(tmp_path):
    pytest.importorskip("joblib")
    root = write_truss(tmp_path / "loky", LOKY, files={"model/items.py": ITEMS})
    with truss_lab.load(root) as tr:
        assert tr.predict([1, 2, 3]).output == [1, 4, 9]


POOL_IN_PREDICT = """
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

from model.items import square


class Model:
    def predict(self, xs):
        with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
            return list(pool.map(square, xs))
"""


def test_with_two_trusses_loaded_a_process_pool_in_predict_works_in_both(tmp_path):
    a = write_truss(tmp_path / "a", POOL_IN_PREDICT, files={"model/items.py": ITEMS})
    b = write_truss(tmp_path / "b", POOL_IN_PREDICT, files={"model/items.py": ITEMS.replace("x * x", "x * x * x")})
    with truss_lab.load(a) as ta, truss_lab.load(b) as tb:
        assert ta.predict([2, 3]).output == [4, 9]  # the truss loaded first, whose pool's feeder pickles by name
        assert tb.predict([2, 3]).output == [8, 27]


def test_vendored_libraries_read_their_own_data_files(tmp_path):
    model = """
    import importlib.resources
    import pkgutil

    import mylib


    class Model:
        def predict(self, x):
            return [importlib.resources.files("mylib").joinpath("vocab.txt").read_text().split(),
                    pkgutil.get_data("mylib", "vocab.txt").decode().split(), mylib.first()]
    """
    files = {"packages/mylib/__init__.py": "import importlib.resources\n\ndef first():\n"
                                           "    return importlib.resources.files(__name__).joinpath('vocab.txt').read_text().split()[0]\n",
             "packages/mylib/vocab.txt": "alpha beta\n"}
    root = write_truss(tmp_path / "vendored", model, files=files)
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == [["alpha", "beta"], ["alpha", "beta"], "alpha"]


def test_a_package_next_to_an_installed_namespace_imports_and_reload_and_path_tricks_work(tmp_path):
    pytest.importorskip("google.protobuf")  # an installed `google` namespace package
    model = """
    import importlib
    import os
    import sys

    import settings
    from google import mytool

    sys.path.append(os.path.dirname(__file__))  # as some model code does
    import helper


    class Model:
        def predict(self, x):
            importlib.reload(settings)
            return [mytool.NAME, settings.VALUE, helper.WHO]
    """
    files = {"packages/google/mytool.py": "NAME = 'mytool'\n", "packages/settings.py": "VALUE = 1\n", "model/helper.py": "WHO = 'v1'\n"}
    root = write_truss(tmp_path / "tricks", model, files=files)
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == ["mytool", 1, "v1"]
        (root / "model" / "helper.py").write_text("WHO = 'v2'\n")  # imported through the path the model appended
        assert tr.reload().ok
        assert tr.predict(None).output == ["mytool", 1, "v2"]


def test_packages_are_appended_to_the_path_even_in_a_spawn_worker(tmp_path):
    model = """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from model.probe import which_csv


    class Model:
        def predict(self, x):
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
                return [which_csv(), pool.submit(which_csv).result()]
    """
    files = {"packages/csv.py": "SHADOW = True\n", "model/probe.py": "def which_csv():\n    import csv\n    return hasattr(csv, 'reader')\n"}
    root = write_truss(tmp_path / "csvs", model, files=files)
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == [True, True]  # the standard library's csv, here and in the worker


def test_a_package_that_fails_to_import_fails_the_load_at_the_users_line(tmp_path):
    model = "import loud\n\nclass Model:\n    def predict(self, x):\n        return loud.shout(x)\n"
    root = write_truss(tmp_path / "missing", model, files={"packages/loud.py": "import not_installed_anywhere\n\ndef shout(x):\n    return x\n"})
    with pytest.raises(truss_lab.LoadError) as info:
        truss_lab.load(root)
    assert "missing/packages/loud.py:1" in str(info.value) and "No module named 'not_installed_anywhere'" in str(info.value)


def test_walking_sys_modules_never_runs_a_file_the_model_does_not_import(tmp_path):
    model = "import inspect\n\nclass Model:\n    def predict(self, x):\n        return len(inspect.stack())\n"
    root = write_truss(tmp_path / "walk", model, files={"packages/script.py": "raise SystemExit('a script next to the code ran')\n"})
    with truss_lab.load(root) as tr:
        assert tr.predict(None).ok
        import inspect

        inspect.stack()
        assert "script" not in sys.modules


# ------------------------------------------------------------------ workers


STREAM = """
import os


class Model:
    def predict(self, x):
        if x == "log":
            return open(os.environ["STREAM_LOG"]).read()
        return self._gen(x)

    def _gen(self, n):
        try:
            for i in range(n):
                yield f"{i},"
        finally:
            with open(os.environ["STREAM_LOG"], "a") as f:
                f.write("closed ")
"""


def test_a_worker_answers_as_the_truss_server_would_send(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAM_LOG", str(tmp_path / "stream.log"))
    (tmp_path / "stream.log").write_text("")
    model = """
    import numpy as np
    import pydantic

    class Out(pydantic.BaseModel):
        score: float

    class Model:
        def predict(self, x):
            if x == "array":
                return {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
            if x == "pydantic":
                return Out(score=0.5)
            if x == "set":
                return {1, 2}
            if x == "file":
                return open("/no/such/weights.bin")
            raise KeyError(x)
    """
    root = write_truss(tmp_path / "sent", model)
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(kernel), truss_lab.load(root) as tr:
        assert tr.process == "worker" and tr.pid != os.getpid()
        out = tr.predict("array").output["a"]
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (2, 3)
        assert tr.predict("pydantic").output == {"score": 0.5}  # its JSON, as sent
        result = tr.run("set")
        assert not result.ok and "cannot leave the worker process" in str(result.error)
        err = tr.run("boom").error
        assert isinstance(err, truss_lab.PredictError) and err.location == "sent/model/model.py:18"
        assert isinstance(err.__cause__, KeyError) and "raise KeyError(x)" in err.model_traceback()
        assert str(err.__cause__) == "'boom'" and err.__cause__.args == ("boom",)
        cause = tr.run("file").error.__cause__  # an OSError as itself: errno, strerror, filename
        assert isinstance(cause, FileNotFoundError) and (cause.errno, cause.filename) == (2, "/no/such/weights.bin")
        assert tr.traces[-1].error_stage == "predict" and tr.report().count == 5
        with pytest.raises(truss_lab.TrussLabError, match="worker process"):
            tr.model


def test_a_worker_streams_chunk_by_chunk_and_a_consumer_that_stops_closes_its_generator(tmp_path, monkeypatch):
    log = tmp_path / "stream.log"
    log.write_text("")
    monkeypatch.setenv("STREAM_LOG", str(log))
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "streamer", STREAM)
    with truss_lab.load(kernel), truss_lab.load(root) as tr:
        assert tr.process == "worker"
        assert list(tr.stream(3)) == ["0,", "1,", "2,"]
        chunks = tr.stream(1000)
        assert next(chunks) == "0," and next(chunks) == "1,"
        chunks.close()  # the consumer stops
        deadline = time.monotonic() + 30
        while log.read_text().count("closed") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the worker closes it (a deadline, not a guess)
        assert log.read_text().count("closed") == 2 and tr.lock_available == tr.concurrency
        assert tr.predict(2).output == "0,1,"  # joined, as the Truss server gathers a stream


CRASH = """
import ctypes, os, signal

class Model:
    def predict(self, how):
        if how == "exit":
            os._exit(3)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "segfault":
            ctypes.string_at(0)
        return how
"""


@pytest.mark.parametrize("how, said", [("exit", "exited with code 3"), ("kill", "was killed by SIGKILL"),
                                        ("segfault", "was killed by SIGSEGV")])
def test_a_worker_that_dies_is_one_line_and_restart_brings_it_back(tmp_path, how, said):
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "crash", CRASH)
    with truss_lab.load(kernel), truss_lab.load(root) as tr:
        assert tr.predict("fine").output == "fine"
        pid = tr.pid
        with pytest.raises(truss_lab.TrussLabError) as info:
            tr.predict(how)
        assert said in str(info.value) and "tr.restart()" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(truss_lab.TrussLabError, match=said):
            tr.predict("fine")  # every later call says so, at once
        tr.restart()
        assert tr.pid != pid and tr.predict("again").output == "again"


def test_a_worker_whose_fork_pool_outlives_it_is_still_seen_dead(tmp_path):
    """A fork pool load() started keeps its processes; the worker dies: its children do not hold the
    kernel's connections open, so the kernel is told at once instead of waiting."""
    model = CRASH.replace("class Model:\n", "class Model:\n    def load(self):\n"
                          "        import multiprocessing as mp\n        from concurrent.futures import ProcessPoolExecutor\n"
                          "        self.pool = ProcessPoolExecutor(2, mp_context=mp.get_context('fork'))\n"
                          "        self.pool.submit(abs, -1).result()\n\n")
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "forks", model)
    with truss_lab.load(kernel), truss_lab.load(root) as tr:
        assert tr.predict("fine").output == "fine"
        with pytest.raises(truss_lab.TrussLabError, match="was killed by SIGKILL"):
            tr.predict("kill")
        group = tr.pid
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-g", str(group)], capture_output=True).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # killed processes are reaped by init: a deadline, not a guess
    assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).returncode == 1  # its pool went too


def test_a_worker_never_outlives_its_kernel_even_one_killed_with_sigkill(tmp_path):
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    pooled = ("import multiprocessing as mp\nfrom concurrent.futures import ProcessPoolExecutor\nclass Model:\n"
              "    def load(self):\n        self.pool = ProcessPoolExecutor(1, mp_context=mp.get_context('fork'))\n"
              "        self.pool.submit(abs, -1).result()  # a pool the model keeps: its process too must go\n"
              "    def predict(self, x):\n        return x\n")
    other = write_truss(tmp_path / "other", pooled)
    script = textwrap.dedent(f"""
        import time, truss_lab
        a = truss_lab.load({str(kernel)!r})
        b = truss_lab.load({str(other)!r})
        print(b.pid, b._dir, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker, folder = proc.stdout.readline().split()
        worker = int(worker)
        group = [int(p) for p in subprocess.run(["pgrep", "-g", str(worker)], capture_output=True, text=True).stdout.split()]
        assert worker in group and len(group) >= 2  # the worker and its pool's process
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = []
        for pid in group:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            assert not os.path.exists(folder)  # its socket's folder went with it
            return
        time.sleep(0.05)  # waiting for the kernel's death to reach them, with a deadline
    pytest.fail(f"{alive} outlived their kernel")


def test_a_worker_reloads_on_save_and_tells_the_kernel(tmp_path):
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "watched", "class Model:\n    def predict(self, x):\n        return 'v1'\n")
    with truss_lab.load(kernel), truss_lab.load(root) as tr:
        assert tr.process == "worker"
        seen = []
        tr.on_reload(seen.append)
        tr.watch()
        n = tr.reload_count
        (root / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return 'v2'\n")
        event = tr.wait_for_reload(since=n, timeout=30)
        assert event.kind == "methods" and tr.predict(None).output == "v2"
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)  # the event crosses from the worker
        assert [e.kind for e in seen] == ["methods"] and tr.version == 2


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)  # a deadline, not a guess
    return False


def test_a_pool_the_model_terminates_ends_its_own_children_not_the_worker(tmp_path):
    """multiprocessing's terminate() sends SIGTERM: in a forked child that is the child's end, never
    the worker's whole process group."""
    model = ("import multiprocessing as mp, time\nclass Model:\n    def load(self):\n"
             "        self.ctx = mp.get_context('fork')\n"
             "    def predict(self, x):\n        pool = self.ctx.Pool(2)\n        pool.map(abs, [-1, -2])\n"
             "        pool.terminate()\n        pool.join()\n"
             "        codes = set()\n        for _ in range(20):  # terminated at once after its start: the racy moment\n"
             "            p = self.ctx.Process(target=time.sleep, args=(30,))\n            p.start()\n"
             "            p.terminate()\n            p.join(60)\n            codes.add(p.exitcode)\n"
             "        return sorted(codes)\n")
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "pools", model)
    with truss_lab.load(kernel), truss_lab.load(root) as tr:
        assert tr.predict(1).output == [-signal.SIGTERM]
        assert tr.predict(2).output == [-signal.SIGTERM]  # the worker is still there


def test_a_worker_truss_the_notebook_drops_ends_its_worker(tmp_path):
    """Re-running `tr = truss_lab.load(...)` drops the previous object: its worker and socket folder go."""
    import gc

    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "dropped", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(kernel):
        tr = truss_lab.load(root)
        tr.on_reload(lambda event: None)
        pid, folder = tr.pid, tr._dir
        assert tr.predict(1).output == 1
        tr = truss_lab.load(root)  # the cell again
        gc.collect()
        assert _gone(pid) and not os.path.exists(folder) and tr.predict(2).output == 2
        tr.close()


def test_a_closed_worker_truss_says_closed(tmp_path):
    kernel = write_truss(tmp_path / "kernel", "class Model:\n    def predict(self, x):\n        return x\n")
    root = write_truss(tmp_path / "closing", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(kernel):
        tr = truss_lab.load(root)
        tr.close()
        for call in (lambda: tr.predict(1), lambda: tr.version, tr.restart):
            with pytest.raises(truss_lab.TrussLabError, match="closed"):
                call()


def test_auto_loads_racing_for_the_kernel_give_one_kernel_truss_and_workers(tmp_path, monkeypatch):
    """Two cells (threads) load at once: the one that finds the kernel taken after all gets a worker."""
    from truss_lab import loader

    a = write_truss(tmp_path / "a", "class Model:\n    def predict(self, x):\n        return 'a'\n")
    b = write_truss(tmp_path / "b", "class Model:\n    def predict(self, x):\n        return 'b'\n")
    with truss_lab.load(a) as first:
        monkeypatch.setattr(loader, "resident", lambda: None)  # b's check ran before a took the process
        with truss_lab.load(b) as second:
            assert (first.process, second.process) == ("kernel", "worker") and second.predict(1).output == "b"
        with pytest.raises(truss_lab.TrussLabError, match="already holds"):
            truss_lab.load(b, process="kernel")


def test_the_worker_and_kernel_apis_agree(tmp_path):
    """What one process has, the other has too - or says in one line why it stays in the other process."""
    model = "import os\nclass Model:\n    def load(self):\n        self.loads = getattr(type(self), 'loads', 0) + 1\n        type(self).loads = self.loads\n    def predict(self, x):\n        return [os.getpid(), self.loads]\n"
    kernel = write_truss(tmp_path / "kernel", model)
    other = write_truss(tmp_path / "other", model)
    with truss_lab.load(kernel) as k, truss_lab.load(other) as w:
        for tr in (k, w):
            tr.reload_drain_timeout = 5
            assert tr.reload_drain_timeout == 5
        assert k.predict(0).output == [os.getpid(), 1]
        assert k.restart() is k and k.predict(0).output == [os.getpid(), 1]  # a new instance, load() again
        pid = w.pid
        assert w.restart() is w and w.pid != pid and w.predict(0).output == [w.pid, 1]
        for reach in (lambda: w.serving, lambda: w.on_retire(print), lambda: w.run_stage("predict", 1), lambda: w.model):
            with pytest.raises(truss_lab.TrussLabError, match="runs in a worker process"):
                reach()


def test_a_path_the_model_appended_goes_with_it(tmp_path):
    """`sys.path.append(os.path.dirname(__file__))` in model.py puts the truss's model/ on the path; when
    the truss closes it goes too - else its model.py stood in for the next kernel truss's `model`
    package (`from model.helper import ...` failed with the old truss's imports)."""
    import sys

    first = write_truss(tmp_path / "appends", "import os, sys\nsys.path.append(os.path.dirname(__file__))\nimport helper\n"
                        "import gone_with_the_first\nclass Model:\n    def predict(self, x):\n        return helper.WHO\n",
                        files={"model/helper.py": "WHO = 'first'\n", "packages/gone_with_the_first.py": ""})
    with truss_lab.load(first, process="kernel") as tr:
        assert tr.predict(None).output == "first"
    assert not [e for e in sys.path if e.startswith(str(first))]
    second = write_truss(tmp_path / "second", "from model.helper import WHO\nclass Model:\n    def predict(self, x):\n        return WHO\n",
                         files={"model/helper.py": "WHO = 'second'\n"})
    with truss_lab.load(second, process="kernel") as tr:
        assert tr.predict(None).output == "second"

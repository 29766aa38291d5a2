"""The lock made visible: bench, timeline, compare and the lock-misuse guard (issue: see the GPU lock).

Models here have known stage durations (sleeps, or busy loops where the guard must see compute) and
download from a real HTTP server on 127.0.0.1 (truss_lab.devtools.localhttp).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest

import truss_lab
from truss_lab import cpu
from truss_lab import guard as lockguard
from truss_lab.devtools.localhttp import LocalServer
from truss_lab.display.style import STAGE_COLOURS

SLEEPY = """
import time
class Model:
    def preprocess(self, x):
        time.sleep({pre})
        return x
    def predict(self, x):
        time.sleep({pred})
        return x
    def postprocess(self, x):
        time.sleep({post})
        return x
"""

# preprocess or predict downloads `x` (a URL); predict then computes for COMPUTE seconds (a busy loop:
# CPU work, as a GPU kernel launch would be, so the guard's idle check has nothing to say about it)
DOWNLOAD = """
import time, urllib.request
COMPUTE = {compute}
def compute():
    end = time.perf_counter() + COMPUTE
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n
def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()
class Model:
    def preprocess(self, x):
        return fetch(x) if {in_pre} else x
    def predict(self, x):
        data = x if {in_pre} else fetch(x)
        compute()
        return len(data)
"""


@pytest.fixture
def server():
    with LocalServer(files={"img.bin": b"\x89PNG" + bytes(4000)}, delay_ms=40) as s:
        yield s


@pytest.fixture(autouse=True)
def _quiet_misuse():
    """Sleep-based models trip the guard on purpose; tests that check warnings record them themselves."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lockguard.LockMisuseWarning)
        yield


# ---------------------------------------------------------------------------------------- bench


def test_bench_efficiency_against_the_bound(live):
    """pre 50 / predict 20 / post 10 ms, 8 workers, lock 1: the lock is the bottleneck and stays busy."""
    tr = live(SLEEPY.format(pre=0.05, pred=0.02, post=0.01))
    report = tr.bench([0], n=100, concurrency=8, progress=False)
    assert isinstance(report, truss_lab.BenchReport) and report.count == 100 and report.ok == 100
    assert report.concurrency == 8 and report.max_lock_holders == 1
    assert report.bound == pytest.approx(1000 / report.stages["predict"].mean)
    assert report.efficiency >= 0.95, report.table()
    assert report.lock_utilization >= 0.95
    # steady state: 8 workers share a 20 ms lock, so each waits ~ 8*20 - (50+20+10) = 80 ms per turn
    assert 55 <= report.stages["lock_wait"].mean <= 100, report.table()
    assert tr.lock_available == 1


def test_one_worker_never_waits_and_uses_the_lock_a_quarter_of_the_time(live):
    tr = live(SLEEPY.format(pre=0.05, pred=0.02, post=0.01))
    report = tr.bench([0], n=10, concurrency=1, progress=False)
    assert report.stages["lock_wait"].p95 < 1.0
    assert report.lock_wait_distribution()[0] == ("< 1 ms", 10)
    assert report.lock_utilization == pytest.approx(20 / 80, abs=0.05)  # predict / whole request
    assert report.efficiency == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize("lock", [1, 2, 3])
def test_lock_never_has_more_holders_than_its_size(live, lock):
    tr = live(SLEEPY.format(pre=0.0, pred=0.01, post=0.0), concurrency=lock)
    report = tr.bench([0], n=24, concurrency=8, progress=False)
    assert report.max_lock_holders == lock  # reached, and never more (checked from the traces)
    held = sorted((t.lock_acquired, t.lock_released) for t in report.traces)
    for i, (a, _) in enumerate(held):
        assert sum(1 for x, y in held if x <= a < y) <= lock, f"more than {lock} holders at request {i}"


def test_bench_counts_failures_by_stage_and_keeps_going(live):
    tr = live(
        """
        class Model:
            def preprocess(self, x):
                if x == "pre": raise ValueError("bad input")
                return x
            def predict(self, x):
                if x == "pred": raise RuntimeError("boom")
                return x
            def postprocess(self, x):
                if x == "post": raise KeyError(x)
                return x
        """
    )
    report = tr.bench(["ok", "pre", "pred", "post", "ok"], n=50, concurrency=4, progress=False)
    assert report.count == 50 and report.ok == 20
    assert report.failures == {"preprocess": 10, "predict": 10, "postprocess": 10}
    assert tr.lock_available == 1
    assert "failures: postprocess 10, predict 10, preprocess 10" in report.table()


def test_bench_progress_bar_and_bad_arguments(live, capsys):
    tr = live(examples=[{"name": "a", "input": 1}])
    tr.bench(n=7, concurrency=2)  # cycles over examples.yaml
    assert "7/7" in capsys.readouterr().err  # tqdm.auto's text bar outside Jupyter
    tr.bench(n=3, concurrency=2, progress=False)
    assert "3/3" not in capsys.readouterr().err
    for kw in ({"n": 0}, {"concurrency": 0}, {"n": True}, {"concurrency": 1.5}):
        with pytest.raises(truss_lab.TrussLabError, match=r"(n|concurrency) must be a positive integer"):
            tr.bench([1], progress=False, **kw)


# ---------------------------------------------------------------------------------------- compare


def test_moving_the_download_to_preprocess_frees_the_lock(live, server):
    """Download 40 ms + compute 10 ms. Under the lock, predict holds it idle through the download;
    outside, the lock holds only compute. (Throughput ratios are benchmarks: they shrink on a busy machine.)"""
    wrong = live(DOWNLOAD.format(compute=0.01, in_pre=False), name="wrong")
    right = live(DOWNLOAD.format(compute=0.01, in_pre=True), name="right")
    url = server.url("img.bin")
    a = wrong.bench([url], n=30, concurrency=8, progress=False)
    b = right.bench([url], n=60, concurrency=8, progress=False)
    assert a.ok == 30 and b.ok == 60
    # what the design guarantees, however busy the machine: the 40 ms download is idle time under the lock
    def idle_ms(report):
        return sum(t.predict_idle_ms for t in report.traces) / report.count

    assert idle_ms(a) >= 30 and idle_ms(a) - idle_ms(b) >= 20, (a.table(), b.table())
    assert a.lock_idle_share > 0.5, a.table()
    cmp = truss_lab.compare(a, b)
    assert cmp.labels == ("wrong", "right")
    assert cmp.throughput_ratio == pytest.approx(b.throughput / a.throughput)
    text = cmp.table()
    assert re.search(r"throughput req/s\s+\S+\s+\S+\s+×\d+\.\d\d", text) and "lock held idle %" in text, text
    html = cmp._repr_mimebundle_()["text/html"]
    assert html.count("<svg") == 2 and "wrong" in html and "right" in html
    # the guard saw the download in the wrong one only
    assert a.findings.get("http") == 30 and "127.0.0.1:" in a.finding_messages["http"]
    assert not b.findings, b.finding_messages


def test_compare_lock_sizes_and_rejects_non_reports(live):
    one = live(SLEEPY.format(pre=0.0, pred=0.02, post=0.0), name="one", concurrency=1)
    two = live(SLEEPY.format(pre=0.0, pred=0.02, post=0.0), name="two", concurrency=2)
    a = one.bench([0], n=32, concurrency=4, progress=False)
    b = two.bench([0], n=32, concurrency=4, progress=False)
    cmp = truss_lab.compare(a, b)
    assert 0.7 * (b.bound / a.bound) <= cmp.throughput_ratio <= 1.1 * (b.bound / a.bound)  # ~2: twice the slots
    with pytest.raises(TypeError, match="b is int"):
        truss_lab.compare(cmp.a, 3)
    same = truss_lab.compare(cmp.a, cmp.a)
    assert same.labels == ("one (a)", "one (b)") and same.throughput_ratio == 1.0 and same.row("throughput").verdict == ""


# ---------------------------------------------------------------------------------------- guard


def test_guard_flags_a_download_in_predict_once_per_kind(live, server):
    tr = live(DOWNLOAD.format(compute=0.0, in_pre=False))
    url = server.url("img.bin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = tr.run(url)
        second = tr.run(url)
    # one download is a lookup, a connection and a request: it is reported once, as the request
    (found,) = first.trace.findings
    assert (found.kind, found.detail) == ("http", f"GET {url}")
    assert found.held_ms >= 40  # the server's delay happened under the lock
    assert re.fullmatch(
        rf"predict sent GET {re.escape(url)} and held the lock \d+ ms — move the download to preprocess", found.message
    )
    assert [f.kind for f in second.trace.findings] == ["http"]  # every trace records it ...
    misuse = [w for w in caught if issubclass(w.category, truss_lab.LockMisuseWarning)]
    assert [str(w.message) for w in misuse] == [f"t: {found.message}"]  # ... the warning comes once
    assert misuse[0].filename.endswith("model.py")  # points at the user's predict, not at truss_lab
    assert "lock misuse" in first._repr_mimebundle_()["text/html"]
    assert f"lock misuse: predict sent GET {url}" in repr(first)


def test_guard_names_a_raw_connection(live, server):
    tr = live(
        f"""
        import socket
        class Model:
            def predict(self, x):
                socket.create_connection(("127.0.0.1", {server.port}), timeout=5).close()
                return x
        """
    )
    (found,) = tr.run(1).trace.findings
    assert found.kind == "connect" and found.detail == f"127.0.0.1:{server.port}"
    assert found.message.startswith(f"predict opened a connection to 127.0.0.1:{server.port} and held the lock ")


def test_guard_is_silent_when_the_download_is_in_preprocess_even_under_concurrency(live, server):
    tr = live(DOWNLOAD.format(compute=0.005, in_pre=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tr.bench([server.url("img.bin")], n=24, concurrency=6, progress=False)
    # other requests download while one holds the lock: none of that is blamed on predict
    assert report.ok == 24 and not report.findings
    assert all(not t.findings for t in report.traces)
    assert not [w for w in caught if issubclass(w.category, truss_lab.LockMisuseWarning)]


def test_guard_flags_a_file_read_in_predict_not_in_load_or_preprocess(live):
    model = """
    class Model:
        def __init__(self, data_dir, **kw):
            self.path = data_dir / "weights.bin"
        def load(self):
            self.weights = self.path.read_bytes()
        def preprocess(self, x):
            return self.path.read_bytes() if x == "pre" else x
        def predict(self, x):
            return len(self.path.read_bytes()) if x == "predict" else len(self.weights)
    """
    tr = live(model, files={"data/weights.bin": "w" * 100})
    assert not tr.run("pre").trace.findings
    found = tr.run("predict").trace.findings
    assert [(f.kind, f.detail) for f in found] == [("file", str(tr.path / "data" / "weights.bin"))]
    assert "read it in load() or preprocess" in found[0].message


def test_guard_sees_async_predict_and_stream_but_not_the_consumer(live, server):
    tr = live(
        f"""
        import asyncio, urllib.request
        PORT = {server.port}
        class Model:
            async def predict(self, x):
                reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
                writer.close()
                await writer.wait_closed()
                return x
        """,
        name="a",
    )
    assert [f.kind for f in tr.run(1).trace.findings] == ["connect"]
    st = live(
        f"""
        import urllib.request
        class Model:
            def predict(self, x):
                for i in range(3):
                    if i == 1:
                        urllib.request.urlopen("{server.url('img.bin')}").read()
                    yield i
        """,
        name="s",
    )
    consumed = []
    for chunk in st.stream(0):
        consumed.append(chunk)
        (st.path / "data" / "consumer.txt").write_text("the caller's own work between chunks")
    trace = st.traces[-1]
    assert consumed == [0, 1, 2]
    assert [f.kind for f in trace.findings] == ["http"]  # the consumer's file write is not predict's


def test_guard_idle_predict_and_turning_it_off(live):
    tr = live(SLEEPY.format(pre=0.03, pred=0.03, post=0.0))
    found = tr.run(0).trace.findings
    assert [(f.kind, f.detail) for f in found] == [("sleep", "30 ms")]  # a sleep in predict is named as such
    waits = live("import threading\nclass Model:\n    def predict(self, x):\n        threading.Event().wait(0.03)\n        return x\n", name="w")
    found = waits.run(0).trace.findings
    assert [f.kind for f in found] == ["idle"]  # waiting on something the guard does not name
    assert re.fullmatch(r"predict was idle for \d+ of its \d+ ms \(thread CPU \d+ ms\) and held the lock \d+ ms — .*", found[0].message)
    tr.guard = False
    assert tr.run(0).trace.findings == []
    off = live(DOWNLOAD.format(compute=0.0, in_pre=False), name="off", guard=False)
    assert off.guard is False


def test_guard_hook_survives_odd_arguments():
    """The audit hook classifies what it can and never raises into the program it watches."""
    watch = lockguard.begin()
    token = lockguard.enter(watch)
    try:
        lockguard._hook("open", (3, "r", 0))  # an fd
        lockguard._hook("open", (b"/tmp/x.bin", "r", 0))
        lockguard._hook("socket.connect", (None, "/run/daemon.sock"))  # AF_UNIX: local, not a download
        lockguard._hook("subprocess.Popen", ("ls", ["ls", "-l"], None, None))
        lockguard._hook("time.sleep", (0.25,))
        lockguard._hook("socket.getaddrinfo", ())  # malformed: ignored
    finally:
        lockguard.leave(token)
    assert set(watch.events) == {("file", "/tmp/x.bin"), ("subprocess", "ls -l"), ("sleep", "250 ms")}
    many = lockguard.begin()
    token = lockguard.enter(many)
    try:
        for i in range(lockguard.MAX_EVENTS + 5):
            lockguard._hook("open", (f"/tmp/f{i}", "r", 0))
    finally:
        lockguard.leave(token)
    found = lockguard.end(many, held_ms=1.0)
    assert len(found) == lockguard.MAX_EVENTS and found[-1].detail.endswith("and 5 other things")


# ---------------------------------------------------------------------------------------- timeline


@pytest.mark.parametrize("n", [1, 10, 200])
def test_timeline_renders_with_one_bar_per_stage_segment(live, n):
    pytest.importorskip("matplotlib")
    tr = live(SLEEPY.format(pre=0.002, pred=0.001, post=0.001), concurrency=2)
    report = tr.bench(list(range(5)), n=n, concurrency=4, progress=False)
    tl = truss_lab.timeline(report)
    assert len(tl.rows) == n
    fig = tl.figure()
    lane, ax = fig.axes
    for stage in ("preprocess", "lock_wait", "predict", "postprocess"):
        expected = sum(1 for t in report.traces if t.stage_ms(stage) > 0)
        bars = [c for c in ax.containers if _gid(c) == stage]
        assert sum(len(c.patches) for c in bars) == expected, stage
    # the sleeping part of predict is drawn as its own, hatched bar: the idle share of the held lock
    idle = [c for c in ax.containers if _gid(c) == "predict_idle"]
    assert sum(len(c.patches) for c in idle) == sum(1 for t in report.traces if t.predict_idle_ms)
    assert all(p.get_hatch() == "////" for c in idle for p in c.patches)
    assert tl.caption.startswith(report.idle_sentence())  # "lock held N% · M% of it idle" (or why it cannot tell)
    assert lane.get_ylim() == (0, 2.5)  # lock of 2, with headroom
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        tl.label(stage) for stage in ("preprocess", "lock_wait", "predict", "predict_idle", "postprocess")
        if any(_gid(c) == stage for c in ax.containers)
    ]
    png = tl.png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    svg = tl.svg()
    for stage in ("preprocess", "predict"):
        colour = STAGE_COLOURS[stage]
        assert svg.count(f'fill="{colour}">') == sum(1 for t in report.traces if t.stage_ms(stage) > 0)
    assert svg.count('fill="url(#tl-idle)">') == sum(1 for t in report.traces if t.predict_idle_ms)
    assert report.count == n and tl.caption in str(tl)


def test_timeline_by_worker_errors_and_escaping(live):
    pytest.importorskip("matplotlib")
    tr = live(
        """
        class Model:
            def predict(self, x):
                if x == 2:
                    raise ValueError("<script>alert(1)</script>")
                return x
        """
    )
    report = tr.bench([1, 2], n=6, concurrency=2, progress=False)
    tl = truss_lab.timeline(report, by="worker")
    assert 1 <= len(tl.rows) <= 2 and all(r.startswith("worker ") for r in tl.rows)
    assert len(tl.errors) == 3
    svg = tl.svg()
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    tl.figure()
    with pytest.raises(ValueError, match="by must be"):
        truss_lab.timeline(report, by="thread")
    with pytest.raises(TypeError, match="not int"):
        truss_lab.timeline(3)
    from_traces = truss_lab.timeline(report.traces, last=2)
    assert len(from_traces.rows) == 2


def test_report_html_shows_timeline_wait_distribution_and_misuse(live):
    tr = live(SLEEPY.format(pre=0.0, pred=0.025, post=0.0))
    report = tr.bench([0], n=4, concurrency=2, progress=False)
    html = report._repr_mimebundle_()["text/html"]
    assert "<svg" in html and "lock wait (requests)" in html and "lock misuse" in html
    text = report.table()
    assert "lock wait: " in text and "lock misuse in 4 requests: predict slept 25 ms" in text


# ---------------------------------------------------------------------------------------- the lock itself


def _wait_for(predicate, timeout=5.0):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


def test_fair_lock_serves_waiters_in_arrival_order():
    """As a Truss server's asyncio.Semaphore: a thread that releases and re-acquires does not barge in."""
    import threading

    from truss_lab.lock import FairLock

    lock = FairLock(1)
    order: list[int] = []
    lock.acquire()
    threads = []
    for i in range(6):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        _wait_for(lambda: lock.waiting == i + 1)  # queued in this order
    lock.release()
    lock.acquire()  # a newcomer queues behind all six
    assert order == [0, 1, 2, 3, 4, 5]
    lock.release()
    for t in threads:
        t.join(5)
    assert lock.available == 1 and lock.waiting == 0
    with pytest.raises(ValueError, match="released more times"):
        lock.release()
    with pytest.raises(ValueError):
        FairLock(0)


def test_fair_lock_interrupted_waiter_leaks_no_slot():
    import signal
    import threading

    from truss_lab.lock import FairLock

    lock = FairLock(1)
    held, done = threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            done.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)

    class Interrupted(Exception):
        pass

    def on_alarm(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted):
            lock.acquire()  # blocked behind the holder, then interrupted as Ctrl-C would
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert lock.waiting == 0
    done.set()
    t.join(5)
    assert lock.available == 1


def test_gpu_check_asks_tensorflow_once(monkeypatch):
    """Idle predicts are checked against a GPU in use; TensorFlow is asked once per process, not per request."""
    import types

    calls = []
    fake_tf = types.SimpleNamespace(config=types.SimpleNamespace(list_physical_devices=lambda kind: calls.append(kind) or []))
    monkeypatch.setitem(__import__("sys").modules, "tensorflow", fake_tf)
    monkeypatch.setattr(lockguard, "_tf_has_gpu", None)
    monkeypatch.setattr(lockguard, "_gpu_seen", False)
    assert lockguard.gpu_in_use() is False and lockguard.gpu_in_use() is False
    assert calls == ["GPU"]
    monkeypatch.setattr(lockguard, "_tf_has_gpu", None)
    fake_tf.config.list_physical_devices = lambda kind: ["/physical_device:GPU:0"]
    assert lockguard.gpu_in_use() is True


def _gid(container):
    """The stage a matplotlib bar container draws (barh's gid is set on its patches)."""
    return container.patches[0].get_gid() if container.patches else None


# ---------------------------------------------------------------------------------------- compute vs idle


def test_predict_time_splits_into_compute_and_idle(live):
    tr = live(
        """
        import threading, time
        class Model:
            def predict(self, x):
                if x == "wait":
                    threading.Event().wait(0.04)  # holds the lock, computes nothing
                else:
                    t = time.thread_time()
                    while time.thread_time() - t < 0.04:  # 40 ms of this thread's own CPU time
                        pass
                return x
        """
    )
    waited, computed = tr.run("wait").trace, tr.run("busy").trace
    assert waited.predict_idle_ms > 0.9 * waited.predict_ms and waited.predict_compute_ms < 0.1 * waited.predict_ms
    assert computed.predict_compute_ms >= 39  # CPU time is the thread's own: it holds however busy the machine is
    report = tr.report()
    assert report.idle_measured == 2 and 0 < report.lock_idle_share < 1
    assert report.compute_bound > report.bound  # if predict only computed, the lock would allow more
    assert [f.kind for f in waited.findings] == ["idle"]  # the guard's idle finding: the same measurement
    assert f"{waited.predict_idle_ms:.0f} of its" in waited.findings[0].detail


def test_async_and_streaming_predicts_say_not_measured(live):
    tr = live("import asyncio\nclass Model:\n    async def predict(self, x):\n        await asyncio.sleep(0.01)\n        return x\n")
    t = tr.run(1).trace
    assert t.predict_compute_ms is None and t.predict_idle_ms is None
    assert "not measured" in tr.report().idle_sentence()
    st = live("class Model:\n    def predict(self, x):\n        yield 1\n", name="s")
    assert list(st.stream(0)) == [1] and st.traces[-1].predict_cpu_ms is None


def test_compare_gives_no_verdict_on_figures_measured_against_each_runs_own_bound(live):
    tr = live(SLEEPY.format(pre=0.0, pred=0.02, post=0.0))
    a = tr.bench([0], n=4, concurrency=2, progress=False)
    b = tr.bench([0], n=4, concurrency=2, progress=False)
    cmp = truss_lab.compare(a, b)
    for name in ("efficiency", "lock utilization", "compute bound"):
        assert cmp.row(name).higher_is_better is None and cmp.row(name).verdict == ""
    assert cmp.row("lock held idle").higher_is_better is False


def test_the_idle_share_of_tiny_predicts_is_not_presented_as_a_finding(live):
    """A no-op predict (microseconds) cannot be split into compute and idle: the clocks and the per-request
    bookkeeping decide the figure. The headline says so instead of advising."""
    tr = live("class Model:\n    def predict(self, x):\n        return x\n")
    report = tr.bench([1], n=50, concurrency=2, progress=False)
    sentence = report.idle_sentence()
    assert "too short to split into compute and idle" in sentence and "predict waits" not in sentence, sentence
    assert truss_lab.timeline(report).caption.startswith(sentence)


def test_a_machine_busier_than_the_model_is_said_instead_of_idle(live):
    """With the machine's CPU stall above half the bench's time, idle cannot be told from waiting for a CPU."""
    import math

    tr = live("import time\nclass Model:\n    def predict(self, x):\n        time.sleep(0.002)\n        return x\n")
    report = tr.bench([1], n=4, concurrency=1, progress=False)
    assert math.isnan(report.others_cpu_share) == (cpu.machine_cpu_s() is None)  # measured where Linux says
    busy = dataclasses.replace(report, others_cpu_share=0.9, model_cpu_share=0.05)
    assert "the machine was busier than the model" in busy.idle_sentence() and "predict waits" not in busy.idle_sentence()
    calm = dataclasses.replace(report, others_cpu_share=0.0)
    assert "of it idle" in calm.idle_sentence()  # a sleeping predict: idle, and said
    mine = dataclasses.replace(report, others_cpu_share=0.6, model_cpu_share=0.9)  # the model itself kept the CPUs busy
    assert "of it idle" in mine.idle_sentence()

"""Issue 25: per-stage profiles (pyinstrument) and traces out (Chrome trace JSON, OpenTelemetry)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import truss_lab
from conftest import ROOT, write_truss

pytest.importorskip("pyinstrument")

MODEL = """
import asyncio
import json


def decode(x):  # preprocess's hot spot
    s = 0
    for i in range(300_000):
        s += i % 7
    return s


def crunch(x):  # predict's
    return sum(i * i for i in range(400_000))


def render(y):  # postprocess's: library code called from here is folded (json.dumps)
    return json.dumps([str(i) for i in range(50_000)])[:5]


class Model:
    def preprocess(self, x):
        return decode(x)

    def predict(self, x):
        return crunch(x)

    async def postprocess(self, y):  # an async stage: profiled on the model's event loop
        await asyncio.sleep(0)
        return render(y)
"""


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = write_truss(tmp_path_factory.mktemp("prof") / "hot", MODEL)
    with truss_lab.load(root) as tr:
        yield tr, tr.profile(1, n=3)


def test_each_stage_has_its_known_function_on_top(profiled):
    _, profile = profiled
    assert profile.count == 3
    top = {stage: profile.hotspots(stage, 1)[0] for stage in ("preprocess", "predict", "postprocess")}
    assert top["preprocess"].function == "decode" and top["preprocess"].share > 0.8, profile.text()
    assert top["predict"].function in ("crunch", "<genexpr>") and top["predict"].location.startswith("hot/model/model.py:")
    crunch = sum(h.share for h in profile.hotspots("predict", 5) if h.function in ("crunch", "<genexpr>"))
    assert crunch > 0.8, profile.text()
    assert top["postprocess"].location.startswith("hot/model/model.py:") and not top["postprocess"].library
    post = profile.hotspots("postprocess", 5)
    assert any(h.library and h.function == "dumps" for h in post), post  # json.dumps: one folded entry
    assert sum(h.share for h in post) > 0.8  # the async stage was sampled where it ran


def test_the_lock_wait_is_its_own_entry_and_expand_shows_library_frames(profiled):
    _, profile = profiled
    (wait,) = profile.hotspots("lock_wait")
    assert wait.function == "waiting for the predict lock" and "not sampled" in wait.location
    expanded = profile.hotspots("postprocess", 20, expand=True)
    assert any(h.library and h.function != "dumps" for h in expanded)  # dumps' callees are shown too
    assert "decode" in profile.tree("preprocess") and "decode" in profile.text()


def test_a_profile_renders_escaped_html(profiled):
    from truss_lab.display import render

    _, profile = profiled
    bundle = render.bundle(profile)
    assert bundle["text/plain"].startswith("profile of hot: 3 requests")
    assert "&lt;genexpr&gt;" in bundle["text/html"] or "&lt;listcomp&gt;" in bundle["text/html"]
    assert "<genexpr>" not in bundle["text/html"] and "<listcomp>" not in bundle["text/html"]


def test_bench_profile_covers_all_its_requests(profiled):
    tr, _ = profiled
    report = tr.bench([1], n=4, concurrency=2, progress=False, profile=True)
    assert report.profile.count == 4 and len(report.profile.sessions["predict"]) == 4
    assert report.profile.hotspots("preprocess", 1)[0].function == "decode"


def test_exported_traces_hold_every_stage_of_every_request(profiled, tmp_path):
    tr, profile = profiled
    from truss_lab.trace import Report

    report = Report.from_traces(profile.traces, tr.concurrency)  # the profiled requests
    data = report.to_chrome_trace(tmp_path / "trace.json", profile=profile)
    assert json.loads((tmp_path / "trace.json").read_text()) == data
    events = data["traceEvents"]
    for t in report.traces:
        stages = {e["name"]: e for e in events if e.get("cat") == "stage" and e["args"]["request"] == t.request_id}
        assert set(stages) == {"preprocess", "lock wait", "lock held", "predict", "postprocess"}
        request = next(e for e in events if e.get("cat") == "request" and e["args"]["request"] == t.request_id)
        ordered = [stages[n] for n in ("preprocess", "lock wait", "predict", "postprocess")]
        for a, b in zip(ordered, ordered[1:]):
            assert a["ts"] <= b["ts"] + 1e-3  # in order
        for e in stages.values():  # inside their request, with durations as the trace measured
            assert request["ts"] - 1e-3 <= e["ts"] and e["ts"] + e["dur"] <= request["ts"] + request["dur"] + 1e-3
        assert abs(stages["predict"]["dur"] / 1000 - t.predict_ms) < 1e-6
        samples = [e for e in events if e.get("cat") == "sample" and e["tid"] == request["tid"]
                   and stages["preprocess"]["ts"] - 1e-3 <= e["ts"] <= stages["preprocess"]["ts"] + stages["preprocess"]["dur"] + 1e-3]
        assert any(e["name"] == "decode" for e in samples)  # the profile's samples nested in their stage
    assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in events)


def test_reloads_are_instant_events(tmp_path):
    root = write_truss(tmp_path / "rl", "class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(root) as tr:
        tr.predict(1)
        (root / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return x + 1\n")
        assert tr.reload().kind == "methods"
        tr.predict(1)
        events = tr.report().to_chrome_trace()["traceEvents"]
        assert [e["name"] for e in events if e["ph"] == "i"] == ["reload: methods"]


def test_to_otel_writes_the_truss_servers_spans(profiled, tmp_path):
    tr, _ = profiled
    report = tr.report(last=2)
    assert report.to_otel(tmp_path / "spans.ndjson") == 8
    spans = [json.loads(line) for line in (tmp_path / "spans.ndjson").read_text().splitlines()]
    roots = {s["context"]["span_id"]: s for s in spans if s["name"] == "predict-endpoint"}
    assert len(roots) == 2
    for s in spans:
        if s["name"] != "predict-endpoint":
            assert s["parent_id"] in roots and s["name"] in ("call-pre", "call-predict", "call-post")
            section = {"call-pre": "preprocess", "call-predict": "predict", "call-post": "postprocess"}[s["name"]]
            assert [e["name"] for e in s["events"]] == [f"start: {section}", f"done: {section}"]
            assert s["events"][1]["attributes"]["duration_sec"] >= 0


def test_truss_lab_profile_on_the_command_line(tmp_path):
    root = write_truss(tmp_path / "cli", MODEL, examples=[{"name": "one", "input": 1}])
    out = subprocess.run([sys.executable, "-m", "truss_lab.cli", "profile", str(root), "--example", "one", "-n", "2",
                          "--chrome-trace", str(tmp_path / "t.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("profile of cli: 2 requests") and "decode" in out.stdout
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


def test_ops_lists_tensorflows_heaviest_ops_in_predict(tmp_path):
    pytest.importorskip("tensorflow")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = truss_lab.load(ROOT / "examples" / "digits")
    with tr:
        profile = tr.profile(tr.example("three"), n=2, ops=True, logdir=str(tmp_path / "tb"))
    names = [o.op for o in profile.ops.ops]
    assert "Conv2D" in names[:3], profile.ops.text()  # the digits convnet's heaviest op
    assert "DecodePng" not in names and "DecodeImage" not in names  # preprocess's ops are not predict's
    assert list((tmp_path / "tb").rglob("*.xplane.pb"))  # TensorBoard's own trace
    assert "TensorFlow ops in predict" in profile.text()


def test_a_profiled_bench_shows_its_profile(profiled):
    from truss_lab.display import render

    tr, _ = profiled
    report = tr.bench([1], n=2, concurrency=1, progress=False, profile=True)
    assert "profile of hot: 2 requests" in report.table()
    assert "truss-lab-profile" in render.bundle(report)["text/html"]


TORCH_MODEL = """
import torch

class Model:
    def load(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten(), torch.nn.Linear(16, 4))

    def preprocess(self, x):
        return torch.rand(1, 3, 64, 64) + torch.zeros(1, 3, 64, 64).sin()  # preprocess's own op: not predict's

    def predict(self, x):
        with torch.no_grad():
            return self.net(x)

    def postprocess(self, y):
        return y.softmax(-1).tolist()
"""


def test_ops_lists_pytorchs_heaviest_ops_in_predict(tmp_path):
    pytest.importorskip("torch")  # where PyTorch is installed (it is not in make test's environment)
    root = write_truss(tmp_path / "torchy", TORCH_MODEL)
    with truss_lab.load(root) as tr:
        profile = tr.profile(1, n=2, ops=True, logdir=str(tmp_path / "trace"))
    names = [o.op for o in profile.ops.ops]
    assert profile.ops.framework == "PyTorch" and "conv" in names[0], profile.ops.text()
    assert "aten::sin" not in names
    assert (tmp_path / "trace" / "torch-trace.json").is_file()


OWN_FUNCTIONS = """
import time

from model.helpers import burn


def decode_slowly(x):
    burn(0.02)
    time.sleep(0.02)  # the guard wraps time.sleep and open: their time is still the user's call's
    with open(__file__) as f:
        f.read()
    return x


def crunch_numbers(x):
    return burn(0.015)


def rank_labels(y):
    burn(0.01)
    return {"y": y}


class Model:
    def preprocess(self, x):
        return decode_slowly(x)

    def predict(self, x):
        return crunch_numbers(x)

    def postprocess(self, y):
        return rank_labels(y)
"""

BURN = """
import time


def burn(seconds):  # the shared helper every stage spends its time in
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n
"""


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = write_truss(tmp_path_factory.mktemp("own") / "own", OWN_FUNCTIONS, files={"model/helpers.py": BURN})
    with truss_lab.load(root) as tr:
        yield tr.profile(1, n=3)


def test_hot_spots_put_the_stages_own_function_on_top(own):
    """Every stage spends its time in the shared burn(): the function that owns the stage's time is the
    stage's own (decode_slowly, crunch_numbers, rank_labels), ranked by total time, with self time beside."""
    for stage, mine in (("preprocess", "decode_slowly"), ("predict", "crunch_numbers"), ("postprocess", "rank_labels")):
        spots = own.hotspots(stage, 5)
        assert spots[0].function == mine, own.text()
        assert spots[0].share > 0.8 and spots[0].self_seconds < 0.3 * spots[0].seconds  # its time is burn's
        burn = next(h for h in spots if h.function == "burn")
        assert burn.location.startswith("own/model/helpers.py:") and burn.self_seconds > 0.3 * burn.seconds
        assert all(0 <= h.self_seconds <= h.seconds + 1e-9 for h in spots)
    text = str(own)
    for name in ("decode_slowly", "crunch_numbers", "rank_labels", "burn"):
        assert name in text
    tree = own.tree("preprocess").splitlines()
    depth = {line.split()[3]: len(line.split("%  ", 1)[1]) - len(line.split("%  ", 1)[1].lstrip()) for line in tree[2:]}
    assert depth["preprocess"] < depth["decode_slowly"] < depth["burn"]  # the path through the truss's code


def test_a_hot_spot_prints_the_same_per_request_figure_as_the_profile(own):
    for stage in ("preprocess", "predict"):
        for spot in own.hotspots(stage, 3):
            assert spot.requests == 3
            assert str(spot) in str(own)  # the line the profile prints: ms per request, not the total of 3


def test_truss_labs_own_frames_never_appear_in_a_profile(own):
    from truss_lab.display import render

    html = render.bundle(own)["text/html"]
    for shown in (str(own), html, json.dumps(own.tree("preprocess", expand=True))):
        assert "truss_lab/" not in shown and "guard.py" not in shown
    sleep = next(h for h in own.hotspots("preprocess", 10) if h.function == "sleep")
    assert sleep.library and sleep.share > 0.2  # time.sleep, with its time, called from decode_slowly
    assert "decode_slowly" in html and "&lt;built-in&gt;" in html  # the call tree is in the HTML too


ASYNC_STAGES = """
import asyncio
import time


def burn(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Model:
    async def preprocess(self, x):
        await asyncio.sleep(0.005)
        burn(0.003)
        await asyncio.sleep(0.005)
        return x

    def predict(self, x):
        burn(0.001)
        return x

    async def postprocess(self, y):
        await asyncio.sleep(0.002)
        burn(0.002)
        return y
"""


def test_async_stages_under_concurrency_keep_their_samples_inside_the_stage(tmp_path):
    """Requests share the model's event loop: a stage's samples can add up to more than its session's
    duration. Every sample slice in the Chrome trace lies inside its own stage slice."""
    root = write_truss(tmp_path / "asy", ASYNC_STAGES)
    with truss_lab.load(root) as tr:
        report = tr.bench([1], n=16, concurrency=4, progress=False, profile=True)
    events = report.to_chrome_trace(profile=report.profile)["traceEvents"]
    stages = [e for e in events if e.get("cat") == "stage" and e["name"] in ("preprocess", "predict", "postprocess")]
    samples = [e for e in events if e.get("cat") == "sample"]
    assert samples
    eps = 1e-3  # µs
    for s in samples:
        assert any(st["tid"] == s["tid"] and st["ts"] - eps <= s["ts"] and s["ts"] + s["dur"] <= st["ts"] + st["dur"] + eps
                   for st in stages), s


def test_requests_that_overlap_never_share_a_trace_track(tmp_path):
    """Over HTTP every request runs on a thread named "AnyIO worker thread": tracks are laid out by time."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    model = """
    import threading

    ARRIVED = threading.Barrier(4)

    class Model:
        def preprocess(self, x):
            ARRIVED.wait(30)  # four requests in flight at once, whatever the machine's speed
            return x

        def predict(self, x):
            return x
    """
    root = write_truss(tmp_path / "tracks", model, config={"runtime": {"predict_concurrency": 4}})
    with truss_lab.load(root) as tr:
        url = tr.serve().url + "/v1/models/model:predict"
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(lambda i: httpx.post(url, json=i, timeout=60).json(), range(4))) == [0, 1, 2, 3]
        events = tr.report().to_chrome_trace()["traceEvents"]
    requests = [e for e in events if e.get("cat") == "request"]
    assert len(requests) == 4 and len({e["tid"] for e in requests}) == 4
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert len(names) == 4 and all(n.startswith("AnyIO worker thread") for n in names)
    for a in requests:
        for b in requests:
            if a is not b and a["tid"] == b["tid"]:
                assert a["ts"] + a["dur"] <= b["ts"] or b["ts"] + b["dur"] <= a["ts"]

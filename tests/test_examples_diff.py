"""What each save changed: examples re-run after a reload and diffed; snapshots for CI (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

import truss_lab
from truss_lab.examples import ExampleOutcome, diff

from conftest import ROOT, write_truss

TOPK = """
import time
LABELS = ["zero", "one", "seven"]

class Model:
    def preprocess(self, x):
        return x
    def predict(self, x):
        if x == "boom":
            pass
        return x
    def postprocess(self, x):
        scores = {"zero": 0.1, "one": 0.2, "seven": 0.7} if x == "seven" else {"zero": 0.8, "one": 0.15, "seven": 0.05}
        return {"predictions": scores}
"""
EXAMPLES = [{"name": "a-seven", "input": "seven"}, {"name": "a-zero", "input": "zero"}, {"name": "plain", "input": "zero"}]


def watched(tmp_path):
    root = write_truss(tmp_path / "topk", TOPK, examples=EXAMPLES)
    tr = truss_lab.load(root)
    tr.watch(examples=True)
    assert tr.wait_for_examples(60)  # the baseline run
    return tr, root / "model" / "model.py"


def next_diff(tr, mf, new_text):
    got = threading.Event()
    box = []
    unsubscribe = tr.on_examples(lambda d: (box.append(d), got.set()))
    n = tr.reload_count
    mf.write_text(new_text)
    tr.wait_for_reload(since=n)
    assert got.wait(60), "no examples diff after the save"
    unsubscribe()
    return box[-1]


def test_an_edit_that_moves_one_examples_top1_is_named_with_ranks(tmp_path):
    tr, mf = watched(tmp_path)
    try:
        d = next_diff(tr, mf, TOPK.replace('"seven": 0.7}', '"seven": 0.15}').replace('"one": 0.2,', '"one": 0.75,'))
        by = {c.name: c for c in d.changes}
        assert by["a-seven"].status == "changed" and by["a-zero"].status == "unchanged"
        assert "seven: #1 -> #2" in by["a-seven"].ranks and "one: #2 -> #1" in by["a-seven"].ranks
        assert ("predictions.seven", 0.7, 0.15) in by["a-seven"].paths
        assert "post" in by["a-seven"].stage_ms  # per-stage time old -> new
        assert d.summary().startswith("examples v1 -> v2: 1 changed")
        html = d._repr_mimebundle_()["text/html"]
        assert "truss-lab-examples-diff" in html and "seven: #1 -&gt; #2" in html
    finally:
        tr.close()


def test_an_edit_that_makes_one_example_fail_shows_stage_and_line(tmp_path):
    tr, mf = watched(tmp_path)
    try:
        d = next_diff(tr, mf, TOPK.replace("            pass\n", "            pass\n        if x == 'seven':\n            raise ValueError('bad seven')\n"))
        by = {c.name: c for c in d.changes}
        assert by["a-seven"].status == "now failing"
        assert "predict failed at topk/model/model.py:12" in by["a-seven"].error and "bad seven" in by["a-seven"].error
        assert by["a-zero"].status == "unchanged"
        d2 = next_diff(tr, mf, TOPK)
        assert {c.name: c.status for c in d2.changes}["a-seven"] == "fixed"
    finally:
        tr.close()


def test_a_whitespace_only_save_runs_nothing(tmp_path):
    tr, mf = watched(tmp_path)
    try:
        traces = len(tr.traces)
        n = tr.reload_count
        mf.write_text(TOPK + "\n\n# a comment\n")
        assert tr.wait_for_reload(since=n).kind == "unchanged"
        assert tr.wait_for_examples(30) and len(tr.traces) == traces and tr.examples_diff is None
    finally:
        tr.close()


def test_two_quick_saves_cancel_the_first_run_and_show_one_diff(tmp_path):
    slow = TOPK.replace("    def predict(self, x):\n", "    def predict(self, x):\n        time.sleep(0.3)\n")
    root = write_truss(tmp_path / "slow", slow, examples=EXAMPLES)
    with truss_lab.load(root) as tr:
        tr.watch(examples=True)
        assert tr.wait_for_examples(60)
        diffs = []
        tr.on_examples(diffs.append)
        mf = root / "model" / "model.py"
        n = tr.reload_count
        mf.write_text(slow.replace('"seven": 0.7}', '"seven": 0.71}'))
        tr.wait_for_reload(since=n)
        mf.write_text(slow.replace('"seven": 0.7}', '"seven": 0.9}'))  # while the first run is in its examples
        tr.wait_for_reload(since=n + 1)
        assert tr.wait_for_examples(60)
        assert len(diffs) == 1 and diffs[0].new_version == 3
        (change,) = [c for c in diffs[0].changes if c.name == "a-seven"]
        assert change.paths[0][2] == 0.9
        assert len(tr.traces) < 3 * 3  # baseline + one full run + at most the first example of the stale one


def test_floats_within_tolerance_are_unchanged():
    a = {"x": ExampleOutcome("x", True, {"p": [0.5, 0.25]})}
    b = {"x": ExampleOutcome("x", True, {"p": [0.50001, 0.25]})}
    assert diff(a, b, 1, 2).changes[0].status == "unchanged"
    assert diff(a, b, 1, 2, rtol=1e-7, atol=0).changes[0].status == "changed"


def test_snapshot_and_test_round_trip_with_a_tolerance(tmp_path):
    root = write_truss(tmp_path / "snap", TOPK, examples=EXAMPLES)
    cli = [sys.executable, "-m", "truss_lab.cli"]
    out = subprocess.run(cli + ["snapshot", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    stored = json.loads((root / "examples.snapshot.json").read_text())
    assert list(stored) == ["a-seven", "a-zero", "plain"] and stored["a-seven"]["output"]["predictions"]["seven"] == 0.7
    assert subprocess.run(cli + ["test", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=120).returncode == 0
    # a change below the tolerance passes; above it fails, naming the path
    mf = root / "model" / "model.py"
    mf.write_text(TOPK.replace('"seven": 0.7}', '"seven": 0.70001}'))
    assert subprocess.run(cli + ["test", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=120).returncode == 0
    mf.write_text(TOPK.replace('"seven": 0.7}', '"seven": 0.6}'))
    out = subprocess.run(cli + ["test", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and "a-seven: changed" in out.stdout and "predictions.seven: 0.7 -> 0.6" in out.stdout
    assert subprocess.run(cli + ["test", str(root), "--update"], capture_output=True, text=True, cwd=ROOT, timeout=120).returncode == 0
    assert subprocess.run(cli + ["test", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=120).returncode == 0


def test_examples_need_watching_first(live):
    tr = live()
    with pytest.raises(truss_lab.TrussLabError, match=r"tr.watch\(examples=True\)"):
        tr.on_examples(print)


def test_an_image_output_shows_before_and_after():
    pytest.importorskip("PIL")
    from truss_lab.display.render import examples_diff_html

    dark = [[[0, 0, 0]] * 8] * 8
    light = [[[200, 200, 200]] * 8] * 8
    d = diff({"img": ExampleOutcome("img", True, dark)}, {"img": ExampleOutcome("img", True, light)}, 1, 2)
    html = examples_diff_html(d)
    assert d.changes[0].status == "changed" and html.count("<img") == 2 and "before" in html and "after" in html


def test_wait_for_examples_right_after_a_reload_waits_for_that_reloads_run(tmp_path):
    tr, mf = watched(tmp_path)
    try:
        for i in range(3):
            n = tr.reload_count
            mf.write_text(TOPK.replace('"one": 0.2,', f'"one": 0.2{i + 1},'))
            tr.wait_for_reload(since=n)
            assert tr.wait_for_examples(60)
            d = tr.examples_diff
            assert d is not None and d.new_version == tr.version, d
    finally:
        tr.close()


def test_a_save_during_the_first_run_still_shows_what_it_changed(tmp_path):
    """`tr.watch(examples=True)` and a save before its first run is over (the model is slow, the user
    quick): the examples that ran on the old code are the baseline, those that had not are "first run",
    and the diff comes - none said unchanged when its output changed (it used to show nothing at all)."""
    gated = TOPK.replace("    def predict(self, x):\n", "    def predict(self, x):\n"
                                                          "        if x == 'seven':\n"
                                                          "            self.entered.set()\n"
                                                          "            assert self.gate.wait(30)\n")
    examples = [{"name": "first", "input": "zero"}, {"name": "gated", "input": "seven"}, {"name": "last", "input": "zero"}]
    root = write_truss(tmp_path / "gated", gated, examples=examples)
    with truss_lab.load(root, process="kernel") as tr:
        model = tr.model  # the instance outlives a swap
        model.entered, model.gate = threading.Event(), threading.Event()
        diffs = []
        tr.watch_examples(True)  # as watch(examples=True), without the watcher: the test reloads by hand
        tr.on_examples(diffs.append)
        assert model.entered.wait(30)  # the first run is inside "gated", on v1
        mf = root / "model" / "model.py"
        mf.write_text(gated.replace('"zero": 0.8', '"zero": 0.6').replace('"seven": 0.7}', '"seven": 0.9}'))
        reloading = threading.Thread(target=tr.reload)
        reloading.start()  # the swap waits for the request in flight to finish
        gate = tr._gate
        with gate._cond:
            assert gate._cond.wait_for(lambda: gate._waiting, 30)  # the reload is waiting for "gated" now
        model.gate.set()
        reloading.join(30)
        assert tr.reload_count == 1 and tr.wait_for_examples(60)
        d = tr.examples_diff
        assert d is not None and diffs == [d] and d.old_version == 1 and d.new_version == 2, d
        status = {c.name: c.status for c in d.changes}
        assert status == {"first": "changed", "gated": "changed", "last": "first run"}, d  # the swap came before "last"
        assert d.summary() == "examples v1 -> v2: 2 changed, 1 first run (3 examples)"

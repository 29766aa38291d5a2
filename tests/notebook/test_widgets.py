"""The widget panel's behaviour, driven through its widgets (clicks, uploads, selections) in-process.

The same panel is clicked in a real JupyterLab and chromium in test_browser.py.
"""

from __future__ import annotations

import io
import re

import pytest

pytest.importorskip("ipywidgets")
PIL = pytest.importorskip("PIL.Image")

import truss_lab
from truss_lab.display import render
from truss_lab.notebook.widgets import parse_input, shape_like_examples

IMAGE_MODEL = """
import base64, io
import numpy as np
from PIL import Image

LABELS = {labels!r}

class Model:
    def preprocess(self, x):
        if isinstance(x, dict) and "image" in x:
            ref = x["image"]
            data = base64.b64decode(ref.split(",", 1)[1]) if ref.startswith("data:") else open(ref, "rb").read()
            return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0
        return x
    def predict(self, x):
        if isinstance(x, str) and x == "boom":
            raise RuntimeError("predict failed on purpose")
        return float(np.mean(x)) if isinstance(x, np.ndarray) else x
    def postprocess(self, y):
        if isinstance(y, float):
            return {{LABELS[0]: round(100 * y, 1), LABELS[1]: round(100 * (1 - y), 1)}}
        return y
"""


def png_bytes(value: int = 200) -> bytes:
    buf = io.BytesIO()
    PIL.new("L", (32, 32), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def panel(live, tmp_path):
    sample = tmp_path / "sample.png"
    sample.write_bytes(png_bytes(51))
    tr = live(
        IMAGE_MODEL.format(labels=["bright", "dark"]),
        examples=[{"name": "numbers", "input": [1, 2, 3]}, {"name": "picture", "input": {"image": str(sample)}}],
    )
    p = truss_lab.widget(tr)
    yield p
    p.close()


def click(panel, button):
    button.click()
    assert panel.wait(30), "the run did not finish"


def test_panel_starts_on_the_first_example_and_shows_status(panel):
    assert panel.text.value == "[1, 2, 3]"
    assert [o[0] for o in panel.examples.options] == ["— example —", "numbers", "picture"]
    assert "<b>t</b>" in panel.status.value and "v1" in panel.status.value and "lock 1" in panel.status.value
    assert "truss-lab-panel" in panel.box._dom_classes
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()


def test_run_shows_result_timing_and_history(panel):
    click(panel, panel.run_button)
    assert "truss-lab-result" in panel.output.value and "truss-lab-timing" in panel.output.value
    assert not panel.run_button.disabled and panel.run_button.description == "Run"
    assert len(panel.runs) == 1 and re.fullmatch(r"\d\d:\d\d:\d\d  v1  \d+\.\d ms  ok", panel.history.options[0][0])
    panel.examples.value = "picture"
    assert '"image"' in panel.text.value
    click(panel, panel.run_button)
    assert "bright" in panel.output.value and "<img" in panel.output.value  # input image, output bars
    assert len(panel.runs) == 2
    panel.history.value = 1  # click the older run: it is shown again
    assert panel.output.value == render.result_html(panel.runs[1].result)
    assert panel.runs[1].result.input == [1, 2, 3] and "bright" not in panel.output.value


def test_upload_is_sent_like_the_examples_and_rendered(panel):
    data = png_bytes(230)
    panel.upload.value = ({"name": "up.png", "type": "image/png", "size": len(data), "content": memoryview(data), "last_modified": __import__("datetime").datetime.now()},)
    x = panel.model_input()
    assert x["image"].startswith("data:image/png;base64,")  # the examples use {"image": ...}
    assert "up.png" in panel.upload_note.value
    click(panel, panel.run_button)
    assert "<img" in panel.output.value and "bright" in panel.output.value
    assert panel.runs[0].result.output["bright"] == pytest.approx(90.2, abs=0.5)
    panel.text.value = "[4]"  # editing the text switches back to it
    assert panel.model_input() == [4] and panel.upload_note.value == ""


def test_shape_like_examples():
    assert shape_like_examples(b"x", "a.jpg", ["path.png"]).startswith("data:image/jpeg;base64,")
    assert shape_like_examples(b"x", "a.png", [{"url": "u", "top_k": 5}])["top_k"] == 5
    assert shape_like_examples(b"x", "a.png", [[1, 2]]) == b"x"
    assert shape_like_examples(b"x", "a.png", []) == b"x"


def test_bad_input_and_model_errors_show_in_the_panel(panel):
    panel.text.value = "{not json"
    panel.run_button.click()
    assert "panel error" in panel.output.value and "neither JSON nor a Python literal" in panel.output.value
    assert panel.wait(1) and not panel.runs  # nothing was started
    panel.text.value = "'boom'"
    click(panel, panel.run_button)
    assert "predict error" in panel.output.value and "predict failed on purpose" in panel.output.value
    assert "model.py:" in panel.output.value
    assert parse_input("b'\\x00'") == b"\x00"
    with pytest.raises(ValueError, match="empty"):
        parse_input("  ")


def test_callback_failures_are_shown_not_lost(panel, monkeypatch):
    def broken(name):
        raise KeyError(name)

    monkeypatch.setattr(panel.live, "example", broken)
    panel.examples.value = "picture"
    assert "panel error" in panel.output.value and "KeyError" in panel.output.value


def test_model_strings_are_escaped(live):
    tr = live(IMAGE_MODEL.format(labels=["<script>alert(1)</script>", "ok"]), examples=[{"name": "a", "input": [0]}])
    p = truss_lab.widget(tr)
    p.text.value = "{'image': 'data:image/png;base64," + __import__("base64").b64encode(png_bytes()).decode() + "'}"
    click(p, p.run_button)
    assert "<script>alert" not in p.output.value and "&lt;script&gt;" in p.output.value
    p.close()


def test_status_follows_reloads_without_a_rerun(panel):
    model = panel.live.path / "model" / "model.py"
    model.write_text(model.read_text().replace("'dark'", "'dim'"))
    panel.live.reload()  # what the watcher does on save (the browser test saves with the watcher on)
    assert "v2" in panel.status.value and "swapped" in panel.status.value
    panel.examples.value = "picture"
    click(panel, panel.run_button)
    assert "dim" in panel.output.value
    model.write_text(model.read_text() + "\ndef broken(:\n")
    panel.live.reload()
    assert "reload failed" in panel.status.value and "SyntaxError" in panel.status.value
    assert "model.py:" in panel.status.value
    click(panel, panel.run_button)  # still serving v2
    assert "dim" in panel.output.value and panel.runs[0].result.trace.version == 2


def test_run_many_shows_the_timeline(panel):
    panel.n.value, panel.workers.value = 12, 3
    click(panel, panel.run_n_button)
    assert "<svg" in panel.timeline.value and "12 requests" in panel.timeline.value
    assert panel.progress.value == 12 and panel.progress.layout.visibility == "hidden"
    assert len(panel.runs) == 1 and "truss-lab-result" in panel.output.value


def test_magic_shows_the_panel(live):
    from IPython.testing.globalipapp import start_ipython
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = start_ipython() or InteractiveShell.instance()
    ip.run_line_magic("load_ext", "truss_lab")
    tr = live()
    ip.user_ns["w"] = tr
    with capture_output() as cap:
        ip.run_line_magic("truss", "widget --model w")
    assert "application/vnd.jupyter.widget-view+json" in cap.outputs[-1].data
    ip.run_line_magic("unload_ext", "truss_lab")


def test_widget_wants_a_live_model():
    with pytest.raises(TypeError, match=r"widget\(\) takes a LiveModel \(tr = truss_lab.load\(path\)\) or a chain, not str"):
        truss_lab.widget("my-truss")


def test_method_picker_appears_with_openai_methods_and_runs_them(live):
    tr = live("class Model:\n    def predict(self, x):\n        return x\n")
    p = truss_lab.widget(tr)
    try:
        assert list(p.method.options) == ["predict"] and p.method.layout.display == "none"
        (tr.path / "model" / "model.py").write_text(
            "class Model:\n    def predict(self, x):\n        return x\n"
            "    def completions(self, body):\n        yield 'to'\n        yield 'ken'\n"
        )
        assert tr.reload().ok
        p._show_status(None)  # what the reload callback does
        assert list(p.method.options) == ["predict", "completions"] and p.method.layout.display == ""
        p.method.value = "completions"
        assert p.run_n_button.disabled  # Run ×N load-tests predict and its lock
        p.text.value = "{}"
        click(p, p.run_button)
        assert p.runs[0].result.output == "token" and p.runs[0].result.trace.method == "completions"
    finally:
        p.close()


def test_a_panel_lets_go_of_its_model_when_the_model_closes(make_truss):
    tr = truss_lab.load(make_truss())
    p = truss_lab.widget(tr)
    try:
        tr.close()
        assert "closed" in p.status.value and p.run_button.disabled
        assert not isinstance(p.live, truss_lab.LiveModel)
        with pytest.raises(truss_lab.TrussLabError, match="closed; run %truss widget"):
            p.live.run(1)
    finally:
        p.close()


def test_the_examples_checkbox_shows_what_a_save_changed(live):
    tr = live("class Model:\n    def predict(self, x):\n        return {'v': x}\n", examples=[{"name": "one", "input": 1}])
    p = truss_lab.widget(tr)
    try:
        import threading

        p.examples_toggle.value = True
        assert tr.watching and tr.wait_for_examples(30)
        shown = threading.Event()
        tr.on_examples(lambda d: shown.set())  # called after the panel's own callback
        n = tr.reload_count
        (tr.path / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return {'v': x * 10}\n")
        tr.wait_for_reload(since=n)
        assert shown.wait(30)
        assert "truss-lab-examples-diff" in p.examples_diff.value and "changed" in p.examples_diff.value
        assert "<code>v</code>: 1 → 10" in p.examples_diff.value
        p.examples_toggle.value = False
        assert tr.examples_diff is None and p.examples_diff.value == ""
    finally:
        p.close()


def test_profile_button_shows_each_stages_hot_spots(panel):
    pytest.importorskip("pyinstrument")
    panel.examples.value = "picture"
    panel.n.value = 2
    click(panel, panel.profile_button)
    assert "truss-lab-profile" in panel.output.value and "preprocess" in panel.output.value
    assert "predict" in panel.output.value and not panel.profile_button.disabled


def test_the_dropdown_follows_an_examples_yaml_edit(panel):
    import yaml

    path = panel.live.bundle.examples_path
    path.write_text(yaml.safe_dump([{"name": "numbers", "input": [1]}, {"name": "more", "input": [2]}]))
    assert panel.live.reload().kind == "examples"
    assert [o[0] for o in panel.examples.options] == ["— example —", "numbers", "more"]

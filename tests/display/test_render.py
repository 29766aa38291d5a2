import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

import truss_lab
from truss_lab.display import media, render, style
from truss_lab.display import text as plain_text
from truss_lab.trace import Trace

XSS = "<script>alert(1)</script>"


def png_bytes(w=20, h=10, mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color=(10, 200, 30) if mode == "RGB" else 128).save(buf, format=fmt)
    return buf.getvalue()


def decoded_images(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(m))) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


@pytest.mark.parametrize(
    "value, size, caption",
    [
        (np.zeros((32, 48, 3), np.uint8), (48, 32), "(32, 48, 3) uint8"),
        (np.zeros((32, 48), np.uint8), (48, 32), "(32, 48) uint8"),
        (np.zeros((32, 48, 1), np.float32), (48, 32), "(32, 48, 1) float32"),
        (np.zeros((1, 224, 224, 3), np.float32) - 1, (224, 224), "(1, 224, 224, 3) float32"),
        (np.zeros((40, 40, 4), np.uint8), (40, 40), "(40, 40, 4)"),
        (Image.new("RGB", (30, 20)), (30, 20), "PIL image RGB 30x20"),
        (png_bytes(), (20, 10), "bytes PNG 20x10"),
        (png_bytes(fmt="JPEG"), (20, 10), "bytes JPEG 20x10"),
        ("data:image/png;base64," + base64.b64encode(png_bytes()).decode(), (20, 10), "data URI PNG 20x10"),
    ],
)
def test_images_render_inline_with_shape(value, size, caption):
    html = media.image_html(value)
    assert html is not None and caption in html
    (img,) = decoded_images(html)
    assert img.size == size


def test_image_file_path_and_big_images_scaled(tmp_path):
    p = tmp_path / "cat.png"
    Image.new("RGB", (2000, 1000)).save(p)
    html = media.image_html(str(p))
    (img,) = decoded_images(html)
    assert max(img.size) <= 2 * media.MAX_IMAGE_SIDE and "cat.png PNG 2000x1000" in html
    assert 'width="256"' in html


def test_float_ranges_scaled_not_clipped():
    ramp = np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    out = media.to_uint8(ramp)
    assert out.min() == 0 and out.max() == 255
    unit = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    assert media.to_uint8(unit).max() == 255
    wide = np.linspace(-500, 900, 64 * 64).reshape(64, 64)
    assert media.to_uint8(wide).min() == 0 and media.to_uint8(wide).max() == 255


def test_non_images_are_not_images():
    assert media.image_html(np.zeros((3, 3))) is None  # too small to be a picture
    assert media.image_html(np.zeros((100, 10, 7))) is None  # 7 channels
    assert media.image_html([[1, 2], [3, 4]]) is None
    assert media.image_html("just text") is None
    assert media.image_html(b"not an image") is None


def test_label_bars_sorted_and_escaped():
    html = media.value_html({"tabby": 12.5, XSS: 80.1, "lynx": 7.4})
    labels = re.findall(r"<td class='k'>(.*?)</td>", html)
    assert labels == [style.esc(XSS), "tabby", "lynx"]
    assert "<script>" not in html
    listed = media.value_html([{"label": "a", "score": 0.1}, {"label": "b", "score": 0.9}])
    assert re.findall(r"<td class='k'>(.*?)</td>", listed) == ["b", "a"]


def test_nested_output_finds_images_and_labels():
    out = {"image": np.zeros((16, 16), np.uint8), "top5": {"cat": 0.9, "dog": 0.1}, "note": XSS}
    html = media.value_html(out)
    assert len(decoded_images(html)) == 1 and "truss-lab-labels" in html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_long_arrays_summarised():
    text = plain_text.short(list(range(1000)))
    assert text == '"[1000 numbers, min 0, max 999]"'
    assert "shape=(500, 3) dtype=float64" in plain_text.short(np.zeros((500, 3)))
    html = media.value_html({"predictions": list(range(1000))})
    assert "1000 numbers" in html and "999," not in html


def _result(output, error=None, name="m"):
    t = Trace(request_id=1, version=3, thread="MainThread", start=0.0)
    t.pre_start, t.pre_end, t.lock_requested, t.lock_acquired = 0.0, 0.010, 0.010, 0.012
    t.predict_start, t.predict_end, t.lock_released = 0.012, 0.032, 0.032
    t.post_start, t.post_end, t.end = 0.032, 0.037, 0.037
    return truss_lab.Result(input=[1], output=output, trace=t, error=error, model_name=name)


def test_result_text_plain_golden():
    r = _result({"label": "cat", "score": 0.5})
    assert plain_text.plain(r) == 'Result from m v3: ok in 37.0 ms\n  output: {"label": "cat", "score": 0.5}'


def test_timing_bar_has_four_stages_and_lock_share():
    html = render.timing_bar(_result(1).trace)
    assert html.count("title=") == 4
    for label in ("pre 10.00 ms", "lock wait 2.00 ms", "predict 20.00 ms", "post 5.00 ms", "total 37.00 ms"):
        assert label in html
    assert "lock (wait + predict) 59%" in html


def test_every_model_string_is_escaped(live):
    tr = live(
        f"""
        class Model:
            def predict(self, x):
                return {{"{XSS}": 1.0, "b": 0.5}}
        """,
        name="x",
    )
    r = tr.predict(XSS)
    html = render.bundle(r)["text/html"]
    assert "<script>" not in html and html.count("&lt;script&gt;") >= 2
    tr2 = live(f"class Model:\n    def predict(self, x):\n        raise ValueError({XSS!r})\n", name="y")
    html = render.bundle(tr2.run(1))["text/html"]
    assert "<script>" not in html and "tl-error" in html
    name = live("class Model:\n    def predict(self, x):\n        return 1\n", name="z", config={"model_name": XSS})
    assert "<script>" not in render.bundle(name.predict(1))["text/html"]


def test_reload_event_and_report_bundles(live):
    tr = live()
    tr.predict_batch(range(5), workers=2)
    b = tr.report()._repr_mimebundle_()
    assert b["text/plain"].startswith("5 requests") and "truss-lab-report" in b["text/html"]
    ev = tr.reload()
    b = ev._repr_mimebundle_()
    assert b["text/plain"] == "v1: no change in behaviour; nothing swapped" and "truss-lab-reload" in b["text/html"]


def test_inputs_never_get_label_bars():
    html = render.result_html(_result({"cat": 0.9, "dog": 0.1}))
    assert html.count("truss-lab-labels") == 1  # the output's
    r = _result(1)
    r.input = {"top_k": 5, "threshold": 0.5}
    assert "truss-lab-labels" not in render.result_html(r)


def test_an_empty_report_says_so(live):
    tr = live()
    report = tr.report()
    assert report.table() == "0 requests: nothing to report yet (run predict, predict_batch or bench first)"
    assert "nothing to report yet" in report._repr_mimebundle_()["text/html"]
    import truss_lab

    assert str(truss_lab.timeline(tr)).endswith(": no requests")

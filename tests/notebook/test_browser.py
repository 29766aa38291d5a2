"""The widget panel in a real JupyterLab, clicked in Debian's chromium through Playwright.

A JupyterLab server starts on 127.0.0.1 (free port, token, temporary runtime/config/settings folders)
on a folder with a small image truss and a notebook that loads it and shows `%truss widget`. The
browser runs the notebook, clicks Run, picks an example, uploads a PNG, and watches the panel follow
edits of model.py made on disk. Screenshots go to test-artifacts/. Server and browser are always
shut down. Skipped (with the reason) where chromium or Playwright is missing, unless
TRUSS_LAB_REQUIRE_BROWSER=1 (CI sets it): then a missing browser is a failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, write_truss
from truss_lab.devtools.jupyter import CHROMIUM_FLAGS, Lab, chromium_path, notebook

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "test-artifacts"

MODEL = """
import base64, io
import numpy as np
from PIL import Image

def load_image(ref):
    if isinstance(ref, bytes):
        data = ref
    elif ref.startswith("data:"):
        data = base64.b64decode(ref.split(",", 1)[1])
    else:
        data = open(ref, "rb").read()
    return Image.open(io.BytesIO(data)).convert("L")

class Model:
    def __init__(self, data_dir, **kwargs):
        self.data_dir = data_dir

    def preprocess(self, request):
        ref = request["image"]
        if isinstance(ref, str) and not ref.startswith("data:"):
            ref = str(self.data_dir / ref)
        return np.asarray(load_image(ref).resize((32, 32)), dtype=np.float32) / 255.0

    def predict(self, x):
        return float(x.mean())

    def postprocess(self, brightness):
        return {"bright": round(100 * brightness, 1), "dark": round(100 * (1 - brightness), 1)}
"""


def require_browser():
    """(playwright.sync_api, chromium path), or skip/fail with the reason."""
    required = os.environ.get("TRUSS_LAB_REQUIRE_BROWSER") == "1"
    reason = None
    chromium = chromium_path()
    try:
        from playwright import sync_api
    except ImportError:
        reason = "Playwright is not installed (pip install -e '.[test]')"
    if chromium is None:
        reason = "Debian chromium is not installed (apt-get install chromium; `make test` does it where it can)"
    if reason:
        if required:
            pytest.fail(f"TRUSS_LAB_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_api, chromium


def png(value: int, size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "work"
    truss = write_truss(
        root / "demo",
        MODEL,
        config={"model_name": "demo"},
        examples=[{"name": "bright", "input": {"image": "light.png"}}, {"name": "dark", "input": {"image": "dark.png"}}],
    )
    (truss / "data" / "light.png").write_bytes(png(230))
    (truss / "data" / "dark.png").write_bytes(png(20))
    (tmp_path / "upload.png").write_bytes(png(128))
    (root / "panel.ipynb").write_text(
        json.dumps(notebook(["%load_ext truss_lab", "%truss load demo --as demo", "%truss predict example:bright", "%truss widget"]))
    )
    return root


def test_widget_panel_in_jupyterlab(workspace, tmp_path):
    sync_api, chromium = require_browser()
    ARTIFACTS.mkdir(exist_ok=True)
    lab = Lab(workspace, tmp_path / "home")
    model_py = workspace / "demo" / "model" / "model.py"
    try:
        lab.start()
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1300, "height": 1100})
                page.set_default_timeout(60_000)
                drive_panel(page, lab, model_py, tmp_path / "upload.png", sync_api.expect)
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "panel-failure.png"), full_page=True)
                raise
            finally:
                browser.close()
    finally:
        lab.stop()
        if lab.log.exists():
            shutil.copy(lab.log, ARTIFACTS / "jupyterlab.log")
    assert lab.proc.poll() is not None  # the server is gone


def drive_panel(page, lab: Lab, model_py: Path, upload: Path, expect) -> None:
    lab.open_notebook(page, "panel.ipynb")  # the kernel is up and idle before we run the cells
    # `make lab`'s settings: nothing to dismiss (JupyterLab asks about its news in a toast otherwise)
    assert page.locator(".jp-Notification-Toast, .Toastify__toast").filter(has_text="news").count() == 0
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    panel = page.locator(".truss-lab-panel")
    expect(panel).to_be_visible(timeout=90_000)
    status = page.locator(".tl-status")
    expect(status).to_contain_text("demo")
    expect(status).to_contain_text("v1")
    expect(status).to_contain_text("watching for edits")
    cells = page.locator(".jp-Notebook .jp-Cell")
    # the magics as a person sees them: the load summary, then %truss predict's rendered Result
    expect(cells.nth(1)).to_contain_text("preprocess, predict, postprocess")
    expect(cells.nth(2).locator(".truss-lab-result")).to_contain_text("bright")
    expect(cells.nth(2).locator(".truss-lab-timing")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "notebook-magics.png"))
    output = page.locator(".tl-output")
    history = page.locator(".tl-history select option")

    # 1. Run the first example (preselected): the result with its image, bars and timing bar
    page.locator("button.tl-run").click()
    expect(history).to_have_count(1)
    expect(output.locator(".truss-lab-result")).to_be_visible()
    expect(output).to_contain_text("bright")
    expect(output.locator(".truss-lab-timing")).to_be_visible()
    panel.screenshot(path=str(ARTIFACTS / "panel-run.png"))

    # 2. Pick the other example and run it
    page.locator(".tl-examples select").select_option(label="dark")
    expect(page.locator(".tl-input textarea")).to_have_value('{"image": "dark.png"}')
    page.locator("button.tl-run").click()
    expect(history).to_have_count(2)
    expect(output).to_contain_text("92.2")  # dark: 100 * (1 - 20/255)

    # 3. Upload an image: it is sent like the examples ({"image": data URI}) and rendered
    with page.expect_file_chooser() as chooser:  # the upload button opens the browser's file dialog
        page.locator("button.tl-upload").click()
    chooser.value.set_files(str(upload))
    expect(page.locator(".tl-upload-note")).to_contain_text("upload.png")
    page.locator("button.tl-run").click()
    expect(history).to_have_count(3)
    expect(output).to_contain_text("50.2")  # 128 / 255
    expect(output.locator("img")).to_have_count(1)  # the uploaded image, shown as the input
    panel.screenshot(path=str(ARTIFACTS / "panel-upload.png"))

    # 4. Edit model.py on disk: the status line follows (no cell re-run); the next Run uses it
    model_py.write_text(model_py.read_text().replace('{"bright": round', '{"light": round'))
    expect(status).to_contain_text("v2", timeout=30_000)
    expect(status).to_contain_text("swapped postprocess")
    expect(cells.nth(1)).to_contain_text("v2: swapped postprocess")  # the load cell's notice, no re-run
    page.locator("button.tl-run").click()
    expect(history).to_have_count(4)
    expect(output).to_contain_text("light")
    panel.screenshot(path=str(ARTIFACTS / "panel-reloaded.png"))

    # 5. A syntax error: shown in the status line; Run still works on v2
    good = model_py.read_text()
    model_py.write_text(good + "\ndef broken(:\n    pass\n")
    expect(page.locator(".tl-reload-error")).to_contain_text("SyntaxError", timeout=30_000)
    expect(page.locator(".tl-reload-error")).to_contain_text("model.py:")
    expect(cells.nth(1)).to_contain_text("reload failed")
    page.locator("button.tl-run").click()
    expect(history).to_have_count(5)
    expect(history.first).to_contain_text("v2")
    expect(output).to_contain_text("light")
    panel.screenshot(path=str(ARTIFACTS / "panel-syntax-error.png"))

    # 6. Run ×N: the lock timeline for the batch
    page.locator(".tl-timeline").scroll_into_view_if_needed()
    page.locator("button.tl-run-n").click()
    expect(page.locator(".tl-timeline svg")).to_be_visible()
    expect(page.locator(".tl-timeline")).to_contain_text("20 requests")
    panel.screenshot(path=str(ARTIFACTS / "panel-run-n.png"))

    # 7. Re-run the examples on every save: the next save shows what it changed, example by example
    page.locator(".tl-examples-toggle input").check()
    diff = page.locator(".tl-examples-diff")
    expect(diff).to_contain_text("every save from now on shows what it changed", timeout=60_000)
    model_py.write_text(good.replace('{"light": round', '{"lite": round'))
    expect(diff).to_contain_text("changed", timeout=60_000)
    expect(diff).to_contain_text("bright")
    expect(diff).to_contain_text("lite")
    panel.screenshot(path=str(ARTIFACTS / "panel-examples-diff.png"))

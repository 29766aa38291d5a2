"""Draw the docs' pictures with truss_lab itself, from real runs.

    python docs/make_pictures.py      # every picture of the docs: notebook, widget-panel, profile,
                                      # timeline-wrong, timeline-right, chain-timeline (.png, in docs/)

The notebook: a real JupyterLab (the one the browser test drives) running the README's quickstart on
examples/digits - a prediction with its stage bar, a bench with its lock timeline - screenshot in
Debian's chromium with Playwright. The timelines: the same download inside predict vs preprocess.
The profile: the digits truss's profile as a notebook shows it (its HTML, screenshot the same way).
"""

from __future__ import annotations

import contextlib
import tempfile
import textwrap
import warnings
from pathlib import Path

import truss_lab
from truss_lab.devtools.localhttp import LocalServer

HERE = Path(__file__).resolve().parent

MODEL = """
import time, urllib.request

def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()

class Model:
    def preprocess(self, url):
        return fetch(url) if {in_pre} else url

    def predict(self, x):
        data = x if {in_pre} else fetch(x)   # the download, under the lock when not in_pre
        end = time.perf_counter() + 0.010     # 10 ms of compute, standing in for the GPU
        while time.perf_counter() < end:
            pass
        return len(data)
"""


def write(root: Path, in_pre: bool) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(f"model_name: {root.name}\n")
    (root / "model" / "model.py").write_text(textwrap.dedent(MODEL.format(in_pre=in_pre)))
    return root


def profile_picture(out: Path) -> None:
    """The digits truss profiled over 5 requests, drawn as its notebook HTML and screenshot."""
    import shutil

    from playwright.sync_api import sync_playwright

    from truss_lab.display import render

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = truss_lab.load(HERE.parent / "examples" / "digits")
    with tr:
        tr.profile(tr.example("three"), n=2)  # warm: TensorFlow traces its functions on the first calls
        html = render.bundle(tr.profile(tr.example("three"), n=5))["text/html"]
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        page_file = Path(tmp) / "profile.html"
        page_file.write_text(f"<html><body style='margin:8px;background:white'>{html}</body></html>")
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 980, "height": 400}, device_scale_factor=1)
        page.goto(page_file.as_uri())
        page.locator(".truss-lab-profile").screenshot(path=str(out))
        browser.close()
    print(f"{out.name}: the digits truss's profile")


QUICKSTART = ["%load_ext truss_lab", "%truss load examples/digits", "%truss predict example:three", "%truss bench -n 40 -c 4"]


@contextlib.contextmanager
def _in_jupyterlab(cells: list[str], height: int):
    """A real JupyterLab (the browser test's) on a copy of examples/digits, a notebook of `cells` run
    in Debian's chromium, the file browser folded away: yields the page, TensorFlow's environment as
    `make lab` sets it."""
    import json
    import os
    import shutil

    from playwright.sync_api import sync_playwright

    from truss_lab.devtools.jupyter import CHROMIUM_FLAGS, Lab, chromium_path, notebook
    from truss_lab.devtools.lab import lab_environment

    for key in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        os.environ.setdefault(key, lab_environment(Path(tempfile.gettempdir()))[key])
    with tempfile.TemporaryDirectory() as tmp:
        root, home = Path(tmp) / "work", Path(tmp) / "home"
        shutil.copytree(HERE.parent / "examples" / "digits", root / "examples" / "digits")
        (root / "picture.ipynb").write_text(json.dumps(notebook(cells)))
        with Lab(root, home) as lab, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1180, "height": height}, device_scale_factor=1)
                page.set_default_timeout(120_000)
                lab.open_notebook(page, "picture.ipynb")
                page.evaluate("() => window.jupyterapp.commands.execute('application:toggle-left-area')")
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                yield page
            finally:
                browser.close()


def notebook_picture(out: Path) -> None:
    """The README's quickstart run in a real JupyterLab: the prediction, its stage bar, the lock timeline."""
    from playwright.sync_api import expect

    with _in_jupyterlab(QUICKSTART, height=1560) as page:
        expect(page.locator(".truss-lab-report svg").first).to_be_visible()
        expect(page.locator(".truss-lab-result .truss-lab-timing").first).to_be_visible()
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:enter-command-mode')")
        page.locator(".truss-lab-report svg").first.scroll_into_view_if_needed()
        page.screenshot(path=str(out))
    print(f"{out.name}: the quickstart in JupyterLab")


def widget_picture(out: Path) -> None:
    """The panel on examples/digits in a real JupyterLab, after a click on Run."""
    from playwright.sync_api import expect

    with _in_jupyterlab(["%load_ext truss_lab", "%truss load examples/digits --no-watch", "%truss widget"], height=1300) as page:
        panel = page.locator(".truss-lab-panel")
        expect(panel).to_be_visible()
        page.locator("button.tl-run").click()
        expect(page.locator(".tl-output .truss-lab-result")).to_be_visible()
        panel.screenshot(path=str(out))
    print(f"{out.name}: the panel after a run")


def chain_picture(out: Path) -> None:
    """The digits chain's lock timeline: a lane per chainlet, after a bench through its entrypoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = truss_lab.load_chain(HERE.parent / "examples" / "digits-chain" / "digits_chain.py")
    with chain:
        inputs = [chain.example(e.name) for e in chain.examples]
        chain.entry.bench(inputs, n=8, concurrency=2, progress=False)  # warm: TensorFlow traces its functions
        chain.entry.clear_traces()
        for live in chain.chainlets.values():
            live.clear_traces()
        chain.entry.bench(inputs, n=24, concurrency=4, progress=False)
        out.write_bytes(truss_lab.timeline(chain).png(width=9, dpi=90))
    print(f"{out.name}: the digits chain, 24 requests from 4 workers")


def main() -> None:
    notebook_picture(HERE / "notebook.png")
    widget_picture(HERE / "widget-panel.png")
    chain_picture(HERE / "chain-timeline.png")
    profile_picture(HERE / "profile.png")
    with tempfile.TemporaryDirectory() as tmp, LocalServer(files={"img.png": bytes(20_000)}, delay_ms=40) as server:
        for name, in_pre in (("wrong", False), ("right", True)):
            with truss_lab.load(write(Path(tmp) / f"download-in-{'preprocess' if in_pre else 'predict'}", in_pre)) as tr:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", truss_lab.LockMisuseWarning)
                    report = tr.bench([server.url("img.png")], n=24, concurrency=8, progress=False)
                out = HERE / f"timeline-{name}.png"
                out.write_bytes(truss_lab.timeline(report).png(width=9, dpi=90))
                print(f"{out.name}: {report.throughput:.1f} req/s, lock utilization {report.lock_utilization:.0%}")


if __name__ == "__main__":
    main()

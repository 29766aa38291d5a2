"""Draw the README's lock timelines with truss_lab itself: the same download inside predict vs preprocess.

    python docs/make_pictures.py      # writes docs/timeline-wrong.png and docs/timeline-right.png
"""

from __future__ import annotations

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


def main() -> None:
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

"""The lock-demo twins on a GPU (issue 17): run where a GPU is lent (`device` tool), with PyTorch.

The twins of examples/ use TensorFlow; the lent GPU machines carry PyTorch but no TensorFlow (and its
wheel is too big to carry there), so these twins are the same story in PyTorch: a 40 ms download (a
LocalServer on 127.0.0.1) inside predict vs in preprocess, then a convnet forward pass on the GPU.
Figures: lock held idle share, compute bound, throughput with lock 1 and lock 2.

    python benchmarks/bench_gpu.py [--n 96] [--json]      # needs torch; uses CUDA when there is a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import truss_lab  # noqa: E402
from truss_lab.devtools.localhttp import LocalServer  # noqa: E402

MODEL = '''
import io, urllib.request
import numpy as np
import torch

def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()

class Model:
    def load(self):
        torch.manual_seed(0)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10),
        ).to(self.device).eval()

    def _image(self, data):
        raw = np.frombuffer(data[:3 * 224 * 224].ljust(3 * 224 * 224, b"\\0"), dtype=np.uint8)
        return torch.from_numpy(raw.reshape(1, 3, 224, 224).astype(np.float32) / 255.0)

    def preprocess(self, request):
        return self._image(fetch(request["url"])) if {in_pre} else request

    def predict(self, x):
        if not {in_pre}:
            x = self._image(fetch(x["url"]))   # the download, under the lock
        with torch.no_grad():
            y = self.net(x.to(self.device))
        return y.cpu().numpy()                  # waits for the GPU

    def postprocess(self, y):
        return {{"top": int(y.argmax())}}
'''


def write(root: Path, in_pre: bool) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "config.yaml").write_text(f"model_name: gpu-{'right' if in_pre else 'wrong'}\n")
    (root / "model" / "model.py").write_text(MODEL.format(in_pre=in_pre))
    (root / "data").mkdir()
    return root


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    results: dict = {"card": card, "torch": torch.__version__, "requests": args.n, "workers": 8}
    with tempfile.TemporaryDirectory() as tmp, LocalServer(files={"img.bin": bytes(range(256)) * 600}, delay_ms=40) as server, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = {"url": server.url("img.bin")}
        for name, in_pre in (("download_in_predict", False), ("download_in_preprocess", True)):
            with truss_lab.load(write(Path(tmp) / name, in_pre)) as tr:
                out = {}
                for lock in (1, 2):
                    tr.concurrency = lock
                    tr.bench([x], n=16, concurrency=8, progress=False)  # warm up (CUDA context, kernels)
                    r = tr.bench([x], n=args.n, concurrency=8, progress=False)
                    out[f"lock{lock}"] = {
                        "throughput_rps": round(r.throughput, 1), "idle_share": round(r.lock_idle_share, 3),
                        "idle_label": r.idle_label, "bound_rps": round(r.bound, 1),
                        "compute_bound_rps": round(r.compute_bound, 1), "predict_ms": round(r.stages["predict"].mean, 2),
                    }
                results[name] = out
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{card}, torch {results['torch']}, {args.n} requests from 8 workers:")
        for name in ("download_in_predict", "download_in_preprocess"):
            for lock in (1, 2):
                o = results[name][f"lock{lock}"]
                print(f"  {name} lock {lock}: {o['throughput_rps']} req/s, lock held {o['idle_share']:.0%} {o['idle_label']}, "
                      f"predict {o['predict_ms']} ms, bound {o['bound_rps']}, compute bound {o['compute_bound_rps']} req/s")
    return results


if __name__ == "__main__":
    main()

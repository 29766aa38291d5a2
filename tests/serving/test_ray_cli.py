"""`truss-lab serve PATH --ray`: deploys on a local Ray, serves the Truss routes, Ctrl-C shuts it all down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import free_port, sigint_default_in_child, write_truss


def test_cli_serve_ray_answers_and_stops_on_ctrl_c(tmp_path):
    root = write_truss(tmp_path / "echo", "class Model:\n    def predict(self, x):\n        return {'echo': x}\n")
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "truss_lab.cli", "serve", str(root), "--ray", "--port", str(port), "--replicas", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env, preexec_fn=sigint_default_in_child,
    )
    lines: list[str] = []
    announced = threading.Event()

    def read() -> None:  # the CLI prints its URL once deploy() has returned
        for line in proc.stdout:
            lines.append(line)
            if "on Ray Serve at" in line:
                announced.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        assert announced.wait(180), "".join(lines)[-3000:]
        assert client.post("/v1/models/model:predict", json=[1, 2]).json() == {"echo": [1, 2]}
        assert client.get("/v1/models/model").json() == {}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)
        reader.join(30)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert f"serving {root} on Ray Serve at http://127.0.0.1:{port}/v1/models/model:predict" in out

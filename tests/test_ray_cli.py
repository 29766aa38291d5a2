"""`truss-lab serve PATH --ray`: deploys on a local Ray, serves the Truss routes, Ctrl-C shuts it all down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from conftest import write_truss


def test_cli_serve_ray_answers_and_stops_on_ctrl_c(tmp_path):
    root = write_truss(tmp_path / "echo", "class Model:\n    def predict(self, x):\n        return {'echo': x}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "truss_lab.cli", "serve", str(root), "--ray", "--port", str(port), "--replicas", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 180
        answer = None
        while answer is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                response = client.post("/v1/models/model:predict", json=[1, 2])
                answer = response.json() if response.status_code == 200 else None
            except httpx.TransportError:
                pass
            time.sleep(0.25)  # polling the deployment with a deadline
        assert answer == {"echo": [1, 2]}
        assert client.get("/v1/models/model").json() == {"name": "echo", "ready": True}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"serving {root} on Ray Serve at http://127.0.0.1:{port}/v1/models/model:predict" in out

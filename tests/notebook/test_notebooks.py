"""The example notebooks: all collected by nbval, outputs committed, offline, and fast enough."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_collected_by_nbval():
    names = {p.name for p in NOTEBOOKS}
    assert {"01-quickstart.ipynb", "02-image-classifier.ipynb", "03-gpu-lock.ipynb", "04-resnet-like-truss.ipynb"} <= names
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "notebooks"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    ).stdout
    for path in NOTEBOOKS:
        cells = sum(1 for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        collected = [line for line in out.splitlines() if line.startswith(f"notebooks/{path.name}::")]
        assert len(collected) == cells, (path.name, cells, collected)


def test_notebooks_have_committed_outputs_and_no_errors():
    for path in NOTEBOOKS:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(c["execution_count"] for c in cells), f"{path.name}: run it and commit the outputs"
        assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"], path.name
        ignored = [c for c in cells if "# NBVAL_IGNORE_OUTPUT" in "".join(c["source"])]
        for cell in ignored:  # each ignored cell says why on the next line
            lines = "".join(cell["source"]).splitlines()
            assert lines[1].startswith("# ("), (path.name, lines[:2])


def test_the_test_processes_are_offline():
    """What keeps the notebooks honest: a connection outside 127.0.0.1 is refused in every test process."""
    code = (
        "import socket\n"
        "try:\n    socket.create_connection(('10.255.255.1', 80), timeout=1)\nexcept ConnectionRefusedError as e:\n    print(e)\n"
        "try:\n    socket.getaddrinfo('pypi.org', 443)\nexcept ConnectionRefusedError as e:\n    print(e)\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); socket.create_connection(s.getsockname()).close(); print('local ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=os.environ).stdout
    assert "truss_lab tests run offline: connection to 10.255.255.1:80 refused" in out
    assert "truss_lab tests run offline: DNS lookup of 'pypi.org' refused" in out and "local ok" in out

"""The project's own promises: environment.yml agrees with pyproject, the core imports nothing heavy."""

import subprocess
import sys
import tomllib

import yaml

from conftest import ROOT


def _norm(req: str) -> str:
    return " ".join(req.replace(" ", "").replace(";", " ; ").split())


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted += extra
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [p for p in pip if not p.startswith("-e")]
    assert sorted(map(_norm, listed)) == sorted(map(_norm, wanted))
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace("python", "") == project["requires-python"]
    assert "-e ." in pip


def test_lab_starts_jupyterlab_on_localhost_and_prints_token(tmp_path):
    """The README's main command: JupyterLab on notebooks/, bound to 127.0.0.1, URL with token printed."""
    import os
    import re
    import selectors
    import time

    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"), JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "truss_lab.devtools.lab"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    url = None
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline and sel.select(timeout=deadline - time.monotonic()):
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"http://127\.0\.0\.1:\d+/lab\?token=\w+", line)
            url = m.group(0) if m else None
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert url, "JupyterLab did not print its URL"

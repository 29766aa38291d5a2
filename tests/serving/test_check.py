"""`truss-lab check`: trusses made to fail each lint and each kind of difference, against the real Truss server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import truss_lab
from conftest import ROOT, write_truss
from truss_lab import check
from truss_lab.bundle import read_bundle
from truss_lab.serving.check import first_difference, lint


def kinds(report) -> set[tuple[str, str]]:
    return {(f.severity, f.kind) for f in report.findings}


def test_a_truss_that_deploys_as_it_runs_passes_and_exits_0(truss_env, tmp_path):
    root = write_truss(tmp_path / "fine", """
        class Model:
            def preprocess(self, x):
                return x["n"]
            def predict(self, n):
                for i in range(n):
                    yield f"{i},"
        """, examples=[{"name": "three", "input": {"n": 3}}])
    out = subprocess.run([sys.executable, "-m", "truss_lab.cli", "check", str(root), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["server_loaded"] and report["findings"] == []
    (example,) = report["examples"]
    assert example["same"] and example["streamed"] and example["truss_ms"] > 0 and "predict" in example["lab_stage_ms"]


def test_a_requirement_left_out_fails_as_on_deploy(truss_env, tmp_path):
    root = write_truss(tmp_path / "noreq", "import tqdm\nclass Model:\n    def predict(self, x):\n        return x\n",
                       examples=[{"name": "one", "input": 1}])
    report = check(root)
    assert not report.ok and not report.server_loaded
    assert ("error", "requirement") in kinds(report)
    messages = [f.line() for f in report.findings]
    assert any("noreq/model/model.py:1: `import tqdm` is not covered by `requirements`" in m for m in messages)
    assert any("on the Truss server, `import tqdm` failed: No module named 'tqdm'" in m for m in messages)
    out = subprocess.run([sys.executable, "-m", "truss_lab.cli", "check", str(root)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 1 and "DIFFERENCES" in out.stdout
    # with the requirement declared, the server's environment gets it (cached per requirements) and it passes
    root2 = write_truss(tmp_path / "withreq", "import tqdm\nclass Model:\n    def predict(self, x):\n        return tqdm.__name__\n",
                        examples=[{"name": "one", "input": 1}], config={"requirements": ["tqdm"]})
    assert check(root2).ok


def test_a_numpy_output_that_serialises_differently_is_found_with_its_path(truss_env, tmp_path):
    # numpy 2 (here) writes a scalar's repr as np.float64(1.5); the Truss server's numpy < 2 as 1.5
    root = write_truss(tmp_path / "np", """
        import numpy as np
        class Model:
            def predict(self, x):
                return {"same": np.float32(0.25), "text": f"{[np.float64(1.5)]}"}
        """, examples=[{"name": "one", "input": 1}])
    report = check(root)
    (example,) = report.examples
    assert not example.same and not report.ok
    assert example.difference == 'text: Truss "[1.5]" vs truss_lab "[np.float64(1.5)]"'


def test_an_environment_variable_set_only_in_the_kernel_differs_and_is_named(truss_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CHECK_MODE", "kernel")
    root = write_truss(tmp_path / "env", """
        import os
        class Model:
            def predict(self, x):
                return os.environ.get("CHECK_MODE", "default")
        """, examples=[{"name": "one", "input": 1}])
    report = check(root)
    assert report.examples[0].difference == '<body>: Truss "default" vs truss_lab "kernel"'
    (finding,) = report.findings
    assert finding.kind == "env-var" and "set in this process only" in finding.message and finding.location.endswith("model.py:5")


def test_lints_for_what_only_fails_on_deploy(tmp_path):
    root = write_truss(tmp_path / "lints", """
        import os
        class Model:
            def __init__(self, data_dir, secrets, **kw):
                self.data_dir, self.secrets = data_dir, secrets
            async def load(self):
                self.w = (self.data_dir / "weights.bin").read_bytes()
            def predict(self, x):
                return [self.secrets["api_key"], self.secrets["declared"], os.environ["DECLARED"], os.getenv("UNDECLARED")]
        """, config={"python_version": "py39", "secrets": {"declared": None}, "environment_variables": {"DECLARED": "1"}})
    findings = {f.kind: f for f in lint(read_bundle(root), env_python="py311")}
    assert set(findings) == {"async-load", "data-file", "secret", "env-var", "python-version"}
    assert findings["async-load"].location.endswith("model.py:6") and findings["async-load"].severity == "error"
    assert "data/weights.bin is not in the truss" in findings["data-file"].message
    assert "'api_key'" in findings["secret"].message and "declared" not in findings["secret"].message.replace("not declared", "")
    assert "UNDECLARED" in findings["env-var"].message
    assert "py39" in findings["python-version"].message
    (root / "data" / "weights.bin").write_bytes(b"w")
    assert "data-file" not in {f.kind for f in lint(read_bundle(root), env_python="py311")}


@pytest.mark.filterwarnings("ignore::truss_lab.guard.LockMisuseWarning")
def test_the_guard_finding_from_the_run_is_reported(truss_env, tmp_path):
    root = write_truss(tmp_path / "sleepy", "import time\nclass Model:\n    def predict(self, x):\n        time.sleep(0.02)\n        return x\n",
                       examples=[{"name": "one", "input": 1}])
    with truss_lab.load(root) as tr:
        report = tr.check()
    assert report.examples[0].same
    (finding,) = report.findings
    assert finding.kind == "lock" and "predict slept" in finding.message
    html = report._repr_mimebundle_()["text/html"]
    assert "truss-lab-check" in html and "predict slept" in html


def test_first_difference_uses_the_tolerance():
    assert first_difference({"p": [0.1, 0.2]}, {"p": [0.1 + 1e-12, 0.2]}) is None
    assert first_difference({"p": [0.1, 0.2]}, {"p": [0.1, 0.25]}) == ("p[1]", 0.2, 0.25)
    assert first_difference({"a": 1}, {"a": 1, "b": 2}) == ("b", "<missing>", 2)
    assert first_difference([1, 2], [1]) == (" (length)", 2, 1)
    assert first_difference(True, 1) == ("", True, 1)


def test_the_panel_check_button_shows_the_report(truss_env, make_truss):
    pytest.importorskip("ipywidgets")
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n", examples=[{"name": "one", "input": 1}])
    with truss_lab.load(root) as tr:
        panel = truss_lab.widget(tr)
        try:
            panel.check_button.click()
            assert panel.wait(120)
            assert "truss-lab-check" in panel.output.value and ">OK<" in panel.output.value
        finally:
            panel.close()


def test_the_check_magic(truss_env, make_truss):
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output

    ip = start_ipython() or InteractiveShell.instance()
    ip.run_line_magic("load_ext", "truss_lab")
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    try:
        with capture_output() as cap:
            ip.run_line_magic("truss", f"load {root} --as checked --no-watch")
            ip.run_line_magic("truss", "check --input 5 --input '[1, 2]'")
        text = cap.outputs[-1].data["text/plain"]
        assert "OK" in text and "input0" in text and "input1" in text
    finally:
        ip.user_ns["checked"].close()
        ip.run_line_magic("unload_ext", "truss_lab")

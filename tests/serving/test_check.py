"""`truss-lab check`: trusses made to fail each lint and each kind of difference, against the real Truss server."""

from __future__ import annotations

import json
import os
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


def test_lints_that_cannot_be_sure_warn_and_never_fail(tmp_path):
    root = write_truss(tmp_path / "unsure", """
        import numpy as np
        import mylib
        import otherlib
        class Model:
            def __init__(self, data_dir, **kw):
                self._data_dir = data_dir
            def load(self):
                self.w = np.load(self._data_dir / "weights" / "w.npy")
                self.missing = np.load(self._data_dir / "weights" / "gone.npy")
                self.cache = self._data_dir / "cache" / "tokens.json"
            def predict(self, x):
                return x
        """, config={"requirements": ["git+https://example.invalid/org/mylib.git@v1", "numpy"]})
    (root / "data" / "weights").mkdir(parents=True)
    np_file = root / "data" / "weights" / "w.npy"
    np_file.write_bytes(b"x")
    findings = lint(read_bundle(root))
    data = [f for f in findings if f.kind == "data-file"]
    assert [(f.severity, "gone.npy" in f.message) for f in data if "weights" in f.message] == [("error", True)]  # w.npy is there
    assert any(f.severity == "warning" and "cache/tokens.json" in f.message and "writes it itself" in f.message for f in data)
    reqs = [f for f in findings if f.kind == "requirement"]
    assert all(f.severity == "warning" for f in reqs) and [("otherlib" in f.message) for f in reqs] == [True]
    assert "git+https://example.invalid/org/mylib.git@v1" in reqs[0].message  # mylib: guessed from the URL, covered
    from truss_lab.serving.lints import requirement_names

    names, opaque = requirement_names(["tqdm>=4", "foo[x] @ https://h/foo-1.0.tar.gz", "-e git+https://h/o/bar.git#egg=bar_pkg",
                                       "https://h/baz-2.0-py3-none-any.whl", "git+ssh://git@h/o/qux.git"])
    assert names == {"tqdm", "foo", "bar-pkg", "baz", "qux"} and opaque == ["https://h/baz-2.0-py3-none-any.whl", "git+ssh://git@h/o/qux.git"]


def test_two_checks_at_once_share_the_cache_safely(truss_env, tmp_path):
    """Two processes (two kernels, a kernel and a terminal) preparing the same app folder and the same
    requirements overlay at once: both get a complete folder; the work is done once."""

    root = write_truss(tmp_path / "twice", "class Model:\n    def predict(self, x):\n        return x\n")
    script = (
        "import sys; from truss_lab.serving.truss_server import ServerEnv, build_once; from pathlib import Path; import time\n"
        "env = ServerEnv.ensure()\n"
        "app = env.app_folder(sys.argv[1])\n"
        "assert (app / 'config.yaml').is_file() and (app / 'model' / 'model.py').is_file(), app\n"
        "def slow(tmp):\n"
        "    with open(sys.argv[2] + '.count', 'a') as f: f.write('x')\n"
        "    time.sleep(0.5); (tmp / 'done').write_text('yes')\n"
        "out = build_once(Path(sys.argv[2]), slow)\n"
        "print(app, (out / 'done').read_text())\n"
    )
    target = tmp_path / "cache" / "overlay"
    target.parent.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(target)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len({o.split()[0] for o, _ in outs}) == 1 and all(o.split()[1] == "yes" for o, _ in outs)
    assert (tmp_path / "cache" / "overlay.count").read_text() == "x"  # built once; the other waited for it
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]  # no half-built folder left


def test_ctrl_c_during_an_install_stops_pip_too(tmp_path, sigint_raises):
    import signal
    import threading

    from truss_lab.serving.truss_server import _install

    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('Collecting x', flush=True); time.sleep(120)"

    def interrupt_when_started() -> None:
        for _ in range(600):
            if pid_file.exists() and pid_file.read_text():
                os.kill(os.getpid(), signal.SIGINT)  # what a kernel interrupt sends
                return
            threading.Event().wait(0.05)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        _install([sys.executable, "-c", child], "fake pip")
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (terminated and reaped)


def test_the_set_up_step_installed_every_overlay_the_examples_checks_need(truss_env):
    """The test run is offline (tests/offline): a check that still had to pip install a requirement
    (notebook 06's chain check: the Classify chainlet's tensorflow) would fail there on a new machine.
    `make truss-server` (python -m truss_lab.serving.prepare examples) installs them all first."""
    from truss_lab.serving.prepare import requirement_sets

    sets = requirement_sets([ROOT / "examples"])
    assert any(any(r.startswith("tensorflow") for r in reqs) for reqs in sets)  # the chain's Classify is among them
    missing = [reqs for reqs in sets if reqs and not (truss_env.overlay_folder(reqs) / ".ready").is_file()]
    assert not missing, f"not prepared by `make truss-server`: {missing}"


def test_a_numpy_string_key_is_json_as_the_truss_server_sends_it(tmp_path, truss_env):
    """sklearn's `target_names` are numpy.str_: as dict keys the Truss server sends them (200), so
    truss_lab must not warn that it would answer 500 (found by a new user: it did, on every request,
    while `truss-lab check` said the answers were the same). A numpy.int64 key the server refuses is
    still named."""
    import warnings

    import numpy as np

    from truss_lab.jsoncheck import first_non_json

    root = write_truss(tmp_path / "labels", "import numpy as np\nclass Model:\n    def predict(self, x):\n"
                       "        return {np.str_('setosa'): np.float64(0.9), 'virginica': 0.1}\n",
                       examples=[{"name": "one", "input": 1}])
    with truss_lab.load(root, process="worker") as tr, warnings.catch_warnings():
        warnings.simplefilter("error", truss_lab.OutputWarning)
        assert tr.predict(1).output == {"setosa": 0.9, "virginica": 0.1}
        report = tr.check()
    assert report.ok and [e.truss_status for e in report.examples] == [200], str(report)
    assert first_non_json({np.int64(3): 1.0}, numpy=True) == ("[np.int64(3)] (key)", "numpy.int64")

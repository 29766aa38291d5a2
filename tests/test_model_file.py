"""Issue 33 (its single-file part): a `class Model(truss_chains.ModelBase)` file, as `truss init
--python-config` writes it and `truss push my_model.py` deploys it - loaded, predicted, reloaded and
checked on the real Truss server."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("truss_chains")

import truss_lab  # noqa: E402

MODEL = '''
import os

import pydantic
import truss_chains as baseten


class Scaled(pydantic.BaseModel):
    value: float
    by: str


class Model(baseten.ModelBase):
    remote_config: baseten.RemoteConfig = baseten.RemoteConfig(
        name="scaler",
        compute=baseten.Compute(predict_concurrency=2),
        assets=baseten.Assets(secret_keys=["api_key"]),
    )

    def __init__(self, context: baseten.DeploymentContext = baseten.depends_context()) -> None:
        with open(os.environ.get("LOADS_FILE", os.devnull), "a") as f:
            f.write("load\\n")
        self._factor = 3.0  # "weights", loaded once
        self._key = context.secrets["api_key"]

    def predict(self, input_field: int) -> Scaled:
        return Scaled(value=input_field * self._factor, by=self._key)
'''


@pytest.fixture
def model_file(tmp_path, monkeypatch):
    loads = tmp_path / "loads.txt"
    loads.write_text("")
    monkeypatch.setenv("LOADS_FILE", str(loads))
    folder = tmp_path / "scaler"
    folder.mkdir()
    path = folder / "my_model.py"
    path.write_text(textwrap.dedent(MODEL))
    return path, loads


def test_a_model_file_loads_predicts_and_hot_reloads_as_truss_push_deploys_it(model_file):
    path, loads = model_file
    with truss_lab.load(str(path), secrets={"api_key": "k1"}) as tr:
        assert isinstance(tr, truss_lab.LiveModel) and tr.process == "worker" and tr.pid != os.getpid()
        assert tr.concurrency == 2  # remote_config's predict_concurrency is the lock
        assert tr.predict({"input_field": 2}).output == {"value": 6.0, "by": "k1"}  # typed output, as sent
        error = tr.run({"input_field": "two"}).error  # typed input, as the generated truss parses it
        assert error is not None and "input_field" in str(error)
        assert tr.schema()["input_schema"]["properties"]["input_field"]["type"] == "integer"
        tr.watch()
        n = tr.reload_count
        path.write_text(path.read_text().replace("input_field * self._factor", "input_field * self._factor + 1"))
        event = tr.wait_for_reload(since=n, timeout=60)
        assert event.ok and event.kind == "methods", event
        assert tr.predict({"input_field": 2}).output == {"value": 7.0, "by": "k1"}
        assert loads.read_text().count("load") == 1  # a method edit kept the loaded state
    with pytest.raises(truss_lab.TrussLabError, match="load_chain"):
        other = path.with_name("not_a_model.py")
        other.write_text("x = 1\n")
        truss_lab.load(str(other))


def test_the_cli_and_the_real_truss_server_take_a_model_file(model_file, truss_env, capsys, monkeypatch):
    import json

    from truss_lab.cli import main
    from truss_lab.chains import load_chain
    from truss_lab.serving.check import check_chain

    path, _ = model_file
    assert main(["predict", str(path), "--input", '{"input_field": 4}']) == 0
    assert json.loads(capsys.readouterr()[0]) == {"value": 12.0, "by": "***"}  # the secret's placeholder, as generated
    report = check_chain(path, [{"input_field": 1}, {"input_field": "x"}], make_chain=load_chain)
    assert report.server_loaded and report.ok, str(report)  # the same answers from the real Truss server
    assert [e.truss_status for e in report.examples] == [200, 400]


def test_init_python_config_writes_what_truss_init_writes_and_it_loads(tmp_path, capsys):
    import subprocess
    import sys

    from truss_lab.cli import main

    assert main(["init", str(tmp_path / "mine"), "--python-config", "--name", "my-model"]) == 0
    ours = next((tmp_path / "mine").glob("*.py"))
    truss_cli = Path(sys.executable).with_name("truss")
    subprocess.run([str(truss_cli), "init", "--python-config", "-n", "my-model", str(tmp_path / "theirs")],
                   check=True, capture_output=True)
    theirs = next((tmp_path / "theirs").glob("*.py"))
    assert ours.name == theirs.name == "my_model.py" and ours.read_text() == theirs.read_text()
    with truss_lab.load(str(ours)) as tr:
        assert tr.predict({"input_field": 7}).output == 7


def test_the_panel_takes_a_model_file_with_its_examples_file(tmp_path):
    pytest.importorskip("ipywidgets")
    folder = tmp_path / "echo"
    folder.mkdir()
    source = folder / "echo_model.py"
    source.write_text(textwrap.dedent('''
        import truss_chains as chains


        class Model(chains.ModelBase):
            remote_config = chains.RemoteConfig(name="echo")

            def predict(self, text: str, times: int = 1) -> str:
                return "<b>" + text * times
    '''))
    (folder / "echo_model.examples.yaml").write_text("- name: twice\n  input: {text: ab, times: 2}\n- name: once\n  input: {text: z}\n")
    with truss_lab.load(str(source)) as tr:
        panel = truss_lab.widget(tr)
        try:
            assert [o[0] for o in panel.examples.options] == ["— example —", "twice", "once"]
            assert panel.text.value == '{"text": "ab", "times": 2}'
            panel.run_button.click()
            assert panel.wait(30)
            assert "&lt;b&gt;abab" in panel.output.value and "<b>abab" not in panel.output.value  # the model's string, escaped
            source.write_text(source.read_text().replace('"<b>"', '"<i>"'))
            assert tr.reload().kind == "methods"
            assert "v2" in panel.status.value and "echo v2: swapped (echo_model.py; its state kept)" in panel.status.value
            panel.run_button.click()
            assert panel.wait(30)
            assert "&lt;i&gt;abab" in panel.output.value and panel.runs[0].result.trace.version == 2
        finally:
            panel.close()

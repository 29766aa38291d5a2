
import pytest
import yaml

import truss_lab
from truss_lab import BundleError, read_bundle
from truss_lab.bundle import resolve_secrets



def test_defaults_and_unknown_keys_kept(make_truss):
    root = make_truss(config={"model_metadata": {"x": 1}, "system_packages": ["ffmpeg"], "base_image": {"image": "x"}})
    b = read_bundle(root)
    assert (b.model_module_dir, b.model_class_filename, b.model_class_name) == ("model", "model.py", "Model")
    assert (b.data_dir_name, b.packages_dir_name, b.examples_filename) == ("data", "packages", "examples.yaml")
    assert b.predict_concurrency == 1
    assert b.config["model_metadata"] == {"x": 1} and b.config["base_image"] == {"image": "x"}
    assert b.model_file == root.resolve() / "model" / "model.py"


def test_custom_keys_honoured(tmp_path):
    root = tmp_path / "custom"
    root.mkdir()
    (root / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_name": "custom",
                "model_module_dir": "src",
                "model_class_filename": "serve.py",
                "model_class_name": "Server",
                "data_dir": "weights",
                "examples_filename": "ex.yaml",
                "runtime": {"predict_concurrency": 3},
                "requirements": ["numpy"],
                "python_version": "py311",
                "resources": {"use_gpu": True, "accelerator": "A10G"},
            }
        )
    )
    (root / "src").mkdir()
    (root / "src" / "serve.py").write_text("class Server:\n    def predict(self, x):\n        return x * 2\n")
    (root / "weights").mkdir()
    (root / "ex.yaml").write_text("- name: two\n  input: 2\n")
    b = read_bundle(root)
    assert b.predict_concurrency == 3 and b.requirements == ["numpy"] and b.resources["accelerator"] == "A10G"
    assert b.example("two") == 2
    with truss_lab.load(root) as tr:
        assert tr.concurrency == 3
        assert tr.predict(21).output == 42


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such Truss folder"),
        (lambda p: p.mkdir(), "config.yaml: missing"),
        (lambda p: (p.mkdir(), (p / "config.yaml").write_text("a: 1\nb: [1, 2\nc: 3\n")), "config.yaml:3: invalid YAML"),
        (lambda p: (p.mkdir(), (p / "config.yaml").write_text("- 1\n- 2\n")), "expected a mapping"),
    ],
    ids=["missing-folder", "no-config", "malformed-yaml", "not-a-mapping"],
)
def test_folder_errors(tmp_path, setup, message):
    root = tmp_path / "bad"
    setup(root)
    with pytest.raises(BundleError) as info:
        read_bundle(root)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "config, key, detail",
    [
        ({"runtime": {"predict_concurrency": 0}}, "runtime.predict_concurrency", "at least 1"),
        ({"runtime": {"predict_concurrency": "x"}}, "runtime.predict_concurrency", "positive integer"),
        ({"runtime": {"predict_concurrency": True}}, "runtime.predict_concurrency", "positive integer"),
        ({"runtime": "fast"}, "runtime", "mapping"),
        ({"model_class_name": 3}, "model_class_name", "non-empty string"),
        ({"model_class_name": "not a name"}, "model_class_name", "class name"),
        ({"model_module_dir": "../elsewhere"}, "model_module_dir", "inside the Truss folder"),
        ({"requirements": "numpy"}, "requirements", "list of strings"),
        ({"secrets": ["a"]}, "secrets", "mapping"),
        ({"environment_variables": {"A": [1]}}, "environment_variables", "scalar"),
        ({"python_version": 3.11}, "python_version", "string"),
    ],
)
def test_key_errors_name_file_and_key(make_truss, config, key, detail):
    root = make_truss(config=config)
    with pytest.raises(BundleError) as info:
        read_bundle(root)
    msg = str(info.value)
    assert "config.yaml" in msg and f"'{key}'" in msg and detail in msg


def test_examples(make_truss):
    root = make_truss(examples=[{"name": "a", "input": [1, 2]}, {"name": "b", "input": {"k": "v"}}])
    b = read_bundle(root)
    assert [e.name for e in b.examples] == ["a", "b"]
    assert b.example("b") == {"k": "v"}
    with pytest.raises(BundleError, match="no example named 'zz'.*examples: a, b"):
        b.example("zz")
    (root / "examples.yaml").write_text("name: a\n")
    with pytest.raises(BundleError, match="examples.yaml: expected a list"):
        read_bundle(root)


def test_secrets_resolution_and_never_printed(make_truss, monkeypatch):
    root = make_truss(config={"secrets": {"api_key": "default-KEY", "token": None, "other": "o"}})
    b = read_bundle(root)
    monkeypatch.setenv("TRUSS_SECRET_token", "env-TOKEN")
    s = resolve_secrets(b, {"other": "arg-OTHER"})
    assert s["api_key"] == "default-KEY" and s["token"] == "env-TOKEN" and s["other"] == "arg-OTHER"
    for text in (repr(s), str(s)):
        assert "KEY" not in text and "TOKEN" not in text and "OTHER" not in text
    assert "api_key" in repr(s)
    monkeypatch.delenv("TRUSS_SECRET_token")
    s = resolve_secrets(b)
    with pytest.raises(truss_lab.SecretNotFound, match="TRUSS_SECRET_token"):
        s["token"]
    with pytest.raises(truss_lab.SecretNotFound, match="not declared"):
        s["nope"]
    # Truss's rules (tests/conformance: secrets-rules): empty is missing; get() and `in` raise; no iteration
    s = resolve_secrets(b, {"api_key": ""})
    with pytest.raises(truss_lab.SecretNotFound, match="'api_key' is empty"):
        s["api_key"]
    with pytest.raises(truss_lab.SecretNotFound):
        s.get("nope", "default")
    with pytest.raises(truss_lab.SecretNotFound):
        "nope" in s
    with pytest.warns(UserWarning, match="'undeclared' passed to load\\(\\) are not declared"):
        s = resolve_secrets(b, {"undeclared": "x"})
    with pytest.raises(truss_lab.SecretNotFound, match="not declared"):
        s["undeclared"]  # as on Truss: only declared secrets reach the model
    with pytest.raises(NotImplementedError):
        list(s)


def test_init_writes_truss_scaffold_and_refuses_overwrite(tmp_path):
    root = truss_lab.init(tmp_path / "fresh", name="My Model")
    assert {p.name for p in root.iterdir()} >= {"config.yaml", "model", "data", "packages", "examples.yaml"}
    assert (root / "model" / "__init__.py").exists()
    code = (root / "model" / "model.py").read_text()
    for needle in ("def __init__(self, **kwargs)", "def load(self)", "def preprocess", "def postprocess",
                   "np.array(model_input)", "self._model.predict(inputs).tolist()", 'model_output["predictions"]'):
        assert needle in code
    b = read_bundle(root)
    assert b.model_name == "My Model"
    with truss_lab.load(root) as tr:
        assert tr.predict([1, 2, 3]).output == {"predictions": [1, 2, 3]}
    before = (root / "model" / "model.py").read_text()
    with pytest.raises(BundleError, match="already exists; refusing to overwrite"):
        truss_lab.init(root)
    assert (root / "model" / "model.py").read_text() == before
    # An existing empty folder is fine (as after mkdir).
    (tmp_path / "empty").mkdir()
    truss_lab.init(tmp_path / "empty")


def test_yaml_error_carries_location_and_reload_reports_it(live):
    tr = live()
    (tr.path / "config.yaml").write_text("model_name: t\nruntime:\n  predict_concurrency: [1\n")
    with pytest.raises(BundleError) as info:
        read_bundle(tr.path)
    assert info.value.location == f"{tr.path}/config.yaml:4"  # PyYAML reports the unclosed list at end of file
    event = tr.reload()
    assert event.kind == "failed" and event.location == info.value.location

"""Truss-server behaviours in the notebook API (tests/conformance holds the same against the real server
over HTTP): request parameters, typed input, the OpenAI-compatible methods, config defaults, imports."""

from __future__ import annotations

import sys

import pytest

import truss_lab
from truss_lab.errors import InputError, LoadError, PredictError


def test_request_parameter_gets_a_real_starlette_request(live):
    tr = live(
        """
        from starlette.requests import Request
        class Model:
            async def predict(self, x, request: Request):
                body = await request.json()
                with request.state.watch_disconnect() as gone:
                    return {"x": x, "body": body, "type": type(request).__name__,
                            "ctype": request.headers["content-type"], "gone": gone.is_set(),
                            "disconnected": await request.is_disconnected()}
        """
    )
    out = tr.predict({"a": 1}).output
    assert out == {"x": {"a": 1}, "body": {"a": 1}, "type": "Request", "ctype": "application/json",
                   "gone": False, "disconnected": False}


def test_request_only_predict_gets_no_parsed_input(live):
    tr = live(
        """
        import fastapi
        class Model:
            def predict(self, request: fastapi.Request):
                return request.headers.get("x-user", "nobody")
        """
    )
    assert tr.predict({"ignored": True}).output == "nobody"
    from truss_lab.request import local_request

    assert tr.predict(None, request=local_request(None, headers={"x-user": "ann"})).output == "ann"


def test_pydantic_input_is_parsed_and_an_invalid_one_is_an_input_error(live):
    tr = live(
        """
        import pydantic
        class In(pydantic.BaseModel):
            prompt: str
            n: int = 1
        class Model:
            def predict(self, x: In):
                return x.prompt * x.n
        """
    )
    assert tr.predict({"prompt": "ab", "n": 2}).output == "abab"
    result = tr.run({"n": "x"})
    assert isinstance(result.error, InputError) and result.error.stage == "input"
    assert "Input Parsing Errors:" in str(result.error.__cause__) and "`prompt`: Field required." in str(result.error.__cause__)
    assert tr.lock_available == tr.concurrency


def test_openai_methods_run_without_the_lock_and_are_traced(live):
    tr = live(
        """
        class Model:
            def predict(self, x):
                return x
            def chat_completions(self, body):
                return {"reply": body["messages"][-1]["content"][::-1]}
            def completions(self, body):
                yield "a"
                yield "b"
        """
    )
    assert tr.serving.methods.endpoints == ["chat_completions", "completions"]
    assert tr.call("chat_completions", {"messages": [{"content": "abc"}]}).output == {"reply": "cba"}
    assert tr.call("completions", {}).output == "ab"
    assert list(tr.stream({}, method="completions")) == ["a", "b"]
    traces = tr.traces[-3:]
    assert [t.method for t in traces] == ["chat_completions", "completions", "completions"]
    assert all(t.lock_acquired is None and t.predict_end is not None for t in traces)
    with pytest.raises(truss_lab.TrussLabError, match="has no embeddings\\(\\) method \\(its OpenAI-compatible methods: chat_completions, completions\\)"):
        tr.call("embeddings", {})
    with pytest.raises(truss_lab.TrussLabError, match="method must be 'predict' or one of"):
        tr.call("nope", {})


def test_an_error_in_an_openai_method_names_it(live):
    tr = live("class Model:\n    def predict(self, x):\n        return x\n    def embeddings(self, body):\n        raise ValueError('no')\n")
    with pytest.raises(PredictError, match=r"^embeddings failed at t/model/model.py:5: ValueError: no"):
        tr.call("embeddings", {})


@pytest.mark.parametrize(
    "model, message",
    [
        ("class Model:\n    def predict(self, x, y):\n        return x\n", "`predict` method with two arguments must have request as second argument"),
        ("import fastapi\nclass Model:\n    def predict(self, request: fastapi.Request, x):\n        return x\n", "not allowed to have request as first argument"),
        ("class Model:\n    def predict(self, a, b, c):\n        return a\n", "`predict` method cannot have more than two arguments"),
        ("class Model:\n    def predict(self, x):\n        return x\n    def is_healthy(self, x):\n        return True\n", "`is_healthy` must have only one argument: `self`."),
        ("import fastapi\nclass Model:\n    def preprocess(self, x):\n        return x\n    def predict(self, request: fastapi.Request):\n        return 1\n",
         "When using `preprocess`, the predict method cannot only have the request argument"),
        ("class Model:\n    def predict(self, x):\n        return x\n    async def websocket(self, ws):\n        pass\n", "cannot have both `websocket` and any of"),
        ("class Model:\n    def websocket(self, ws):\n        pass\n", "`websocket` endpoints must be async function definitions."),
    ],
    ids=["two-args", "request-first", "three-args", "is-healthy-arg", "request-only-after-preprocess", "websocket-and-predict", "sync-websocket"],
)
def test_definitions_truss_refuses_are_refused_at_load_with_its_reason(make_truss, model, message):
    with pytest.raises(LoadError, match=message.replace("(", "\\(").replace(")", "\\)").replace("`", ".")) as info:
        truss_lab.load(make_truss(model))
    assert "model/model.py:" in str(info.value) and "\n" not in str(info.value)


def test_config_gets_truss_defaults_and_coerced_values(live):
    tr = live(
        """
        class Model:
            def __init__(self, config, **kwargs):
                self.config = config
            def predict(self, x):
                return self.config
        """,
        config={"runtime": {"predict_concurrency": "3"}, "environment_variables": {"ON": True}},
    )
    config = tr.predict(None).output
    assert config["model_metadata"] == {} and config["runtime"]["streaming_read_timeout"] == 60
    assert config["runtime"]["predict_concurrency"] == 3 == tr.concurrency
    assert config["environment_variables"] == {"ON": "true"}


def test_docker_server_and_trt_llm_trusses_get_one_line(make_truss):
    root = make_truss()
    (root / "config.yaml").write_text("model_name: d\ndocker_server: {start_command: vllm serve, server_port: 8000}\n")
    with pytest.raises(LoadError, match="a docker_server truss .*truss_lab runs trusses whose Model is Python code"):
        truss_lab.load(root)
    (root / "config.yaml").write_text("model_name: t\ntrt_llm: {build: {base_model: llama}}\n")
    (root / "model" / "model.py").unlink()
    with pytest.raises(LoadError, match="a trt_llm truss"):
        truss_lab.load(root)


# ------------------------------------------------------------------------------------ imports


def test_two_trusses_with_the_same_packages_module_stay_apart(live):
    model = "import utils\nclass Model:\n    def predict(self, x):\n        return utils.NAME\n"
    a = live(model, name="a", files={"packages/utils.py": "NAME = 'a'\n"})
    b = live(model, name="b", files={"packages/utils.py": "NAME = 'b'\n"})
    assert (a.predict(None).output, b.predict(None).output) == ("a", "b")


def test_two_live_models_of_one_folder_reload_independently(make_truss):
    root = make_truss("from model.helper import K\nclass Model:\n    def predict(self, x):\n        return K\n",
                      files={"model/helper.py": "K = 1\n"})
    with truss_lab.load(root) as one, truss_lab.load(root, process="worker") as two:  # a second copy: its own process
        (root / "model" / "helper.py").write_text("K = 2\n")
        assert one.reload().ok and one.predict(None).output == 2
        assert two.predict(None).output == 1  # its modules are its own: nothing of it was dropped
        assert two.reload().ok and two.predict(None).output == 2


def test_a_packages_folder_without_init_never_hides_an_installed_module(live):
    tr = live("import yaml\nclass Model:\n    def predict(self, x):\n        return hasattr(yaml, 'safe_load')\n",
              files={"packages/yaml/weights.txt": "not code\n"})
    assert tr.predict(None).output is True
    assert not (sys.modules["yaml"].__file__ or "").startswith(str(tr.bundle.path))


def test_an_unparseable_file_the_model_never_imports_does_not_stop_load(live):
    tr = live(files={"model/scratch.py": "def broken(:\n"})
    assert tr.predict(3).ok


def test_from_model_import_follows_the_version_after_a_reload(make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        from model.helper import K\n        return K\n",
                      files={"model/helper.py": "K = 'v1'\n"})
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == "v1"
        (root / "model" / "helper.py").write_text("K = 'v2'\n")
        assert tr.reload().ok and tr.predict(None).output == "v2"
        assert sys.modules["model.helper"].K == "v2"  # the real module, by its real name, as in Truss's image
    assert "model" not in sys.modules and "model.helper" not in sys.modules  # and gone with the truss

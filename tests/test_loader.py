import os
import sys

import pytest

import truss_lab
from truss_lab import LoadError


def test_two_trusses_with_same_file_names_load_side_by_side(make_truss):
    a = make_truss(
        "from .helpers import tag\nclass Model:\n    def predict(self, x):\n        return tag(x)\n",
        name="a",
        files={"model/helpers.py": "def tag(x):\n    return 'A:' + x\n"},
    )
    b = make_truss(
        "from .helpers import tag\nclass Model:\n    def predict(self, x):\n        return tag(x)\n",
        name="b",
        files={"model/helpers.py": "def tag(x):\n    return 'B:' + x\n"},
    )
    with truss_lab.load(a) as ta, truss_lab.load(b) as tb:  # one truss per process: b in a worker
        assert (ta.process, tb.process) == ("kernel", "worker") and ta.pid == os.getpid() != tb.pid
        assert ta.predict("x").output == "A:x"
        assert tb.predict("x").output == "B:x"
        assert sys.modules["model.helpers"].__file__ == str(a / "model" / "helpers.py")  # the kernel's truss, by its real name
        assert ta.predict("y").output == "A:y"  # b's import did not replace a's helpers
    assert "model.helpers" not in sys.modules and "model.model" not in sys.modules  # closed: its modules left


def test_packages_dir_importable(make_truss):
    root = make_truss(
        "import shoutlib\nclass Model:\n    def predict(self, x):\n        return shoutlib.shout(x)\n",
        files={"packages/shoutlib/__init__.py": "def shout(x):\n    return x.upper() + '!'\n"},
    )
    with truss_lab.load(root) as tr:
        assert tr.predict("hi").output == "HI!"


def test_init_gets_only_accepted_kwargs(make_truss):
    root = make_truss(
        """
        class Model:
            def __init__(self, config, data_dir):
                self.got = (config["model_name"], data_dir.name)
            def predict(self, x):
                return list(self.got)
        """,
        name="kw",
    )
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == ["kw", "data"]


def test_kwargs_gets_all_and_environment(make_truss):
    root = make_truss(
        """
        class Model:
            def __init__(self, **kwargs):
                self.keys = sorted(kwargs)
                self.env = kwargs["environment"]
                self.secret = kwargs["secrets"]["k"]
            def predict(self, x):
                return [self.keys, self.env, self.secret]
        """,
        config={"secrets": {"k": "v"}},
    )
    with truss_lab.load(root, environment={"name": "staging"}) as tr:
        keys, env, secret = tr.predict(None).output
    assert keys == ["config", "data_dir", "environment", "lazy_data_resolver", "secrets"]
    assert env == {"name": "staging"} and secret == "v"


def test_no_init_at_all(make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    with truss_lab.load(root) as tr:
        assert tr.predict(5).output == 5
        assert tr.methods() == ["predict"]


def test_environment_variables_applied_before_import(make_truss, monkeypatch):
    monkeypatch.delenv("TL_TEST_FLAG", raising=False)
    root = make_truss(
        "import os\nFLAG = os.environ['TL_TEST_FLAG']\nclass Model:\n    def predict(self, x):\n        return FLAG\n",
        config={"environment_variables": {"TL_TEST_FLAG": 7}},
    )
    with truss_lab.load(root) as tr:
        assert tr.predict(None).output == "7"
        assert os.environ["TL_TEST_FLAG"] == "7"
    assert "TL_TEST_FLAG" not in os.environ  # put back as it was once the model closed


def test_load_runs_once_and_is_timed(make_truss):
    root = make_truss(
        """
        import time
        COUNT = []
        class Model:
            def load(self):
                COUNT.append(1)
                time.sleep(0.05)
            def predict(self, x):
                return len(COUNT)
        """
    )
    with truss_lab.load(root) as tr:
        assert tr.load_ms >= 50
        assert [tr.predict(None).output for _ in range(3)] == [1, 1, 1]


def test_async_load_is_not_run_and_says_so(make_truss):
    # The Truss server calls load() without awaiting it (tests/conformance: async-load): its body never runs.
    root = make_truss(
        """
        import asyncio
        class Model:
            async def load(self):
                await asyncio.sleep(0)
                self.ready = True
            def predict(self, x):
                return getattr(self, "ready", False)
        """
    )
    with pytest.warns(truss_lab.wrapper.ModelDefinitionWarning, match=r"model.py:4: load\(\) is `async def`.*never runs"):
        tr = truss_lab.load(root)
    with tr:
        assert tr.predict(None).output is False


def test_failing_load_is_retried_once_as_truss_does(make_truss):
    root = make_truss(
        """
        TRIES = []
        class Model:
            def load(self):
                TRIES.append(1)
                if len(TRIES) == 1:
                    raise OSError("flaky disk")
            def predict(self, x):
                return len(TRIES)
        """
    )
    with pytest.warns(RuntimeWarning, match="load\\(\\) failed \\(OSError: flaky disk\\); retrying once"):
        tr = truss_lab.load(root)
    with tr:
        assert tr.predict(None).output == 2


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"model/model.py": None}, "model.py: missing"),
        ({"model/model.py": "class Model:\n    def predict(self, x)\n        return x\n"}, "model/model.py:2"),
        ({"model/model.py": "import no_such_module_xyz\n"}, "ModuleNotFoundError"),
        ({"model/model.py": "class Other:\n    pass\n"}, "no class 'Model'"),
        ({"model/model.py": "class Model:\n    def load(self):\n        pass\n"}, "must have a `predict` or `websocket` method"),
        (
            {"model/model.py": "class Model:\n    def __init__(self):\n        raise ValueError('bad init')\n    def predict(self, x):\n        return x\n"},
            "Model.__init__ failed at t/model/model.py:3: ValueError: bad init",
        ),
        (
            {"model/model.py": "class Model:\n    def load(self):\n        1 / 0\n    def predict(self, x):\n        return x\n"},
            "load() failed at t/model/model.py:3: ZeroDivisionError",
        ),
    ],
    ids=["missing-model-py", "syntax-error", "import-error", "class-missing", "no-predict", "init-raises", "load-raises"],
)
def test_load_errors(make_truss, files, expected):
    root = make_truss()
    for rel, text in files.items():
        if text is None:
            (root / rel).unlink()
        else:
            (root / rel).write_text(text)
    modules_before = set(sys.modules)
    with pytest.raises(LoadError) as info:
        truss_lab.load(root)
    msg = str(info.value)
    assert expected in msg, msg
    assert "\n" not in msg
    leaked = {m for m in set(sys.modules) - modules_before if m == "model" or m.startswith("model.")}
    assert not leaked, leaked  # a failed load leaves no Truss name behind

"""The magics, driven through a real IPython InteractiveShell; assertions on namespace and MIME bundles."""

import os
import re
import subprocess
import sys
import threading

import pytest

pytest.importorskip("IPython")
from IPython.core.interactiveshell import InteractiveShell
from IPython.testing.globalipapp import start_ipython
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import truss_lab


@pytest.fixture
def ip():
    shell = start_ipython() or InteractiveShell.instance()
    shell.run_line_magic("load_ext", "truss_lab")
    yield shell
    for name, value in list(shell.user_ns.items()):
        if isinstance(value, truss_lab.LiveModel):
            value.close()
            del shell.user_ns[name]
    shell.run_line_magic("unload_ext", "truss_lab")


def run(ip, line, cell=None):
    with capture_output() as cap:
        if cell is None:
            ip.run_line_magic("truss", line)
        else:
            ip.run_cell_magic("truss", line, cell)
    return cap


def cell_error(ip, source):
    """Run a cell as a user would; return what it printed (UsageErrors print one line, no traceback)."""
    with capture_output() as cap:
        result = ip.run_cell(source)
    return result, cap.stdout + cap.stderr


def test_init_load_predict_flow(ip, tmp_path):
    path = tmp_path / "my-model"
    cap = run(ip, f"init {path} --name demo")
    assert "wrote a new Truss" in cap.stdout
    cap = run(ip, f"load {path} --no-watch")
    live = ip.user_ns["my_model"]
    assert isinstance(live, truss_lab.LiveModel)
    summary = cap.outputs[0].data["text/plain"]
    for needle in ("demo (class Model) as `my_model`", "load()", "methods   load, preprocess, predict, postprocess", "lock      1", "examples  example"):
        assert needle in summary
    cap = run(ip, "predict [1, 2]")
    data = cap.outputs[0].data
    assert data["text/plain"].startswith("Result from demo v1: ok in")
    assert '{"predictions": [1, 2]}' in data["text/plain"]
    assert "truss-lab-result" in data["text/html"] and "truss-lab-timing" in data["text/html"]
    ip.user_ns["xs"] = [[3]]
    assert '{"predictions": [[3]]}' in run(ip, "predict xs").outputs[0].data["text/plain"]
    assert '{"predictions": [1, 2, 3]}' in run(ip, "predict example:example").outputs[0].data["text/plain"]
    assert '{"predictions": {"k": 1}}' in run(ip, "predict", '{"k": 1}').outputs[0].data["text/plain"]
    assert '{"predictions": [2, 4]}' in run(ip, "predict", "[x * 2 for x in (1, 2)]").outputs[0].data["text/plain"]


def test_load_as_and_concurrency_and_model_flag(ip, tmp_path):
    truss_lab.init(tmp_path / "a")
    truss_lab.init(tmp_path / "b")
    run(ip, f"load {tmp_path / 'a'} --as first --concurrency 3 --no-watch")
    run(ip, f"load {tmp_path / 'b'} --as second --no-watch")
    assert ip.user_ns["first"].concurrency == 3 and not ip.user_ns["first"].watching
    run(ip, "predict --model first 1")
    assert len(ip.user_ns["first"].traces) == 1 and len(ip.user_ns["second"].traces) == 0
    run(ip, "predict 1")  # the current model is the last loaded
    assert len(ip.user_ns["second"].traces) == 1


def test_path_argument_is_passed_as_string(ip, make_truss, tmp_path):
    root = make_truss("class Model:\n    def predict(self, x):\n        return type(x).__name__ + ':' + str(x)[-7:]\n")
    (tmp_path / "cat.png").write_bytes(b"\x89PNG")
    run(ip, f"load {root} --no-watch")
    out = run(ip, f"predict {tmp_path / 'cat.png'}").outputs[0].data["text/plain"]
    assert '"str:cat.png"' in out
    out = run(ip, "predict https://example.invalid/a.jpg").outputs[0].data["text/plain"]
    assert '"str:d/a.jpg"' in out  # the last 7 characters of the URL


@pytest.mark.parametrize(
    "source, message",
    [
        ("%truss predict 1", "no model loaded yet"),
        ("%truss bogus", "invalid choice: 'bogus'"),
        ("%truss load", "the following arguments are required: path"),
        ("%truss load /no/such/truss", "BundleError: /no/such/truss: no such Truss folder"),
        ("%truss load {t} --concurrency 0", "concurrency must be at least 1"),
        ("%truss load {t} --as 1abc", "--as 1abc: not a valid variable name"),
        ("%truss predict --model nope 1", "--model nope: not a LiveModel"),
        ("%truss watch maybe", "invalid choice: 'maybe'"),
        ("%truss load 'unbalanced", "cannot parse the arguments"),
    ],
)
def test_usage_errors_are_one_line(ip, make_truss, source, message):
    root = make_truss()
    result, text = cell_error(ip, source.format(t=root))
    assert message in text, text
    assert "Traceback" not in text and "truss_lab/" not in text


def test_model_error_shows_red_panel_not_traceback(ip, make_truss):
    root = make_truss(
        """
        def helper(x):
            return x["missing"]

        class Model:
            def predict(self, x):
                return helper(x)
        """
    )
    run(ip, f"load {root} --no-watch")
    cap = run(ip, "predict {}")
    data = cap.outputs[0].data
    assert "predict error" in data["text/plain"]
    assert "predict failed at t/model/model.py:3: KeyError: 'missing'" in data["text/plain"]
    html = data["text/html"]
    assert "tl-error" in html and "t/model/model.py:3" in html and "model traceback" in html
    assert "runner.py" not in html  # only the user's frames
    tb = run(ip, "traceback").stdout
    assert 'model.py", line 7, in predict' in tb and 'model.py", line 3, in helper' in tb
    assert "runner.py" not in tb


def test_load_error_names_line(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x)\n        return x\n")
    _, text = cell_error(ip, f"%truss load {root}")
    assert "LoadError: importing model.py failed at t/model/model.py:2: SyntaxError" in text
    assert "Traceback" not in text


def test_reload_status_watch_and_live_notice(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return 'one'\n")
    cap = run(ip, f"load {root}")
    live = ip.user_ns["t"]
    assert live.watching
    notice = cap.outputs[-1]
    assert "v1: loaded; watching for edits" in notice.data["text/plain"]
    # the watcher's notice updates that output in place: capture the update
    updates = []
    arrived = threading.Event()
    original = ip.display_pub.publish

    def publish(data, metadata=None, *args, **kw):
        if kw.get("update") and "truss-lab-reload" in data.get("text/html", ""):
            updates.append(data)
            arrived.set()
        return original(data, metadata, *args, **kw)

    ip.display_pub.publish = publish
    try:
        (root / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return 'two'\n")
        assert arrived.wait(10), "no live notice after a save"
    finally:
        ip.display_pub.publish = original
    assert "v2: swapped predict" in updates[-1]["text/plain"]
    assert '"two"' in run(ip, "predict 0").outputs[0].data["text/plain"]
    out = run(ip, "status").outputs[0].data["text/plain"]
    assert "t v2" in out and "swapped predict" in out and "watching  yes" in out
    assert "not watching" in run(ip, "watch off").stdout and not live.watching
    ev = run(ip, "reload").outputs[0].data["text/plain"]
    assert "no change in behaviour" in ev


def test_bench_and_timeline(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n", examples=[{"name": "a", "input": 1}])
    run(ip, f"load {root} --no-watch")
    data = run(ip, "bench -n 20 -c 4 --as first").outputs[-1].data
    assert data["text/plain"].startswith("bench first with 4 workers\n20 requests, 20 ok")
    assert "truss-lab-report" in data["text/html"] and "<svg" in data["text/html"]
    assert ip.user_ns["first"].count == 20
    tl = run(ip, "timeline").outputs[-1].data
    assert tl["text/plain"].startswith("lock timeline of 20 requests: lock held ") and "| 20 requests" in tl["text/plain"]
    assert tl["text/html"].startswith('<img src="data:image/png;base64,')
    by_worker = run(ip, "timeline --by worker").outputs[-1].data["text/plain"]
    assert re.match(r"lock timeline of [1-4] workers: lock held .* \| 20 requests", by_worker)  # a fast model may not need all 4
    assert run(ip, "bench -n 5 -c 2 --as second 7").outputs[-1].data["text/plain"].startswith("bench second with 2 workers\n5 requests")
    cmp = run(ip, "compare first second").outputs[-1].data["text/plain"]
    assert cmp.splitlines()[0].split() == ["first", "second", "b", "/", "a"] and "throughput" in cmp
    with pytest.raises(UsageError, match="no variable 'third'"):
        ip.run_line_magic("truss", "compare first third")
    ip.user_ns["third"] = 3
    with pytest.raises(UsageError, match="b is int"):
        ip.run_line_magic("truss", "compare first third")


def test_guard_toggle_and_status(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    run(ip, f"load {root} --no-watch --no-guard --as g")
    assert ip.user_ns["g"].guard is False
    with capture_output() as cap:
        ip.run_line_magic("truss", "guard on")
    assert "lock-misuse guard on" in cap.stdout and ip.user_ns["g"].guard is True


def test_help(ip):
    with capture_output() as cap:
        ip.run_line_magic("truss", "--help")
    assert "usage: %truss" in cap.stdout and "predict" in cap.stdout
    assert "usage: %truss" in ip.find_line_magic("truss").__doc__


def test_load_ext_imports_nothing_heavy_and_is_fast():
    code = (
        "import time, sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "t0 = time.perf_counter()\n"
        "ip.run_line_magic('load_ext', 'truss_lab')\n"
        "ms = (time.perf_counter() - t0) * 1000\n"
        "print([m for m in ('tensorflow', 'matplotlib', 'ipywidgets', 'PIL') if m in sys.modules], ms)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    heavy, ms = out.stdout.strip().rsplit(" ", 1)
    assert heavy == "[]"
    assert float(ms) < 3000  # generous sanity bound; the benchmark measures the real figure


def test_predict_expr_keeps_its_quotes_and_spacing(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    run(ip, f"load {root} --no-watch --as q")
    for line, expected in (
        ('predict "not a list"', '"not a list"'),
        ("predict 'it''s'", '"its"'),
        ('predict --model q {"a  b": [1, 2]}', '{"a  b": [1, 2]}'),
        ("predict   [1,  2]", "[1, 2]"),
    ):
        text = run(ip, line).outputs[-1].data["text/plain"]
        assert text.splitlines()[1] == f"  output: {expected}", text
    from truss_lab.notebook.magic_args import split_line

    assert split_line('load -n 3  "a b" c') == ["load", "-n", "3", "a b", "c"]


def test_every_typed_input_is_a_result_or_one_usage_line(ip, make_truss, tmp_path):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    run(ip, f"load {root} --no-watch --as q")
    long_prompt = "x" * 300
    for line, expected in (
        ('predict {"prompt": "%s"}' % long_prompt, '{"prompt": "%s' % long_prompt[:100]),  # not tried as a 300-char path
        ("predict -1", "-1"),
        ("predict -1.5 * 2", "-3.0"),
        ("predict 'it\\'s'", '"it\'s"'),
        ("predict --model q -- --model", None),
        ("predict --method=predict [3]", "[3]"),
    ):
        if expected is None:  # `--` ends the options: the rest is EXPR, here a Python expression that fails
            result, printed = cell_error(ip, f"%truss {line}")
            assert "cannot evaluate '--model'" in printed and "Traceback" not in printed
            continue
        text = run(ip, line).outputs[-1].data["text/plain"]
        assert text.splitlines()[1].startswith(f"  output: {expected}"), (line, text)
    cap = run(ip, 'bench -n 2 -c 1 {"prompt": "%s"}' % long_prompt)
    assert "2 requests" in cap.outputs[-1].data["text/plain"] or "requests" in cap.outputs[-1].data["text/plain"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result, printed = cell_error(ip, f"%truss init {locked / 'new'}")
        if os.geteuid() == 0:  # root writes anyway: use a path under a file instead
            result, printed = cell_error(ip, f"%truss init {root / 'config.yaml' / 'new'}")
        assert "UsageError" in printed and "%truss init" in printed and "Traceback" not in printed, printed
    finally:
        locked.chmod(0o700)


def test_magics_use_the_only_model_in_the_notebook(ip, make_truss):
    ip.run_line_magic("unload_ext", "truss_lab")  # a fresh extension: no current model
    ip.run_line_magic("load_ext", "truss_lab")
    ip.user_ns["pre"] = truss_lab.load(make_truss("class Model:\n    def predict(self, x):\n        return x\n"))
    assert run(ip, "predict 5").outputs[-1].data["text/plain"].startswith("Result from t v1: ok")
    ip.run_line_magic("unload_ext", "truss_lab")
    ip.run_line_magic("load_ext", "truss_lab")
    ip.user_ns["other"] = truss_lab.load(make_truss("class Model:\n    def predict(self, x):\n        return x\n", name="u"))
    with pytest.raises(UsageError, match=r"several models in this notebook \(other, pre\)"):
        ip.run_line_magic("truss", "predict 5")


def test_predict_method_calls_an_openai_compatible_method(ip, make_truss):
    path = make_truss(
        "class Model:\n    def predict(self, x):\n        return x\n"
        "    def chat_completions(self, body):\n        return {'reply': body['q'].upper()}\n"
    )
    run(ip, f"load {path} --as chat --no-watch")
    out = run(ip, "predict --method chat_completions {'q': 'hi'}").outputs[0].data["text/plain"]
    assert '{"reply": "HI"}' in out
    assert ip.user_ns["chat"].traces[-1].method == "chat_completions"
    result, printed = cell_error(ip, "%truss predict --method embeddings {}")
    assert "has no embeddings() method (its OpenAI-compatible methods: chat_completions)" in printed
    assert "Traceback" not in printed


def test_reloading_into_one_variable_lets_the_old_models_go(ip, tmp_path):
    import gc
    import weakref

    truss_lab.init(tmp_path / "m")
    refs = []
    for _ in range(3):
        run(ip, f"load {tmp_path / 'm'} --as m")
        run(ip, "widget")  # a panel per model, as a user re-running cells makes them
        refs.append(weakref.ref(ip.user_ns["m"]))
    gc.collect()
    assert [r() is None for r in refs] == [True, True, False]  # only the model in `m` is alive
    assert len(ip.magics_manager.registry["TrussMagics"]._notices) == 1


def test_watch_with_examples_shows_the_diff(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return {'v': x}\n", examples=[{"name": "one", "input": 1}])
    run(ip, f"load {root} --as ex --no-watch")
    cap = run(ip, "watch on --examples")
    live = ip.user_ns["ex"]
    assert live.watching and "examples will be re-run" in cap.outputs[0].data["text/plain"]
    assert live.wait_for_examples(30)
    got = threading.Event()
    live.on_examples(lambda d: got.set())
    n = live.reload_count
    (root / "model" / "model.py").write_text("class Model:\n    def predict(self, x):\n        return {'v': x + 1}\n")
    live.wait_for_reload(since=n)
    assert got.wait(30) and "one: changed" in str(live.examples_diff)


def test_load_shows_the_schema_of_typed_io(ip, make_truss):
    root = make_truss("import pydantic\nclass In(pydantic.BaseModel):\n    prompt: str\nclass Out(pydantic.BaseModel):\n    text: str\n"
                      "class Model:\n    def predict(self, x: In) -> Out:\n        return Out(text=x.prompt)\n")
    summary = run(ip, f"load {root} --no-watch --as typed").outputs[0].data["text/plain"]
    assert "schema    In -> Out (tr.schema(), GET /v1/models/model/schema)" in summary


def test_timeline_last_zero_is_a_usage_line(ip, make_truss):
    root = make_truss("class Model:\n    def predict(self, x):\n        return x\n")
    run(ip, f"load {root} --no-watch --as z")
    run(ip, "predict 1")
    result, printed = cell_error(ip, "%truss timeline --last 0")
    assert "--last 0: N must be 1 or more" in printed and "Traceback" not in printed


def test_init_python_config_then_load_predict_and_save_a_single_file_model(ip, tmp_path):
    """`%truss init --python-config` writes what `truss init --python-config` writes; `%truss load
    my_model.py` binds it as a model (not a chain) named after its file, and speaks of the file and its
    class, never of the truss generated from it - in the summary, a save's reload, an error."""
    pytest.importorskip("truss_chains")
    path = tmp_path / "pc"
    assert "wrote a single-file model at" in run(ip, f"init {path} --python-config --name my-model").stdout
    source = path / "my_model.py"
    summary = run(ip, f"load {source}").outputs[0].data["text/plain"]
    assert "my-model (class Model in my_model.py) as `my_model`" in summary and f"from      {source}" in summary
    tr = ip.user_ns["my_model"]
    assert isinstance(tr, truss_lab.LiveModel) and tr.watching
    assert "output: 3" in run(ip, "predict", '{"input_field": 3}').outputs[0].data["text/plain"]
    text = source.read_text()
    n = tr.reload_count
    source.write_text(text.replace("return input_field", "return input_field * 10"))
    event = tr.wait_for_reload(since=n, timeout=60)
    assert event.kind == "methods" and event.summary().startswith("my-model v2: swapped (my_model.py; its state kept)")
    assert "output: 30" in run(ip, "predict", '{"input_field": 3}').outputs[0].data["text/plain"]
    n = tr.reload_count
    source.write_text(text.replace("return input_field", "return input_field *"))
    event = tr.wait_for_reload(since=n, timeout=60)
    assert not event.ok and re.search(r"my_model\.py:\d+: SyntaxError", event.summary()), event.summary()
    status = run(ip, "status").outputs[0].data["text/plain"]
    assert "reload failed" in status and "still serving v2" in status
    assert "output: 30" in run(ip, "predict", '{"input_field": 3}').outputs[0].data["text/plain"]  # the old code serves
    result, printed = cell_error(ip, "%truss bench -n 3")
    assert f"{path / 'my_model.examples.yaml'}: no inputs given" in printed and "Traceback" not in printed


def test_a_trailing_comment_is_not_an_argument(ip, tmp_path):
    """`%truss load my-truss   # watches it` as the docs write it: a `#` starting a word outside
    quotes ends the line, as in a shell and in Python; a `#` inside a string or a word stays."""
    path = tmp_path / "c"
    run(ip, f"init {path}   # the scaffold")
    run(ip, f"load {path} --no-watch   # binds `c`")
    assert isinstance(ip.user_ns["c"], truss_lab.LiveModel)
    assert '{"predictions": "a # b"}' in run(ip, "predict 'a # b'   # a string with a #").outputs[0].data["text/plain"]
    assert '{"predictions": [1, 2, 3]}' in run(ip, "predict example:example  # by name").outputs[0].data["text/plain"]

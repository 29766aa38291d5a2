"""Issue 26 (first part): a Truss Chain built from Truss's own generated chainlet trusses, each a
LiveModel, calling each other over 127.0.0.1 - compared with `chains.run_local`."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import textwrap
import threading
import warnings

import pytest

pytest.importorskip("truss_chains")

import truss_lab  # noqa: E402
from conftest import sigint_default_in_child  # noqa: E402
from truss_lab.chains import load_chain  # noqa: E402

CHAIN = """
import asyncio
import time
from typing import AsyncIterator

import pydantic
import truss_chains as chains
from marks import mark  # a helper module next to the chain (every chainlet's packages/ has it)


class Item(pydantic.BaseModel):
    text: str
    n: int


class Upper(chains.ChainletBase):
    remote_config = chains.RemoteConfig(compute=chains.Compute(predict_concurrency=1))

    def run_remote(self, text: str) -> str:
        time.sleep(0.05)  # long enough for concurrent calls to queue on this chainlet's lock
        return text.upper()


class Count(chains.ChainletBase):
    async def run_remote(self, item: Item) -> int:
        await asyncio.sleep(0)
        return len(item.text) * item.n if item.n >= 0 else 1.5  # 1.5 passes locally, not across the wire


class Spell(chains.ChainletBase):
    async def run_remote(self, text: str) -> AsyncIterator[str]:  # a streaming chainlet
        for letter in text:
            yield mark(letter)


@chains.mark_entrypoint
class Entry(chains.ChainletBase):
    remote_config = chains.RemoteConfig(compute=chains.Compute(predict_concurrency=8))

    def __init__(self, upper: Upper = chains.depends(Upper), count: Count = chains.depends(Count, use_binary=True),
                 spell: Spell = chains.depends(Spell)):  # Count's calls go as msgpack (binary transport)
        self._upper, self._count, self._spell = upper, count, spell

    async def run_remote(self, text: str, n: int = 2) -> dict[str, str]:
        up = self._upper.run_remote(text)
        counted = await self._count.run_remote(Item(text=up, n=n))
        spelled = "".join([part async for part in self._spell.run_remote(up)])
        return {"upper": up, "count": str(counted), "spelled": spelled}
"""


MARKS = """
def mark(letter):
    return letter + "."
"""


def _write_chain(folder):
    (folder / "marks.py").write_text(MARKS)
    path = folder / "word_chain.py"
    path.write_text(textwrap.dedent(CHAIN))
    return path


@pytest.fixture(scope="module")
def chain_file(tmp_path_factory):
    return _write_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def chain(chain_file):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_chain(chain_file)
    yield c
    c.close()


def _run_local(chain_file, entry="Entry", **kwargs):
    import truss_chains as chains
    from truss_chains import framework

    registry = framework._global_chainlet_registry
    getattr(registry, "_default", registry).clear()  # run_local's own import of the source, as a script would
    spec = importlib.util.spec_from_file_location("word_chain_local", chain_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["word_chain_local"] = module
    sys.path.insert(0, str(chain_file.parent))  # as `python word_chain.py` would have it
    try:
        spec.loader.exec_module(module)
        with chains.run_local():
            answer = getattr(module, entry)().run_remote(**kwargs)
            return asyncio.run(answer) if asyncio.iscoroutine(answer) else answer
    finally:
        sys.path.remove(str(chain_file.parent))
        sys.modules.pop("marks", None)
        del sys.modules["word_chain_local"]
        getattr(registry, "_default", registry).clear()


def test_the_chain_answers_as_run_local_on_valid_inputs(chain, chain_file):
    assert sorted(chain.chainlets) == ["Count", "Entry", "Spell", "Upper"] and chain.entrypoint == "Entry"
    assert list(chain.chainlets)[-1] == "Entry"  # dependencies first
    assert all(isinstance(live, truss_lab.LiveModel) for live in chain.chainlets.values())
    for kwargs in ({"text": "hi", "n": 3}, {"text": "chains"}):
        assert chain.run(**kwargs) == _run_local(chain_file, **kwargs)
    result = chain.predict({"text": "ab", "n": 1})
    assert result.ok and result.output == {"upper": "AB", "count": "2", "spelled": "A.B."}
    assert all(chain.chainlets[n].traces for n in ("Upper", "Count", "Spell"))  # each chainlet served its part


def test_a_value_that_does_not_survive_the_wire_fails_here_as_on_deploy(chain, chain_file):
    assert _run_local(chain_file, text="x", n=-1) == {"upper": "X", "count": "1.5", "spelled": "X."}  # locally: no wire, no check
    with pytest.raises(truss_lab.ModelError) as info:
        chain.run(text="x", n=-1)
    message = str(info.value)
    assert "Count" in message and "int" in message, message  # the chainlet, and the type that refused it


def test_each_chainlet_has_its_own_lock(chain):
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(chain.run(text=f"w{i}", n=1))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4
    assert chain.chainlets["Upper"].concurrency == 1 and chain.chainlets["Entry"].concurrency == 8
    upper = chain.chainlets["Upper"].report(last=4)
    assert upper.max_lock_holders == 1  # its predict_concurrency, whatever the entrypoint sends
    assert chain.chainlets["Entry"].report(last=4).max_lock_holders > 1  # the entrypoint's calls overlapped


EXAMPLES_YAML = """
- name: short
  input: {text: ab, n: 1}
- name: long
  input: {text: chains, n: 3}
"""


def test_the_magics_and_the_panel_on_a_chain(tmp_path):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output

    from truss_lab.chains import ChainReloadEvent
    from truss_lab.notebook.widgets import widget

    chain_file = _write_chain(tmp_path)
    chain_file.with_name("word_chain.examples.yaml").write_text(EXAMPLES_YAML)  # the examples next to the chain
    ip = start_ipython() or InteractiveShell.instance()
    ip.run_line_magic("load_ext", "truss_lab")
    try:
        with capture_output() as cap, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ip.run_line_magic("truss", f"load {chain_file} --as wc")
            ip.run_line_magic("truss", 'predict {"text": "ok", "n": 1}')
            ip.run_line_magic("truss", "predict example:long")
            ip.run_line_magic("truss", "timeline")
            ip.run_line_magic("truss", "reload")
            ip.run_line_magic("truss", "status --model wc")
        chain = ip.user_ns["wc"]
        status = cap.outputs[-1].data["text/plain"]  # the chain's watching and reloads, not its entrypoint worker's
        assert status.startswith("chain     Entry v1: Upper, Count, Spell, Entry") and "watching  yes" in status, status
        assert "reload    chain v1: no chainlet's code changed" in status, status
        assert "as `wc`" in cap.stdout and isinstance(chain, truss_lab.chains.Chain) and chain.watching
        texts = [o.data["text/plain"] for o in cap.outputs]
        assert any('"upper": "OK"' in t for t in texts) and any('"count": "18"' in t for t in texts), texts
        assert [e.name for e in chain.examples] == ["short", "long"]
        assert any("chainlet tracks" in t for t in texts), texts  # the chain's timeline: a lane per chainlet
        assert isinstance(chain.reload_history[-1], ChainReloadEvent) and len(chain.trees()) == 2
        panel = widget(chain)
        assert panel.live is chain.entry and panel.chain is chain
        assert [label for label, _ in panel.examples.options][1:] == ["short", "long"]
        panel.examples.value = "short"
        panel.run_button.click()
        assert panel._idle.wait(60) and panel.runs[-1].result.output == {"upper": "AB", "count": "2", "spelled": "A.B."}  # as sent
        assert len(chain.trees()) == 3  # the panel's run is a request tree too
    finally:
        ip.user_ns.pop("wc").close()
        ip.run_line_magic("unload_ext", "truss_lab")


def test_the_chain_serves_its_entrypoint_as_deployed(chain):
    httpx = pytest.importorskip("httpx")
    server = chain.serve()
    r = httpx.post(server.url + "/v1/models/model:predict", json={"text": "up", "n": 2}, timeout=60)
    assert r.status_code == 200 and r.json() == {"upper": "UP", "count": "4", "spelled": "U.P."}


def test_the_example_digits_chain_answers_as_the_digits_truss(tmp_path):
    import base64

    from conftest import EXAMPLES

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = load_chain(EXAMPLES / "digits-chain" / "digits_chain.py")
        digits = truss_lab.load(EXAMPLES / "digits")
    with chain, digits:
        assert list(chain.chainlets) == ["Preprocess", "Classify", "Digits"]
        assert (chain.chainlets["Preprocess"].concurrency, chain.chainlets["Classify"].concurrency) == (4, 1)
        for png in sorted((EXAMPLES / "digits" / "data" / "samples").glob("*.png")):
            answer = chain.run(image_b64=base64.b64encode(png.read_bytes()).decode(), top_k=1)
            expected = digits.predict({"image": str(png), "top_k": 1}).output["predictions"]
            assert list(answer) == list(expected) == [png.stem], (png.name, answer, expected)


def test_a_file_that_is_no_chain_is_one_line(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("x = 1\n")
    with pytest.raises(truss_lab.TrussLabError, match=r"plain\.py: No `target_name` was specified") as info:
        load_chain(path)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------ hot reload


@pytest.fixture
def fresh_chain(tmp_path):
    path = _write_chain(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = load_chain(path)
    yield c
    c.close()


def _state(chain):
    """Per chainlet: (its serving version, its worker process, how many reloads it has had)."""
    return {name: (live.version, live.pid, live.reload_count) for name, live in chain.chainlets.items()}


def test_a_save_that_changes_one_chainlet_reloads_it_alone(fresh_chain):
    chain, path = fresh_chain, fresh_chain.source
    assert chain.run(text="ab", n=1)["count"] == "2"
    before = _state(chain)
    path.write_text(path.read_text().replace("len(item.text) * item.n", "len(item.text) * item.n * 10"))
    event = chain.reload()
    assert event.kind == "methods" and event.changed == ["Count"], event
    assert sorted(event.untouched) == ["Entry", "Spell", "Upper"] and "Count swapped" in str(event)
    assert chain.run(text="ab", n=1) == {"upper": "AB", "count": "20", "spelled": "A.B."}
    after = _state(chain)
    for name in ("Upper", "Spell", "Entry"):
        assert after[name] == before[name]  # untouched: same version, same process, never reloaded
    assert after["Count"][:2] == (before["Count"][0] + 1, before["Count"][1])  # swapped in its own process
    assert chain.chainlets["Count"].reload_history[-1].kind == "methods"  # its instance kept (the swap rule)


def test_a_chainlet_whose_init_changed_is_rebuilt_and_a_helper_reloads_its_users_only(fresh_chain):
    chain, path = fresh_chain, fresh_chain.source
    chain.run(text="a")
    before = _state(chain)
    path.write_text(path.read_text().replace("        self._upper, self._count, self._spell = upper, count, spell",
                                             "        self._upper, self._count, self._spell = upper, count, spell\n        self.built = 2"))
    event = chain.reload()
    assert event.kind == "full" and event.changed == ["Entry"], event
    assert any("Entry.__init__" in c for c in event.chainlets["Entry"].changed), event.chainlets["Entry"]
    assert chain.chainlets["Entry"].reload_history[-1].kind == "full" and chain.chainlets["Entry"].pid == before["Entry"][1]
    (path.parent / "marks.py").write_text(MARKS.replace('"."', '"!"'))  # only Spell uses it
    event = chain.reload()
    assert event.changed == ["Spell"] and event.kind == "methods", event
    assert chain.run(text="ab")["spelled"] == "A!B!"
    assert _state(chain)["Upper"] == before["Upper"] and _state(chain)["Count"] == before["Count"]


def test_the_watcher_reloads_a_saved_chain_and_a_broken_save_keeps_the_old_code(fresh_chain):
    import watchfiles

    chain, path = fresh_chain, fresh_chain.source
    good = path.read_text()
    counts = chain.reloader.watch_filter(watchfiles)  # every file a push copies, as `truss chains push --watch`
    assert counts(watchfiles.Change.modified, str(path)) and counts(watchfiles.Change.modified, str(path.with_name("x.examples.yaml")))
    assert counts(watchfiles.Change.modified, str(path.with_name("06.ipynb")))
    assert not counts(watchfiles.Change.modified, str(path.parent / ".ipynb_checkpoints" / "06-checkpoint.ipynb"))
    assert not counts(watchfiles.Change.modified, str(path.parent / "__pycache__" / "word_chain.cpython-311.pyc"))
    n = chain.reload_count
    path.with_name("06.ipynb").write_text("{}")  # the notebook next to the chain, saved: no code names it
    path.with_name("chain.json").write_text("{}")  # an exported trace
    assert chain.reload().kind == "unchanged" and chain.reload_count == n + 1  # asked: told nothing changed
    chain.watch()
    n = chain.reload_count
    path.write_text(good.replace("return text.upper()", "return text.upper() + '?'"))
    event = chain.wait_for_reload(n, timeout=60)
    assert event.ok and event.changed == ["Upper"] and event.trigger == "watch", event.error or event
    assert chain.run(text="a")["upper"] == "A?"
    n = chain.reload_count
    path.write_text(good.replace("return text.upper()", "return text.upper(("))
    event = chain.wait_for_reload(n, timeout=60)
    assert event.kind == "failed" and "word_chain.py:" in (event.location or ""), event
    assert chain.run(text="a")["upper"] == "A?"  # the old code keeps serving
    n = chain.reload_count
    count = _state(chain)["Count"]
    renamed = good.replace("return text.upper()", "return text.upper() + '?'").replace("Spell", "Spelling")
    path.write_text(renamed)  # a renamed chainlet: one added, one gone, its caller rebuilt, the others untouched
    event = chain.wait_for_reload(n, timeout=60)
    assert event.ok and event.removed == ["Spell"], event
    assert event.chainlets["Spelling"].changed == ["added"] and event.chainlets["Entry"].kind == "full", event
    assert sorted(event.untouched) == ["Count", "Upper"] and "Spelling added" in str(event) and "Spell removed" in str(event)
    assert list(chain.chainlets) == ["Upper", "Count", "Spelling", "Entry"] and _state(chain)["Count"] == count
    assert chain.run(text="a") == {"upper": "A?", "count": "4", "spelled": "A.?."}
    assert [c.chainlet for c in chain.trees()[-1].calls] == ["Upper", "Count", "Spelling"]


# ------------------------------------------------------------------------------ traces across chainlets


def test_one_trace_tree_per_request_across_the_chainlets(fresh_chain):
    chain = fresh_chain
    threads = [threading.Thread(target=chain.run, kwargs={"text": f"t{i}", "n": 1}) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with pytest.raises(truss_lab.ModelError):
        chain.run(text="x", n=-1)  # Count refuses 1.5: the tree shows where it failed
    trees = chain.trees()
    assert len(trees) == 4 and all(tree.chainlet == "Entry" for tree in trees)
    for tree in trees[:3]:
        assert [c.chainlet for c in tree.calls] == ["Upper", "Count", "Spell"]  # in the order Entry called them
        assert {c.trace.trace_id for c in tree.walk()} == {tree.trace.trace_id}  # one trace per request
        assert all(c.trace.parent_span_id == tree.trace.span_id for c in tree.calls)
        assert all(tree.trace.start <= c.trace.start and c.trace.end <= tree.trace.end for c in tree.calls)
    failed = trees[-1]
    assert not failed.trace.ok and [c.chainlet for c in failed.calls] == ["Upper", "Count"]
    assert not failed.calls[-1].trace.ok and "int" in failed.calls[-1].trace.error
    assert len({tree.trace.trace_id for tree in trees}) == 4
    report = chain.report()
    assert report["Count"].count == 4 and report["Spell"].count == 3 and report["Upper"].max_lock_holders == 1
    text = str(report)
    assert "request trees:" in text and "└─ Spell" in text and "FAILED in predict" in text, text
    assert chain.report(last=1).trees == trees[-1:] and chain.report(last=1)["Spell"].count == 0


def test_the_timeline_has_a_lane_per_chainlet(fresh_chain):
    chain = fresh_chain
    chain.run(text="ab", n=1)
    chain.run(text="cd", n=1)
    tl = truss_lab.timeline(chain)
    assert tl.by == "chainlet"
    lanes = {row.split(" ")[0] for row in tl.rows}
    assert lanes == {"Upper", "Count", "Spell", "Entry"} and tl.rows[-1].startswith("Entry")
    for name in lanes:  # every chainlet's calls are drawn on its own lane
        rows = {i for i, r in enumerate(tl.rows) if r.split(" ")[0] == name}
        assert sum(1 for s in tl.segments if s.row in rows and s.stage == "predict") == 2, name
    assert "Upper" in tl.lane_label and tl.lock_size == 1  # the smallest lock's occupancy
    assert tl.png()[:4] == b"\x89PNG" and "<svg" in tl.svg()


# ------------------------------------------------------------------------------ check on the real Truss server


def test_truss_lab_check_of_a_chain_on_the_real_truss_server(truss_env, chain_file):
    from truss_lab.serving.check import check_chain

    report = check_chain(chain_file, [{"text": "ab", "n": 2}, {"text": "x", "n": -1}], make_chain=load_chain)
    assert report.server_loaded and report.ok, str(report)
    assert [e.truss_status for e in report.examples] == [200, 500] and [e.lab_status for e in report.examples] == [200, 500]


def test_check_names_the_chainlet_whose_requirement_is_left_out(truss_env, tmp_path):
    from truss_lab.serving.check import check_chain

    path = tmp_path / "needs_pyinstrument.py"
    path.write_text(textwrap.dedent('''
        import truss_chains as chains


        class Bar(chains.ChainletBase):  # no pip_requirements: pyinstrument is in the notebook's environment only
            def __init__(self):
                import pyinstrument

                self._version = pyinstrument.__version__

            async def run_remote(self, n: int) -> int:
                return n + 1


        @chains.mark_entrypoint
        class Top(chains.ChainletBase):
            def __init__(self, bar: Bar = chains.depends(Bar)):
                self._bar = bar

            async def run_remote(self, n: int) -> int:
                return await self._bar.run_remote(n)
    '''))
    report = check_chain(path, [{"n": 1}], make_chain=load_chain)
    assert not report.ok and not report.server_loaded
    assert any(f.message.startswith("Bar: ") and "pyinstrument" in f.message for f in report.findings), report.findings


def test_the_example_chains_examples_are_the_digits_samples():
    import base64

    from conftest import EXAMPLES
    from truss_lab.bundle import read_examples

    examples = read_examples(EXAMPLES / "digits-chain" / "digits_chain.examples.yaml")
    assert examples
    for e in examples:
        png = (EXAMPLES / "digits" / "data" / "samples" / f"{e.name}.png").read_bytes()
        assert base64.b64decode(e.input["image_b64"]) == png, e.name


FLAKY = """
import truss_chains as chains

CALLS = {}  # per text: how many calls this chainlet got (module state, as model code keeps it)


class Flaky(chains.ChainletBase):
    async def run_remote(self, text: str) -> str:
        CALLS[text] = CALLS.get(text, 0) + 1
        if CALLS[text] == 1:
            raise RuntimeError(f"transient failure for {text}")
        return f"{text}:{CALLS[text]}"


@chains.mark_entrypoint
class Caller(chains.ChainletBase):
    def __init__(self, flaky: Flaky = chains.depends(Flaky, retries=2)):
        self._flaky = flaky

    async def run_remote(self, text: str) -> str:
        return await self._flaky.run_remote(text)
"""


def test_a_dependency_is_retried_as_deployed_and_the_tree_shows_each_try(tmp_path):
    path = tmp_path / "flaky_chain.py"
    path.write_text(FLAKY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = load_chain(path)
    with chain:
        assert chain.run(text="a") == "a:2"  # retries=2: the first call failed over the wire, the second answered
        tree = chain.trees()[-1]
        assert [(c.chainlet, c.trace.ok) for c in tree.calls] == [("Flaky", False), ("Flaky", True)]
        assert "transient failure for a" in tree.calls[0].trace.error
        assert chain.run(text="b") == "b:2" and len(chain.trees()) == 2


def test_the_request_trees_export_to_perfetto_and_opentelemetry(fresh_chain, tmp_path):
    import json

    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    chain = fresh_chain
    chain.run(text="ab", n=1)
    chain.run(text="cd", n=2)
    report = chain.report()
    memory = InMemorySpanExporter()
    report.to_otel(exporter=memory)
    spans = memory.get_finished_spans()
    roots = [s for s in spans if s.name == "predict-endpoint"]
    assert len(roots) == 8  # 2 requests x 4 chainlets
    by_trace: dict[int, list] = {}
    for s in roots:
        by_trace.setdefault(s.context.trace_id, []).append(s)
    assert sorted(by_trace) == sorted(int(t.trace.trace_id, 16) for t in chain.trees())  # the recorded trace ids
    for members in by_trace.values():
        entry = next(s for s in members if s.resource.attributes["service.name"] == "Entry")
        assert entry.parent is None
        assert sorted(s.resource.attributes["service.name"] for s in members if s.parent is not None
                      and s.parent.span_id == entry.context.span_id) == ["Count", "Spell", "Upper"]
    path = tmp_path / "chain.json"
    events = report.to_chrome_trace(path)["traceEvents"]
    assert json.loads(path.read_text())["traceEvents"] == events
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(processes.values()) == ["Count", "Entry", "Spell", "Upper"]
    starts = [e for e in events if e["ph"] == "s"]
    assert len(starts) == 6 and len([e for e in events if e["ph"] == "f"]) == 6  # a flow arrow per call
    entry_pid = next(pid for pid, name in processes.items() if name == "Entry")
    assert all(e["pid"] == entry_pid for e in starts)


def test_the_cli_predicts_and_benches_a_chain(tmp_path, capsys):
    import json

    from truss_lab.cli import main

    path = _write_chain(tmp_path)
    path.with_name("word_chain.examples.yaml").write_text(EXAMPLES_YAML)
    assert main(["predict", str(path), "--input", '{"text": "ab", "n": 2}']) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"upper": "AB", "count": "4", "spelled": "A.B."}
    assert "request tree:" in err and "└─ Spell" in err  # where the time went, chainlet by chainlet
    assert main(["predict", str(path), "--example", "long"]) == 0
    assert json.loads(capsys.readouterr()[0])["count"] == "18"
    assert main(["profile", str(path), "--input", '{"text": "ab", "n": 2}', "-n", "2"]) == 0  # its entrypoint's stages
    assert "predict" in capsys.readouterr()[0]
    assert main(["bench", str(path), "-n", "4", "--no-progress"]) == 0
    out, _ = capsys.readouterr()
    assert "4 requests, 4 ok" in out and "chain Entry: 4 requests" in out and "Spell" in out


def test_a_chainlet_added_then_removed_while_the_chain_serves(fresh_chain):
    chain, path = fresh_chain, fresh_chain.source
    good = path.read_text()
    extra = '''

class Extra(chains.ChainletBase):
    def __init__(self):
        self.bonus = 1 // BONUS

    async def run_remote(self, n: int) -> int:
        return n + self.bonus


BONUS = 0
'''
    uses_extra = (good.replace("spell: Spell = chains.depends(Spell)):", "spell: Spell = chains.depends(Spell), extra: Extra = chains.depends(Extra)):")
                  .replace("self._upper, self._count, self._spell = upper, count, spell",
                           "self._upper, self._count, self._spell, self._extra = upper, count, spell, extra")
                  .replace('"spelled": spelled}', '"spelled": spelled, "extra": str(await self._extra.run_remote(n))}')
                  .replace("@chains.mark_entrypoint", extra.strip() + "\n\n\n@chains.mark_entrypoint"))
    path.write_text(uses_extra)
    event = chain.reload()  # Extra's __init__ raises: it is not added, Entry keeps its old code
    assert event.kind == "failed" and event.error.startswith("Extra: ") and "ZeroDivisionError" in event.error, event
    assert "Extra" not in chain.chainlets and chain.run(text="a") == {"upper": "A", "count": "2", "spelled": "A."}
    path.write_text(uses_extra.replace("BONUS = 0", "BONUS = 1"))
    event = chain.reload()
    assert event.ok and event.chainlets["Extra"].changed == ["added"] and event.chainlets["Entry"].kind == "full", event
    assert chain.run(text="a", n=3)["extra"] == "4" and list(chain.chainlets)[-2:] == ["Extra", "Entry"]
    path.write_text(good)
    event = chain.reload()
    assert event.ok and event.removed == ["Extra"] and "Extra" not in chain.chainlets and "Extra" not in chain.urls, event
    assert chain.run(text="a") == {"upper": "A", "count": "2", "spelled": "A."}


def test_a_rebuilt_chainlets_old_stubs_close_their_clients(fresh_chain):
    """The aiohttp session a chainlet's async stub opened keeps a connection to the chainlet it calls;
    a full reload retires the instance and closes its stubs' clients (no connection, no "Unclosed
    client session" left behind); a method swap keeps the instance and its session."""
    psutil = pytest.importorskip("psutil")
    chain, path = fresh_chain, fresh_chain.source
    chain.run(text="a")
    port = int(chain.urls["Count"]["predict_url"].split(":")[2].split("/")[0])

    def to_count() -> int:
        return sum(1 for c in psutil.Process(chain.entry.pid).net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED)

    assert to_count() == 1  # kept alive by the session
    path.write_text(path.read_text().replace("        self._upper, self._count, self._spell = upper, count, spell",
                                             "        self._upper, self._count, self._spell = upper, count, spell\n        self.z = 1"))
    assert chain.reload().chainlets["Entry"].kind == "full"
    chain.run(text="b")
    assert to_count() == 1  # the new session's; the old one was closed with its instance
    path.write_text(path.read_text().replace('"count": str(counted)', '"count": str(counted) + "!"'))
    event = chain.reload()
    assert event.chainlets["Entry"].kind == "methods", event
    assert chain.run(text="c")["count"] == "2!" and to_count() == 1  # the same instance and session


def test_truss_lab_serve_of_a_chain_answers_and_reloads_on_save(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import time

    httpx = pytest.importorskip("httpx")
    path = _write_chain(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "truss_lab.cli", "serve", str(path), "--port", str(port), "--max-body-mb", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=sigint_default_in_child)
    url = f"http://127.0.0.1:{port}/v1/models/model:predict"

    def answer():
        try:
            return httpx.post(url, json={"text": "ab", "n": 1}, timeout=10).json()
        except httpx.TransportError:
            return None

    def wait_for(expected, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if answer() == expected:
                return
            time.sleep(0.05)  # polling the server with a deadline
        raise AssertionError(f"never answered {expected}")

    try:
        wait_for({"upper": "AB", "count": "2", "spelled": "A.B."})
        assert httpx.post(url, json={"text": "a" * (2 << 20), "n": 1}, timeout=30).status_code == 413  # --max-body-mb 1
        path.write_text(path.read_text().replace("return text.upper()", "return text.upper() + '?'"))
        wait_for({"upper": "AB?", "count": "3", "spelled": "A.B.?."})
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "serving the chain Entry" in out and "Upper swapped" in out, out


ERRORS_CHAIN = """
import truss_chains as chains


class Lookup(chains.ChainletBase):
    def run_remote(self, key: str) -> str:
        return {"a": "alpha"}[key]


@chains.mark_entrypoint
class Ask(chains.ChainletBase):
    def __init__(self, lookup: Lookup = chains.depends(Lookup)):
        self._lookup = lookup

    def run_remote(self, key: str) -> str:
        try:
            return self._lookup.run_remote(key)
        except KeyError as exc:  # the remote error arrives as its own class, as deployed
            return f"missing: {type(exc).__name__}"
"""


def test_a_chainlets_exception_reaches_its_caller_as_its_own_class(tmp_path):
    """The stub re-raises a chainlet's KeyError as KeyError (its `error` body is the RemoteErrorDetail
    dict, sent as JSON as the Truss server sends an HTTPException's detail), so `except KeyError:`
    around a chainlet call works here as in run_local() and deployed."""
    path = tmp_path / "ask_chain.py"
    path.write_text(textwrap.dedent(ERRORS_CHAIN))
    local = _run_local(path, entry="Ask", key="z")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chain = load_chain(path)
    with chain:
        assert chain.run(key="a") == "alpha"
        assert chain.run(key="z") == local == "missing: KeyError"

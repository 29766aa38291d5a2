"""Issue 32: a chain as deployed - each chainlet in a process of its own, the code generation out of
the kernel, a save that costs what it changed, watching what `truss chains push --watch` watches."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("truss_chains")

import truss_lab  # noqa: E402
from truss_lab.chains import load_chain  # noqa: E402

CHAIN = '''
import truss_chains as chains
from helpers import shout  # a helper module next to the chain

GREETING = chains.make_abs_path_here("greeting.txt")  # a file next to the chain its code reads


class Weights(chains.ChainletBase):
    remote_config = chains.RemoteConfig(
        docker_image=chains.DockerImage(data_dir=chains.make_abs_path_here("data")),
        assets=chains.Assets(secret_keys=["hf_token"]),
    )

    def __init__(self, context: chains.DeploymentContext = chains.depends_context()):
        self._weights = (context.data_dir / "weights.txt").read_text().strip()
        self._token = context.secrets["hf_token"]

    def run_remote(self) -> str:
        return f"{self._weights}/{self._token}"


@chains.mark_entrypoint
class Hello(chains.ChainletBase):
    def __init__(self, weights: Weights = chains.depends(Weights)):
        self._weights = weights

    def run_remote(self, name: str) -> str:
        greeting = open(GREETING.abs_path).read().strip()
        return shout(f"{greeting} {name} ({self._weights.run_remote()})")
'''

OTHER_CHAIN = '''
import truss_chains as chains


@chains.mark_entrypoint
class Other(chains.ChainletBase):
    def run_remote(self) -> str:
        return "other"
'''


def _write(folder: Path) -> Path:
    (folder / "data").mkdir()
    (folder / "data" / "weights.txt").write_text("w1\n")
    (folder / "data" / "big.bin").write_bytes(os.urandom(4 << 20))
    (folder / "greeting.txt").write_text("hello\n")
    (folder / "helpers.py").write_text("def shout(text):\n    return text.upper()\n")
    marker = folder / "script-ran"
    # a script next to the chain, which nothing imports: it must never run
    (folder / "script.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nwhile True:\n    pass\n")
    (folder / "other_chain.py").write_text(textwrap.dedent(OTHER_CHAIN))  # a second chain in the same folder
    path = folder / "hello_chain.py"
    path.write_text(textwrap.dedent(CHAIN))
    return path


def _run_local(path: Path, **kwargs):
    """What `python hello_chain.py` with `chains.run_local()` does, in this (the kernel's) process."""
    import truss_chains as chains
    from truss_chains import framework

    registry = framework._global_chainlet_registry
    getattr(registry, "_default", registry).clear()  # each run is a script of its own (`python hello_chain.py`)
    spec = importlib.util.spec_from_file_location("hello_chain", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    sys.modules["hello_chain"] = module
    try:
        spec.loader.exec_module(module)
        with chains.run_local(secrets={"hf_token": "t0"}, data_dir=path.parent / "data"):
            return module.Hello().run_remote(**kwargs)
    finally:
        sys.path.remove(str(path.parent))
        for name in ("hello_chain", "helpers"):
            sys.modules.pop(name, None)


def test_a_chain_runs_a_process_per_chainlet_and_never_enters_the_kernel(tmp_path, monkeypatch):
    folder = tmp_path / "chain"
    folder.mkdir()
    path = _write(folder)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = set(sys.modules)
    local = _run_local(path, name="ada")  # run_local first, then load_chain, in one kernel
    with load_chain(path, secrets={"hf_token": "t0"}) as chain:
        assert chain.run(name="ada") == local == "HELLO ADA (W1/T0)"
        pids = {name: c.pid for name, c in chain.chainlets.items()}
        assert len(set(pids.values()) | {os.getpid()}) == 3  # each chainlet in a process of its own
        assert _run_local(path, name="bo") == "HELLO BO (W1/T0)"  # and run_local after it
        new = set(sys.modules) - before
        assert not {"hello_chain", "helpers", "script", "other_chain"} & new  # the kernel never imported them
        assert not (folder / "script-ran").exists()  # a file the chain does not import never runs
    with load_chain(folder / "other_chain.py") as other:  # the folder's second chain
        assert other.run() == "other"
    assert list(cwd.iterdir()) == []  # nothing written into the working directory (no .ruff_cache)
    assert not (folder / "__pycache__").exists()  # nor into the chain's folder


def test_a_chain_whose_code_fails_to_import_names_its_file_and_line(tmp_path):
    path = tmp_path / "pk_chain.py"
    path.write_text("import truss_chains as chains\nimport lib\n\n\n@chains.mark_entrypoint\nclass E(chains.ChainletBase):\n"
                    "    def run_remote(self) -> str:\n        return 'x'\n")
    with pytest.raises(truss_lab.TrussLabError) as info:
        load_chain(path)
    message = str(info.value)
    assert "pk_chain.py:2" in message and "ModuleNotFoundError: No module named 'lib'" in message, message
    assert "\n" not in message and "chainlet_" not in message  # one line, never generated code


def test_a_save_costs_what_it_changed_and_every_file_of_the_folder_reloads_its_users(tmp_path):
    folder = tmp_path / "chain"
    folder.mkdir()
    path = _write(folder)
    with load_chain(path, secrets={"hf_token": "t0"}) as chain:
        chain.watch()
        big = chain.chainlets["Weights"].bundle.data_dir / "big.bin"
        stamp = (big.stat().st_ino, big.stat().st_mtime_ns)
        (folder / "notes.ipynb").write_text("{}")  # a notebook saved beside the chain: copied, reloads nothing...
        n = chain.reload_count
        path.write_text(path.read_text().replace("return shout(", "return '! ' + shout("))
        event = chain.wait_for_reload(since=n, timeout=60)
        assert event.ok and list(event.chainlets) == ["Hello"], event
        assert event.chainlets["Hello"].kind == "methods", event  # ...and never makes the next edit a rebuild
        n = chain.reload_count
        path.write_text(path.read_text() + "\n# a comment\n")
        event = chain.wait_for_reload(since=n, timeout=60)  # a comment-only save is said, as for a truss
        assert event.kind == "unchanged", event
        assert chain.run(name="ada") == "! HELLO ADA (W1/T0)"
        assert (big.stat().st_ino, big.stat().st_mtime_ns) == stamp  # the 4 MB data file was not copied again
        n = chain.reload_count
        (folder / "greeting.txt").write_text("bonjour\n")  # a text file next to the chain: watched too
        event = chain.wait_for_reload(since=n, timeout=60)
        assert event.ok and chain.run(name="ada") == "! BONJOUR ADA (W1/T0)", event
        n = chain.reload_count
        (folder / "data" / "weights.txt").write_text("w2\n")  # the data_dir: its chainlet rebuilt
        event = chain.wait_for_reload(since=n, timeout=60)
        assert event.ok and "Weights" in event.chainlets and chain.run(name="ada") == "! BONJOUR ADA (W2/T0)", event
        root = chain.root
    assert not root.exists()  # closed: its scratch folder went


def test_a_scratch_folder_of_a_process_that_is_gone_is_removed_at_the_next_start(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no process has now (a kernel killed with SIGKILL)
    stale = [Path(tempfile.mkdtemp(prefix=f"truss-lab-{kind}-{gone.pid}-")) for kind in ("chain", "worker")]
    path = tmp_path / "one.py"
    path.write_text(textwrap.dedent(OTHER_CHAIN))
    with load_chain(path) as chain:
        assert chain.run() == "other"
        assert not any(p.exists() for p in stale)
        assert chain.root.name.startswith(f"truss-lab-chain-{os.getpid()}-")


def test_hot_reload_on_a_served_chain_reloads_the_chain(tmp_path):
    """POST /hot-reload on the chain's server (its entrypoint's process) regenerates the chain and
    reloads the chainlets whose code changed - here one that is not the entrypoint."""
    httpx = pytest.importorskip("httpx")
    folder = tmp_path / "chain"
    folder.mkdir()
    path = _write(folder)
    with load_chain(path, secrets={"hf_token": "t0"}) as chain:
        server = chain.serve()
        predict = server.url + "/v1/models/model:predict"
        assert httpx.post(predict, json={"name": "ada"}, timeout=60).json() == "HELLO ADA (W1/T0)"
        path.write_text(path.read_text().replace('return f"{self._weights}/{self._token}"', 'return "swapped"'))
        r = httpx.post(server.url + "/hot-reload", timeout=120)
        assert r.status_code == 200 and r.json() == {"msg": "Hot reload complete"}, r.text
        assert httpx.post(predict, json={"name": "ada"}, timeout=60).json() == "HELLO ADA (SWAPPED)"
        assert chain.reload_history[-1].chainlets["Weights"].kind == "methods"
        path.write_text(path.read_text().replace('return "swapped"', 'return "swapped" +'))  # broken
        r = httpx.post(server.url + "/hot-reload", timeout=120)
        assert r.status_code == 422 and "hello_chain.py" in r.json()["error"], r.text
        assert httpx.post(predict, json={"name": "ada"}, timeout=60).json() == "HELLO ADA (SWAPPED)"


def test_a_chainlets_error_names_the_chains_own_file_not_its_generated_copy(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    path = folder / "ie_chain.py"
    path.write_text("import truss_chains as chains\n\n\nclass Lookup(chains.ChainletBase):\n"
                    "    def run_remote(self, key: str) -> str:\n        return {'a': 'alpha'}[key]\n\n\n"
                    "@chains.mark_entrypoint\nclass Ask(chains.ChainletBase):\n"
                    "    def __init__(self, lookup: Lookup = chains.depends(Lookup)):\n        self._lookup = lookup\n\n"
                    "    def run_remote(self, key: str) -> str:\n        return self._lookup.run_remote(key)\n")
    with load_chain(path) as chain:
        error = chain.chainlets["Lookup"].run({"key": "b"}).error  # the chainlet's own request
        assert error.location == "mine/ie_chain.py:6", error
        text = path.read_text()
        path.write_text(text.replace("    def run_remote(self, key: str) -> str:\n        return {",
                                     "    def __init__(self):\n        self.n = 1 / 0\n\n    def run_remote(self, key: str) -> str:\n        return {"))
        event = chain.reload()
        assert event.kind == "failed" and event.location == "mine/ie_chain.py:6", event
        assert "chainlet_" not in event.error and "mine/ie_chain.py:6: ZeroDivisionError" in event.error, event.error


def test_a_data_dir_outside_the_chains_folder_is_watched_too(tmp_path):
    """`data_dir=make_abs_path_here("../weights")` (the example chain shares the digits truss's data):
    the chain's folders are its root and such data_dirs; a save there rebuilds the chainlet."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.txt").write_text("w1")
    folder = tmp_path / "chain"
    folder.mkdir()
    path = folder / "dd_chain.py"
    path.write_text("import truss_chains as chains\n\n\n@chains.mark_entrypoint\nclass W(chains.ChainletBase):\n"
                    "    remote_config = chains.RemoteConfig(docker_image=chains.DockerImage(\n"
                    "        data_dir=chains.make_abs_path_here('../weights')))\n\n"
                    "    def __init__(self, context: chains.DeploymentContext = chains.depends_context()):\n"
                    "        self._w = (context.data_dir / 'w.txt').read_text()\n\n"
                    "    def run_remote(self) -> str:\n        return self._w\n")
    with load_chain(path) as chain:
        assert chain.run() == "w1"
        chain.watch()
        n = chain.reload_count
        (tmp_path / "weights" / "w.txt").write_text("w2")
        event = chain.wait_for_reload(since=n, timeout=60)
        assert event.ok and chain.run() == "w2", event


LEGACY_CHAIN = '''
import httpx
import truss_chains as chains
from truss_chains.remote_chainlet.truss_chainlet import TrussHandle


class Legacy(chains.TrussChainlet):
    truss_dir = "../legacy"  # an existing truss folder, next to the chain's


@chains.mark_entrypoint
class Entry(chains.ChainletBase):
    def __init__(self, legacy: TrussHandle = chains.depends(Legacy)):
        self._legacy = legacy

    async def run_remote(self, n: int) -> int:
        url, headers = self._legacy.http_call_args()  # as deployed: the sibling's URL and the chain's key
        async with httpx.AsyncClient() as client:
            r = await client.post(url, json={"n": n}, headers=headers)
        r.raise_for_status()
        return r.json()["doubled"]
'''


def test_a_truss_chainlet_runs_its_truss_folder_as_one_of_the_chains_processes(tmp_path):
    from conftest import write_truss

    legacy = write_truss(tmp_path / "legacy", "import time\nclass Model:\n    def predict(self, x):\n"
                         "        time.sleep(0.01)\n        return {'doubled': x['n'] * 2}\n",
                         config={"runtime": {"predict_concurrency": 3}})
    folder = tmp_path / "chain"
    folder.mkdir()
    path = folder / "legacy_chain.py"
    path.write_text(textwrap.dedent(LEGACY_CHAIN))
    config = (legacy / "config.yaml").read_bytes()
    with load_chain(path) as chain:
        assert chain.run(n=5) == 10
        assert list(chain.chainlets) == ["Legacy", "Entry"]
        legacy_tr = chain.chainlets["Legacy"]
        assert legacy_tr.pid not in (os.getpid(), chain.entry.pid) and legacy_tr.concurrency == 3  # its own lock
        tree = chain.trees()[-1]
        assert [c.chainlet for c in tree.calls] == ["Legacy"]  # in the request's tree, under its caller
        assert "Legacy" in chain.report().reports  # and in the per-chainlet report the timeline draws
        chain.watch()
        n = chain.reload_count
        model = legacy / "model" / "model.py"
        model.write_text(model.read_text().replace("x['n'] * 2", "x['n'] * 3"))  # its folder, outside the chain's
        event = chain.wait_for_reload(since=n, timeout=60)
        assert event.ok and list(event.chainlets) == ["Legacy"] and event.chainlets["Legacy"].kind == "methods", event
        assert chain.run(n=5) == 15
        n = chain.reload_count
        model.write_text(model.read_text().replace("x['n'] * 3", "x['n'] * (3"))  # broken: named in the user's folder
        event = chain.wait_for_reload(since=n, timeout=60)
        assert event.kind == "failed" and event.location.startswith("legacy/model/model.py:"), event
        assert chain.run(n=5) == 15
    assert (legacy / "config.yaml").read_bytes() == config  # the user's truss folder is never written


def test_a_chain_with_a_truss_chainlet_answers_as_on_the_real_truss_server(tmp_path, truss_env):
    from conftest import write_truss

    from truss_lab.serving.check import check_chain

    write_truss(tmp_path / "legacy", "class Model:\n    def predict(self, x):\n        return {'doubled': x['n'] * 2}\n")
    folder = tmp_path / "chain"
    folder.mkdir()
    path = folder / "legacy_chain.py"
    path.write_text(textwrap.dedent(LEGACY_CHAIN))
    report = check_chain(path, [{"n": 2}, {"n": "x"}], make_chain=load_chain)
    assert report.server_loaded and report.ok, str(report)
    assert [e.truss_status for e in report.examples] == [200, 400] and [e.lab_status for e in report.examples] == [200, 400]

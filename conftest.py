"""Settings shared by tests/ and the notebooks nbval runs (their kernels inherit this environment),
and the executed docs.

Executed docs: every ```python block of README.md and docs/*.md runs as a test of `make test`, in
the order of its page, each page in a namespace of its own (sybil), from the repository's root; an
```ipython block runs as a notebook cell does, through an IPython shell with `%load_ext truss_lab`
(so `%truss ...` magics are checked too). A block that cannot run here (a placeholder path such as
`my_chain.py`, a fixed port) is preceded by `<!-- skip: next "why" -->`: the reason is on the page, for the
reader too. Whatever a page left open (a model, a chain, a server) is closed when the page ends.
"""

from __future__ import annotations

import os
from pathlib import Path

# TensorFlow's C++ start-up lines (CPU features, oneDNN) differ per machine: keep them out of the
# notebook outputs nbval compares. Python-level warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # oneDNN reorders float sums: same numbers everywhere

# Every Python process the tests start imports tests/offline/sitecustomize.py: it refuses connections
# that leave 127.0.0.1 (notebooks included), so the suite proves it needs no network.
_OFFLINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "offline")
if _OFFLINE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_OFFLINE, os.environ.get("PYTHONPATH")) if p)

ROOT = Path(__file__).resolve().parent

try:
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser
except ImportError:  # the docs extra is not installed: the pages are not collected
    Sybil = None

_SHELL = None


def _shell():
    """One IPython shell for the pages' ```ipython blocks (a fresh truss_lab extension per page)."""
    global _SHELL
    if _SHELL is None:
        from IPython.core.interactiveshell import InteractiveShell

        _SHELL = InteractiveShell.instance()
    return _SHELL


def _run_ipython(example) -> None:
    from IPython.utils.capture import capture_output

    shell = _shell()
    if not example.namespace.get("_truss_lab_ext"):
        shell.run_line_magic("load_ext", "truss_lab")
        example.namespace["_truss_lab_ext"] = True
    shell.user_ns.update({k: v for k, v in example.namespace.items() if not k.startswith("_")})
    with capture_output() as shown:
        result = shell.run_cell(example.parsed)
    example.namespace.update({k: v for k, v in shell.user_ns.items() if not k.startswith("_")})
    error = result.error_before_exec or result.error_in_exec
    if error is not None:
        raise AssertionError(f"the cell failed: {type(error).__name__}: {error}\n{shown.stdout}{shown.stderr}")


def _setup(namespace: dict) -> None:
    """Each page runs in a scratch folder holding a copy of examples/: it names paths from the
    repository's root, as a reader's shell does, and what it writes (`%truss init my-truss`, an edit
    to show a hot reload) never lands in the checkout."""
    import shutil
    import tempfile

    namespace["_cwd"] = os.getcwd()
    namespace["_scratch"] = scratch = tempfile.mkdtemp(prefix="truss-lab-docs-")
    shutil.copytree(ROOT / "examples", Path(scratch) / "examples")
    os.chdir(scratch)


def _teardown(namespace: dict) -> None:
    try:
        if namespace.get("_truss_lab_ext"):
            shell = _shell()
            for name, value in list(shell.user_ns.items()):
                namespace.setdefault(name, value)
                if not name.startswith("_"):
                    shell.user_ns.pop(name, None)
            shell.run_line_magic("unload_ext", "truss_lab")
        for value in list(namespace.values()):  # what the page left open: models, chains, servers
            for method in ("close", "stop"):
                if type(value).__module__.startswith("truss_lab") and callable(getattr(value, method, None)):
                    try:
                        getattr(value, method)()
                    except Exception:
                        pass
                    break
    finally:
        import shutil

        os.chdir(namespace.pop("_cwd"))
        shutil.rmtree(namespace.pop("_scratch"), ignore_errors=True)


if Sybil is not None:
    pytest_collect_file = Sybil(
        parsers=[PythonCodeBlockParser(), CodeBlockParser("ipython", _run_ipython), SkipParser()],
        patterns=["README.md", "docs/*.md"],
        setup=_setup,
        teardown=_teardown,
        name="docs",
    ).pytest()

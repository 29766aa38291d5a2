"""The docs cannot lie: the site builds offline with --strict, the command-line page is the parser's
own help, and the executed-docs configuration (the root conftest.py, sybil) fails a page whose
documented call is broken. The pages' own blocks run as tests of their own (docs/*.md, README.md)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytest_plugins = ["pytester"]
pytest.importorskip("mkdocs")
pytest.importorskip("sybil")


def test_the_site_builds_offline_and_strict(tmp_path):
    """`make docs`: every page in the nav, no broken link, anchor or API reference (--strict)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    for command in ("init", "predict", "bench", "profile", "serve", "snapshot", "test", "check"):
        assert f"truss-lab {command}" in cli  # each command's --help, from the parser
    assert "--python-config" in cli and "--max-body-mb" in cli
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "truss_lab.load" in api and "LiveModel" in api and "Profile" in api
    home = (tmp_path / "site" / "index.html").read_text()
    assert "Quickstart" in home and 'href="truss-semantics/"' in home  # the README, its docs/ links the site's own


def test_the_readme_is_short_and_keeps_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make lab", "make test"]


# Durations the docs may state: settings and thresholds of the code (or of Truss), and the scenario a
# picture was drawn from - not how long something takes. Each with why.
SETTINGS = {
    ("truss-semantics.md", "(default 60 s)"): "runtime.streaming_read_timeout's default, Truss's",
    ("truss-semantics.md", "after 1 s"): "Truss's retry of a failing load()",
    ("hot-reload.md", "(60 s)"): "reload_drain_timeout's default",
    ("hot-reload.md", "within 12 ms"): "the watcher's debounce",
    ("lock.md", "under 1 ms"): "the guard's threshold for telling idle time",
    ("lock.md", "at least 20 ms"): "the guard's idle-finding threshold",
    ("lock.md", "of 1 ms or more"): "the guard's threshold for reading CPU pressure",
    ("lock.md", "a 40 ms download"): "the pictures' scenario (make_pictures.py)",
    ("lock.md", "the 10 ms of compute"): "the pictures' scenario (make_pictures.py)",
}


def test_no_figure_of_time_without_the_script_that_measures_it():
    """A duration in the docs' prose is an example's placeholder (`… ms`), a setting (SETTINGS), or sits
    on the benchmarks page, which `make bench` writes: a measured figure anywhere else would drift."""
    pattern = re.compile(r"\b\d+(?:\.\d+)?\s?(?:ms|µs|us|s|seconds?|minutes?)\b")
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if page.name == "benchmarks.md":
            continue
        allowed = [phrase for (name, phrase) in SETTINGS if name == page.name]
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                if not any(m.group(0) in phrase and phrase in line for phrase in allowed):
                    found.append(f"{page.name}:{n}: {m.group(0)!r} in {line.strip()[:100]}")
    assert not found, "\n".join(found)


BROKEN_PAGE = '''# A page

```python
import truss_lab
tr = truss_lab.load("examples/digits")
print(tr.predict(tr.example("three")).output)
```

A call the docs promise and the code no longer has:

```python
tr.predict_with_a_typo(tr.example("three"))
```

<!-- skip: next "a placeholder path" -->
```python
truss_lab.load("my-truss")
```
'''


def test_a_page_whose_documented_call_is_broken_fails(pytester):
    """The root conftest.py's configuration, as `make test` collects docs/*.md and README.md: the first
    block runs (from a scratch copy of examples/), the broken one fails with its line, the marked one
    is skipped with its reason."""
    pytester.makeconftest((ROOT / "conftest.py").read_text().replace(
        'ROOT = Path(__file__).resolve().parent', f'ROOT = Path({str(ROOT)!r})'))
    (pytester.path / "docs").mkdir()
    (pytester.path / "docs" / "page.md").write_text(BROKEN_PAGE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:nbval", "-rs", "docs/page.md")
    result.assert_outcomes(passed=2, failed=1, skipped=1)  # sybil counts the skip directive as an example too
    result.stdout.fnmatch_lines(["*page.md line=11*", "*AttributeError*predict_with_a_typo*", "*a placeholder path*"])


def _reference():
    import truss_lab
    from truss_lab.chains import Chain
    from truss_lab.live import LiveModel
    from truss_lab.profile import Profile

    functions = [getattr(truss_lab, n) for n in ("load", "load_chain", "init", "check", "compare", "timeline", "widget", "read_bundle")]
    methods = [getattr(LiveModel, n) for n in ("predict", "run", "stream", "call", "predict_batch", "bench", "report", "profile",
                                               "reload", "watch", "wait_for_reload", "serve", "check", "restart", "example", "schema")]
    methods += [getattr(Chain, n) for n in ("run", "predict", "trees", "report", "reload", "watch", "serve", "check")]
    methods += [getattr(Profile, n) for n in ("tree", "hotspots", "call_tree")]
    return functions + methods


def test_the_public_api_is_documented_for_reference():
    """The API page is made of the docstrings (issue 34): every public member of the main classes says
    what it is, and every function and method a newcomer calls says each of its parameters, what it
    returns, what it raises where it raises, and shows a call."""
    import inspect

    import truss_lab
    from truss_lab.chains import Chain
    from truss_lab.live import LiveModel
    from truss_lab.profile import Profile

    missing = []
    for cls in (LiveModel, truss_lab.Result, truss_lab.Trace, truss_lab.Report, Profile, Chain):
        if not inspect.getdoc(cls):
            missing.append(cls.__name__)
        for klass in cls.__mro__[:-1]:
            for name, member in vars(klass).items():
                if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                    continue
                target = member.fget if isinstance(member, property) else member
                if not (getattr(target, "__doc__", None) or "").strip():
                    missing.append(f"{cls.__name__}.{name}")
    assert not missing, f"no docstring: {missing}"
    incomplete = []
    for f in _reference():
        doc = inspect.getdoc(f) or ""
        params = [p for p in inspect.signature(f).parameters.values() if p.name != "self"]
        wanted = ["Example:", "```python"] + (["Args:"] if params else [])
        wanted += [f"**{p.name}:" if p.kind is p.VAR_KEYWORD else f"{p.name}:" for p in params]
        if inspect.signature(f).return_annotation not in (None, "None") and "Yields:" not in doc:
            wanted.append("Returns:")
        lacking = [w for w in wanted if w not in doc]
        if lacking:
            incomplete.append(f"{f.__qualname__}: {lacking}")
    assert not incomplete, "\n".join(incomplete)

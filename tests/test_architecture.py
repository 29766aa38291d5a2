"""The package's one rule, checked: the core never needs a front end, and no module imports in a circle.

Core: truss_lab's top-level modules. Front ends: display/, notebook/, serving/, devtools/ and cli.py.
The facade (`truss_lab/__init__.py`) and the old-name re-exports (ray_serve.py, localhttp.py) may import
anything. Imports are read with `ast`, those inside functions included, except in display hooks
(`_repr_*_`, `__repr__`: a value may hand itself to display/) and `if TYPE_CHECKING:` blocks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "truss_lab"
FRONT_ENDS = ("truss_lab.display", "truss_lab.notebook", "truss_lab.serving", "truss_lab.devtools", "truss_lab.cli")
FACADES = ("truss_lab", "truss_lab.ray_serve", "truss_lab.localhttp")
# Core functions whose whole job is to start a front end (the only core -> front-end imports allowed).
FRONT_END_ENTRIES = {("truss_lab.live", "serve"), ("truss_lab.live", "check"),
                     ("truss_lab.chains", "check"), ("truss_lab.chains", "timeline")}
FRONT_END_LIBRARIES = (
    "IPython", "ipywidgets", "ipykernel", "matplotlib", "PIL", "tensorflow", "keras",
    "uvicorn", "fastapi", "starlette", "ray", "tqdm", "watchfiles",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_display_hook(name: str) -> bool:
    return name == "__repr__" or (name.startswith("_repr_") and name.endswith("_"))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The truss_lab modules an import statement names (a `from pkg import mod` names pkg.mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    if node.level:
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    if len(found) < len(node.names) and target in MODULES:
        found.append(target)
    return found


def imports(name: str) -> list[tuple[str, str]]:
    """(imported module, enclosing function or '') for every truss_lab import in module `name`."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not _is_display_hook(child.name):
                    visit(child, child.name)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit(stmt, func)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                out.extend((target, func) for target in _resolve(name, child))
            else:
                visit(child, func)

    visit(tree, "")
    return out


def is_front_end(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FRONT_ENDS)


def is_core(name: str) -> bool:
    return not is_front_end(name) and name not in FACADES


def test_the_layout_tells_core_from_front_ends():
    core = sorted(n for n in MODULES if is_core(n))
    assert {"truss_lab.runner", "truss_lab.live", "truss_lab.wrapper", "truss_lab.reload", "truss_lab.lock"} <= set(core)
    assert all(n.count(".") == 1 for n in core), f"core modules belong at the package's top level: {core}"
    for package in FRONT_ENDS[:-1]:
        assert (ROOT / package.replace(".", "/") / "__init__.py").is_file(), package


def test_core_modules_never_import_front_end_modules():
    bad = [
        f"{name} imports {target}" + (f" in {func}()" if func else "")
        for name in MODULES
        if is_core(name)
        for target, func in imports(name)
        if is_front_end(target) and (name, func) not in FRONT_END_ENTRIES
    ]
    assert not bad, "core must not import front ends:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_truss_lab_modules():
    graph = {name: {target for target, _ in imports(name) if target != name} for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_import_reader_sees_function_level_imports():
    """The checks above would pass vacuously if imports inside functions were missed."""
    assert ("truss_lab.serving.server", "serve") in imports("truss_lab.live")
    assert any(t == "truss_lab.notebook.magics" for t, _ in imports("truss_lab"))
    assert not any(t.startswith("truss_lab.display") for t, _ in imports("truss_lab.trace"))  # hooks only


def test_core_runs_a_model_without_front_end_libraries(tmp_path):
    import truss_lab

    truss_lab.init(tmp_path / "t")
    code = (
        "import sys, truss_lab\n"
        f"tr = truss_lab.load({str(tmp_path / 't')!r})\n"
        "tr.predict(1)\n"
        "tr.reload(full=True)\n"
        f"libs = [m for m in {FRONT_END_LIBRARIES!r} if m in sys.modules]\n"
        f"ends = [m for m in sys.modules if m.startswith({FRONT_ENDS!r})]\n"
        "print(libs, ends)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_old_import_paths_still_work():
    code = (
        "from truss_lab.localhttp import LocalServer\n"
        "from truss_lab.devtools.localhttp import LocalServer as L2\n"
        "assert LocalServer is L2\n"
        "import truss_lab\n"
        "assert truss_lab.timeline.__module__ == 'truss_lab.display.plots'\n"
        "assert truss_lab.compare.__module__ == 'truss_lab.display.compare'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _code_lines(path: Path) -> int:
    """Lines of `path` outside its docstrings: the reference docstrings (Args, Returns, Raises, an
    example: the API page is made of them, issue 34) are read on the docs site, not held with the code."""
    import ast

    text = path.read_text()
    docs = 0
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docs += first.end_lineno - first.lineno + 1
    return len(text.splitlines()) - docs


def test_no_module_is_over_500_lines():
    """A module a reader holds in one sitting (issue 31): split by what it is about, not by size alone."""
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py") if (n := _code_lines(p)) > 500}
    assert not long, long


def test_nothing_stands_in_for_the_import_system():
    """One truss per process, under its real names (issue 31): no module proxies in sys.modules, no
    wrapped registries, no patched spawn preparation - the names and everything found by them are
    Python's own."""
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for gone in ("NameProxy", "get_preparation_data", "_ScopedRegistry", "registry_cls.register", "load_dynamic_chainlet_config ="):
        assert gone not in source, gone

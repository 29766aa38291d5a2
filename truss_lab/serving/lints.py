"""The lints of `truss-lab check`: what only fails on deploy, read from the truss's code and config
(nothing is run). Each finding has file:line and a fix; a lint that cannot be sure is a warning that
says why, never an error.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..bundle import Bundle


@dataclass
class Finding:
    """One thing that would go wrong (error) or differently (warning) on deploy."""

    severity: str  # "error" | "warning"
    kind: str  # requirement | async-load | python-version | secret | data-file | env-var | lock | server-load
    message: str
    fix: str
    location: str | None = None  # file:line

    def line(self) -> str:
        where = f"{self.location}: " if self.location else ""
        return f"{self.severity}: {where}{self.message} — {self.fix}"


def requirements_of(bundle: Bundle) -> list[str]:
    """`requirements` and the lines of `requirements_file`, as the image installs them."""
    reqs = list(bundle.requirements)
    req_file = bundle.config.get("requirements_file")
    if req_file:
        path = bundle.path / str(req_file)
        if path.is_file():
            reqs += [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [r for r in reqs if r]


def lint(bundle: Bundle, env_python: str | None = None, server_site: Path | None = None) -> list[Finding]:
    """What only fails on deploy, read from the truss's code and config (nothing is run)."""
    files = [p for folder in (bundle.model_dir, bundle.packages_dir) if folder.is_dir()
             for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts]
    trees: list[tuple[Path, ast.AST]] = []
    for path in files:
        try:
            trees.append((path, ast.parse(path.read_bytes(), filename=str(path))))
        except SyntaxError:
            continue  # the load itself reports it
    findings: list[Finding] = []
    findings += _lint_imports(bundle, trees, server_site)
    findings += _lint_async_load(bundle, trees)
    if env_python and bundle.python_version and bundle.python_version != env_python:
        findings.append(Finding("warning", "python-version",
                                f"config.yaml asks for python_version {bundle.python_version}; this check's Truss server runs {env_python}",
                                f"deploy and check on the same Python: set python_version: {env_python}, or check with that Python",
                                f"{bundle.config_path.name}"))
    findings += _lint_secrets(bundle, trees)
    findings += _lint_data_files(bundle, trees)
    findings += _lint_env_vars(bundle, trees)
    return findings


def _where(bundle: Bundle, path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(bundle.path.parent)}:{getattr(node, 'lineno', 1)}"


def _local_names(bundle: Bundle) -> set[str]:
    names = {Path(bundle.model_module_dir).parts[0]}
    for folder in (bundle.packages_dir, bundle.model_dir):
        if folder.is_dir():
            names |= {p.stem for p in folder.iterdir() if p.suffix == ".py" or p.is_dir()}
    return names


def requirement_names(requirements: list[str]) -> tuple[set[str], list[str]]:
    """(the distribution names the requirements name, the URL/path ones whose name is only a guess).

    `tqdm>=4`, `name[extra] @ https://...` and `-e git+https://...#egg=name` name their package; a bare
    `git+https://host/org/mylib.git` or a wheel URL names none until installed: its name is guessed
    from the URL (`mylib`), and the lint only warns about imports it might provide."""
    names: set[str] = set()
    opaque: list[str] = []
    for raw in requirements:
        req = re.sub(r"^(-e|--editable)\s+", "", raw.strip())
        egg = re.search(r"#.*\begg=([A-Za-z0-9._-]+)", req)
        named = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*@", req)
        if egg:
            names.add(_norm(egg.group(1)))
        elif named:
            names.add(_norm(named.group(1)))
        elif "://" in req or req.startswith(("git+", ".", "/")) or re.search(r"\.(whl|zip|tar\.gz|tgz)$", req):
            last = req.split("#")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
            last = re.sub(r"\.git$", "", last)
            if last.endswith(".whl"):
                last = last.split("-")[0]
            else:
                last = re.sub(r"(-\d[\w.]*)?(\.tar\.gz|\.tgz|\.zip)$", "", last)
            names.add(_norm(last))
            opaque.append(raw.strip())
        else:
            names.add(_norm(re.split(r"[<>=!~;\[ @]", req, maxsplit=1)[0]))
    return names, opaque


def _lint_imports(bundle: Bundle, trees, server_site: Path | None) -> list[Finding]:
    import importlib.metadata as md

    local = _local_names(bundle)
    required, opaque = requirement_names(requirements_of(bundle))
    dists = md.packages_distributions()
    on_server = {p.name.split("-")[0].split(".")[0] for p in server_site.iterdir()} if server_site else set()
    seen: set[str] = set()
    out = []
    for path, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for full in names:
                top = full.split(".")[0]
                if top in seen or top in local or top in sys.stdlib_module_names or top in on_server or top == "truss_lab":
                    continue
                providers = {_norm(d) for d in dists.get(top, [])} | {_norm(top)}
                if any(req in providers or req.startswith(_norm(top)) for req in required):
                    continue
                seen.add(top)
                provider = sorted(dists.get(top, [top]))[0]
                if opaque:  # cannot be sure: a URL requirement may well provide it
                    out.append(Finding("warning", "requirement",
                                       f"`import {top}` is not covered by a named requirement; it may come from {opaque[0]}"
                                       f"{f' (or {len(opaque) - 1} other URL requirements)' if len(opaque) > 1 else ''}, "
                                       "whose modules are known only once it is installed",
                                       f"if it does not, add `{provider}` to requirements in {bundle.config_path.name}",
                                       _where(bundle, path, node)))
                    continue
                out.append(Finding("error", "requirement",
                                   f"`import {top}` is not covered by `requirements` (and the Truss server's own environment lacks it)",
                                   f"add `{provider}` to requirements in {bundle.config_path.name}", _where(bundle, path, node)))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower().strip()


def _model_class(bundle: Bundle, trees) -> tuple[Path, ast.ClassDef] | None:
    for path, tree in trees:
        if path == bundle.model_file:
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name == bundle.model_class_name:
                    return path, node
    return None


def _lint_async_load(bundle: Bundle, trees) -> list[Finding]:
    found = _model_class(bundle, trees)
    if found is None:
        return []
    path, cls = found
    for node in cls.body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "load":
            return [Finding("error", "async-load", "`async def load` is never awaited by the Truss server: its body does not run on deploy",
                            "make it a plain `def load(self)` (run async setup with asyncio.run inside it)", _where(bundle, path, node))]
    return []


def _string_key(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _named(node: ast.AST, *words: str) -> bool:
    text = ast.unparse(node).lower()
    return any(w in text for w in words)


def _lint_secrets(bundle: Bundle, trees) -> list[Finding]:
    declared = set(bundle.secrets)
    out, seen = [], set()
    for path, tree in trees:
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Subscript) and _named(node.value, "secret"):
                key = _string_key(node.slice)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and _named(node.func.value, "secret") and node.args:
                key = _string_key(node.args[0])
            if key and key not in declared and key not in seen:
                seen.add(key)
                out.append(Finding("error", "secret", f"secret {key!r} is read but not declared under `secrets` in config.yaml",
                                   f"add `{key}: null` under secrets (and set its value in your Baseten secrets)", _where(bundle, path, node)))
    return out


_READERS = ("open", "load", "read", "loadtxt", "genfromtxt", "imread", "from_file", "load_model", "from_pretrained", "fromfile")


def _data_path(node: ast.AST) -> list[str] | None:
    """The parts of a `data_dir / "a" / "b.npy"` chain (["a", "b.npy"]), None if it is not one or any
    part is not a constant."""
    parts: list[str] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        part = _string_key(node.right)
        if part is None:
            return None
        parts.insert(0, part)
        node = node.left
    root = ast.unparse(node).split(".")[-1].lower()
    return parts if parts and root.strip("_") in ("data_dir", "datadir", "data_path", "data") else None


def _lint_data_files(bundle: Bundle, trees) -> list[Finding]:
    out, seen = [], set()
    for path, tree in trees:
        inner = set()  # a chain's own left-hand sides (data_dir / "weights" in data_dir / "weights" / "w.npy")
        read = set()  # chains passed straight to a reader: open(...), np.load(...), ...
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                inner.add(id(node.left))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("read_bytes", "read_text", "open") and not node.args:
                read.add(id(node.func.value))  # (data_dir / "x").read_bytes()
            if isinstance(node, ast.Call) and node.args:
                func = ast.unparse(node.func).split(".")[-1]
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                writes = func == "open" and isinstance(mode, ast.Constant) and any(c in str(mode.value) for c in "wax")
                if any(func.startswith(r) for r in _READERS) and not writes:
                    read.add(id(node.args[0]))
        for node in ast.walk(tree):
            if id(node) in inner:
                continue
            parts = _data_path(node)
            if parts is None:
                continue
            name = "/".join(parts)
            if name in seen or any(ch in name for ch in "*?{"):
                continue
            seen.add(name)
            if (bundle.data_dir / name).exists():
                continue
            where = _where(bundle, path, node)
            if id(node) in read:
                out.append(Finding("error", "data-file", f"`{ast.unparse(node)}` is read but {bundle.data_dir_name}/{name} is not in the truss",
                                   f"put {name} in {bundle.data_dir_name}/ (only data/ is deployed)", where))
            else:  # maybe a file the model writes itself (a cache): cannot be sure
                out.append(Finding("warning", "data-file",
                                   f"`{ast.unparse(node)}`: {bundle.data_dir_name}/{name} is not in the truss "
                                   "(fine if the model writes it itself; this lint cannot tell how the path is used)",
                                   f"if the model reads it, put {name} in {bundle.data_dir_name}/ (only data/ is deployed)", where))
    return out


def _lint_env_vars(bundle: Bundle, trees) -> list[Finding]:
    declared = set(bundle.environment_variables)
    out, seen = [], set()
    for path, tree in trees:
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
                key = _string_key(node.slice)
            elif isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in ("os.environ.get", "environ.get", "os.getenv", "getenv"):
                key = _string_key(node.args[0])
            if key and key not in declared and key not in seen and not key.startswith("TRUSS_SECRET_"):
                seen.add(key)
                in_kernel = " (it is set in this process only)" if key in os.environ else ""
                out.append(Finding("warning", "env-var", f"environment variable {key} is read but not set in `environment_variables`{in_kernel}",
                                   "add it under environment_variables in config.yaml if the model needs it on deploy",
                                   _where(bundle, path, node)))
    return out



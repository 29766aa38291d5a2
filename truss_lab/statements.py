"""What a module's source says about its names, for the swap rule (carry.py) and a chain's reload
(chain_reload.py): the statements that bind each name and, followed through, everything they depend on
- the module's own functions, classes and values, and the truss modules it imports from."""

from __future__ import annotations

import ast
import functools
import hashlib
from typing import Callable


class Statements:
    """For one module's source: per name, a key that changes when the statements assigning it, or
    anything they depend on, change. Dependencies are followed through the module's own functions,
    classes and values, and into the truss modules it imports from (whole files: `file_key`)."""

    def __init__(self, source: bytes, module: str, package: str, file_key: Callable[[str], str | None]):
        self.module, self.package, self.file_key = module, package, file_key
        self.tree = parsed(source)
        self.code: set[str] = set()
        self.defs: dict[str, list[ast.AST]] = {}  # name -> statements binding it (module level)
        self.imports: dict[str, str] = {}  # name -> what it is imported from ("truss:model.helper" / "ext:numpy")
        self.class_attrs: dict[str, list[ast.AST]] = {}  # "Cls.attr" -> statements in the class body
        for stmt in self.tree.body:
            self._collect(stmt)
        self._keys: dict[str, str] = {}

    def _collect(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.code.add(stmt.name)
            self.defs.setdefault(stmt.name, []).append(stmt)
            if isinstance(stmt, ast.ClassDef):
                for inner in stmt.body:
                    for target in _targets(inner):
                        self.class_attrs.setdefault(f"{stmt.name}.{target}", []).append(inner)
            return
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                bound = (alias.asname or alias.name).partition(".")[0] if isinstance(stmt, ast.Import) else (alias.asname or alias.name)
                self.code.add(bound)
                self.imports[bound] = self._origin(stmt, alias)
            return
        if isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)):  # names bound inside: the whole block
            for node in ast.walk(stmt):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    self.code.add(node.name)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        bound = (alias.asname or alias.name).partition(".")[0] if isinstance(node, ast.Import) else (alias.asname or alias.name)
                        self.code.add(bound)
                        self.imports[bound] = self._origin(node, alias)
            for target in {t for node in ast.walk(stmt) if isinstance(node, ast.stmt) for t in _targets(node)}:
                self.defs.setdefault(target, []).append(stmt)
            return
        for target in _targets(stmt):
            self.defs.setdefault(target, []).append(stmt)

    def _origin(self, stmt: ast.Import | ast.ImportFrom, alias: ast.alias) -> str:
        if isinstance(stmt, ast.Import):
            dotted = alias.name  # `import model.helper` binds `model`, but what it reads is model.helper
        else:
            base = _from_module(stmt, self.package)
            dotted = f"{base}.{alias.name}" if self.file_key(f"{base}.{alias.name}") is not None else base
        key = self.file_key(dotted)
        return f"truss:{key}" if key is not None else f"ext:{dotted}"

    def assigns(self, name: str) -> bool:
        """Whether a statement of the source binds `name` (a module-level name, or "Cls.attr")."""
        return name in (self.class_attrs if "." in name else self.defs) or name in self.imports or name in self.code

    def key(self, name: str) -> str:
        """The key of a module-level name (or "Cls.attr"): its statements and, followed through, their inputs."""
        if name not in self._keys:
            self._keys[name] = "..."  # a cycle: what is inside it is counted where it starts
            h = hashlib.sha1()
            if name in self.imports:
                h.update(self.imports[name].encode())
            statements = self.class_attrs.get(name) if "." in name else self.defs.get(name)
            for stmt in statements or ():
                h.update(ast.dump(stmt).encode())
                for used in sorted(_names_used(stmt) - {name}):
                    if used in self.defs or used in self.imports:
                        h.update(f"{used}={self.key(used)}".encode())
            if "." in name:  # a class attribute also depends on the class's other attributes it reads
                cls = name.partition(".")[0]
                for stmt in statements or ():
                    for used in sorted(_names_used(stmt)):
                        if f"{cls}.{used}" in self.class_attrs and f"{cls}.{used}" != name:
                            h.update(f"{cls}.{used}={self.key(f'{cls}.{used}')}".encode())
            self._keys[name] = h.hexdigest()
        return self._keys[name]


@functools.lru_cache(maxsize=32)
def parsed(source: bytes) -> ast.Module:
    """Parsed once per distinct source (the old version's were parsed when it was new); a few kept."""
    return ast.parse(source)


def _targets(stmt: ast.AST) -> list[str]:
    if isinstance(stmt, ast.Assign):
        targets = stmt.targets
    elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
        targets = [stmt.target]
    elif isinstance(stmt, (ast.For, ast.With)):
        targets = [stmt.target] if isinstance(stmt, ast.For) else [i.optional_vars for i in stmt.items if i.optional_vars]
    else:
        return []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


class FileKeys:
    """Per truss module of one version: a digest of its source and, followed through, of the truss
    modules it imports (what a value read from it depends on)."""

    def __init__(self, source_of: Callable[[str], bytes | None], package_of: Callable[[str], str]):
        self.source_of, self.package_of = source_of, package_of
        self._keys: dict[str, str | None] = {}

    def key(self, dotted: str) -> str | None:
        if dotted in self._keys:
            return self._keys[dotted]
        source = self.source_of(dotted)
        if source is None:
            self._keys[dotted] = None
            return None
        self._keys[dotted] = hashlib.sha1(source).hexdigest()  # while its imports are followed (cycles)
        h = hashlib.sha1(ast.dump(parsed(source)).encode())
        for node in ast.walk(parsed(source)):
            for target in _imported(node, self.package_of(dotted)):
                inner = self.key(target)
                if inner is not None and target != dotted:
                    h.update(f"{target}={inner}".encode())
        self._keys[dotted] = h.hexdigest()
        return self._keys[dotted]


def _imported(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _from_module(node, package)
        return [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
    return []


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` reads from (`from ..x import y` in package `a.b` -> `a.x`)."""
    base = node.module or ""
    if not node.level:
        return base
    parts = package.split(".") if package else []
    parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join(p for p in (*parts, base) if p)

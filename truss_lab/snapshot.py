"""What a reload compares (reload.py): a truss folder's snapshot - config, data files, examples, the
other files under model/ and packages/, and every .py file fingerprinted by its syntax tree (no line
numbers, no comments), the model class method by method - and what changed between two of them."""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Bundle


FULL_RELOAD_METHODS = ("__init__", "load", "__post_init__")  # what builds the state a swap keeps


def _digest(node: ast.AST | list) -> str:
    """A node's (or nodes') fingerprint: its AST dump, which has no line numbers and no comments."""
    nodes = node if isinstance(node, list) else [node]
    return hashlib.sha1("\n".join(ast.dump(n) for n in nodes).encode()).hexdigest()


@dataclass
class PyFile:
    """A parsed .py file: its fingerprint and, for model.py, the model class's, method by method."""

    module: str  # the whole file
    methods: dict[str, str]  # model class only: method name -> fingerprint; "<class body>" for the rest
    outside_class: str  # the file with the model class left out
    classes: dict[str, dict[str, str]] = field(default_factory=dict)  # every class: method -> fingerprint
    model_bases: tuple[str, ...] = ()  # model class only: the names of its bases
    model_is_dataclass: bool = False  # its __init__ is generated from the class body


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def fingerprint_file(path: Path, class_name: str | None) -> PyFile:
    """Parse `path` (a SyntaxError propagates, with its line) and fingerprint it."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    methods: dict[str, str] = {}
    outside: list[ast.AST] = []
    classes: dict[str, dict[str, str]] = {}
    bases: tuple[str, ...] = ()
    is_dataclass = False
    for stmt in tree.body:
        if isinstance(stmt, ast.ClassDef):
            classes[stmt.name] = {m.name: _digest(m) for m in stmt.body if isinstance(m, _DEFS)}
        if class_name and isinstance(stmt, ast.ClassDef) and stmt.name == class_name:
            methods = dict(classes[stmt.name])
            rest = [n for n in stmt.body if not isinstance(n, _DEFS)]
            methods["<class body>"] = _digest([*stmt.bases, *stmt.keywords, *stmt.decorator_list, *rest])
            bases = tuple(_last_name(b) for b in stmt.bases if _last_name(b))
            is_dataclass = any("dataclass" in (_last_name(d.func if isinstance(d, ast.Call) else d) or "") for d in stmt.decorator_list)
        else:
            outside.append(stmt)
    return PyFile(module=_digest(tree), methods=methods, outside_class=_digest(outside), classes=classes,
                  model_bases=bases, model_is_dataclass=is_dataclass)


def _last_name(node: ast.AST) -> str | None:
    """`Base` for `Base`, `mod.Base` or `Base[T]`."""
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


@dataclass
class Snapshot:
    """Everything a reload compares: config, data files (size, mtime), and .py fingerprints."""

    config: str
    data: dict[str, tuple[int, int]]
    examples: str  # sha1 of examples.yaml ("" when there is none): an edit reloads the examples, not the model
    py_bytes: dict[str, str]  # rel path -> sha1 of the bytes (cheap check before compiling)
    py: dict[str, PyFile]
    assets: dict[str, tuple[int, int]] = field(default_factory=dict)  # other files under model/ and packages/: (size, mtime)
    sources: dict[str, bytes] = field(default_factory=dict, repr=False)  # absolute path -> bytes: what this version imports

    @classmethod
    def take(cls, bundle: Bundle, previous: "Snapshot | None" = None) -> "Snapshot":
        """Read the folder; compile only .py files whose bytes changed since `previous`."""
        root = bundle.path
        config = hashlib.sha1(bundle.config_path.read_bytes()).hexdigest() if bundle.config_path.exists() else ""
        examples = hashlib.sha1(bundle.examples_path.read_bytes()).hexdigest() if bundle.examples_path.is_file() else ""
        data: dict[str, tuple[int, int]] = {}
        if bundle.data_dir.is_dir():
            for p in sorted(bundle.data_dir.rglob("*")):
                if p.is_file() and not _ignored(p):
                    st = p.stat()
                    data[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
        py_bytes: dict[str, str] = {}
        py: dict[str, PyFile] = {}
        sources: dict[str, bytes] = {}
        assets: dict[str, tuple[int, int]] = {}
        for folder in (bundle.model_dir, bundle.packages_dir):
            if not folder.is_dir():
                continue
            for p in sorted(folder.rglob("*")):
                if _ignored(p) or not p.is_file():
                    continue
                if p.suffix != ".py":  # a label file read at import or by load(): an edit reloads fully
                    if folder == bundle.packages_dir and not PACKAGES_ASSETS:
                        continue
                    st = p.stat()
                    assets[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
                    continue
                rel = str(p.relative_to(root))
                raw = p.read_bytes()
                sources[str(p.resolve())] = raw
                py_bytes[rel] = hashlib.sha1(raw).hexdigest()
                if previous is not None and previous.py_bytes.get(rel) == py_bytes[rel]:
                    py[rel] = previous.py[rel]
                elif p == bundle.model_file:
                    py[rel] = fingerprint_file(p, bundle.model_class_name)
                else:
                    try:
                        py[rel] = fingerprint_file(p, None)
                    except SyntaxError:  # a scratch file the model may never import: its import says so if it does
                        py[rel] = PyFile(module="unparseable:" + py_bytes[rel], methods={}, outside_class="")
        return cls(config=config, data=data, examples=examples, py_bytes=py_bytes, py=py, assets=assets, sources=sources)


def _ignored(path: Path) -> bool:
    return any(part in ("__pycache__", ".ipynb_checkpoints") or part.startswith(".") for part in path.parts[-3:])


# A chainlet's packages/ is its chain's whole folder (a notebook, a trace, a script beside the chain):
# there the chain decides which of those files reload it (chain_reload.py), not its worker.
PACKAGES_ASSETS = True


@dataclass
class Diff:
    config: bool
    data: list[str]
    files: list[str]  # .py files whose behaviour changed
    methods: list[str]  # model class methods changed/added/removed
    module_level: bool  # model.py changed outside the model class
    state_builders: list[str] = field(default_factory=list)  # e.g. "Base.load", "dataclass fields": need a full reload
    assets: list[str] = field(default_factory=list)  # other files under model/ and packages/: read at import or by load()

    @property
    def needs_full(self) -> bool:
        return (self.config or bool(self.data) or bool(self.assets) or any(m in FULL_RELOAD_METHODS for m in self.methods)
                or bool(self.state_builders))

    @property
    def any(self) -> bool:
        return self.config or bool(self.data) or bool(self.files) or bool(self.assets)

    def names(self, model_rel: str) -> list[str]:
        out = ["config.yaml"] if self.config else []
        out += self.data
        out += self.methods
        out += [b for b in self.state_builders if b != "dataclass fields" or "dataclass fields" not in out]
        if self.module_level:
            out.append("module-level code")
        out += [f for f in self.files if f != model_rel]
        return out + self.assets


def diff(old: Snapshot, new: Snapshot, model_rel: str) -> Diff:
    data = sorted(k for k in set(old.data) | set(new.data) if old.data.get(k) != new.data.get(k))
    def module_fp(snapshot: Snapshot, rel: str) -> str | None:
        return snapshot.py[rel].module if rel in snapshot.py else None

    files = sorted(k for k in set(old.py) | set(new.py) if module_fp(old, k) != module_fp(new, k))
    assets = sorted(k for k in set(old.assets) | set(new.assets) if old.assets.get(k) != new.assets.get(k))
    methods: list[str] = []
    module_level = False
    if model_rel in files and model_rel in old.py and model_rel in new.py:
        a, b = old.py[model_rel].methods, new.py[model_rel].methods
        methods = sorted(m for m in set(a) | set(b) if a.get(m) != b.get(m))
        if "<class body>" in methods:
            methods.remove("<class body>")
            module_level = True  # class attributes (constants) count as code around the methods
        module_level = module_level or old.py[model_rel].outside_class != new.py[model_rel].outside_class
    return Diff(config=old.config != new.config, data=data, files=files, methods=methods, module_level=module_level,
                state_builders=_state_builders(old, new, model_rel), assets=assets)


def _state_builders(old: Snapshot, new: Snapshot, model_rel: str) -> list[str]:
    """What changed in how the model's state is built, beyond its own __init__/load: a base class's
    __init__, load or __post_init__ (in any file of the truss), or a dataclass model's fields."""
    if model_rel not in old.py or model_rel not in new.py:
        return []
    model_old, model_new = old.py[model_rel], new.py[model_rel]
    found = []
    if model_new.model_is_dataclass and model_old.methods.get("<class body>") != model_new.methods.get("<class body>"):
        found.append("dataclass fields")
    for base in sorted(set(model_old.model_bases) | set(model_new.model_bases)):
        def methods_of(snapshot: Snapshot) -> dict[str, str]:
            for f in snapshot.py.values():
                if base in f.classes:
                    return f.classes[base]
            return {}

        a, b = methods_of(old), methods_of(new)
        found += [f"{base}.{m}" for m in FULL_RELOAD_METHODS if a.get(m) != b.get(m)]
    return found

"""What the live model holds, moved onto the new code by a method swap (swap.py).

After the import of the new code, run-time state still points at the old version: objects `load()`
built from the truss's classes (`self.tok = Tokenizer()`, one a module-level cache holds, one inside a
scikit-learn Pipeline), members of the truss's Enums (`self.mode = Mode.FAST`), the truss's classes
and functions stored on the model. `plan` finds them and says how each moves, or why it cannot:

* an object of a truss class moves to the new version's class in place (identity kept: a thread or a
  library container holding it sees the new code too) - unless its state was built by code that
  changed (its class's `__init__`, `__new__`, `__post_init__`, `__setstate__`, fields, bases), or the
  class is gone: then the reload is a full one, naming it;
* an Enum member or a class of the truss is replaced, where it is held (an attribute, a dict, a list,
  a set), by the new version's of the same name: `self.mode is Mode.FAST` holds in the new code;
  held where it cannot be replaced (a tuple, a library's object) it makes the reload full;
* a function of the truss held by the model whose code changed makes the reload full (it would keep
  running the old code); so does a process pool the model holds (its workers imported the old code).

Where to look: from the model and the values the swap carries (carry.py), through containers and the
truss's own objects. Objects a library holds (a Pipeline's steps) are not walked: every instance holds
a reference to its class, so each class's reference count, against its count right after the import
(`Baseline`), says how many objects of it exist that the walk did not find - and only then are the
garbage collector's referrers of those classes scanned (milliseconds with TensorFlow loaded).
"""

from __future__ import annotations

import ast
import enum
import functools
import gc
import hashlib
import sys
import types
from dataclasses import dataclass, field
from typing import Any

from .carry import NeedsFullReload
from .statements import parsed

STATE_BUILDERS = ("__init__", "__new__", "__post_init__", "__setstate__")
MAX_HELD = 20_000  # objects looked at per reload; past it, the reference counts still find what was missed
MAX_DEPTH = 12
_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, memoryview, range)


# ------------------------------------------------------------------------------ right after the import


@dataclass
class Baseline:
    """Every class the truss's modules define and every Enum member of them, with its reference count
    right after the import finished (no run-time object yet), and the objects of truss classes the
    import itself built (module and class values: a constant is no run-time object)."""

    objects: list[Any] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    built: set[int] = field(default_factory=set)

    @classmethod
    def take(cls, modules: dict[str, types.ModuleType]) -> "Baseline":
        names = set(modules)
        found: dict[int, Any] = {}
        built: set[int] = set()
        for module in list(modules.values()):
            for value in list(vars(module).values()):
                _collect(value, module.__name__, names, found, built, 0)
        base = cls(list(found.values()), [], built)
        base.counts = [sys.getrefcount(o) for o in base.objects]  # measured the way `surplus` measures
        return base

    def surplus(self) -> dict[int, int]:
        """id(object) -> references it has now beyond those it had right after the import."""
        return {id(o): sys.getrefcount(o) - c for o, c in zip(self.objects, self.counts) if sys.getrefcount(o) != c}


def _collect(value: Any, module: str, names: set[str], found: dict[int, Any], built: set[int], depth: int) -> None:
    if isinstance(value, type):
        if value.__module__ != module or id(value) in found:
            return
        found[id(value)] = value
        if issubclass(value, enum.Enum):
            found.update((id(m), m) for m in value.__members__.values())
        for inner in list(vars(value).values()):
            if isinstance(inner, type) and inner.__module__ == module and depth < 3:
                _collect(inner, module, names, found, built, depth + 1)  # nested classes
            elif type(inner).__module__ in names:
                built.add(id(inner))
    elif type(value).__module__ in names:
        built.add(id(value))  # DEFAULT = Params(): what the import built
    elif isinstance(value, (list, tuple, dict, set)) and depth == 0 and len(value) <= 1000:
        for item in list(value.values() if isinstance(value, dict) else value):
            if type(item).__module__ in names:
                built.add(id(item))  # REGISTRY = {"upper": Upper()}


# ------------------------------------------------------------------------------ at a swap


@dataclass
class Migration:
    moves: list[tuple[Any, type, str]]  # (object, its new class, where it was found)
    replaces: list[tuple[Any, Any, Any, Any, str]]  # (holder, slot, old value, new value, where)

    def apply(self) -> list[str]:
        """Move and replace everything (undoing all of it if an object refuses its new class)."""
        done: list[tuple[Any, type]] = []
        for obj, target, path in self.moves:
            try:
                done.append((obj, type(obj)))
                object.__setattr__(obj, "__class__", target)
            except (TypeError, AttributeError) as exc:
                done.pop()
                for o, cls in reversed(done):
                    object.__setattr__(o, "__class__", cls)
                raise NeedsFullReload([f"{path}: cannot move it to the new {target.__qualname__} ({exc})"]) from None
        for holder, slot, old_value, new_value, _ in self.replaces:
            _put(holder, slot, old_value, new_value)
        return [f"{path} -> {t.__module__}.{t.__qualname__}" for _, t, path in self.moves]


def plan(instance: Any, roots: list[tuple[str, Any, Any, str]], old: Any, new: Any) -> Migration:
    """How what the model holds moves from `old` to `new` (loader.Code), found from `instance` and the
    carried values `roots` (where, value, the new module's dict or class, name: carry.Plan); raises
    NeedsFullReload naming what cannot move honestly. Changes nothing."""
    surplus = old.baseline.surplus() if old.baseline is not None else None  # first: the walk holds references
    walk = _Walk(old, new)
    walk.visit(instance, "self", None, None, 0)
    for path, value, holder, name in roots:
        walk.found[id(value)] = walk.found.get(id(value), 0) + 1  # the old module's binding: it goes with it
        walk.visit(value, path, holder, name, 1)
    if surplus is not None:
        surplus.pop(id(type(instance)), None)  # the model's class: truss_lab's own wrapper holds it too; swap.py moves the model
        walk.account(surplus)
    if walk.full:
        raise NeedsFullReload(walk.full)
    return Migration([m for m in walk.moves if m[0] is not instance], walk.replaces)


class _Walk:
    def __init__(self, old: Any, new: Any):
        self.old, self.new = old, new
        self.files = {getattr(m, "__file__", None): name for name, m in old.modules.items()}
        self.moves: list[tuple[Any, type, str]] = []
        self.replaces: list[tuple[Any, Any, Any, Any, str]] = []
        self.full: list[str] = []
        self.seen: set[int] = set()
        self.found: dict[int, int] = {}  # id(class or member) -> references the walk explains
        self.budget = MAX_HELD
        self.built = old.baseline.built if old.baseline is not None else set()
        self.decided: dict[type, tuple[type | None, str | None]] = {}

    def visit(self, obj: Any, path: str, holder: Any, slot: Any, depth: int) -> None:
        t = type(obj)
        if t in _LEAVES or depth > MAX_DEPTH:
            return
        if isinstance(obj, enum.Enum) or isinstance(obj, type):
            if self._is_truss(obj if isinstance(obj, type) else t):
                self._replace(obj, path, holder, slot)
            return
        if isinstance(obj, (types.FunctionType, types.MethodType)):
            self._function(obj, path)
            return
        if id(obj) in self.seen or self.budget <= 0:
            return
        self.seen.add(id(obj))
        self.budget -= 1
        if t in (list, tuple, set, frozenset) or isinstance(obj, (list, tuple, set, frozenset)):
            for i, item in enumerate(list(obj)[: max(self.budget, 0)]):
                self.budget -= 1
                self.visit(item, f"{path}[{i}]", obj, i if isinstance(obj, list) else item, depth + 1)
            return
        if isinstance(obj, dict):
            for k, item in list(obj.items())[: max(self.budget, 0)]:
                self.budget -= 1
                self.visit(k, f"{path} key {k!r}", obj, _Key(k), depth + 1)
                self.visit(item, f"{path}[{k!r}]", obj, k, depth + 1)
            return
        if _process_pool(obj):
            self.full.append(f"{path} is a process pool: its workers run the old code (a full reload builds it again)")
            return
        cls = t
        if cls not in self.decided:
            self.decided[cls] = self._new_class(cls)
        target, why = self.decided[cls]
        if why is not None:
            self.full.append(f"{path} ({cls.__module__}.{cls.__qualname__}): {why}")
            return
        if target is None and depth:
            return  # a library's object: the reference counts find truss objects inside it
        if target is not None:
            self.moves.append((obj, target, path))
            if id(obj) not in self.built:
                self.found[id(cls)] = self.found.get(id(cls), 0) + 1
        fields = getattr(obj, "__dict__", None)
        if isinstance(fields, dict):
            for name, value in list(fields.items()):
                self.visit(value, f"{path}.{name}", fields, name, depth + 1)

    def _is_truss(self, cls: type) -> bool:
        module = self.old.modules.get(getattr(cls, "__module__", None))
        return module is not None and _resolve(module, cls.__qualname__) is cls

    def _replace(self, obj: Any, path: str, holder: Any, slot: Any) -> None:
        """An Enum member or a class of the old version: the new version's of the same name, where held."""
        self.found[id(obj)] = self.found.get(id(obj), 0) + 1
        if holder is None:
            return
        cls = obj if isinstance(obj, type) else type(obj)
        new_module = self.new.modules.get(cls.__module__)
        new_cls = _resolve(new_module, cls.__qualname__) if new_module is not None else None
        label = f"{cls.__qualname__}.{obj.name}" if isinstance(obj, enum.Enum) else cls.__qualname__
        if isinstance(obj, enum.Enum):
            new_value = getattr(new_cls, "__members__", {}).get(obj.name) if isinstance(new_cls, type) else None
        else:
            new_value = new_cls if isinstance(new_cls, type) else None
        if new_value is None:
            self.full.append(f"{path} holds {label}, which the new code no longer defines")
        elif isinstance(holder, (tuple, frozenset)):
            self.full.append(f"{path}: a {type(holder).__name__} holds {label} (it cannot be replaced in place)")
        else:
            self.replaces.append((holder, slot, obj, new_value, path))

    def _function(self, fn: Any, path: str) -> None:
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        name = self.files.get(getattr(code, "co_filename", None))
        if name is None or name not in self.old.compiled or name not in self.new.compiled:
            return
        if def_digest(self.old.compiled[name], code.co_qualname) != def_digest(self.new.compiled[name], code.co_qualname):
            self.full.append(f"{path} holds {code.co_qualname}, which changed")

    def _new_class(self, cls: type) -> tuple[type | None, str | None]:
        """(the new version's class for an old version's `cls`, or None if `cls` is no truss class;
        why a full reload is needed instead, or None)."""
        if not self._is_truss(cls):
            return None, None
        new_module = self.new.modules.get(cls.__module__)
        target = _resolve(new_module, cls.__qualname__) if new_module is not None else None
        if not isinstance(target, type):
            return None, f"its class is gone from {cls.__module__}"
        old, new = self.old, self.new
        changed = []
        for base in cls.__mro__:
            if base.__module__ in old.modules and base.__module__ in old.compiled and base.__module__ in new.compiled:
                a = _builders(old.compiled[base.__module__], base.__qualname__)
                b = _builders(new.compiled[base.__module__], base.__qualname__)
                changed += [f"{base.__qualname__}.{k}" if not k.startswith("<") else f"{base.__qualname__} {k[1:-1]}"
                            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if changed:
            return target, f"built by code that changed ({', '.join(changed)})"
        return target, None

    def account(self, surplus: dict[int, int]) -> None:
        """Objects of truss classes the walk did not reach (a library holds them): found by scanning
        the referrers of the classes whose count says so; Enum members held out of reach: a full reload."""
        objects = {id(o): o for o in self.old.baseline.objects if id(o) in surplus}
        missing = []
        for ident, extra in surplus.items():
            obj = objects[ident]
            if extra <= self.found.get(ident, 0):
                continue
            if isinstance(obj, type) and not issubclass(obj, enum.Enum):
                missing.append(obj)
            elif isinstance(obj, enum.Enum):
                self.full.append(f"{type(obj).__qualname__}.{obj.name} is held where it cannot be replaced "
                                 f"(a library's object or a tuple): a full reload builds it again")
        if not missing:
            return
        classes = {id(c) for c in missing}
        moving = {id(m[0]) for m in self.moves}
        for obj in gc.get_referrers(*missing):
            if id(type(obj)) in classes and id(obj) not in moving and not isinstance(obj, type):
                cls = type(obj)
                if cls not in self.decided:
                    self.decided[cls] = self._new_class(cls)
                target, why = self.decided[cls]
                where = f"a {cls.__qualname__} the model does not hold directly (in a library's object)"
                if why is not None:
                    self.full.append(f"{where}: {why}")
                elif target is not None:
                    self.moves.append((obj, target, where))
                    moving.add(id(obj))


@dataclass(frozen=True)
class _Key:
    """The slot of a dict key (`{Mode.FAST: handler}`), not of a value."""

    key: Any


def _put(holder: Any, slot: Any, old_value: Any, new_value: Any) -> None:
    if isinstance(holder, dict):
        if isinstance(slot, _Key):
            items = [(new_value if k is old_value else k, v) for k, v in holder.items()]
            holder.clear()
            holder.update(items)
        elif holder.get(slot) is old_value:
            holder[slot] = new_value
    elif isinstance(holder, list):
        if slot < len(holder) and holder[slot] is old_value:
            holder[slot] = new_value
    elif isinstance(holder, set):
        holder.discard(old_value)
        holder.add(new_value)
    elif isinstance(holder, type):  # a carried class attribute
        setattr(holder, slot, new_value)


def _process_pool(obj: Any) -> bool:
    futures = sys.modules.get("concurrent.futures.process")
    pool = sys.modules.get("multiprocessing.pool")
    return ((futures is not None and isinstance(obj, futures.ProcessPoolExecutor))
            or (pool is not None and isinstance(obj, pool.Pool) and not isinstance(obj, pool.ThreadPool)))


def shut_down_loky() -> None:
    """joblib's reusable loky executor keeps its workers between calls, with the truss's modules they
    imported: after a reload, new jobs must run the new code, so the next call starts fresh workers."""
    for name in ("joblib.externals.loky.reusable_executor", "loky.reusable_executor"):
        module = sys.modules.get(name)
        executor = getattr(module, "_executor", None)
        if executor is not None:
            try:
                executor.shutdown(wait=False, kill_workers=True)
            except Exception:  # an executor already broken: the next call replaces it anyway
                pass


def _resolve(module: Any, qualname: str) -> Any:
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def def_digest(source: bytes, qualname: str) -> str | None:
    """A fingerprint of the function `qualname` in `source` (no line numbers, no comments)."""
    body: list[ast.stmt] = parsed(source).body
    node = None
    for part in qualname.replace(".<locals>", "").split("."):
        node = next((s for s in body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and s.name == part), None)
        if node is None:
            return None
        body = node.body
    return hashlib.sha1(ast.dump(node).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _builders(source: bytes, qualname: str) -> dict[str, str]:
    """What builds an instance's state in class `qualname` of `source`: its state-building methods,
    its fields (annotated class-level names: dataclasses, pydantic), its bases and decorators."""
    body: list[ast.stmt] = parsed(source).body
    node: ast.ClassDef | None = None
    for part in qualname.split("."):
        node = next((s for s in body if isinstance(s, ast.ClassDef) and s.name == part), None)
        if node is None:
            return {"<missing>": ""}
        body = node.body
    assert node is not None
    out = {"<bases>": "|".join(ast.dump(e) for e in [*node.bases, *node.keywords, *node.decorator_list])}
    fields = [s for s in node.body if isinstance(s, ast.AnnAssign)]
    if fields:
        out["<fields>"] = "|".join(ast.dump(s) for s in fields)
    for stmt in node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name in STATE_BUILDERS:
            out[stmt.name] = ast.dump(stmt)
    return out


"""What a method swap carries from the old version's modules into the new one's: the swap rule.

For every module-level value of every module of the truss (`model.py`, helpers under `model/`,
`packages/`) and every class-level value of the classes they define, two facts decide:

* **same statement**: the statements that assign the name, and everything they depend on (the
  functions and classes they call, the values they read, the truss modules they import from,
  followed through), are unchanged between the versions;
* **state**: the value is run-time state - rebound, set, or changed in place since import (by
  `load()`, a request, a thread they started). `None` when that cannot be told (an object too big or
  too opaque to fingerprint). What import itself built (a registry its decorators filled, a constant
  made from a truss class, an Enum's members, a label file read at import) is not state: the new
  import builds it again, from the new code and files;
* **made by machinery**: a class attribute no statement of the class body assigns that was there
  right after import (`_abc_impl`, an Enum's `_member_map_`): the new class's own, always.

The rules, first match wins (like IPython autoreload's update table):
"""

from __future__ import annotations

import hashlib
import types
from dataclasses import dataclass, field
from typing import Any, Callable

from .statements import FileKeys, Statements

NEW, CARRY, FULL = "new", "carry", "full"


@dataclass(frozen=True)
class Value:
    """One name as the rules see it."""

    name: str  # "CACHE", or "Model.vocab" for a class attribute
    module: str  # "model.model"
    code: bool  # bound by def / class / import: code, never state
    dunder: bool
    same_statement: bool
    state: bool | None
    machinery: bool = False


RULES: list[tuple[Callable[[Value], bool], str, str]] = [
    (lambda v: v.code or v.dunder or v.machinery, NEW, "functions, classes, imports, dunders and class machinery come from the new code"),
    (lambda v: v.state is False, NEW, "untouched since import: what the import built, the new import builds again"),
    (lambda v: v.same_statement, CARRY, "run-time state from the same statement and inputs: keep what the model has"),
    (lambda v: v.state is None, FULL, "its code changed; cannot tell whether load() or a request changed it"),
    (lambda v: True, FULL, "run-time state whose code changed"),
]
__doc__ += "\n" + "\n".join(f"  {i + 1}. {outcome:5}  {why}" for i, (_, outcome, why) in enumerate(RULES))


def decide(value: Value) -> tuple[str, str]:
    for test, outcome, why in RULES:
        if test(value):
            return outcome, why
    raise AssertionError("the last rule matches everything")


class NeedsFullReload(Exception):
    """A method swap would leave run-time state built by code that changed: reload fully instead."""

    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


# ------------------------------------------------------------------------------ fingerprints

MAX_NODES = 10_000  # values looked at per fingerprint: beyond, "cannot tell"
MAX_BYTES = 16 << 20  # array / bytes contents hashed up to this size
MAX_DEPTH = 8
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_CODE_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type, types.MethodType)


class _CannotTell(Exception):
    pass


def fingerprint(value: Any) -> str | None:
    """A digest of `value`'s contents (None when it cannot be told: too big, too deep, opaque).

    Equal digests mean nothing was changed in place; a rebinding is seen by identity (ImportState)."""
    h = hashlib.blake2b(digest_size=16)
    budget = [MAX_NODES]
    try:
        _feed(h, value, 0, budget, set())
    except _CannotTell:
        return None
    return h.hexdigest()


def _feed(h, v: Any, depth: int, budget: list[int], path: set[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_DEPTH:
        raise _CannotTell
    t = type(v)
    h.update(t.__qualname__.encode())
    if t in _SCALARS:
        if t in (str, bytes) and len(v) > MAX_BYTES:
            raise _CannotTell
        h.update(v if t is bytes else repr(v).encode())
        return
    if isinstance(v, _CODE_TYPES):  # code is compared by the statements, not here
        h.update(str(id(v)).encode())
        return
    if id(v) in path:
        h.update(b"<cycle>")
        return
    path.add(id(v))
    try:
        if t in (list, tuple) or isinstance(v, (list, tuple)):
            h.update(str(len(v)).encode())
            for item in v:
                _feed(h, item, depth + 1, budget, path)
        elif isinstance(v, dict):
            h.update(str(len(v)).encode())
            for k, item in list(v.items()):
                _feed(h, k, depth + 1, budget, path)
                _feed(h, item, depth + 1, budget, path)
        elif isinstance(v, (set, frozenset)):
            h.update(str(len(v)).encode())
            for digest in sorted(fingerprint(item) or "?" for item in v):
                h.update(digest.encode())
        elif isinstance(v, bytearray):
            if len(v) > MAX_BYTES:
                raise _CannotTell
            h.update(bytes(v))
        elif t.__module__ == "numpy" and hasattr(v, "tobytes") and hasattr(v, "nbytes"):
            if v.nbytes > MAX_BYTES or getattr(v.dtype, "hasobject", False):
                raise _CannotTell
            h.update(f"{v.dtype}{getattr(v, 'shape', ())}".encode())
            h.update(v.tobytes())
        elif _known_value(v):
            h.update(repr(v).encode())
        elif hasattr(v, "__dict__") or hasattr(t, "__slots__"):
            h.update(str(id(t)).encode())
            fields = dict(vars(v)) if hasattr(v, "__dict__") else {}
            for slot in getattr(t, "__slots__", ()):
                if isinstance(slot, str) and hasattr(v, slot):
                    fields[slot] = getattr(v, slot)
            if not fields and not _plain_object(t):
                raise _CannotTell  # its state lives where Python cannot see (a C object)
            _feed(h, fields, depth + 1, budget, path)
        else:
            raise _CannotTell
    finally:
        path.discard(id(v))


def _known_value(v: Any) -> bool:
    import datetime
    import decimal
    import enum
    import pathlib
    import re
    import uuid

    return isinstance(v, (re.Pattern, pathlib.PurePath, datetime.date, datetime.time, datetime.timedelta,
                          decimal.Decimal, uuid.UUID, enum.Enum, range, slice))


def _plain_object(t: type) -> bool:
    """A class of Python code whose instances keep all their state in __dict__ / __slots__."""
    return all(base.__module__ != "builtins" or base is object for base in t.__mro__)


_CODE = "<code>"  # ImportState's mark for a value that is a class, function or module


@dataclass
class ImportState:
    """A module's values right after its import: identity and fingerprint, for globals and for the
    attributes of the classes it defines (no reference is kept: a rebound value can be freed)."""

    values: dict[str, tuple[int, str | None]]

    @classmethod
    def of(cls, module: types.ModuleType) -> "ImportState":
        out: dict[str, tuple[int, str | None]] = {}
        for name, value in list(vars(module).items()):
            if _is_dunder(name):
                continue
            out[name] = (id(value), _CODE if isinstance(value, _CODE_TYPES) else fingerprint(value))
            if isinstance(value, type) and value.__module__ == module.__name__:
                for attr, inner in list(vars(value).items()):
                    if not _is_dunder(attr) and _is_data(inner):
                        out[f"{name}.{attr}"] = (id(inner), fingerprint(inner))
        return cls(out)

    def state(self, name: str, value: Any) -> bool | None:
        """Whether `value` (now bound to `name`) changed since import; None when that cannot be told."""
        if name not in self.values:
            return True  # set after import (`global X` in load())
        ident, digest = self.values[name]
        if ident != id(value):
            return True  # rebound
        if digest == _CODE:
            return False  # a class or function bound by assignment (`Output = helper.Pixels`), still that one: code
        if digest is None:
            return None
        now = fingerprint(value)
        return None if now is None else now != digest


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _is_data(value: Any) -> bool:
    """A class attribute that is a value, not a method or descriptor."""
    return not (callable(value) or isinstance(value, (staticmethod, classmethod, property)) or hasattr(value, "__get__"))


# ------------------------------------------------------------------------------ statements and their inputs


# ------------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    carried: list[str]  # "model.model:CACHE", ...
    full: list[str]  # why a method swap cannot keep the state: a full reload's reasons
    roots: list[tuple[str, Any, Any, str]] = field(default_factory=list)  # (where, value, new module dict or class, name): held.py looks inside


def plan(old_module: types.ModuleType, new_module: types.ModuleType, old_state: ImportState,
         old_statements: Statements, new_statements: Statements) -> Plan:
    """Apply the rules to every name of one module (and of the classes it defines); carry what they say."""
    carried, full, roots = [], [], []
    module = old_module.__name__
    star = "*" in old_statements.code or "*" in new_statements.code  # `from x import *`: names no statement shows
    for name, value in list(vars(old_module).items()):
        outcome, why = decide(Value(
            name, module,
            code=(name in old_statements.code or name in new_statements.code or isinstance(value, types.ModuleType)
                  or (star and isinstance(value, _CODE_TYPES))),  # a module (a submodule the import bound) is code
            dunder=_is_dunder(name),
            same_statement=old_statements.key(name) == new_statements.key(name),
            state=None if _is_dunder(name) else old_state.state(name, value),
        ))
        if outcome == CARRY:
            setattr(new_module, name, value)
            carried.append(f"{module}:{name}")
            roots.append((f"{module}.{name}", value, vars(new_module), name))
        elif outcome == FULL:
            full.append(f"{module}.{name}: {why}")
        if isinstance(value, type) and value.__module__ == module and name in old_statements.code:
            new_cls = vars(new_module).get(name)
            if isinstance(new_cls, type) and new_cls is not value:
                _plan_class(value, new_cls, f"{name}", module, old_state, old_statements, new_statements, carried, full, roots)
    return Plan(carried, full, roots)


def _plan_class(old_cls: type, new_cls: type, cls_name: str, module: str, old_state: ImportState,
                old_statements: Statements, new_statements: Statements, carried: list[str], full: list[str],
                roots: list[tuple[str, Any, Any, str]]) -> None:
    for attr, value in list(vars(old_cls).items()):
        if _is_dunder(attr) or not _is_data(value):
            continue
        qual = f"{cls_name}.{attr}"
        outcome, why = decide(Value(
            qual, module, code=False, dunder=False,
            same_statement=old_statements.key(qual) == new_statements.key(qual),
            state=old_state.state(qual, value),
            machinery=qual in old_state.values and not (old_statements.assigns(qual) or new_statements.assigns(qual)),
        ))
        if outcome == CARRY:
            try:
                setattr(new_cls, attr, value)
                carried.append(f"{module}:{qual}")
                roots.append((f"{module}.{qual}", value, new_cls, attr))
            except (AttributeError, TypeError):
                pass
        elif outcome == FULL:
            full.append(f"{module}.{qual}: {why}")


# ------------------------------------------------------------------------------ a whole version


def carry_version(old: Any, new: Any) -> Plan:
    """Carry run-time state from every module of `old` (a loader.Code) that `new` has too, by the
    rules: what was carried, and why a full reload is needed instead (empty if it is not)."""
    total = Plan([], [], [])
    old_keys = FileKeys(old.source_of, old.package_of)
    new_keys = FileKeys(new.source_of, new.package_of)
    for name, old_module in list(old.modules.items()):
        new_module = new.modules.get(name)
        if new_module is None or name not in old.compiled or name not in new.compiled or name not in old.import_state:
            continue
        package = old.package_of(name)
        try:
            before = Statements(old.compiled[name], name, package, old_keys.key)
            after = Statements(new.compiled[name], name, package, new_keys.key)
        except SyntaxError:
            continue
        p = plan(old_module, new_module, old.import_state[name], before, after)
        total.carried += p.carried
        total.full += p.full
        total.roots += p.roots
    return total

"""A reload in the process that holds the truss: Truss's own rule, and what truss_lab promises on top.

Truss's `hot_reload()` evicts the truss's modules from sys.modules, imports model.py again through
the normal machinery and swaps `__class__` on the live instance. So does `apply`, alone at the
gate (no request in flight, none starting), and:

* a failed import (or a failed full reload) puts the old modules back: the old code keeps serving;
* a method swap keeps what `load()` and the requests built - instance attributes, and module globals
  or class attributes rebound or changed after import (carry.py) - while everything the import
  itself builds (registries its decorators fill, constants, Enum and ABC bookkeeping, files under
  model/ read at import) comes from the new import; objects the model holds whose class the truss
  defines move to the new class in place;
* where that cannot be honest - run-time state whose code changed, an object whose class's
  construction changed, a thread running a function the save changed - the reload is a full one
  (a new instance, `load()` again) and says why;
* the import's Prometheus collectors and log handlers are handed over (owned.py).
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from . import carry, held, owned, wrapper
from .bundle import Bundle
from .carry import NeedsFullReload


def apply(live: Any, bundle: Bundle, full: bool, sources: dict[str, bytes], bump: bool = True) -> tuple[str, list[str]]:
    """Reload `live` (a LiveModel, alone at its gate) to `sources`, the truss's .py files as saved:
    ("methods" | "full", why a full reload was needed). Raises what the import or load() raised, the
    old code serving (and importing, for a module first imported later, its own sources)."""
    current = live.serving
    version = current.version + (1 if bump else 0)
    old_sources, live.resident.sources = live.resident.sources, sources
    old = live.resident.evict()
    current.code.imported.withdraw()
    reasons: list[str] = []
    try:
        if not full:
            try:
                serving = _rebind(live, bundle, version, old)
                kind = "methods"
            except NeedsFullReload as why:  # state built by code that changed: build it again
                reasons, full = list(dict.fromkeys(why.reasons)), True  # each reason once (several threads, one cause)
                live.resident.evict()
        if full:
            current.code.loaded.withdraw()
            serving, _ = live._build(bundle, version)
            kind = "full"
    except BaseException:
        live.resident.evict()
        live.resident.restore(old)
        live.resident.sources = old_sources
        current.code.imported.reinstate()
        if full:
            current.code.loaded.reinstate()
        raise
    live._switch(serving, bundle)
    held.shut_down_loky()  # joblib's reused workers imported the old code: the next call starts new ones
    if kind == "full":
        current.code.imported.drop()
        current.code.loaded.drop()
        live._retired(current.instance)
    else:  # the import's handlers go (the new import added its own); load()'s stay with the model
        current.code.imported.collectors.clear()
        current.code.imported.drop()
    return kind, reasons


def _rebind(live: Any, bundle: Bundle, version: int, old: Any) -> wrapper.Serving:
    """Import the new code and move the live instance onto it (no load()); NeedsFullReload when state
    was built by code that changed. Nothing of the live model changes until every check passed."""
    current = live.serving
    fresh = owned.Owned()
    with fresh.recording():
        module = live.resident.import_model(also=list(old.modules))
    try:
        new = live.resident.code()
        model_cls = wrapper.model_class(bundle, module)
        methods = wrapper.ModelMethods.check(bundle, model_cls)
        carried = carry.carry_version(old, new)
        full = carried.full + threads_on_changed_code(old, new)
        if full:
            raise NeedsFullReload(full)
        held.plan(current.instance, carried.roots, old, new).apply()  # what the model holds moves (undone if one refuses)
        try:
            object.__setattr__(current.instance, "__class__", model_cls)  # Truss's own hot reload does this
        except TypeError as exc:  # a layout __class__ assignment refuses (__slots__ that differ)
            raise NeedsFullReload([f"self: cannot move it to the new {model_cls.__qualname__} ({exc})"]) from None
        owned.settle(fresh, new.modules)  # a carried metric keeps counting where it was registered
    except BaseException:
        fresh.drop()
        raise
    return wrapper.Serving.bind(version, current.instance, module, model_cls, methods,
                                type(current.code)(fresh, current.code.loaded))


def threads_on_changed_code(old: Any, new: Any) -> list[str]:
    """Threads (one load() started, say) running a function of the truss that the save changed: after
    a swap they would go on running the old code, so the reload is a full one, naming them."""
    files = {getattr(m, "__file__", None): name for name, m in old.modules.items()}
    me = threading.get_ident()
    found = []
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        while frame is not None:
            name = files.get(frame.f_code.co_filename)
            if name is not None and name in old.compiled and name in new.compiled:
                qualname = frame.f_code.co_qualname
                if held.def_digest(old.compiled[name], qualname) != held.def_digest(new.compiled[name], qualname):
                    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                    found.append(f"thread {names.get(ident, ident)!r} runs {qualname} ({where}), which changed")
                    break
            frame = frame.f_back
    return found

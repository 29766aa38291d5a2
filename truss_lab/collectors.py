"""Prometheus metrics the model registers itself, across reloads.

A truss that declares `HITS = Counter("hits", ...)` at module level registers it in
prometheus_client's process-wide registry when the module is imported. A new version imports the
module again: in a Truss image that happens once per process, here once per version, and the second
registration would fail ("Duplicated timeseries"). So, once prometheus_client is installed:

* a collector registered by a version's code is marked with its truss (names.py tells which);
* a newer version of the same truss registering the same names takes them over from the older one;
* when the swap carries the old module-level value (the same statement: carry.py), the old
  collector - with its counts - is the one registered again, so the counts go on;
* a failed reload hands the names back, and a closed truss unregisters its collectors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from typing import Any

from . import names

_installed = False
_lock = threading.Lock()


def install() -> None:
    """Wrap prometheus_client's registry register() once it is imported (now, if it already is; else
    when model code first imports it: a truss that never uses it never pays for the import)."""
    if _installed or _WhenImported in sys.meta_path:
        return
    registry = sys.modules.get("prometheus_client.registry")
    if registry is not None:
        _wrap(registry.CollectorRegistry)
    elif importlib.util.find_spec("prometheus_client") is not None:
        sys.meta_path.insert(0, _WhenImported)


class _WhenImported:
    """A finder that only watches for prometheus_client.registry, wraps it once loaded, and leaves."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "prometheus_client.registry":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(cls)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _wrap(module.CollectorRegistry)

        spec.loader.exec_module = exec_module
        return spec


def _wrap(registry_cls: type) -> None:
    global _installed
    with _lock:
        if _installed:
            return
        original = registry_cls.register

        def register(self, collector):
            code = names.caller_code(1)
            space = getattr(code, "space", None)
            if space is None:
                return original(self, collector)
            try:
                original(self, collector)
            except ValueError:  # the names belong to an older version of this truss: take them over
                taken = _older(self, space, code)
                for old in taken:
                    self.unregister(old)
                try:
                    original(self, collector)
                except ValueError:
                    for old in taken:
                        original(self, old)
                    raise
                code.replaced_collectors.extend(taken)
            code.collectors.append(collector)
            try:
                collector._truss_lab_space = space
            except AttributeError:
                pass

        register.__wrapped__ = original
        registry_cls.register = register
        _installed = True


def _older(registry, space: Any, code: Any) -> list:
    return [c for c in list(registry._collector_to_names) if getattr(c, "_truss_lab_space", None) is space
            and c not in code.collectors]


def settle(old: Any, new: Any) -> None:
    """After a swap: a collector the new version's module holds is the one registered (the old one,
    with its counts, where carry.py carried it)."""
    registry = _registry()
    if registry is None or not new.collectors:
        return
    held = {id(v) for m in new.modules.values() for v in list(vars(m).values())}
    for fresh in list(new.collectors):
        if id(fresh) in held:
            continue
        names_of = registry._collector_to_names.get(fresh)
        carried = [c for c in new.replaced_collectors if id(c) in held and registry_names(c) == names_of]
        if carried:
            registry.unregister(fresh)
            registry.register.__wrapped__(registry, carried[0])
            new.collectors.remove(fresh)
            new.collectors.append(carried[0])


def registry_names(collector: Any) -> Any:
    from prometheus_client.registry import REGISTRY

    try:
        return REGISTRY._get_names(collector)
    except Exception:
        return None


def give_back(new: Any) -> None:
    """A version that will not serve (its build failed): its collectors go, the older ones come back."""
    registry = _registry()
    if registry is None:
        return
    for c in new.collectors:
        try:
            registry.unregister(c)
        except KeyError:
            pass
    for c in new.replaced_collectors:
        try:
            registry.register.__wrapped__(registry, c)
        except ValueError:
            pass
    new.collectors.clear()
    new.replaced_collectors.clear()


def forget(space: Any) -> None:
    """A closed truss: its collectors leave the registry."""
    registry = _registry()
    if registry is None:
        return
    for c in [c for c in list(registry._collector_to_names) if getattr(c, "_truss_lab_space", None) is space]:
        registry.unregister(c)


def _registry():
    if not _installed:
        return None
    from prometheus_client.registry import REGISTRY

    return REGISTRY

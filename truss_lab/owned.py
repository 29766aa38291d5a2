"""What a truss's code put into process-wide registries: Prometheus collectors and logging handlers.

In a Truss image a module-level `HITS = Counter("hits", ...)` registers once per process, and a
`logger.addHandler(...)` in `load()` runs once. A reload imports the modules again (a second
registration of the same names fails: "Duplicated timeseries") and a full reload runs `load()` again
(a second handler prints every line twice, and pins the replaced version). So what one version's
import and its `load()` registered is recorded (`Owned.recording`, a before/after difference of the
registries - one truss per process, nothing else registers meanwhile), and:

* before the next import, the import's collectors leave the registry; a failed import puts them back;
* after a method swap, a collector the swap rule carried (the same object, its counts) is the one
  registered, in place of the fresh one; the import's old handlers go, `load()`'s stay with the model;
* a full reload withdraws the replaced version's collectors and handlers while the new `load()` runs
  (`basicConfig()` in it configures logging again, no line prints twice), then drops them - or puts
  them back if the new code fails; a closed model takes its collectors and handlers with it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator


def _registry() -> Any:
    module = sys.modules.get("prometheus_client.registry")  # a truss that never imports it never pays for it
    return getattr(module, "REGISTRY", None)


def _collectors() -> set:
    registry = _registry()
    return set(registry._collector_to_names) if registry is not None else set()


def _handlers() -> set[tuple[Any, Any]]:
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    return {(lg, h) for lg in loggers for h in list(lg.handlers)}


@dataclass
class Owned:
    """The collectors and handlers one part of one version (its import, or its load()) registered."""

    collectors: list = field(default_factory=list)
    handlers: list = field(default_factory=list)  # (logger, handler)

    @contextlib.contextmanager
    def recording(self) -> Iterator["Owned"]:
        collectors, handlers = _collectors(), _handlers()
        try:
            yield self
        finally:
            self.collectors += [c for c in _collectors() - collectors]
            self.handlers += [h for h in _handlers() - handlers]

    def withdraw(self) -> None:
        """Unregister the collectors and take the handlers off their loggers while the code that replaces
        them runs (its `basicConfig()` configures logging afresh, nothing prints twice); kept, to
        `reinstate` them if that code fails."""
        registry = _registry()
        for c in self.collectors if registry is not None else ():
            with contextlib.suppress(KeyError):
                registry.unregister(c)
        for logger, handler in self.handlers:
            logger.removeHandler(handler)

    def reinstate(self) -> None:
        registry = _registry()
        for c in self.collectors if registry is not None else ():
            with contextlib.suppress(ValueError):
                registry.register(c)
        for logger, handler in self.handlers:
            logger.addHandler(handler)

    def drop(self) -> None:
        """This version is gone: its collectors leave the registry, its handlers their loggers."""
        self.withdraw()
        self.collectors.clear()
        for logger, handler in self.handlers:
            logger.removeHandler(handler)
            if not any(handler in lg.handlers for lg, _ in self.handlers):
                with contextlib.suppress(Exception):
                    handler.close()
        self.handlers.clear()


def settle(fresh: Owned, modules: dict[str, Any]) -> None:
    """After a method swap: where the new modules hold an old collector (carried, with its counts)
    registered under the same names as a fresh one their import made, the old one is registered."""
    registry = _registry()
    if registry is None or not fresh.collectors:
        return
    held = [v for m in modules.values() for v in list(vars(m).values())
            if type(v).__module__.startswith("prometheus_client") and v not in fresh.collectors]
    for new in list(fresh.collectors):
        names = registry._collector_to_names.get(new)
        for old in held:
            try:
                same = registry._get_names(old) == names
            except Exception:
                same = False
            if same:
                registry.unregister(new)
                with contextlib.suppress(ValueError):
                    registry.register(old)
                fresh.collectors[fresh.collectors.index(new)] = old
                break
